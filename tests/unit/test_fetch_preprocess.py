"""fetch -> preprocess -> read back, on the real sample and synthetic data, and every bad input."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_params
from pipeline.data.loaders import ShardDataset, decode_mask, list_shards
from pipeline.data.sources import fetch
from pipeline.data.shards import preprocess
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import tree_snapshot
from tests.support.paths import SAMPLE_TAR


def _params(params_file, data_dir, *extra):
    return load_params(params_file, [f"data.dir={data_dir}", *extra])


def _tar_pngs(tar_path: Path) -> dict[str, np.ndarray]:
    with tarfile.open(tar_path) as tf:
        return {
            Path(m.name).stem: np.array(Image.open(io.BytesIO(tf.extractfile(m).read())))
            for m in tf.getmembers()
            if "SegmentationClass/" in m.name and m.name.endswith(".png")
        }


def test_sample_end_to_end_bit_identical(tmp_path, params_file):
    """The 10 real VOC images: fetch (CLI) -> preprocess (CLI) -> masks decode bit-identical."""
    d = tmp_path / "D"
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.source={SAMPLE_TAR}", "-S", f"data.dir={d}", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("preprocess", "-p", str(params_file), "-S", "data.source=sample", "-S", f"data.dir={d}", "-q")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((d / "shards" / "manifest.json").read_text())
    assert {s: v["count"] for s, v in manifest["splits"].items()} == {"train": 7, "val": 3, "tune": 1}  # data.tune_split
    truth = _tar_pngs(SAMPLE_TAR)
    assert len(truth) == 10
    seen = {}
    for split in ("train", "val"):
        for path in list_shards(d, split):
            t = pq.read_table(path)
            assert max(t.to_batches(max_chunksize=1000), key=len).num_rows <= 100
            for row in t.to_pylist():
                mask = decode_mask(row["mask"]).numpy()
                seen[row["id"]] = mask
                assert (row["height"], row["width"]) == mask.shape
                # the JPEG is the original file, byte for byte
                with tarfile.open(SAMPLE_TAR) as tf:
                    orig = tf.extractfile(f"VOCdevkit/VOC2012/JPEGImages/{row['id']}.jpg").read()
                assert row["image"] == orig
    assert set(seen) == set(truth)
    for sid, mask in seen.items():
        assert mask.dtype == truth[sid].dtype and np.array_equal(mask, truth[sid]), sid
    # per-class pixel histogram matches the masks
    hist = manifest["splits"]["val"]["class_pixels"]
    val_masks = [truth[i] for i in ("2012_000008", "2012_000009", "2012_000010")]
    assert hist["void"] == sum(int((m == 255).sum()) for m in val_masks)
    assert hist["bicycle"] == sum(int((m == 2).sum()) for m in val_masks) > 0
    # sha256 per shard is right
    import hashlib
    for rel, info in manifest["shards"].items():
        assert hashlib.sha256((d / "shards" / rel).read_bytes()).hexdigest() == info["sha256"]


def test_sample_source_and_dir_source(tmp_path, params_file):
    d = tmp_path / "D"
    fetch(_params(params_file, d, "data.source=sample"), progress=False)
    voc_dir = tmp_path / "copy"
    shutil.copytree(d / "raw", voc_dir)
    # a directory holding VOCdevkit/ is read in place
    d2 = tmp_path / "D2"
    layout = fetch(_params(params_file, d2, f"data.source={voc_dir}"), progress=False)
    assert Path(layout.voc_root).is_absolute() and str(layout.voc_root).startswith(str(voc_dir))
    m = preprocess(_params(params_file, d2, f"data.source={voc_dir}"), progress=False)
    assert m["splits"]["train"]["count"] == 7


def test_synthetic_is_deterministic_and_valid(tmp_path, params_file):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    opts = ["data.source=synthetic", "data.synthetic.train_count=12", "data.synthetic.val_count=4", "data.synthetic.size=64"]
    for d, seed in ((a, 0), (b, 0), (c, 1)):
        fetch(_params(params_file, d, *opts, f"data.synthetic.seed={seed}"), progress=False)
    assert tree_snapshot(a / "raw") == tree_snapshot(b / "raw")
    assert tree_snapshot(a / "raw") != tree_snapshot(c / "raw")
    m = preprocess(_params(params_file, a, *opts, "data.workers=2"), progress=False)
    assert m["splits"]["train"]["count"] == 12 and m["splits"]["val"]["count"] == 4
    hist = m["splits"]["train"]["class_pixels"]
    assert hist["void"] > 0 and hist["background"] > 0
    assert sum(hist[c] > 0 for c in ("aeroplane", "car", "dog", "person")) >= 2
    mask = np.array(Image.open(a / "raw/VOCdevkit/VOC2012/SegmentationClass/syn_000000.png"))
    assert Image.open(a / "raw/VOCdevkit/VOC2012/SegmentationClass/syn_000000.png").mode == "P"
    assert set(np.unique(mask)) <= {0, 1, 7, 12, 15, 255}


def test_shards_split_by_size_and_row_groups(tmp_path, params_file):
    d = tmp_path / "D"
    opts = ["data.source=synthetic", "data.synthetic.train_count=30", "data.synthetic.val_count=2",
            "data.row_group_rows=4", "data.shard_max_mb=0.05", "data.workers=1"]
    fetch(_params(params_file, d, *opts), progress=False)
    m = preprocess(_params(params_file, d, *opts), progress=False)
    train = [rel for rel in m["shards"] if rel.startswith("train/")]
    assert len(train) > 1
    for rel in train:
        md = pq.ParquetFile(d / "shards" / rel).metadata
        assert all(md.row_group(i).num_rows <= 4 for i in range(md.num_row_groups))
    assert sum(m["shards"][r]["rows"] for r in train) == 30
    assert not list((d / "shards").rglob("*.tmp"))


# ---------------------------------------------------------------- bad inputs


def _make_voc(root: Path, params_file) -> Path:
    """A copy of the sample's raw VOC tree to break."""
    fetch(_params(params_file, root, "data.source=sample"), progress=False)
    return root / "raw" / "VOCdevkit" / "VOC2012"


