"""The shell blocks of the README and of the guides in docs/, checked with the real parsers.

Every fenced ```bash / ```sh / ```shell / ```zsh / ```console block of README.md and docs/*.md is split into
commands (line continuations, `&&`, `||`, `;`, `|`, `FOO=bar cmd`, comments, redirections) and
each command is parsed by the parser of the program it calls: `segpipe` by pipeline/cli.py's
argparse, its `-S` overrides validated against params.yaml by pipeline.config.load_params; `dvc`
by DVC's own parser (so `dvc repro -S` fails); `ray job submit` by Ray's click command, its files
checked and its entrypoint checked as a segpipe command; `make` against the Makefile's targets.
Every block passes `bash -n` (and `zsh -n` where zsh is installed); a `-S` value holding [ ] { } *
is quoted.

The blocks docs/cluster.md marks with `<!-- tests/cluster/test_readme_cluster.py runs this block -->`
are run for real by that test, with the substitutions declared in tests/support/readme.py
(substitutions / tiny_sets) and nothing else; the README's parsing (blocks, commands) is there too.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.paths import ROOT
from tests.support.readme import BLOCKS, RUN_MARK, Block, readme_blocks, split_commands

# -p files the README names that a command of the README writes first (not in a fresh clone)
GENERATED = {"reports/tune/deeplabv3/best_params.yaml": "segpipe tune --family deeplabv3"}
# placeholder paths of the README that the params schema requires to exist (data.source,
# data.sbd_source): validated against empty stand-ins of the same names in a temp dir
PLACEHOLDER_ROOTS = ("/datasets/",)


# ------------------------------------------------------------------------------ the checkers


def _placeholders(tmp: Path, overrides: list[str]) -> list[str]:
    """Map /datasets/... values onto empty stand-ins under tmp (same names, same kind)."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        for root in PLACEHOLDER_ROOTS:
            if value.startswith(root):
                stand_in = tmp / value[len(root):]
                name = stand_in.name
                if name.endswith((".tar", ".tgz", ".tar.gz")):
                    stand_in.parent.mkdir(parents=True, exist_ok=True)
                    stand_in.touch()
                elif key == "data.source":
                    (stand_in / "VOCdevkit").mkdir(parents=True, exist_ok=True)
                else:
                    stand_in.mkdir(parents=True, exist_ok=True)
                value = str(stand_in)
        out.append(f"{key}={value}")
    return out


def check_segpipe(args: list[str], tmp: Path) -> None:
    from pipeline.cli import build_parser
    from pipeline.config import load_params

    ns = build_parser().parse_args(args)  # unknown stage / flag -> UserError
    assert ns.stage, args
    params = ROOT / ns.params
    if ns.params in GENERATED:
        params = ROOT / "params.yaml"  # written by an earlier command; its keys are params.yaml's
    else:
        assert params.is_file(), f"-p {ns.params} does not exist"
    load_params(params, _placeholders(tmp, ns.overrides))  # unknown key / bad value -> ParamsError
    if getattr(ns, "profile", None):
        assert (ROOT / "profiles" / f"{ns.profile}.yaml").is_file(), ns.profile


def check_dvc(args: list[str]) -> None:
    from dvc.cli import parse_args

    parse_args(args)  # DvcParserError on anything DVC does not take (e.g. `dvc repro -S`)


def check_ray(args: list[str], tmp: Path) -> None:
    from ray.dashboard.modules.job.cli import job_cli_group

    if args[:1] != ["job"]:
        return
    sub = job_cli_group.commands[args[1]]
    ctx = sub.make_context(args[1], list(args[2:]))  # click's own parsing: unknown options raise
    if args[1] == "submit":
        p = ctx.params
        for key in ("runtime_env", "working_dir"):
            if p[key]:
                assert (ROOT / p[key]).exists(), f"--{key.replace('_', '-')} {p[key]} does not exist"
        entry = list(p["entrypoint"])
        assert entry and entry[0] == "segpipe", f"the job's entrypoint is not a segpipe command: {entry}"
        check_segpipe(entry[1:], tmp)


