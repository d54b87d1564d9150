"""The layer rules of docs/architecture.md, checked on the source: which third-party frameworks each
part of pipeline/ may import (every import statement, also those inside functions), seg_models'
purity, module and function size."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

# framework -> where it may be imported (paths relative to pipeline/; a trailing / means the package)
ALLOWED = {
    "mlflow": ("tracking/",),
    "matplotlib": ("reporting/figures.py", "reporting/tune_figures.py"),
    "ray": ("training/", "tuning/", "system.py"),
}
MAX_MODULE_LINES = 400
EXEMPT_MODULES = {"config.py"}  # the params schema: a data table of fields
MAX_FUNCTION_LINES = 65


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def _allowed(rel: str, places: tuple[str, ...]) -> bool:
    return any(rel.startswith(p) if p.endswith("/") else rel == p for p in places)


def pipeline_files():
    return sorted(PIPELINE.rglob("*.py"))


def test_frameworks_are_imported_only_in_their_layer():
    wrong = []
    for f in pipeline_files():
        rel = f.relative_to(PIPELINE).as_posix()
        for framework in imported_roots(f) & set(ALLOWED):
            if not _allowed(rel, ALLOWED[framework]):
                wrong.append(f"pipeline/{rel} imports {framework} (allowed in: {', '.join(ALLOWED[framework])})")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_a_violation(tmp_path):
    """The checker itself: a stage importing mlflow inside a function is found."""
    f = tmp_path / "x.py"
    f.write_text("def run():\n    import mlflow.tracking\n    from ray import train\n")
    assert {"mlflow", "ray"} <= imported_roots(f)
    assert not _allowed("stages/report.py", ALLOWED["mlflow"])
    assert _allowed("tracking/report.py", ALLOWED["mlflow"])


def test_seg_models_is_pure_pytorch():
    for f in sorted((ROOT / "seg_models").rglob("*.py")):
        bad = imported_roots(f) & {"pipeline", "ray", "mlflow", "dvc", "matplotlib"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_benchmarks_are_not_in_the_installed_package():
    import tomllib

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert not any(p.startswith("benchmarks") for p in find["include"])
    assert not (PIPELINE / "bench.py").exists() and not (PIPELINE / "stages" / "bench_impl.py").exists()


@pytest.mark.parametrize("path", pipeline_files(), ids=lambda p: p.relative_to(PIPELINE).as_posix())
def test_modules_and_functions_stay_small(path):
    rel = path.relative_to(PIPELINE).as_posix()
    lines = len(path.read_text().splitlines())
    if rel not in EXEMPT_MODULES:
        assert lines <= MAX_MODULE_LINES, f"pipeline/{rel}: {lines} lines (split it by responsibility)"
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"pipeline/{rel}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_model_family_has_a_family_record():
    from seg_models.registry import FAMILIES, MODELS

    assert {e.family for e in MODELS.values()} <= set(FAMILIES)
    for fam in FAMILIES.values():
        assert set(fam.variants.values()) <= set(MODELS)
        assert set(fam.torchvision_identical) <= set(MODELS)
