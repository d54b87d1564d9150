"""segpipe bench: every benchmark runs at a tiny size, prints its ratio and writes its JSON + bench.md
(no speed is asserted: the figures of a tiny run on a shared machine mean nothing); the GPU script
needs nothing but torch/torchvision; the fused train augmentation keeps image and mask aligned."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from tests.support.cli import assert_user_error, run_cli
from tests.support.paths import ROOT

FORBIDDEN = {"ray", "mlflow", "dvc", "pydantic", "pyarrow", "pandas"}  # gpu_bench: torch + pyyaml


def _result(out, what: str) -> dict:
    d = json.loads((out / f"{what}.json").read_text())
    assert d["benchmark"] == what and d["command"].startswith(("segpipe bench", "python benchmarks/gpu_bench.py"))
    m = d["machine"]
    assert m["cpu_count"] >= 1 and m["torch"] and m["python"]
    cols, rows = d["table"]["columns"], d["table"]["rows"]
    assert rows and all(len(r) == len(cols) for r in rows)
    for g in d["goals"]:
        assert isinstance(g["value"], (int, float)) and g["met"] in (True, False, None)
    md = (out.parent / "bench.md").read_text()
    assert f"## {what}\n" in md
    return d


def _goal(d: dict, needle: str) -> dict:
    found = [g for g in d["goals"] if needle in g["name"]]
    assert len(found) == 1, (needle, d["goals"])
    return found[0]


def test_loader_bench_ours_torchvision_and_ray_data(ray_local, tmp_path, capsys):
    from pipeline.cli import main  # in-process: the Ray Data path reuses the session's Ray

    out = tmp_path / "bench"
    assert main(["bench", "loader", "--quick", "--images", "24", "--crop", "64", "--out", str(out)]) == 0
    d = _result(out, "loader")
    names = [r[0] for r in d["table"]["rows"]]
    assert len(names) == 5 and "VOCSegmentation" in names[0] and "segpipe train" in names[3] and "Ray Data" in names[4]
    assert d["table"]["rows"][0][-2:] == [1.0, 1.0]  # the baseline against itself
    assert all(r[1] > 0 for r in d["table"]["rows"]) and all(r[3] > 0 for r in d["table"]["rows"][:4])
    for needle in ("(images per CPU-second)", "(img/s, wall clock)"):
        g = _goal(d, "ours / torchvision VOCSegmentation " + needle)
        assert g["target"] == 1.5 and g["op"] == ">="
    printed = capsys.readouterr().out
    assert "ours / torchvision VOCSegmentation (images per CPU-second):" in printed and "goal >= 1.5" in printed


def test_model_bench_pairs_ours_with_torchvision(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "model", "--quick", "--out", str(out), fresh=True)
    assert proc.returncode == 0, proc.stderr
    d = _result(out, "model")
    assert [(r[0], r[1], r[2]) for r in d["table"]["rows"]] == [
        ("lraspp_mobilenet_v3_large", "fwd+bwd", "off"), ("lraspp_mobilenet_v3_large", "inference", "off"),
        ("lraspp_mobilenet_v3_large", "fwd+bwd", "on"), ("lraspp_mobilenet_v3_large", "inference", "on")]
    assert _goal(d, "worst ours / torchvision")["target"] == 1.05
    assert "ours / torchvision (ms per batch)" in proc.stdout


def test_preprocess_bench_speedup_and_flat_memory(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "preprocess", "--quick", "--sizes", "20,60", "--out", str(out), fresh=True)
    assert proc.returncode == 0, proc.stderr
    d = _result(out, "preprocess")
    assert [(r[0], r[2]) for r in d["table"]["rows"]] == [(20, 1), (20, 1), (60, 1)]  # images, runs
    assert {r["images"] for r in d["runs"]} == {20, 60} and all(r["peak_rss_main_mib"] > 10 for r in d["runs"])
    assert _goal(d, "peak RSS of the process tree")["target"] == 1.15
    assert _goal(d, "all cores")["target"] is None


def test_ray_bench_ray_train_vs_plain_loop(ray_local, tmp_path):
    from pipeline.cli import main

    out = tmp_path / "bench"
    # one Ray Train run (2 workers: DDP) keeps the test short; the benchmark runs 1 and 2 by default
    assert main(["bench", "ray", "--quick", "--epochs", "1", "--ray-workers", "2", "--out", str(out)]) == 0
    d = _result(out, "ray")
    assert [r[0] for r in d["table"]["rows"]] == ["plain torch loop (pipeline.training.engine)", "Ray Train TorchTrainer, 2 workers"]
    assert len(d["runs"]["plain"]) == 2 and d["runs"]["ray2"]["img_per_s"][0] > 0
    assert _goal(d, "per-step overhead")["target"] == 0.10


def test_pipeline_bench_times_stages_and_a_noop_repro(tmp_path):
    out = tmp_path / "bench"
    proc = run_cli("bench", "pipeline", "--stages", "fetch,preprocess", "-S", "data.synthetic.train_count=12",
                   "-S", "data.synthetic.val_count=4", "--out", str(out), fresh=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    d = _result(out, "pipeline")
    assert set(d["stage_seconds"]) == {"fetch", "preprocess"}
    assert _goal(d, "no-op `dvc repro`")["target"] == 10.0
    assert "data.synthetic.train_count=12" in d["settings"]["overrides"]


def test_gpu_bench_needs_only_torch(tmp_path):
    """The GPU script on CPU (just to show it runs) and what it imported: no Ray/MLflow/DVC/pyarrow/..."""
    out = tmp_path / "bench"
    code = (f"import sys, runpy; sys.argv = ['gpu_bench.py', '--device', 'cpu', '--quick', '--amp', 'off', '--out', "
            f"{str(out)!r}, '--models', 'lraspp_mobilenet_v3_large', '--no-md'];"
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_bench.py')!r}, run_name='__main__');"
            f"print('IMPORTED', sorted({{m.split('.')[0] for m in sys.modules}}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    imported = set(eval(proc.stdout.split("IMPORTED ", 1)[1]))
    assert "torch" in imported and not imported & FORBIDDEN, imported & FORBIDDEN
    d = json.loads((out / "gpu.json").read_text())
    impls = {(r["model"], r["impl"]) for r in d["results"] if "img_per_s" in r}
    assert impls == {("lraspp_mobilenet_v3_large", "ours"), ("lraspp_mobilenet_v3_large", "torchvision")}
    assert not (out.parent / "bench.md").exists()  # --no-md


def test_gpu_bench_rows_follow_params_yaml(tmp_path):
    """gpu_bench keeps no copy of the recipe: its rows are params.yaml's families (backbone weights
    dropped), paired with torchvision's twin where seg_models' registry names one."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_bench

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"batch_size": 3}, "families": {
        "lraspp": {"model": "lraspp_mobilenet_v3_large", "options": {"backbone_weights": "w.pth"}},
        "unet": {"model": "unet", "options": {"base_channels": 8}}}}))
    families, train = gpu_bench.recipe(params)
    assert families == {"lraspp": ("lraspp_mobilenet_v3_large", {}), "unet": ("unet", {"base_channels": 8})}
    assert train == {"batch_size": 3}
    assert gpu_bench.plan_rows(families) == [
        ("lraspp", "lraspp_mobilenet_v3_large", {}, "lraspp_mobilenet_v3_large", {}),
        ("unet", "unet", {"base_channels": 8}, None, None)]
    committed, _ = gpu_bench.recipe()
    assert {f: m for f, (m, _) in committed.items()} == {
        f: v["model"] for f, v in yaml.safe_load((ROOT / "params.yaml").read_text())["families"].items()}