def check_make(args: list[str]) -> None:
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+):", (ROOT / "Makefile").read_text(), re.M))
    for t in [a for a in args[1:] if not a.startswith("-") and "=" not in a]:
        assert t in targets, f"make {t}: no such target in the Makefile"


def check_command(cmd: list[str], tmp: Path) -> str | None:
    """Check one command; returns the program name when a parser checked it."""
    prog = os.path.basename(cmd[0])
    if prog == "segpipe":
        check_segpipe(cmd[1:], tmp)
    elif prog == "dvc":
        check_dvc(cmd[1:])
    elif prog == "ray":
        check_ray(cmd[1:], tmp)
    elif prog == "make":
        check_make(cmd)
    else:
        return None
    return prog


def unquoted_yaml_values(block_text: str) -> list[str]:
    """-S values holding [ ] { } * that the shell would see unquoted (globs / brace expansion)."""
    bad = []
    for logical in block_text.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(logical, posix=False)  # keeps the quotes in the tokens
        lex.whitespace_split = True
        lex.commenters = "#"
        tokens = list(lex)
        for flag, value in zip(tokens, tokens[1:]):
            if flag in ("-S", "--set", "--set-param") and re.search(r"[\[\]{}*]", value) and value[0] not in "'\"":
                bad.append(value)
    return bad


# ------------------------------------------------------------------------------ the static tests


def _id(b: Block) -> str:
    return f"{b.page}:L{b.line}-{b.lang}"


def test_readme_has_shell_blocks_and_the_marked_cluster_recipe():
    assert len(BLOCKS) >= 15
    marked = [b for b in BLOCKS if b.marked]
    assert [(b.page, b.section) for b in marked] == [("docs/cluster.md", "Run on a cluster")] * 3, \
        [(b.page, b.line, b.section) for b in marked]
    assert {b.page for b in BLOCKS} >= {"README.md", "docs/cluster.md", "docs/training.md", "docs/tune.md"}
    cmds = [c for b in marked for c in split_commands(b.text)]
    submits = [c for c in cmds if c[:3] == ["ray", "job", "submit"]]
    # the whole comparison is ONE submission: train --all
    assert len(submits) == 1 and submits[0][submits[0].index("--") + 1:][:3] == ["segpipe", "train", "--all"]


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_every_command_parses_with_the_real_parsers(block, tmp_path):
    cmds = split_commands(block.text)
    assert cmds, block.text
    checked = [check_command(c, tmp_path) for c in cmds]
    if "segpipe" in block.text or "dvc " in block.text:
        assert any(checked), (block.line, cmds)


@pytest.mark.parametrize("block", BLOCKS, ids=_id)
def test_every_block_is_valid_shell(block, tmp_path):
    script = tmp_path / "block.sh"
    script.write_text(block.text)
    shells = ["bash"] + (["zsh"] if shutil.which("zsh") else [])
    for sh in shells:
        proc = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{sh} -n {block.page}:{block.line}: {proc.stderr}"
    assert not unquoted_yaml_values(block.text), f"{block.page}:{block.line}: quote these -S values: " \
                                                 f"{unquoted_yaml_values(block.text)}"


def test_the_cluster_recipe_uses_one_data_dir_and_one_set_of_weights():
    """fetch, preprocess, the job and the report name the same data.dir, and the weights the job
    loads are the files `fetch --weights` put on shared storage."""
    from pipeline.cli import build_parser

    sets: dict[str, list[dict[str, str]]] = {}
    for b in (b for b in BLOCKS if b.marked):
        for cmd in split_commands(b.text):
            args = cmd[cmd.index("--") + 2:] if cmd[:3] == ["ray", "job", "submit"] else cmd[1:] if cmd[0] == "segpipe" else None
            if args is None:
                continue
            ns = build_parser().parse_args(args)
            name = ns.stage + (" --weights" if getattr(ns, "weights", False) else "") + (" --all" if getattr(ns, "all", False) else "")
            sets.setdefault(name, []).append(dict(o.split("=", 1) for o in ns.overrides))
    assert set(sets) == {"fetch", "preprocess", "fetch --weights", "train --all", "report"}, set(sets)
    dirs = {s.get("data.dir") for k, v in sets.items() if k != "fetch --weights" for s in v}
    assert len(dirs) == 1 and dirs.pop().startswith("/shared/"), sets
    weights = lambda s: {k: v for k, v in s.items() if k.endswith(".backbone_weights")}  # noqa: E731
    fetched, trained = weights(sets["fetch --weights"][0]), weights(sets["train --all"][0])
    assert fetched == trained and len(fetched) == 4 and all(v.startswith("/shared/") for v in fetched.values())
    # every command that talks to the tracking server names it by the head's address
    assert {sets[k][0]["mlflow.tracking_uri"] for k in ("train --all", "report")} == {"http://HEAD:5000"}


