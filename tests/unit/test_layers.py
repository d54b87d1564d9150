"""The layer rules of docs/architecture.md, checked on the source (every import statement, also those
inside functions): the import order of pipeline's modules and packages (no arrow runs back up),
which third-party frameworks each part may import, public Ray APIs only, no knob defaults outside
params.yaml, seg_models' purity, module and function size."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"

# framework -> where it may be imported (paths relative to pipeline/; a trailing / means the package)
ALLOWED = {
    "mlflow": ("tracking/",),
    "matplotlib": ("figures/",),
    "ray": ("training/", "tuning/", "system.py"),
}

# pipeline's import order, lowest first: a module may import from its own unit and from units of a
# lower rank only (units of one rank are peers that import none of each other). cli reaches the
# stages by name (importlib), not by an import statement.
ORDER = [("errors",), ("storage",), ("config",), ("display", "profiles", "system", "params_doc", "stats"), ("data",),
         ("figures",), ("tracking",), ("training",), ("tuning",), ("reporting",), ("stages",), ("cli",)]
RANK = {unit: i for i, units in enumerate(ORDER) for unit in units}
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


def imported_modules(path: Path) -> set[tuple[str, int]]:
    """Every pipeline module `path` imports, as (dotted name, line): relative imports resolved,
    `from pipeline import storage` read as pipeline.storage."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] != "pipeline":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or (ROOT / Path(*sub.split("."))).is_dir()
                out.add((sub if is_module else base, node.lineno))
    return out


def unit_of(module: str) -> str | None:
    """pipeline.tracking.runs -> tracking; pipeline.config -> config; pipeline -> None (the package)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def order_violations(files) -> list[str]:
    wrong = []
    for f in files:
        rel = f.relative_to(PIPELINE)
        mine = rel.parts[0].removesuffix(".py")
        for module, line in sorted(imported_modules(f)):
            theirs = unit_of(module)
            if theirs is None or theirs == mine:
                continue
            if theirs not in RANK or mine not in RANK:
                wrong.append(f"pipeline/{rel.as_posix()}:{line} imports {module}: {theirs if theirs not in RANK else mine} "
                             "has no place in ORDER (add it to docs/architecture.md and here)")
            elif RANK[theirs] >= RANK[mine]:
                wrong.append(f"pipeline/{rel.as_posix()}:{line} imports {module}: {mine} may import only units "
                             f"below it ({' < '.join('/'.join(u) for u in ORDER)})")
    return wrong


def test_imports_follow_the_layer_order():
    assert not order_violations(pipeline_files()), "\n".join(order_violations(pipeline_files()))


def test_every_unit_of_pipeline_has_a_place_in_the_order():
    units = {p.name.removesuffix(".py") for p in PIPELINE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    assert units - {"__init__"} == set(RANK), sorted((units - {"__init__"}) ^ set(RANK))


def test_the_order_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: training importing reporting (inside a function, or relatively) is found."""
    fake = tmp_path / "pipeline" / "training"
    fake.mkdir(parents=True)
    for name in ("reporting", "data"):
        (tmp_path / "pipeline" / name).mkdir()
    f = fake / "job.py"
    f.write_text("def run():\n    from pipeline.reporting import figures\n"
                 "from ..data import loaders\nfrom pipeline import reporting\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PIPELINE", tmp_path / "pipeline")
    wrong = order_violations([f])
    assert len(wrong) == 2 and all("reporting" in w for w in wrong), wrong