def test_every_bad_pair_is_reported_and_old_shards_kept(tmp_path, params_file):
    d = tmp_path / "D"
    voc = _make_voc(d, params_file)
    preprocess(_params(params_file, d, "data.source=sample"), progress=False)
    before = tree_snapshot(d / "shards")
    # 1. truncated image, 2. mask values outside 0..20/255, 3. size mismatch, 4. id without a mask
    img = voc / "JPEGImages" / "2012_000001.jpg"
    img.write_bytes(img.read_bytes()[: len(img.read_bytes()) // 2])
    m = np.array(Image.open(voc / "SegmentationClass/2012_000002.png"))
    m[0, 0] = 42
    Image.fromarray(m, mode="L").save(voc / "SegmentationClass/2012_000002.png")
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(voc / "SegmentationClass/2012_000003.png")
    (voc / "SegmentationClass/2012_000009.png").unlink()
    proc = run_cli("preprocess", "-p", str(params_file), "-S", "data.source=sample", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "4 bad", "train/2012_000001: undecodable or truncated", "train/2012_000002: mask values outside 0..20 and 255: [42]",
                      "train/2012_000003: image is 513x513 but mask is 10x10", "val/2012_000009: listed without a mask")
    assert tree_snapshot(d / "shards") == before
    assert not (d / ".shards-new").exists()


def test_rgb_mask_and_not_a_jpeg_are_refused(tmp_path, params_file):
    d = tmp_path / "D"
    voc = _make_voc(d, params_file)
    Image.open(voc / "SegmentationClass/2012_000004.png").convert("RGB").save(voc / "SegmentationClass/2012_000004.png")
    Image.new("RGB", (513, 513)).save(voc / "JPEGImages/2012_000005.jpg", format="PNG")
    proc = run_cli("preprocess", "-p", str(params_file), "-S", "data.source=sample", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "2012_000004: mask is a RGB image", "2012_000005: image is PNG, expected JPEG")
    assert not (d / "shards").exists()


def test_preprocess_without_fetch(tmp_path, params_file):
    proc = run_cli("preprocess", "-p", str(params_file), "-S", f"data.dir={tmp_path}", "-q")
    assert_user_error(proc, "segpipe fetch")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "device"])
