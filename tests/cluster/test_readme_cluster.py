"""(cluster: the README's cluster block run against a local Ray head and MLflow server) The README's shell blocks, checked with the real parsers, and its cluster recipe run for real.

Every fenced ```bash / ```sh / ```shell / ```zsh / ```console block of README.md is split into
commands (line continuations, `&&`, `||`, `;`, `|`, `FOO=bar cmd`, comments, redirections) and
each command is parsed by the parser of the program it calls: `segpipe` by pipeline/cli.py's
argparse, its `-S` overrides validated against params.yaml by pipeline.config.load_params; `dvc`
by DVC's own parser (so `dvc repro -S` fails); `ray job submit` by Ray's click command, its files
checked and its entrypoint checked as a segpipe command; `make` against the Makefile's targets.
Every block passes `bash -n` (and `zsh -n` where zsh is installed); a `-S` value holding [ ] { } *
is quoted.

The slow test runs the blocks the README marks with `<!-- tests/cluster/test_readme_cluster.py runs this block -->`
(the cluster recipe: data and weights on shared storage, the whole comparison as ONE `ray job
submit`, the report) against a Ray head and a `segpipe mlflow-server` it starts, with the
substitutions declared in SUBSTITUTIONS / TINY_SETS below and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.support import TINY

README = ROOT / "README.md"
RUN_MARK = "<!-- tests/cluster/test_readme_cluster.py runs this block -->"
SHELLS = ("bash", "sh", "shell", "zsh", "console")
BIN = Path(sys.executable).parent

# -p files the README names that a command of the README writes first (not in a fresh clone)
GENERATED = {"reports/tune/deeplabv3/best_params.yaml": "segpipe tune --family deeplabv3"}
# placeholder paths of the README that the params schema requires to exist (data.source,
# data.sbd_source): validated against empty stand-ins of the same names in a temp dir
PLACEHOLDER_ROOTS = ("/datasets/",)


# ------------------------------------------------------------------------------ the README


@dataclass
class Block:
    lang: str
    line: int            # 1-based line of the opening fence
    text: str            # dedented body (console: the `$ ` commands only)
    marked: bool         # preceded by RUN_MARK
    section: str         # the `## ` heading it is under


def readme_blocks(text: str | None = None) -> list[Block]:
    lines = (README.read_text() if text is None else text).splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        m = re.match(r"^(\s*)```(\w*)\s*$", line)
        if not m:
            i += 1
            continue
        indent, lang = len(m.group(1)), m.group(2)
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            j += 1
        body = [b[indent:] if b[:indent].strip() == "" else b for b in lines[i + 1:j]]
        if lang in SHELLS:
            if lang == "console":
                body = [b[2:] for b in body if b.startswith("$ ")]
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            blocks.append(Block(lang, i + 1, "\n".join(body) + "\n", prev == RUN_MARK, section))
        i = j + 1
    return blocks


_OPS = {"&&", "||", ";", "|", "&", "|&", ";;"}
_REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "<&", "&>", "&>>", ">|"}
_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_commands(script: str) -> list[list[str]]:
    """Shell text -> simple commands as argv lists: continuations joined, comments dropped, split
    at && || ; | &, redirections (and their targets) and leading VAR=value assignments removed."""
    script = script.replace("\\\n", " ")
    commands: list[list[str]] = []
    for logical in script.splitlines():
        logical = re.sub(r"(?<!\S)\d+(?=[<>])", " ", logical)  # `2>&1`: the fd number is no argument
        lex = shlex.shlex(logical, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        lex.commenters = "#"
        cmd: list[str] = []
        tokens = list(lex)
        k = 0
        while k < len(tokens):
            tok = tokens[k]
            if tok in _OPS:
                commands.append(cmd)
                cmd = []
            elif tok in _REDIRECTS or (tok and set(tok) <= set("<>&") and tok not in _OPS):
                k += 1  # the redirection's target
            else:
                cmd.append(tok)
            k += 1
        commands.append(cmd)
    out = []
    for cmd in commands:
        while cmd and _ASSIGN.match(cmd[0]):
            cmd = cmd[1:]
        if cmd:
            out.append(cmd)
    return out


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


BLOCKS = readme_blocks()


def _id(b: Block) -> str:
    return f"L{b.line}-{b.lang}"


# CPUs of the instance types the launcher example names (Ray counts vCPUs)
INSTANCE_CPUS = {"g5.xlarge": 4, "m6i.2xlarge": 8}


# ------------------------------------------------------------------------------ the recipe, for real


def substitutions(head: str, mlflow: str, shared: Path) -> dict[str, str]:
    """Everything the slow test changes in the README's commands (in every argument)."""
    return {"http://HEAD:8265": head, "http://HEAD:5000": mlflow, "/shared/": f"{shared}/"}


def tiny_sets() -> list[str]:
    """Appended as -S to every segpipe command of the marked blocks: tiny synthetic data, two tiny
    families, one seed, one epoch, 0.5-CPU workers (the README's 4 CPUs + 1 GPU per worker do not
    fit a 2-core test Ray). Paths, the tracking URI and ray.num_workers stay the README's."""
    fams = {f: {"model": TINY[f][0], "options": TINY[f][1]} for f in ("unet", "lraspp")}
    return ["data.source=synthetic", "data.synthetic.train_count=16", "data.synthetic.val_count=6",
            "data.synthetic.size=64", "data.row_group_rows=5", "train.epochs=1", "train.batch_size=4",
            "train.crop_size=64", "train.eval_size=64", "train.loader_workers=0", "train.sample_images=1",
            "train.bn_momentum=0.1", "ray.cpus_per_worker=0.5", f"families={json.dumps(fams)}", "seeds=[0]",
            "report.latency_repeats=2", "report.sample_images=1"]


