"""The cluster definitions (cluster/*.yaml) parse and run commands the CLI has. The cluster itself,
for real (two hosts in a network namespace, an authenticated tracking server, the README's
`train --all` job, a tune job and a bad-params job): test_readme_cluster.py."""

from __future__ import annotations

import shlex

import pytest
import yaml

from pipeline.cli import build_parser
from tests.support.paths import ROOT


_SHELL_OPS = {">", ">>", "&", "&&", "|", "||", ";", "2>&1"}


def _segpipe_args(command: str) -> list[str] | None:
    """The arguments of the `segpipe ...` call inside a shell command line, if any."""
    tokens = shlex.split(command, comments=True)
    if "segpipe" not in tokens:
        return None
    args = tokens[tokens.index("segpipe") + 1:]
    return args[: next((i for i, t in enumerate(args) if t in _SHELL_OPS), len(args))]


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "rayjob.yaml", "runtime_env.yaml"])
def test_cluster_definitions_parse_and_use_real_commands(name):
    path = ROOT / "cluster" / name
    doc = yaml.safe_load(path.read_text())
    parser = build_parser()
    if name == "rayjob.yaml":
        assert doc["kind"] == "RayJob"
        args = _segpipe_args(doc["spec"]["entrypoint"])
        assert args and args[0] == "train"
        parser.parse_args(args)  # the stage and every flag exist (argparse raises on an unknown one)
        assert doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        # the tracking server by an address every pod reaches, not an env var (it would win over -S)
        assert "MLFLOW_TRACKING_URI" not in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]
        assert "mlflow.tracking_uri=http://mlflow:5000" in args and "--all" in args
    elif name == "ray-cluster.yaml":
        assert {"head", "gpu_worker"} <= set(doc["available_node_types"])
        cmds = [a for a in map(_segpipe_args, doc["setup_commands"] + doc["head_start_ray_commands"]) if a]
        assert [c[0] for c in cmds] == ["mlflow-server"]
        for c in cmds:
            parser.parse_args(c)
        assert "pip install" in " ".join(doc["setup_commands"]) and doc["docker"]["image"]
    else:
        for d in ("data/", ".venv/", "mlruns/"):
            assert d in doc["excludes"]
        assert doc["env_vars"]["PYTHONPATH"] == "."
        # no tracking URI: jobs name the server by the head's address (-S mlflow.tracking_uri=...);
        # an env var here would win over that, and 127.0.0.1 is each node itself
        assert "MLFLOW_TRACKING_URI" not in doc["env_vars"]
