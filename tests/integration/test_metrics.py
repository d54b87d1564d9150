"""Metrics: our confusion-matrix scores against an independent implementation, and the
distributed evaluation (2 Ray workers, all-reduced) against 1 process on the same data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.training.metrics import confusion_matrix, scores


def reference_scores(pred: np.ndarray, target: np.ndarray, n: int) -> dict:
    """Straight from the definitions, class by class, no confusion matrix."""
    keep = target != 255
    p, t = pred[keep], target[keep]
    ious, accs, fw = {}, [], 0.0
    for c in range(n):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        if union:
            ious[c] = inter / union
            fw += np.sum(t == c) / t.size * ious[c]
        if np.sum(t == c):
            accs.append(inter / np.sum(t == c))
    return {"pixel_acc": np.mean(p == t), "mean_acc": np.mean(accs), "mIoU": np.mean(list(ious.values())),
            "fwIoU": fw, "ious": ious}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_reference(seed):
    rng = np.random.default_rng(seed)
    n = 21
    target = rng.choice([0, 1, 3, 15, 255], size=(4, 37, 41))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.choice([0, 1, 2, 3], size=target.shape))
    pred[pred == 255] = 0
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n)
    got = scores(cm)
    ref = reference_scores(pred, target, n)
    for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    from pipeline.data.voc import VOC_CLASSES
    for c, name in enumerate(VOC_CLASSES):
        if c in ref["ious"]:
            assert got[f"iou/{name}"] == pytest.approx(ref["ious"][c])
        else:  # absent from target and prediction: excluded
            assert math.isnan(got[f"iou/{name}"])
    # class 2 appears only in predictions: it counts (IoU 0) in the mean
    assert got["iou/bicycle"] == 0.0


def test_void_is_ignored_and_sum_of_parts_is_the_whole():
    t = torch.tensor([[0, 1, 255], [1, 1, 0]])
    p = torch.tensor([[0, 1, 1], [0, 1, 0]])
    cm = confusion_matrix(p, t, 3)
    assert cm.sum() == 5 and cm[1, 0] == 1
    halves = confusion_matrix(p[:1], t[:1], 3) + confusion_matrix(p[1:], t[1:], 3)
    assert torch.equal(halves, cm)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int16])
def test_labels_outside_the_classes_are_dropped_like_void(dtype):
    """torchvision's mask (t >= 0) & (t < n): labels 21..254 and negative ones are dropped, not counted
    as another class (t * n + p would land in another row) and not a bincount crash."""
    t = torch.tensor([[0, 1, 21], [-1, 254, 20], [255, 2, 300]], dtype=dtype)
    p = torch.tensor([[0, 1, 5], [0, 1, 20], [3, 2, 0]])
    cm = confusion_matrix(p, t, 21)
    assert cm.shape == (21, 21) and cm.sum() == 4
    assert cm[0, 0] == cm[1, 1] == cm[20, 20] == cm[2, 2] == 1
    assert torch.equal(cm, confusion_matrix(p[[0, 1, 2]][:, :2], t[:, :2], 21) + confusion_matrix(p[1:2, 2:], t[1:2, 2:], 21))
    got = scores(cm)
    assert got["pixel_acc"] == 1.0 and got["mIoU"] == 1.0
    # uint8 masks (what the loader hands over): 21..254 dropped too
    u = torch.tensor([0, 7, 30, 200, 255], dtype=torch.uint8)
    assert confusion_matrix(torch.tensor([0, 7, 0, 0, 0]), u, 21).sum() == 2


@pytest.mark.slow
def test_two_ray_workers_equal_one_process(ray_local, synthetic_shards):
    """Evaluation split over 2 Ray Train workers (disjoint rows, matrices all-reduced) gives
    exactly what one process gives, and both equal the reference implementation."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training import engine
    from pipeline.data.loaders import ShardDataset
    from pipeline.data.transforms import eval_transform
    from pipeline.training.setup import build_loaders
    from seg_models import build_model

    from pipeline.config import default_params
    from pipeline.training.spec import WorkerSpec

    spec = WorkerSpec.from_params(default_params(), model="unet", options={}, data_dir=str(synthetic_shards)).replace(
        crop_size=64, eval_size=64, scale_min=1.0, scale_max=1.0, seed=0, batch_size=3, loader_workers=0)
    cfg = {"spec": spec, "out": str(synthetic_shards.parent / "eval2.json")}

    def model():
        torch.manual_seed(123)
        return build_model("unet", num_classes=21, base_channels=8).eval()

    def loop(config):
        import torch.distributed as dist

        ctx = ray.train.get_context()
        _, val = build_loaders(config["spec"], ctx.get_world_rank(), ctx.get_world_size(), 0)
        cm = engine.evaluate(model(), val, engine.StepOptions(device=torch.device("cpu"), channels_last=False), 21)
        dist.all_reduce(cm)
        if ctx.get_world_rank() == 0:
            Path(config["out"]).write_text(json.dumps({"cm": cm.tolist(), "scores": scores(cm)}))
        ray.train.report({"done": 1})

    TorchTrainer(loop, train_loop_config=cfg, scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(storage_path=str(synthetic_shards.parent / "ray"), name="eval2")).fit()
    res = json.loads(Path(cfg["out"]).read_text())
    two = torch.tensor(res["cm"])

    _, val = build_loaders(spec, 0, 1, 0)
    one = engine.evaluate(model(), val, engine.StepOptions(device=torch.device("cpu"), channels_last=False), 21)
    assert torch.equal(one, two)
    assert one.sum() > 0

    # independent: per-image predictions straight from the model, scored from the definitions
    m = model()
    ds = ShardDataset(synthetic_shards, "val", eval_transform(64))
    preds, targets = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            x, y = ds[i]
            preds.append(m(x[None])["out"].argmax(1)[0].numpy())
            targets.append(y.numpy())
    ref = reference_scores(np.stack(preds), np.stack(targets), 21)
    got = res["scores"]
    for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
