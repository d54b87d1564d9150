"""Local data sources give the recipe's train_aug: a VOC tar / VOCdevkit dir plus a local SBD
(tar or dir), or a SegmentationClassAug folder. Real VOC layout (assets/voc-mini.tar) and a
hand-made SBD (real JPEGs, .mat masks) -> fetch -> preprocess (CLI) -> manifest + shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from scipy.io import savemat

from pipeline.data.loaders import decode_mask, list_shards
from pipeline.data.palette import save_mask_png
from tests.support.cli import assert_user_error, run_cli
from tests.support.files import tree_snapshot
from tests.support.paths import SAMPLE_TAR

# voc-mini: train 7, val 3. SBD adds three new ids, repeats a VOC train id (VOC's mask wins) and
# lists a VOC val id (held out).
NEW = ["2011_000001", "2011_000002", "2011_000003"]


def _voc_ids(split: str) -> list[str]:
    with tarfile.open(SAMPLE_TAR) as tf:
        return tf.extractfile(f"VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt").read().decode().split()


def _make_sbd(root: Path) -> dict[str, np.ndarray]:
    ds = root / "benchmark_RELEASE" / "dataset"
    (ds / "cls").mkdir(parents=True)
    (ds / "img").mkdir()
    rng = np.random.default_rng(1)
    train, val = _voc_ids("train"), _voc_ids("val")
    mats = {}
    for k, i in enumerate(NEW + [train[0], val[0]]):
        h, w = 40 + 3 * k, 50 + 2 * k
        seg = rng.integers(0, 21, size=(h, w), dtype=np.uint8)
        savemat(str(ds / "cls" / f"{i}.mat"), {"GTcls": {"Segmentation": seg}})
        mats[i] = seg
        Image.fromarray(rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)).save(ds / "img" / f"{i}.jpg")
    (ds / "train.txt").write_text("\n".join(NEW[:2] + [train[0]]) + "\n")
    (ds / "val.txt").write_text("\n".join([NEW[2], val[0]]) + "\n")
    return mats


def _sbd_tar(tmp_path: Path) -> tuple[Path, dict]:
    src = tmp_path / "sbd-src"
    mats = _make_sbd(src)
    tgz = tmp_path / "benchmark.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(src / "benchmark_RELEASE", arcname="benchmark_RELEASE")
    return tgz, mats


def _masks(d: Path, split: str) -> dict[str, np.ndarray]:
    out = {}
    for path in list_shards(d, split):
        for row in pq.read_table(path, columns=["id", "mask"]).to_pylist():
            out[row["id"]] = decode_mask(row["mask"]).numpy()
    return out


def _fetch_preprocess(params_file, d, *sets):
    args = [x for s in sets for x in ("-S", s)]
    f = run_cli("fetch", "-p", str(params_file), "-S", f"data.dir={d}", *args)
    assert f.returncode == 0, f.stderr
    pre = run_cli("preprocess", "-p", str(params_file), "-S", f"data.dir={d}", *args)
    assert pre.returncode == 0, pre.stderr
    return f.stdout + pre.stdout, json.loads((d / "shards" / "manifest.json").read_text())


def _check_train_aug(out, manifest, d, mats):
    train, val = _voc_ids("train"), _voc_ids("val")
    expected = sorted(set(train) | set(NEW))
    assert manifest["train_list"] == "train_aug"
    assert manifest["splits"]["train"]["count"] == len(expected) == 10
    assert manifest["splits"]["val"]["count"] == len(val)
    assert "train split: train_aug (10 images" in out and "train list: train_aug" in out
    got = _masks(d, "train")
    assert sorted(got) == expected and not set(got) & set(val)
    for i in NEW:  # converted from the .mat, exactly
        assert np.array_equal(got[i], mats[i]), i
    assert got[train[0]].shape != mats[train[0]].shape  # VOC's own mask won


def test_voc_tar_plus_sbd_tar_gives_train_aug(tmp_path, params_file):
    tgz, mats = _sbd_tar(tmp_path)
    d = tmp_path / "D"
    out, manifest = _fetch_preprocess(params_file, d, f"data.source={SAMPLE_TAR}", f"data.sbd_source={tgz}",
                                      "data.tune_split=0")
    _check_train_aug(out, manifest, d, mats)
    assert "SBD" in manifest["train_from"]
    assert not (d / "raw" / "sbd").exists()  # the extracted SBD is not kept


def test_vocdevkit_dir_plus_sbd_dir_leaves_both_untouched(tmp_path, params_file):
    voc = tmp_path / "myvoc"
    with tarfile.open(SAMPLE_TAR) as tf:
        tf.extractall(voc, filter="data")
    sbd = tmp_path / "sbd"
    mats = _make_sbd(sbd)
    before = tree_snapshot(voc), tree_snapshot(sbd)
    d = tmp_path / "D"
    out, manifest = _fetch_preprocess(params_file, d, f"data.source={voc}", f"data.sbd_source={sbd}",
                                      "data.tune_split=0")
    _check_train_aug(out, manifest, d, mats)
    assert (tree_snapshot(voc), tree_snapshot(sbd)) == before


def test_segmentationclassaug_folder(tmp_path, params_file):
    """The pre-converted folder (grey PNGs) + the widely shared DeepLab-style train_aug.txt."""
    voc = tmp_path / "myvoc"
    with tarfile.open(SAMPLE_TAR) as tf:
        tf.extractall(voc, filter="data")
    vroot = voc / "VOCdevkit" / "VOC2012"
    train, val = _voc_ids("train"), _voc_ids("val")
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    mine = {}
    for i in train + val:
        with Image.open(vroot / "SegmentationClass" / f"{i}.png") as im:
            arr = np.array(im)
        arr = np.where(arr == 255, 255, (arr + 1) % 21).astype(np.uint8)  # differs from VOC's
        Image.fromarray(arr, mode="L").save(aug / f"{i}.png")
        mine[i] = arr
    listed = train[:5] + [val[0]]  # the val id is held out
    (tmp_path / "train_aug.txt").write_text(
        "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in listed))
    before = tree_snapshot(voc)
    d = tmp_path / "D"
    out, manifest = _fetch_preprocess(params_file, d, f"data.source={voc}", f"data.sbd_source={aug}",
                                      "data.tune_split=0")
    assert manifest["train_list"] == "train_aug" and manifest["splits"]["train"]["count"] == 5
    assert "train split: train_aug (5 images" in out
    got = _masks(d, "train")
    assert sorted(got) == sorted(train[:5])
    for i in got:
        assert np.array_equal(got[i], mine[i]), i
    with Image.open(vroot / "SegmentationClass" / f"{val[0]}.png") as im:
        assert np.array_equal(_masks(d, "val")[val[0]], np.array(im))  # val: VOC's own masks
    assert tree_snapshot(voc) == before

    # without a list: every mask of the folder but VOC val
    (tmp_path / "train_aug.txt").unlink()
    d2 = tmp_path / "D2"
    _, manifest = _fetch_preprocess(params_file, d2, f"data.source={SAMPLE_TAR}", f"data.sbd_source={aug}",
                                    "data.tune_split=0")
    assert manifest["splits"]["train"]["count"] == len(train)


def test_local_voc_alone_says_train_not_train_aug(tmp_path, params_file):
    d = tmp_path / "D"
    out, manifest = _fetch_preprocess(params_file, d, f"data.source={SAMPLE_TAR}")
    assert manifest["train_list"] == "train" and "data.sbd_source" in out


def test_bad_local_sbd_is_refused_and_raw_kept(tmp_path, params_file):
    d = tmp_path / "D"
    _fetch_preprocess(params_file, d, "data.source=sample")
    before = tree_snapshot(d)
    # an SBD tar escaping its directory: the extraction limits still hold
    evil = tmp_path / "sbd-evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("benchmark_RELEASE/../../pwned.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"pwned"))
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.source={SAMPLE_TAR}",
                   "-S", f"data.sbd_source={evil}", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "sbd-evil.tar")
    assert not (tmp_path / "pwned.txt").exists()
    # a train_aug list with an id that could leave the dataset dir
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    save_mask_png(np.zeros((4, 4), np.uint8), aug / "2012_000001.png")
    (tmp_path / "train_aug.txt").write_text("/JPEGImages/../../etc/passwd.jpg x\n")
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.source={SAMPLE_TAR}",
                   "-S", f"data.sbd_source={aug}", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "train_aug.txt")
    # synthetic has no VOC to add SBD to; a missing path is a params error
    proc = run_cli("fetch", "-p", str(params_file), "-S", "data.source=synthetic",
                   "-S", f"data.sbd_source={aug}", "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "data.sbd_source")
    proc = run_cli("fetch", "-p", str(params_file), "-S", f"data.sbd_source={tmp_path / 'nope'}",
                   "-S", f"data.dir={d}", "-q")
    assert_user_error(proc, "data.sbd_source")
    assert tree_snapshot(d) == before


def test_runs_record_the_train_list(tmp_path, params_file):
    from pipeline import tracking
    from pipeline.config import load_params

    d = tmp_path / "D"
    tgz, _ = _sbd_tar(tmp_path)
    _fetch_preprocess(params_file, d, f"data.source={SAMPLE_TAR}", f"data.sbd_source={tgz}")
    p = load_params(params_file, [f"data.dir={d}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    run_id = tracking.start_run(uri, p, family="fcn", model="fcn8s_vgg16", options={}, stage="train")
    tags = tracking.client(uri).get_run(run_id).data.tags
    assert tags["data_train_list"] == "train_aug" and tags["data_train_images"] == "10"