def test_refused_archive_leaves_raw_intact(tmp_path, params_file, kind):
    d = tmp_path / "D"
    fetch(_params(params_file, d, "data.source=sample"), progress=False)
    before = tree_snapshot(d)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        with tarfile.open(SAMPLE_TAR) as src:
            for m in src.getmembers()[:5]:
                tf.addfile(m, src.extractfile(m) if m.isfile() else None)
        info = tarfile.TarInfo({"absolute": str(tmp_path / "pwned.txt"), "dotdot": "VOCdevkit/../../pwned.txt",
                                "symlink": "VOCdevkit/link", "device": "VOCdevkit/dev"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        elif kind == "device":
            info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        data = b"pwned" if info.type == tarfile.REGTYPE else None
        info.size = len(data) if data else 0
        tf.addfile(info, io.BytesIO(data) if data else None)
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.source={evil}", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "evil.tar")
    assert not (tmp_path / "pwned.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D", "evil.tar", "params.yaml"]
    assert tree_snapshot(d) == before
    assert sorted(p.name for p in d.iterdir()) == ["raw"]


def test_tar_without_voc_layout(tmp_path, params_file):
    t = tmp_path / "x.tar"
    with tarfile.open(t, "w") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.source={t}", "-S", f"data.dir={tmp_path / 'D'}", "-q")
    assert_user_error(proc, "VOC layout")
    assert not (tmp_path / "D" / "raw").exists()


def test_offline_voc2012_fails_fast_and_says_what_to_do(tmp_path, params_file):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there
    proc = run_cli("fetch", "-p", str(params_file), "-S", "data.source=voc2012", "-S", f"data.dir={tmp_path / 'D'}",
                   "-S", f"data.voc_url=http://127.0.0.1:{port}/VOCtrainval_11-May-2012.tar", "-q", timeout=60)
    assert_user_error(proc, "data.source")
    assert not (tmp_path / "D" / "raw").exists()


# ---------------------------------------------------------------- reading


def test_dataset_partitions_are_disjoint_and_cover(tmp_path, params_file):
    d = tmp_path / "D"
    opts = ["data.source=synthetic", "data.synthetic.train_count=23", "data.synthetic.val_count=3", "data.row_group_rows=5"]
    fetch(_params(params_file, d, *opts), progress=False)
    preprocess(_params(params_file, d, *opts), progress=False)
    ids = lambda ds: [ds.raw(i)[0] for i in range(len(ds))]  # noqa: E731
    parts = [ids(ShardDataset(d, "train", rank=r, world_size=3)) for r in range(3)]
    assert sum(map(len, parts)) == 23
    assert set().union(*map(set, parts)) == set(ids(ShardDataset(d, "train")))
    assert all(not (set(a) & set(b)) for i, a in enumerate(parts) for b in parts[i + 1:])
    padded = [ShardDataset(d, "train", rank=r, world_size=3, pad=True) for r in range(3)]
    assert {len(p) for p in padded} == {8}


def test_transforms(tmp_path, params_file):
    import torch

    from pipeline.data.transforms import eval_transform, train_transform

    d = tmp_path / "D"
    fetch(_params(params_file, d, "data.source=sample"), progress=False)
    preprocess(_params(params_file, d, "data.source=sample"), progress=False)
    raw = ShardDataset(d, "val")
    _, _, mask_bytes = raw.raw(0)
    truth = decode_mask(mask_bytes)
    torch.manual_seed(0)
    ds = ShardDataset(d, "train", transform=train_transform(200, 0.5, 2.0))
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 200, 200) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(range(21)) | {255}
    ev = ShardDataset(d, "val", transform=eval_transform(600))
    x, y = ev[0]
    assert x.shape == (3, 600, 600)
    # no resampling at eval when the image fits: the mask is the original, padded with void
    assert torch.equal(y[:513, :513], truth.long()) and (y[513:] == 255).all() and (y[:, 513:] == 255).all()
    small = ShardDataset(d, "val", transform=eval_transform(256))[0][1]
    assert small.shape == (256, 256) and set(small.unique().tolist()) <= set(truth.unique().tolist())


def test_quiet_silences_the_progress_of_every_stage(tmp_path, params_file):
    """-q: no progress lines on stdout (the same switch for every stage: the `pipeline` logger);
    without it the same commands say what they did."""
    d = tmp_path / "D"
    common = ["-p", str(params_file), "-S", "data.source=sample", "-S", f"data.dir={d}"]
    loud = [run_cli("fetch", *common), run_cli("preprocess", *common)]
    assert all(proc.returncode == 0 for proc in loud), [proc.stderr for proc in loud]
    assert "preprocessed" in loud[1].stdout, loud[1].stdout
    quiet = [run_cli(stage, *common, "-q") for stage in ("fetch", "preprocess")]
    assert [(proc.returncode, proc.stdout) for proc in quiet] == [(0, ""), (0, "")], [p.stdout for p in quiet]
    assert run_cli("models", "-q").stdout, "-q silences progress, not a command's answer"
