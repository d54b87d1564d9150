"""A tune with a known answer: the right ASPP field of view is known by construction, and the real
`segpipe tune` must find it beyond the seed spread.

The scenes (`data.synthetic.kind: context`, 128 px): identical near-white discs whose class (VOC 1 or
2) only the colour painted beyond a clear zone of 40 px around each disc tells; every scene holds one
disc of each class. The model: `deeplabv3_small` (backbone receptive field 39 px, output stride 8)
with image pooling off, so the ASPP is the only way to see far. Rates (1, 1, 1), the configured
point, reach about 19 + 8 + 8 (the head's 3x3) = 35 px from a pixel: they find the discs but name
them only from their rims, 26 px from the colour (mIoU ~0.6-0.7). Rates (6, 6, 6) put the taps
48-68 px out, in the colour, and name them (mIoU > 0.95). Training is held fixed (no optimiser
phase: lr 0.02, batch 8 = the trials' global batch of 8 x 1 worker, 20 epochs, scale augmentation
off so the colour stays 40 px away), two seeds per point, scored on the tune split. Measured outside
the pipeline (the same model and data, seeds 0-7): reaching 0.981-0.996 on every seed; lr 0.05,
batch 32 or 12 epochs left some seeds on the short rates' plateau.

The test fails when the search stops finding a real effect: seeds not varied or not averaged, the
configured point's optimiser not held, the selection split leaking, or the verdict not applied."""

import json
from pathlib import Path

import pytest

from pipeline.config import load_params
from tests.support.cli import run_cli
from tests.support.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("known_answer")]

SHORT, REACHING = [1, 1, 1], [6, 6, 6]


def overrides(data_dir: Path, work: Path) -> list[str]:
    return [
        f"data.dir={data_dir}", "data.source=synthetic", "data.synthetic.kind=context", "data.synthetic.size=128",
        "data.synthetic.context_distance=40", "data.synthetic.classes=[1, 2]", "data.synthetic.max_objects=2",
        "data.synthetic.train_count=320", "data.synthetic.val_count=4", "data.synthetic.seed=7",
        "data.tune_split=0.25", "data.row_group_rows=32", "data.workers=1",
        "families.deeplabv3.model=deeplabv3_small",
        f"families.deeplabv3.options={{width: 16, image_pooling: false, atrous_rates: {SHORT}}}",
        "train.batch_size=8", "ray.num_workers=1", "train.crop_size=128", "train.eval_size=128", "train.scale_min=1.0",
        "train.scale_max=1.0", "train.lr=0.02", "train.momentum=0.9", "train.weight_decay=0.0001",
        "train.loader_workers=0", "train.sample_images=0", "train.bn_momentum=0.1",
        f"train.models_dir={work / 'models'}", f"train.reports_dir={work / 'reports'}",
        f"ray.storage_path={work / 'ray'}", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        "tune.families=[deeplabv3]", f"tune.space.deeplabv3={{atrous_rates: {{grid: [{SHORT}, {REACHING}]}}}}",
        "tune.max_epochs=20", "tune.seeds=2", "tune.num_workers=1", "tune.cpus_per_worker=0.9",
        "tune.max_concurrent_trials=2",
    ]


@pytest.fixture(scope="module")
def ablation(request, tmp_path_factory):
    from pipeline.data.shards import preprocess
    from pipeline.data.sources import fetch

    work = tmp_path_factory.mktemp("known_answer")
    args = overrides(work / "data", work)
    p = load_params(ROOT / "params.yaml", args)
    # in this process, with no worker pool (data.workers=1): forking a process that runs Ray's
    # threads can deadlock the child (seen in a full suite run)
    fetch(p, progress=False)
    preprocess(p, progress=False)
    request.getfixturevalue("ray_local")  # the session's Ray, for the tune
    r = run_cli("tune", "--family", "deeplabv3", "-p", str(ROOT / "params.yaml"), *sum((["-S", a] for a in args), []),
                timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((work / "reports" / "tune" / "deeplabv3" / "ablation.json").read_text())


def test_the_tune_ranks_the_rates_that_reach_the_colour_above_those_that_do_not(ablation):
    rows = {tuple(r["value"]): r for r in ablation["axes"]["atrous_rates"]}
    short, reaching = rows[tuple(SHORT)], rows[tuple(REACHING)]
    assert short["configured"] and short["n"] == reaching["n"] == 2, rows
    assert reaching["mean"] > short["mean"], rows
    assert reaching["verdict"] == "better beyond the seed spread", rows
    assert ablation["chosen"]["atrous_rates"] == REACHING
    # the effect is the one built in, not noise: the short rates only find the discs
    # (measured: 0.991 +- 0.001 vs 0.700 +- 0.036; the short rates name the discs only from their rims,
    # 26 px from the colour)
    assert reaching["mean"] > 0.9 and short["mean"] < 0.8 and reaching["mean"] - short["mean"] > 0.15, rows
