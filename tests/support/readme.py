"""The shell blocks of the README and of every docs/*.md guide as data: the fenced blocks (which are
marked for the cluster test),
their simple commands, and the substitutions that make the marked blocks a runnable script for
tests/cluster/test_readme_cluster.py. The checks of every command are tests/unit/test_readme.py."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import ROOT
from tests.support.training import TINY

README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
RUN_MARK = "<!-- tests/cluster/test_readme_cluster.py runs this block -->"
SHELLS = ("bash", "sh", "shell", "zsh", "console")


@dataclass
class Block:
    lang: str
    line: int            # 1-based line of the opening fence
    text: str            # dedented body (console: the `$ ` commands only)
    marked: bool         # preceded by RUN_MARK
    section: str         # the `# ` / `## ` heading it is under
    page: str = "README.md"  # the page, relative to the repo


def readme_blocks(text: str | None = None, page: str = "README.md") -> list[Block]:
    lines = ((ROOT / page).read_text() if text is None else text).splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"^#{1,2} (.*)", line):
            section = m.group(1).strip()
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
            blocks.append(Block(lang, i + 1, "\n".join(body) + "\n", prev == RUN_MARK, section, page))
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


BLOCKS = [b for page in PAGES for b in readme_blocks(page=str(page.relative_to(ROOT)))]


def substitutions(head: str, mlflow: str, shared: Path, runtime_env: Path) -> dict[str, str]:
    """Everything the slow test changes in the README's commands (in every argument): the head's
    and the server's addresses, /shared, and the runtime env: the README's "own, uncommitted copy"
    of cluster/runtime_env.yaml with the credentials of the --auth server."""
    return {"http://HEAD:8265": head, "http://HEAD:5000": mlflow, "/shared/": f"{shared}/",
            "cluster/runtime_env.yaml": str(runtime_env)}


def tiny_sets() -> list[str]:
    """Appended as -S to every segpipe command of the marked blocks: tiny synthetic data, two tiny
    families, one seed, one epoch, 0.5-CPU workers (the README's 4 CPUs + 1 GPU per worker do not
    fit a 2-core test machine), SPREAD placement (each run's two workers on the test's two hosts,
    so its collectives cross the veth pair). Paths, the tracking URI and ray.num_workers stay the
    README's."""
    fams = {f: {"model": TINY[f][0], "options": TINY[f][1]} for f in ("unet", "lraspp")}
    return ["data.source=synthetic", "data.synthetic.train_count=16", "data.synthetic.val_count=6",
            "data.synthetic.size=64", "data.row_group_rows=5", "train.epochs=1", "train.batch_size=4",
            "train.crop_size=64", "train.eval_size=64", "train.loader_workers=0", "train.sample_images=1",
            "train.bn_momentum=0.1", "ray.cpus_per_worker=0.5", "ray.placement_strategy=SPREAD",
            f"families={json.dumps(fams)}", "seeds=[0]",
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
