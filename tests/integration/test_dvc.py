"""The DVC pipeline for real: `dvc repro preprocess` in a fresh copy, then a no-op second run."""

import json
import os
import shutil
import subprocess

import yaml

from tests.support.paths import BIN, ROOT


def _run(cmd, cwd):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_dvc_repro_preprocess_then_noop(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("pipeline", "seg_models", "assets", "profiles"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["source"] = "sample"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _run(["git", "init", "-q"], repo).returncode == 0
    assert _run([str(BIN / "dvc"), "init", "-q"], repo).returncode == 0
    _run([str(BIN / "dvc"), "config", "core.analytics", "false"], repo)

    first = _run([str(BIN / "dvc"), "repro", "preprocess"], repo)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'fetch'" in first.stdout and "Running stage 'preprocess'" in first.stdout
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 7 and manifest["source"] == "sample"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["fetch"]["params"]["params.yaml"]["data.source"] == "sample"

    second = _run([str(BIN / "dvc"), "repro", "preprocess"], repo)
    assert second.returncode == 0, second.stderr
    assert "Running stage" not in second.stdout, second.stdout
    assert "didn't change" in second.stdout or "up to date" in second.stdout

    # a param change re-runs exactly the stage that depends on it
    params["data"]["row_group_rows"] = 50
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run([str(BIN / "dvc"), "repro", "preprocess"], repo)
    assert third.returncode == 0, third.stderr
    assert "Running stage 'preprocess'" in third.stdout and "Running stage 'fetch'" not in third.stdout

    # a code change in a package folder the stage depends on re-runs it (deps name folders, not files)
    shards = repo / "pipeline" / "data" / "shards.py"
    shards.write_text(shards.read_text() + "\n# touched\n")
    fourth = _run([str(BIN / "dvc"), "repro", "preprocess"], repo)
    assert fourth.returncode == 0, fourth.stderr
    assert "Running stage 'preprocess'" in fourth.stdout, fourth.stdout


def test_report_runs_after_every_train_and_tune_stage():
    """`dvc repro` orders report after the whole train and tune matrices: the comparison has its tune section."""
    dot = _run([str(BIN / "dvc"), "dag", "--dot", "report"], ROOT)
    assert dot.returncode == 0, dot.stderr
    into_report = {line.split("->")[0].strip().strip('"') for line in dot.stdout.splitlines() if '-> "report"' in line}
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert {f"tune@{f}" for f in params["tune"]["families"]} <= into_report, into_report
    assert {f"train@{f}-{s}" for f in params["families"] for s in params["seeds"]} <= into_report, into_report
