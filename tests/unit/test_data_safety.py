"""segpipe never deletes what it did not make, and never trains on data that contradicts itself.

- raw/ and shards/ of data.dir (and the report's figures/, a tune's result folder) are replaced only
  when they carry segpipe's mark (pipeline.storage.OWNER_MARK, or the file an older segpipe wrote):
  a user's own folder in their place is refused, byte for byte untouched;
- id lists with repeated ids or val ids in train are refused by preprocess, before a shard is written;
- a manifest whose shard list disagrees with its counts, or an empty split, stops train before Ray;
- masks are stored as the training decoder reads them: a 1/2/4-bit palette PNG is re-encoded as 8 bits.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.storage import OWNER_MARK
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import tree_snapshot


def _cli(stage: str, params_file: Path, d: Path, *sets: str, **kw):
    args = [x for s in ("data.source=sample", "data.workers=1", *sets) for x in ("-S", s)]
    return run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={d}", *args, **kw)


# ------------------------------------------------------------------------------ ownership


def test_fetch_refuses_a_raw_folder_segpipe_did_not_make(tmp_path, params_file):
    d = tmp_path / "D"
    (d / "raw" / "photos").mkdir(parents=True)
    (d / "raw" / "photos" / "thesis.txt").write_text("four years of work")
    before = tree_snapshot(d)
    assert_user_error(_cli("fetch", params_file, d, no_ray=True), f"{d / 'raw'}", "segpipe did not make it", "data.dir")
    assert tree_snapshot(d) == before
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")], "staging left behind"


def test_preprocess_refuses_a_shards_folder_segpipe_did_not_make(tmp_path, params_file):
    d = tmp_path / "D"
    assert _cli("fetch", params_file, d).returncode == 0
    assert (d / "raw" / OWNER_MARK).is_file()  # what fetch made carries the mark
    (d / "shards").mkdir()
    (d / "shards" / "notes.txt").write_text("mine")
    before = tree_snapshot(d)
    assert_user_error(_cli("preprocess", params_file, d, no_ray=True), f"{d / 'shards'}", "data.dir")
    assert tree_snapshot(d) == before


def test_what_segpipe_made_is_replaced_again_and_older_outputs_count_as_its_own(tmp_path, params_file):
    d = tmp_path / "D"
    for _ in range(2):
        assert _cli("fetch", params_file, d).returncode == 0
        assert _cli("preprocess", params_file, d).returncode == 0
    assert (d / "shards" / OWNER_MARK).is_file()
    # outputs of a segpipe from before the mark: raw/source.json and shards/manifest.json vouch for them
    (d / "raw" / OWNER_MARK).unlink()
    (d / "shards" / OWNER_MARK).unlink()
    assert _cli("fetch", params_file, d).returncode == 0
    assert _cli("preprocess", params_file, d).returncode == 0
    assert (d / "raw" / OWNER_MARK).is_file() and (d / "shards" / OWNER_MARK).is_file()


def test_a_file_where_raw_belongs_is_refused_too(tmp_path, params_file):
    d = tmp_path / "D"
    d.mkdir()
    (d / "raw").write_text("not a directory")
    assert_user_error(_cli("fetch", params_file, d, no_ray=True), "raw", "data.dir")
    assert (d / "raw").read_text() == "not a directory"


# ------------------------------------------------------------------------------ the id lists


def _train_list(d: Path) -> Path:
    layout = json.loads((d / "raw" / "source.json").read_text())
    root = Path(layout["voc_root"])
    root = root if root.is_absolute() else d / "raw" / root
    return root / layout["splits"]["train"], root / layout["splits"]["val"]


@pytest.mark.parametrize("fault", ["val ids in train", "repeated ids"])
def test_preprocess_refuses_leaking_or_repeated_ids(tmp_path, params_file, fault):
    d = tmp_path / "D"
    assert _cli("fetch", params_file, d).returncode == 0
    train, val = _train_list(d)
    train_ids, val_ids = train.read_text().split(), val.read_text().split()
    if fault == "val ids in train":
        train.write_text("\n".join(train_ids + val_ids) + "\n")
        needles = (f"{len(val_ids)} id(s) of the val list", val_ids[0], "trained on")
    else:
        train.write_text("\n".join(train_ids + train_ids[:2]) + "\n")
        needles = ("2 id(s) more than once", str(train), train_ids[0])
    before = tree_snapshot(d)
    assert_user_error(_cli("preprocess", params_file, d, no_ray=True), *needles)
    assert tree_snapshot(d) == before and not (d / "shards").exists()


# ------------------------------------------------------------------------------ the shards a run reads


def _edit_manifest(d: Path, edit) -> None:
    path = d / "shards" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("fault", ["train shards unlisted", "counts disagree", "empty val"])
def test_train_refuses_shards_that_contradict_their_manifest_before_ray(sample_dir, params_file, tmp_path, fault):
    def edit(m):
        if fault == "train shards unlisted":  # every train/ entry removed, the counts kept
            m["shards"] = {k: v for k, v in m["shards"].items() if not k.startswith("train/")}
        elif fault == "counts disagree":
            m["splits"]["train"]["count"] += 3
        else:
            m["splits"]["val"]["count"] = 0
            m["shards"] = {k: v for k, v in m["shards"].items() if not k.startswith("val/")}

    _edit_manifest(sample_dir, edit)
    out = tmp_path / "out"
    proc = run_cli("train", "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample",
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", "-S", "data.verify_shards=false",
                   "-S", f"train.models_dir={out}/models", "-S", f"train.reports_dir={out}/reports",
                   "-S", "families.unet.model=unet", "-S", "families.unet.options={base_channels: 8}",
                   "--family", "unet", no_ray=True)  # no_ray: starting a Ray raises
    needle = {"train shards unlisted": "the train split", "counts disagree": "counts 10 train images but lists "
              "shards of 7 rows", "empty val": "the val split"}[fault]
    assert_user_error(proc, needle, "data.dir")
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("stage", ["train", "tune"])
def test_a_split_smaller_than_one_global_batch_is_refused_before_ray(sample_dir, params_file, tmp_path, stage):
    """The sample's 7 train images (6 once a tune split of 1 is carved) against a global batch of
    8 (4 per worker x 2 workers): training would drop its only, incomplete batch (a batch of 1 breaks
    BatchNorm), so the stage says which split, how many images, the batch and the knobs."""
    out = tmp_path / "out"
    workers = "ray.num_workers=2"  # a tune trial trains at the same global batch (on tune.num_workers)
    proc = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample",
                   "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", "-S", "train.batch_size=4", "-S", workers,
                   "-S", f"train.models_dir={out}/models", "-S", f"train.reports_dir={out}/reports",
                   "-S", "families.unet.model=unet", "-S", "families.unet.options={base_channels: 8}",
                   "-S", "tune.families=[unet]", "-S", "tune.space.unet={upsample: {grid: [bilinear, transposed]}}",
                   "--family", "unet", no_ray=True)
    manifest = json.loads((sample_dir / "shards" / "manifest.json").read_text())["splits"]
    images = manifest["train"]["count"] - (manifest.get("tune", {}).get("count", 0) if stage == "tune" else 0)
    assert images < 8, manifest
    if stage == "train":
        assert_user_error(proc, f"the train split holds {images} images, fewer than one global batch of 8 (4 per "
                          "worker x 2 workers)", "train.batch_size, ray.num_workers")
    else:  # params.yaml: tune.num_workers 1, so the trial's one worker takes the whole global batch
        assert_user_error(proc, f"holds {images} images, fewer than one global batch of 8 (8 per worker x 1 workers)",
                          "train.batch_size, ray.num_workers")
    assert not out.exists()
    if stage == "train":  # one batch fits: no refusal of this kind (the run then needs Ray, which no_ray refuses)
        ok = run_cli(stage, "-q", "-p", str(params_file), "-S", f"data.dir={sample_dir}", "-S", "data.source=sample",
                     "-S", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}", "-S", "train.batch_size=3",
                     "-S", workers, "-S", f"train.models_dir={out}/models", "-S", f"train.reports_dir={out}/reports",
                     "-S", "families.unet.model=unet", "-S", "families.unet.options={base_channels: 8}",
                     "--family", "unet", no_ray=True)
        assert "global batch" not in ok.stderr and "RayStarted" in ok.stderr, ok.stderr[-2000:]


def test_train_refuses_val_ids_in_the_train_shards(sample_dir, params_file, tmp_path):
    """Shards written by another tool (or an older preprocess) with val ids in train: refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.checks import check_shards, split_ids
    from pipeline.data.loaders import load_manifest
    from pipeline.errors import UserError

    m = load_manifest(sample_dir)
    val_shard = next(k for k in m["shards"] if k.startswith("val/"))
    train_shard = sample_dir / "shards" / next(k for k in m["shards"] if k.startswith("train/"))
    rows = pq.read_table(train_shard).to_pylist()
    leaked = pq.read_table(sample_dir / "shards" / val_shard).to_pylist()[0]
    rows[0] = dict(leaked, split="train")
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_table(train_shard).schema), train_shard)
    assert leaked["id"] in split_ids(sample_dir, m, "train")
    with pytest.raises(UserError, match=f"also in the train list .*{leaked['id']}"):
        check_shards(sample_dir, m)