@pytest.mark.parametrize("args, needle", [
    (["bench", "nope"], "invalid choice"),
    (["bench", "model", "--models", "unet"], "unet: not a model torchvision has an identical copy of"),
    (["bench", "model", "--models", "lraspp_mobilenet_v3_large,nonexistent"], "nonexistent: not a model torchvision"),
    (["bench", "ray", "--ray-workers", "0"], "--ray-workers takes worker counts"),
    (["bench", "loader", "--name", "../x"], "--name takes letters"),
    (["bench", "loader", "--images", "0"], "--images must be positive"),
    (["bench", "preprocess", "--sizes", "100"], "two or more positive counts"),
    (["bench", "loader", "-S", "train.epochs=1"], "-S only applies"),
    (["bench", "pipeline", "--stages", "nostage"], "no stage nostage"),
    (["bench", "gpu", "--device", "cpu", "--models", "nope"], "--models names none of"),
])
def test_bad_bench_input_is_one_error_line(args, needle, tmp_path):
    assert_user_error(run_cli(*args, "--out", str(tmp_path / "b")), needle)
    assert not (tmp_path / "b").exists()


def test_committed_results_render(tmp_path):
    """reports/bench/*.json (the committed results) parse, and reports/bench.md is what they render to."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import write_markdown

    out = ROOT / "reports" / "bench"
    files = sorted(out.glob("*.json"))
    assert {"loader", "preprocess", "model", "ray", "pipeline", "gpu"} <= {f.stem for f in files}
    for f in files:
        d = json.loads(f.read_text())
        assert d["machine"] and d["table"]["rows"] and not d.get("partial"), f
    rendered = write_markdown(out, tmp_path / "bench.md").read_text()
    assert rendered == (ROOT / "reports" / "bench.md").read_text(), "reports/bench.md is stale: `segpipe bench md`"


# --------------------------------------------------------------------------- the fused augmentation

def _scene():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(375, 500, dtype=torch.uint8)
    for k in range(1, 8):
        y, x = (int(v) for v in torch.randint(0, 300, (2,), generator=g))
        mask[y:y + 60, x:x + 90] = k
    image = ((mask.int() + 1) * 25).to(torch.uint8).expand(3, -1, -1).clone()  # no 0 pixel: padding is visible
    return image, mask


def test_train_transform_keeps_image_and_mask_aligned():
    from torchvision import tv_tensors

    from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform

    image, mask = _scene()
    t = train_transform(513, 0.5, 2.0)
    torch.manual_seed(0)
    padded_any = full_any = False
    for _ in range(40):
        x, y = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert x.shape == (3, 513, 513) and x.dtype == torch.float32 and y.shape == (513, 513) and y.dtype == torch.int64
        value = (x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255  # back to the uint8 scale
        pad = y == 255
        assert torch.allclose(value[pad], torch.zeros(()), atol=1e-3)  # padding: a 0 pixel, normalised
        inside = ~pad
        interior = inside.clone()  # pixels whose 2-neighbourhood has one class: away from resampled edges
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 0), (-2, 0), (0, 2), (0, -2)):
            interior &= torch.roll(y, (dy, dx), (0, 1)) == y
        agree = ((value[interior] / 25).round() - 1 == y[interior]).float().mean()
        assert agree > 0.999, agree
        padded_any |= bool(pad.any())
        full_any |= not bool(pad.any())
    assert padded_any and full_any  # scales below and above what fills the crop were drawn


def test_uint8_hand_over_is_the_normalised_transform():
    """normalize=False gives the same crop as uint8 (image and mask); pipeline.training.engine turns that batch
    into exactly what the float transform gives."""
    from torchvision import tv_tensors

    from pipeline.data.transforms import eval_transform, train_transform
    from pipeline.training.engine import StepOptions, _to_device

    image, mask = _scene()
    for make in (lambda n: train_transform(300, 0.5, 2.0, normalize=n), lambda n: eval_transform(256, normalize=n)):
        for seed in range(6):
            torch.manual_seed(seed)
            xf, yf = make(True)(tv_tensors.Image(image), tv_tensors.Mask(mask))
            torch.manual_seed(seed)
            xu, yu = make(False)(tv_tensors.Image(image), tv_tensors.Mask(mask))
            assert xu.dtype == yu.dtype == torch.uint8 and (xf.dtype, yf.dtype) == (torch.float32, torch.int64)
            xb, yb = _to_device(xu[None], yu[None], StepOptions(device=torch.device("cpu"), channels_last=True))
            assert xb.is_contiguous(memory_format=torch.channels_last) and yb.dtype == torch.int64
            torch.testing.assert_close(xb[0], xf, rtol=0, atol=1e-5)
            assert torch.equal(yb[0], yf)


def test_train_transform_without_scaling_is_the_image_itself():
    """scale 1 and a crop larger than the image: the image (or its mirror) at the top left, padded."""
    from torchvision import tv_tensors

    from pipeline.data.transforms import normalize_uint8, train_transform

    image, mask = _scene()
    t = train_transform(600, 1.0, 1.0)
    torch.manual_seed(1)
    flips = set()
    for _ in range(12):
        x, y = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        flipped = not torch.equal(y[:375, :500], mask.long())
        flips.add(flipped)
        img, m = (image.flip(-1), mask.flip(-1)) if flipped else (image, mask)
        assert torch.equal(y[:375, :500], m.long()) and (y[375:] == 255).all() and (y[:, 500:] == 255).all()
        torch.testing.assert_close(x[:, :375, :500], normalize_uint8(img))
    assert flips == {True, False}
