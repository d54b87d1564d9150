"""Tiny training settings for CPU runs: the light member of each family, the overrides that make
a run take seconds, and the run set the session's `trained_all` fixture trains."""

from __future__ import annotations

import json
from pathlib import Path

TINY = {  # light members of each family, so CPU tests stay fast
    "fcn": ("fcn32s_vgg16", {"upsample": "bilinear"}),
    "deeplabv3": ("deeplabv3_mobilenet_v3_large", {"aux_loss": True}),
    "lraspp": ("lraspp_mobilenet_v3_large", {}),
    "unet": ("unet", {"base_channels": 8, "upsample": "transposed"}),
}

# the run set of tests/integration/conftest.py's trained_all (read by test_train_all and test_report)
TRAINED_FAMILIES = ("lraspp", "unet")  # the two lightest tiny models (TINY)
TRAINED_SEEDS = (0, 1)
TRAINED_EPOCHS = 2


def tiny_overrides(data_dir: Path, work: Path, epochs: int = 1) -> list[str]:
    out = [f"data.dir={data_dir}", "data.source=synthetic", f"train.epochs={epochs}", "train.batch_size=4",
           "train.crop_size=64", "train.eval_size=64", "train.loader_workers=0", "train.sample_images=2",
           "train.bn_momentum=0.1", "ray.num_workers=2", "ray.cpus_per_worker=0.5",
           f"ray.storage_path={work / 'ray'}", f"train.models_dir={work / 'models'}",
           f"train.reports_dir={work / 'reports'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}"]
    for fam, (model, opts) in TINY.items():
        out.append(f"families.{fam}.model={model}")
        out.append(f"families.{fam}.options={json.dumps(opts)}")
    return out