# CPUs of the instance types the launcher example names (Ray counts vCPUs)
INSTANCE_CPUS = {"g5.xlarge": 4, "m6i.2xlarge": 8}


def test_the_worker_counts_fit_the_example_clusters():
    """The README's train --all (and the RayJob's) asks per run for ray.num_workers x {CPU:
    ray.cpus_per_worker, GPU: 1}: each bundle fits one GPU node of either example cluster, and the
    whole group fits the GPUs each cluster can have."""
    import yaml

    from pipeline.cli import build_parser

    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    gpu = launcher["available_node_types"]["gpu_worker"]
    rayjob = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    clusters = {"ray-cluster.yaml": (INSTANCE_CPUS[gpu["node_config"]["InstanceType"]], gpu["max_workers"]),
                "rayjob.yaml": (int(limits["cpu"]), group["maxReplicas"] * int(limits["nvidia.com/gpu"]))}
    submit = next(c for b in BLOCKS if b.marked for c in split_commands(b.text) if c[:3] == ["ray", "job", "submit"])
    entrypoints = {"README": submit[submit.index("--") + 2:],
                   "rayjob.yaml": shlex.split(rayjob["spec"]["entrypoint"])[1:]}
    for where, args in entrypoints.items():
        ns = build_parser().parse_args(args)
        sets = dict(o.split("=", 1) for o in ns.overrides)
        workers, cpus = int(sets["ray.num_workers"]), float(sets["ray.cpus_per_worker"])
        for name, (node_cpus, gpus) in clusters.items():
            assert cpus <= node_cpus and workers <= gpus, (where, name, workers, cpus, node_cpus, gpus)


def test_the_checker_refuses_what_it_should(tmp_path):
    """The checks bite: a wrong flag, a wrong key, dvc repro -S, a missing runtime env, a missing
    make target, an unquoted list, a broken line."""
    from dvc.cli import DvcParserError

    from pipeline.errors import UserError

    def check(line):
        for c in split_commands(line):
            check_command(c, tmp_path)

    check("segpipe train --all -S ray.num_workers=2 && dvc exp run -S ray.address=auto | tee log  # ok")
    with pytest.raises(UserError):
        check("segpipe train --everything")
    with pytest.raises(UserError, match="unknown key"):
        check("segpipe fetch -S data.directory=/shared/data")
    with pytest.raises(DvcParserError):
        check("dvc repro -S ray.address=auto")
    with pytest.raises(AssertionError, match="does not exist"):
        check("ray job submit --address http://HEAD:8265 --runtime-env cluster/nope.yaml -- segpipe train")
    with pytest.raises(AssertionError, match="entrypoint"):
        check("ray job submit --address http://HEAD:8265 -- python train.py")
    with pytest.raises(AssertionError, match="no such target"):
        check("make quickstrat")
    assert split_commands("FOO=1 BAR=2 segpipe ui --port 5001 2>&1 > log; make test") == \
        [["segpipe", "ui", "--port", "5001"], ["make", "test"]]
    assert unquoted_yaml_values("segpipe tune -S tune.families=[deeplabv3]") == ["tune.families=[deeplabv3]"]
    assert not unquoted_yaml_values("segpipe tune -S 'tune.families=[deeplabv3]'")
    assert readme_blocks("## X\n" + RUN_MARK + "\n   ```bash\n   ray job logs <submission id>\n   ```\n")[0].marked