# ------------------------------------------------------------------------------ masks


@pytest.mark.parametrize("bits,values", [(1, [0, 1]), (2, [0, 3]), (4, [0, 15]), (8, [0, 20, 255])])
def test_masks_are_stored_as_the_training_decoder_reads_them(tmp_path, bits, values):
    """PIL writes a palette PNG of <= 2/4/16 colours with 1/2/4 bits a sample; torchvision's
    decode_png(UNCHANGED), what training uses, scales those samples to 8 bits (15 -> 255)."""
    from pipeline.data.loaders import decode_mask
    from pipeline.data.shards import _png_bit_depth, load_pair

    rng = np.random.default_rng(bits)
    arr = rng.choice(values, size=(24, 32)).astype(np.uint8)
    im = Image.fromarray(arr, mode="P")
    colours = 2 ** bits if bits < 8 else 256
    im.putpalette([c % 256 for i in range(colours) for c in (i * 7, i * 11, i * 13)])
    mask = tmp_path / "m.png"
    im.save(mask)
    assert _png_bit_depth(mask.read_bytes()) == bits  # the case is real
    if bits < 8:  # ... and read raw it is wrong: what training got before
        assert not np.array_equal(decode_mask(mask.read_bytes()).numpy(), arr)
    img = tmp_path / "i.jpg"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(img)
    row = load_pair(("train", "x1", str(img), str(mask)))
    assert "error" not in row, row
    assert np.array_equal(decode_mask(row["mask"]).numpy(), arr)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["mask"]))), arr)