def _ray_privates(path: Path) -> list[str]:
    """`ray._private` / `ray.core.generated` imports, and `_`-attributes read off anything other
    than self / cls in a module that imports ray (Ray objects' private state)."""
    tree = ast.parse(path.read_text())
    found = []
    uses_ray = "ray" in imported_roots(path)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        private = [n for n in names if n.startswith("ray.") and any(p.startswith("_") or p == "generated" for p in n.split(".")[1:])]
        if private:
            found.append(f"{path.name}:{node.lineno} imports {private[0]}")
        if not uses_ray:
            continue
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{path.name}:{node.lineno} reads .{node.attr}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr")
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_")):
            found.append(f"{path.name}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    return found


def test_public_ray_apis_only():
    files = pipeline_files() + sorted((ROOT / "benchmarks").rglob("*.py"))
    found = [w for f in files for w in _ray_privates(f)]
    assert not found, "\n".join(found)


def test_the_ray_check_catches_private_use(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("import ray\nfrom ray._private.state import state\nfrom ray.core.generated import gcs_pb2\n"
                 "def f(tuner, s):\n    getattr(tuner, '_local_tuner')\n    return s._brackets, self._mine\n")
    found = _ray_privates(f)
    assert len(found) == 4, found


# leaf knob names that are also the keys of run tags, manifests (the train split) and summaries (a `.get("model", ...)`
# on a tag dict is no params default)
AMBIGUOUS = {"model", "seed", "source", "profile", "options", "train"}


def _knob_names() -> set[str]:
    """Every leaf knob name of the params schema (blocks like `train` are not knobs)."""
    from pydantic import BaseModel

    from pipeline.config import Params

    names, todo = set(), [Params]
    while todo:
        model = todo.pop()
        for name, field in model.model_fields.items():
            ann = field.annotation
            blocks = [t for t in (ann, *getattr(ann, "__args__", ())) if isinstance(t, type) and issubclass(t, BaseModel)]
            todo += blocks
            if not blocks:
                names.add(name)
    return names - AMBIGUOUS


def knob_defaults(path: Path, knobs: set[str]) -> list[str]:
    """`x.get("<knob>", <default>)` and `getattr(x, "<knob>", <default>)`: a second home of a default."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        args = node.args
        if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(args) == 2:
            key = args[0]
        elif isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(args) == 3:
            key = args[1]
        else:
            continue
        if isinstance(key, ast.Constant) and key.value in knobs:
            found.append(f"{path.name}:{node.lineno} .get({key.value!r}, <default>)")
    return found


def test_no_knob_default_outside_params_yaml():
    knobs = _knob_names()
    found = [w for f in pipeline_files() if f.name != "config.py" for w in knob_defaults(f, knobs)]
    assert not found, "defaults live in params.yaml:\n" + "\n".join(found)


def test_the_default_check_catches_one(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f(cfg, t):\n    return cfg.get('poly_power', 0.9), getattr(t, 'grad_clip', 0.0), cfg.get('other', 1)\n")
    found = knob_defaults(f, {"poly_power", "grad_clip"})
    assert len(found) == 2 and "poly_power" in found[0] and "grad_clip" in found[1], found


def test_worker_spec_is_a_typed_subset_of_the_train_params():
    """Every train knob a worker reads is a TrainParams field of the same type: the spec copies by
    name from the validated params, so a renamed or retyped knob fails here, not in a worker."""
    import typing

    from pipeline.config import TrainParams
    from pipeline.training.spec import TRAIN_KNOBS, WorkerSpec

    hints = typing.get_type_hints(WorkerSpec)
    for name in TRAIN_KNOBS:
        assert name in TrainParams.model_fields, f"WorkerSpec.{name} is not a train.* knob"
        assert hints[name] == TrainParams.model_fields[name].annotation, (name, hints[name])


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


def test_tests_share_helpers_only_through_tests_support():
    """The suite's helpers have one home, tests/support/: no module under tests/ imports a test
    module (tests.*.test_*) or a conftest (those hold tests, fixtures and hooks only), and the
    free-port helper is defined once."""
    import ast
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    imports, free_ports = [], []
    for path in sorted(tests.rglob("*.py")):
        rel = path.relative_to(tests.parent)
        package = rel.with_suffix("").parts[:-1]  # what a relative import starts from
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in ("free_port", "_free_port"):
                free_ports.append(f"{rel}:{node.lineno}")
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*package[:len(package) - node.level + 1], node.module or ""] if node.level
                                else [node.module or ""]).strip(".")
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "tests" and any(p == "conftest" or p.startswith("test_") for p in parts[1:]):
                    imports.append(f"{rel}:{node.lineno} imports {name}")
                    break
    assert not imports, "import helpers from tests.support, not from a test module or conftest:\n" + "\n".join(imports)
    assert len(free_ports) == 1, f"one free_port, in tests/support/procs.py: {free_ports}"
