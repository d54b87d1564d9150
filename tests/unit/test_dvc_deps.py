"""dvc.yaml's deps cover the code each stage runs (no DVC run): every pipeline/ and seg_models/ file
that a stage's command imports, directly or through other modules, at module top or inside a
function, is under one of that stage's deps, so a change to it re-runs the stage. The import graph
is read from the source at test time (ast), not from a list kept by hand."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.cli import STAGES
from tests.support.paths import ROOT

OURS = ("pipeline", "seg_models")


def _module_file(name: str) -> Path | None:
    """The file of one of our modules, found without importing anything (None: not a module,
    e.g. a function named in `from pkg import name`)."""
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts if rel.name == "__init__" else parts[:-1])


def _imported(path: Path) -> set[str]:
    """Module names one file imports (absolute and relative, anywhere in the file)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(path).split(".")
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {n for n in names if n.split(".")[0] in OURS}


def import_closure(module: str) -> set[Path]:
    """Every file of ours that importing `module` and calling into it can load (parent packages'
    __init__ included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a module loads each parent package first
            f = _module_file(".".join(parts[:i]))
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_imported(f))
    return seen


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _stage_module(stage: dict) -> str:
    cmd = stage["cmd"].split()
    assert cmd[0] == "segpipe", stage["cmd"]
    return STAGES[cmd[1]]


@pytest.mark.parametrize("name", sorted(_stages()))
def test_every_imported_file_of_a_stage_is_under_its_deps(name):
    stage = _stages()[name]
    deps = [ROOT / d for d in stage["deps"] if "${" not in d]
    files = import_closure(_stage_module(stage)) | import_closure("pipeline.cli")  # the command runs through cli
    assert len(files) > 3
    uncovered = sorted(str(f.relative_to(ROOT)) for f in files
                       if not any(f == d or d in f.parents for d in deps))
    assert not uncovered, f"dvc.yaml stage {name!r}: add deps covering {uncovered}"
    missing = [str(d.relative_to(ROOT)) for d in deps if d.relative_to(ROOT).parts[0] in OURS and not d.exists()]
    assert not missing, f"dvc.yaml stage {name!r} names deps that do not exist: {missing}"


def test_the_closure_follows_imports_inside_functions():
    """The walker sees lazy imports (stages import their layers inside run())."""
    files = {str(f.relative_to(ROOT)) for f in import_closure("pipeline.stages.preprocess")}
    assert "pipeline/data/shards.py" in files and "pipeline/data/voc.py" in files
    assert "pipeline/__init__.py" in files
