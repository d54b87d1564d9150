"""The documentation stays true: docs/params.md is what `python -m pipeline.params_doc` renders from the
schema, every module, class, function and path that docs/architecture.md and the guides name exists,
and the README and architecture.md stay short enough to read.

Names are taken from the `code spans` of the pages. A span is checked when it is one of:
- a dotted name rooted in our code: `pipeline.x.y`, `seg_models.x`, `benchmarks.x`, or a pipeline
  module or package written without the prefix (`storage.swap_in`, `training.job.fit`,
  `data.loaders.verify_shards`), or a module known by its last name when that name is unique
  (`setup.build`, `dist.all_reduce`); a call's arguments are dropped (`swap_in(new, dest)`).
  Spans that are params.yaml keys (`data.tune_split`, `train.lr`) are not names;
- a path in the repo: `pipeline/x/y.py`, `seg_models/x.py`, `tests/.../test_x.py[::test_name]`,
  `benchmarks/...`, `cluster/...`, `profiles/...`, `docs/...` (paths with a placeholder such as
  `<family>` or `*` are skipped);
- in architecture.md, a call of a bare name, `Name(...)`: it must be defined in pipeline/, seg_models/
  or benchmarks/.
"""

from __future__ import annotations

import ast
import importlib
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
PACKAGES = ("pipeline", "seg_models", "benchmarks")
PATH_ROOTS = ("pipeline/", "seg_models/", "benchmarks/", "tests/", "cluster/", "profiles/", "docs/")
MAX_LINES = {"README.md": 300, "docs/architecture.md": 300}


# ------------------------------------------------------------------------------ docs/params.md


def test_params_reference_is_current():
    from pipeline import params_doc

    assert (DOCS / "params.md").read_text() == params_doc.render(), \
        "docs/params.md is stale: run `python -m pipeline.params_doc --write`"


def test_params_reference_covers_every_key_of_params_yaml():
    import yaml

    from pipeline import params_doc

    keys = {r[0] for r in params_doc.rows()}

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and v and prefix + k not in ("families", "tune.space", "train.model_options"):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield prefix + k

    missing = sorted(set(leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))) - keys)
    assert not missing, missing
    undescribed = [r[0] for r in params_doc.rows() if not r[4]]
    assert not undescribed, f"add Field(description=...) in pipeline/config.py for: {undescribed}"


def test_params_doc_check_flags_a_stale_page(tmp_path, monkeypatch, capsys):
    from pipeline import params_doc

    monkeypatch.setattr(params_doc, "DOC", tmp_path / "params.md")
    assert params_doc.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert params_doc.main(["--write"]) == 0
    assert params_doc.main(["--check"]) == 0


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("page", sorted(MAX_LINES))
def test_the_readme_and_architecture_stay_short(page):
    n = len((ROOT / page).read_text().splitlines())
    assert n <= MAX_LINES[page], f"{page} has {n} lines (at most {MAX_LINES[page]})"


def test_the_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    first = lines.index("```bash")
    block = lines[first + 1:lines.index("```", first + 1)]
    assert [line.split()[:2] for line in block] == [["make", "quickstart"], ["make", "test"]]
    assert not any(line.startswith("```") for line in lines[:first])


# ------------------------------------------------------------------------------ names


@cache
def _modules() -> dict[str, str]:
    """Every module of our packages: full dotted name -> the same (plus packages)."""
    out = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        out[pkg] = pkg
        for path in base.rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            out[".".join(parts)] = ".".join(parts)
    return out


@cache
def _by_last_name() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name in _modules():
        out.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return out


@cache
def _params_keys() -> set[str]:
    import yaml

    keys: set[str] = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            keys.add(prefix + str(k))
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    walk(yaml.safe_load((ROOT / "params.yaml").read_text()))
    return keys


@cache
def _defined_names() -> set[str]:
    """Every def / class / assignment in our packages and the tests' own helpers."""
    names: set[str] = set()
    for pkg in PACKAGES + ("tests",):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Assign):
                    names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _candidates(dotted: str) -> list[str] | None:
    """Full module-rooted spellings of a dotted name, or None when it is not a name of our code."""
    first = dotted.split(".")[0]
    if first in PACKAGES:
        return [dotted]
    if f"pipeline.{first}" in _modules():
        return [f"pipeline.{dotted}"]
    homes = _by_last_name().get(first, [])
    if len(homes) == 1 and homes[0] != first:
        return [homes[0] + dotted[len(first):]]
    return None


def resolve(dotted: str) -> bool:
    """Import the longest module prefix of `dotted`, then getattr the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        mod = ".".join(parts[:i])
        if mod not in _modules():
            continue
        try:
            obj = importlib.import_module(mod)
        except ImportError:
            return False
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                if isinstance(obj, type) and attr in getattr(obj, "model_fields", {}):
                    return True  # a pydantic field
                return False
            obj = getattr(obj, attr)
        return True
    return False


_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
_CALL = re.compile(r"^([A-Za-z_]\w*)\(")
_PATH = re.compile(r"^[\w./-]+(::\w+)?$")
_FILES = (".py", ".md", ".json", ".yaml", ".yml", ".csv", ".png", ".pt", ".db", ".lock", ".txt", ".tar", ".tgz", ".pth")


def _prose(text: str) -> str:
    """The page without its fenced blocks (commands are test_readme.py's)."""
    return re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)


def names_in(page: Path) -> list[tuple[str, str]]:
    """(kind, name) of every checkable reference of a page: kind is `name`, `path` or `call`."""
    out = []
    for span in _SPAN.findall(_prose(page.read_text())):
        span = span.strip()
        if span.startswith(PATH_ROOTS):
            if _PATH.match(span):
                out.append(("path", span))
            continue
        words = span.split("(")[0].split()
        head = words[0] if words else ""
        if _DOTTED.match(head) and not head.endswith(_FILES) and head not in _params_keys() and _candidates(head):
            out.append(("name", head))
        elif page.name == "architecture.md" and (m := _CALL.match(span)):
            out.append(("call", m.group(1)))
    return out


def missing_names(page: Path) -> list[str]:
    bad = []
    for kind, name in names_in(page):
        if kind == "path":
            path, _, test = name.partition("::")
            if not (ROOT / path).exists():
                bad.append(name)
            elif test and not re.search(rf"^\s*(async )?def {re.escape(test)}\b", (ROOT / path).read_text(), re.M):
                bad.append(name)
        elif kind == "call":
            if name not in _defined_names():
                bad.append(f"{name}()")
        elif not any(resolve(c) for c in _candidates(name)):
            bad.append(name)
    return sorted(set(bad))


def test_architecture_names_things_the_checker_sees():
    kinds = {k for k, _ in names_in(DOCS / "architecture.md")}
    assert kinds == {"name", "path", "call"}, kinds


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_name_the_docs_mention_exists(page):
    bad = missing_names(page)
    assert not bad, f"{page.relative_to(ROOT)} names what does not exist: {bad}"


def test_the_name_checker_bites(tmp_path):
    page = tmp_path / "architecture.md"
    page.write_text("`pipeline.storage.swap_in`, `storage.no_such_thing`, `pipeline/nope.py`, "
                    "`train.lr`, `data.tune_split`, `setup.build(cfg)`, `NoSuchClass(x)`, `ray.init`\n"
                    "```bash\nsegpipe `pipeline.hidden`\n```\n")
    assert missing_names(page) == ["NoSuchClass()", "pipeline/nope.py", "storage.no_such_thing"]
