"""params.yaml schema, -p / -S, and the CLI's exit codes and help."""

import pytest
import yaml

from pipeline.config import ParamsError, apply_overrides, flatten, load_params
from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT


def test_committed_params_are_the_full_recipe():
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "voc2012_aug"
    assert set(p.families) == {"fcn", "deeplabv3", "lraspp", "unet"}
    assert p.train.crop_size >= 480


def test_overrides_parse_yaml_values(params_file):
    p = load_params(params_file, ["train.epochs=3", "data.source=sample", "train.model_options.atrous_rates=[6, 12, 18]",
                                  "ray.use_gpu=false"])
    assert p.train.epochs == 3 and p.data.source == "sample"
    assert p.train.model_options == {"atrous_rates": [6, 12, 18]}
    assert p.ray.use_gpu is False


def test_overrides_do_not_touch_the_file(params_file):
    before = params_file.read_text()
    load_params(params_file, ["train.epochs=3"])
    assert params_file.read_text() == before


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.batch_size=-4", "train.batch_size"),
        ("train.epochs=many", "train.epochs"),
        ("data.source=imagenet", "data.source"),
        ("data.source=/no/such/voc.tar", "data.source"),
        ("train.learning_rate=0.1", "train.learning_rate: unknown key"),
        ("data.row_group_rows=500", "data.row_group_rows"),
        ("data.synthetic.classes=[0, 25]", "data.synthetic.classes"),
    ],
)
def test_bad_params_name_the_key(params_file, override, needle):
    with pytest.raises(ParamsError) as exc:
        load_params(params_file, [override])
    assert needle in str(exc.value)


def test_malformed_override_and_missing_file(tmp_path, params_file):
    with pytest.raises(ParamsError, match="dotted.key=value"):
        load_params(params_file, ["train.epochs"])
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_apply_overrides_and_flatten():
    raw = apply_overrides({"a": {"b": 1}}, ["a.c.d=2", "e=x"])
    assert raw == {"a": {"b": 1, "c": {"d": 2}}, "e": "x"}
    assert flatten(raw) == {"a.b": 1, "a.c.d": 2, "e": "x"}
    with pytest.raises(ParamsError):
        apply_overrides({"a": 1}, ["a.b=2"])


@pytest.mark.parametrize("stage", ["fetch", "preprocess"])
def test_bad_params_exit_2_for_every_stage(tmp_path, params_file, stage):
    proc = run_cli(stage, "-p", str(params_file), "-S", "train.batch_size=-1", cwd=tmp_path)
    assert_user_error(proc, "train.batch_size")
    proc = run_cli(stage, "-p", str(tmp_path / "missing.yaml"), cwd=tmp_path)
    assert_user_error(proc, "missing.yaml")
    assert not (tmp_path / "data").exists()