def runnable_script(blocks: list[Block], subs: dict[str, str], extra: list[str]) -> str:
    lines = ["set -euo pipefail"]
    for b in blocks:
        for cmd in split_commands(b.text):
            for k, v in subs.items():
                cmd = [t.replace(k, v) for t in cmd]
            assert not any("HEAD" in t or re.search(r"(^|=)/shared/", t) for t in cmd), cmd  # nothing left behind
            if "segpipe" in cmd:
                cmd = cmd + sum((["-S", o] for o in extra), [])
            lines.append(shlex.join(cmd))
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_the_cluster_recipe_runs_as_written(tmp_path):
    """A fresh copy of the checkout, a Ray head and an MLflow server started here; the README's
    marked blocks run by bash in the copy with the declared substitutions; one `ray job submit`
    trains every family x seed; the job SUCCEEDED and its runs are in the tracking server."""
    from tests.support import _env, _free_port, _rest, _stop_tree, _wait_http

    # a fresh checkout: the tracked (and untracked, not ignored) files, as `git clone` would give
    clone = tmp_path / "segpipe"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    shared = tmp_path / "shared"
    shared.mkdir()

    env = dict(_env(), PYTHONPATH=str(clone))
    procs: list[subprocess.Popen] = []
    ray_tmp = Path(__import__("tempfile").mkdtemp(prefix="rr", dir="/tmp"))  # short: Ray's sockets
    try:
        # the Ray head (as tests/cluster/test_cluster.py's ray_head: own temp dir and ports)
        ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "node-manager-port",
                                            "object-manager-port", "dashboard-agent-listen-port",
                                            "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")}
        base = 20000 + ((os.getpid() + 97) % 200) * 100
        hlog = ray_tmp / "head.log"
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--temp-dir={ray_tmp}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats",
             f"--min-worker-port={base}", f"--max-worker-port={base + 99}", *(f"--{k}={v}" for k, v in ports.items())],
            env=env, stdout=open(hlog, "w"), stderr=subprocess.STDOUT, start_new_session=True))
        head = f"http://127.0.0.1:{ports['dashboard-port']}"
        # the tracking server: step 2's command, on 127.0.0.1 without --auth (test_cluster's
        # two-host test covers --auth), its store on the "shared" volume
        mport = _free_port()
        mlog = tmp_path / "mlflow.log"
        procs.append(subprocess.Popen(
            [str(BIN / "segpipe"), "mlflow-server", "--port", str(mport), "--artifacts-destination",
             str(shared / "mlartifacts"), "-S", f"mlflow.tracking_uri=sqlite:///{shared / 'mlflow.db'}"],
            cwd=clone, env=env, stdout=open(mlog, "w"), stderr=subprocess.STDOUT))
        mlflow = f"http://127.0.0.1:{mport}"
        _wait_http(head + "/api/version", 120, procs[0], hlog)
        _wait_http(mlflow + "/health", 120, procs[1], mlog)

        script = runnable_script([b for b in BLOCKS if b.marked], substitutions(head, mlflow, shared), tiny_sets())
        (tmp_path / "recipe.sh").write_text(script)
        t0 = time.time()
        proc = subprocess.run(["bash", str(tmp_path / "recipe.sh")], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=900)
        took = time.time() - t0
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{script}\n{out[-6000:]}"
        print(f"\nthe README's cluster recipe ran in {took:.0f}s")

        # one job, SUCCEEDED, that ran train --all
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(head).list_jobs()
        assert [(str(j.status), j.entrypoint.split()[:3]) for j in jobs] == [("SUCCEEDED", ["segpipe", "train", "--all"])]
        assert "[unet/seed0] done: val mIoU" in out and "[lraspp/seed0] done: val mIoU" in out, out[-4000:]
        assert "train --all: 2/2 runs finished" in out

        # the runs are in the tracking server, with their artifacts; the report read them from it
        exp = _rest(mlflow, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=segpipe")["experiment"]
        runs = _rest(mlflow, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
        assert sorted((t["family"], t["seed"], t["stage"]) for t in tags) == [("lraspp", "0", "train"), ("unet", "0", "train")]
        assert all(r["info"]["status"] == "FINISHED" and any(m["key"] == "val/mIoU" for m in r["data"]["metrics"])
                   for r in runs)
        assert list((shared / "mlartifacts").rglob("confusion_matrix.png"))
        # where the README put things: shards, checkpoints, DVC outputs and the report on /shared
        assert (shared / "data" / "shards" / "manifest.json").is_file()
        assert list((shared / "ray_results").rglob("checkpoint_*"))
        assert {p.name for p in (shared / "models").iterdir()} == {"unet-seed0.pt", "lraspp-seed0.pt"}
        comparison = json.loads((shared / "reports" / "comparison.json").read_text())
        assert "unet" in json.dumps(comparison) and "lraspp" in json.dumps(comparison)
    finally:
        for p in reversed(procs):
            _stop_tree(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)