def test_help_explains_each_stage():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for stage in ("fetch", "preprocess", "models", "quickstart"):
        assert stage in proc.stdout
        sub = run_cli(stage, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "-S KEY=VALUE" in sub.stdout, sub.stdout
    assert "data.source" in run_cli("fetch", "--help").stdout


def test_unknown_stage_is_a_user_error():
    assert_user_error(run_cli("frobnicate"), "invalid choice")


def test_quickstart_profile_is_valid_over_params(params_file):
    from pipeline.profiles import profile_overrides

    overrides = profile_overrides("quickstart")
    p = load_params(params_file, overrides)
    assert p.data.source == "synthetic"
    assert p.mlflow.experiment == "segpipe-quickstart"  # its own experiment, never mixed with the recipe's runs
    prof = yaml.safe_load((ROOT / "profiles" / "quickstart.yaml").read_text())
    assert len(overrides) == len(prof) - 1  # every entry but `source` (not a param), `profile` first
    assert "source" in prof and not any(o.startswith("source") for o in overrides)


def test_stage_help_is_the_stage_module_docstring_and_startup_stays_light():
    """`segpipe <stage> --help` shows the stage module's docstring (first line: the one-line help of
    `segpipe --help`); building the parser imports no heavy library."""
    import ast
    import importlib.util
    import subprocess
    import sys

    from pipeline.cli import STAGES, build_parser

    listing = run_cli("--help").stdout
    for name, module in STAGES.items():
        origin = importlib.util.find_spec(module).origin
        doc = ast.get_docstring(ast.parse(open(origin).read()))
        assert doc, f"{module} has no docstring: it is the help of `segpipe {name}`"
        first = doc.splitlines()[0]
        assert first.endswith(".") and not first.startswith("`"), first
        sub = build_parser()._subparsers._group_actions[0].choices[name]
        assert sub.description == doc
        assert " ".join(first.rstrip(".").split()[:3]) in " ".join(listing.split())
    code = ("import sys; from pipeline.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_params_yaml_is_the_one_home_of_defaults(tmp_path):
    """The schema holds no default values: a block built in code or a key missing from a params file
    gets the repo's params.yaml value, and default_params() is that file."""
    from pipeline.config import _Strict, DataParams, Params, default_params

    committed = yaml.safe_load((ROOT / "params.yaml").read_text())
    blocks = [c for c in _Strict.__subclasses__() if c.SECTION is not None]
    assert {c.SECTION for c in blocks} >= {"", "data", "data.synthetic", "train", "mlflow", "ray", "tune"}
    for cls in blocks:
        assert not [n for n, f in cls.model_fields.items() if not f.is_required()], cls  # no value written twice
    p = default_params()
    assert p == Params() == load_params(ROOT / "params.yaml")
    assert p.train.loader_workers == committed["train"]["loader_workers"]
    assert p.ray.num_workers == committed["ray"]["num_workers"] and p.seeds == committed["seeds"]
    assert p.tune.space == committed["tune"]["space"]
    assert DataParams(source="sample").synthetic.size == committed["data"]["synthetic"]["size"]
    partial = dict(committed)
    del partial["ray"]
    partial["train"] = {k: v for k, v in committed["train"].items() if k != "lr"}
    f = tmp_path / "partial.yaml"
    f.write_text(yaml.safe_dump(partial))
    q = load_params(f)
    assert q.ray == p.ray and q.train.lr == committed["train"]["lr"]
    assert default_params(["train.epochs=2"]).train.epochs == 2


def test_mlflow_servers_run_without_the_genai_job_runner_unless_asked(params_file, monkeypatch):
    """segpipe ui / mlflow-server start `mlflow server` with MLflow's job runner off
    (mlflow.server_jobs: false); the knob or MLFLOW_SERVER_ENABLE_JOB_EXECUTION turns it on."""
    from pipeline.tracking import server_env

    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    assert server_env(load_params(params_file)) == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    assert server_env(load_params(params_file, ["mlflow.server_jobs=true"])) == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    assert server_env(load_params(params_file)) == {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true"}


@pytest.mark.parametrize("codes, rc", [((1, 2), 1), ((2, 2), 2)])
def test_failures_are_summed_up_in_one_error_line(monkeypatch, capsys, params_file, codes, rc):
    """`segpipe train --all`'s summary of its runs' outcomes (no Ray: job.train_all replaced by the
    outcomes): every failed run named in one `error:` line; exit 2 only when every failure was bad input."""
    import argparse

    from pipeline.errors import UserError
    from pipeline.stages.train import run_all
    from pipeline.training import job

    outcomes = [job.RunOutcome("lraspp", 0, summary={"mIoU": 0.5, "train_seconds": 3.0, "mlflow_run_id": "abc"}),
                job.RunOutcome("unet", 0, error="loss became NaN at epoch 1 step 2", exit_code=codes[0]),
                job.RunOutcome("unet", 1, error="bad shard", exit_code=codes[1])]
    monkeypatch.setattr(job, "train_all", lambda p, progress=True: outcomes)
    with pytest.raises(UserError) as err:
        run_all(load_params(params_file), argparse.Namespace(all=True, family=None, seed=None, quiet=True))
    assert str(err.value) == "2 of 3 runs failed: unet/seed0: loss became NaN at epoch 1 step 2; unet/seed1: bad shard"
    assert err.value.exit_code == rc
    out = capsys.readouterr().out
    assert "train --all: 1/3 runs finished" in out and "unet/seed1" in out and "FAILED: bad shard" in out
