"""pipeline.data.sbd: SegmentationClassAug + train_aug.txt from a tiny hand-made SBD / VOC layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from pipeline.errors import UserError
from pipeline.data.palette import VOC_PALETTE, save_mask_png, voc_palette
from pipeline.data.sbd import build_train_aug, load_sbd_mask

# SBD train: 1, 2, 3 (3 is VOC val -> excluded); SBD val: 4, 5 (5 is also VOC train, VOC mask wins)
SBD_TRAIN = ["2008_000001", "2008_000002", "2008_000003"]
SBD_VAL = ["2008_000004", "2008_000005"]
VOC_TRAIN = ["2008_000005", "2007_000010"]  # 2007_000010: VOC only (no .mat)
VOC_VAL = ["2008_000003", "2007_000020"]
EXPECTED = ["2007_000010", "2008_000001", "2008_000002", "2008_000004", "2008_000005"]


def _write_mat(path: Path, seg: np.ndarray) -> None:
    present = np.unique(seg[(seg > 0) & (seg < 255)]).astype(np.uint8)
    savemat(str(path), {"GTcls": {"Segmentation": seg, "Boundaries": np.zeros((1, 20), dtype=object),
                                  "CategoriesPresent": present}})


@pytest.fixture
def layout(tmp_path):
    rng = np.random.default_rng(0)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "img").mkdir()
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for d in ("ImageSets/Segmentation", "SegmentationClass", "JPEGImages"):
        (voc / d).mkdir(parents=True)

    mats = {}
    for k, i in enumerate(SBD_TRAIN + SBD_VAL):
        seg = rng.integers(0, 21, size=(5 + k, 7 + 2 * k), dtype=np.uint8)  # a distinct shape each
        _write_mat(sbd / "cls" / f"{i}.mat", seg)
        mats[i] = seg
        (sbd / "img" / f"{i}.jpg").write_bytes(b"sbd-jpeg-" + i.encode())
    (sbd / "train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "val.txt").write_text("\n".join(SBD_VAL) + "\n\n")

    vocmasks = {}
    for i in VOC_TRAIN + VOC_VAL:
        m = rng.integers(0, 21, size=(6, 8), dtype=np.uint8)
        m[0, :] = 255  # VOC's void border
        save_mask_png(m, voc / "SegmentationClass" / f"{i}.png")
        vocmasks[i] = m
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(b"voc-jpeg-" + i.encode())
    (voc / "JPEGImages" / "2008_000001.jpg").write_bytes(b"voc-jpeg-2008_000001")  # VOC has it
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    return sbd, voc, mats, vocmasks


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "P"
        assert im.getpalette()[: 3 * 21] == VOC_PALETTE[: 3 * 21]
        return np.array(im)


def test_build_train_aug(layout):
    sbd, voc, mats, vocmasks = layout
    counts = build_train_aug(sbd, voc, progress=False, workers=1)
    assert counts == {"train_aug": 5, "converted": 3, "val": 2}

    lines = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().splitlines()
    assert lines == EXPECTED
    assert not set(lines) & set(VOC_VAL)  # 2008_000003 is SBD train but VOC val

    aug = voc / "SegmentationClassAug"
    for i in ("2008_000001", "2008_000002", "2008_000004"):  # from SBD .mat, exactly
        got = _read_png(aug / f"{i}.png")
        assert got.dtype == np.uint8 and np.array_equal(got, mats[i])
    for i in VOC_TRAIN + VOC_VAL:  # VOC's own masks win (2008_000005 has both)
        assert np.array_equal(_read_png(aug / f"{i}.png"), vocmasks[i])
    assert vocmasks["2008_000005"].shape != mats["2008_000005"].shape  # so the check above means something
    assert sorted(p.stem for p in aug.glob("*.png")) == sorted(set(EXPECTED) | set(VOC_VAL))

    jp = voc / "JPEGImages"
    assert (jp / "2008_000002.jpg").read_bytes() == b"sbd-jpeg-2008_000002"  # copied from SBD
    assert (jp / "2008_000004.jpg").read_bytes() == b"sbd-jpeg-2008_000004"
    assert (jp / "2008_000001.jpg").read_bytes() == b"voc-jpeg-2008_000001"  # VOC's kept
    assert not list(voc.rglob(".*tmp*"))

    # a second run gives the same result
    assert build_train_aug(sbd, voc, progress=False) == counts
    assert (voc / "ImageSets/Segmentation/train_aug.txt").read_text().splitlines() == EXPECTED


def test_build_train_aug_parallel_matches(layout):
    sbd, voc, mats, _ = layout
    assert build_train_aug(sbd, voc, progress=False, workers=2)["converted"] == 3
    for i in ("2008_000001", "2008_000002", "2008_000004"):
        assert np.array_equal(_read_png(voc / "SegmentationClassAug" / f"{i}.png"), mats[i])


def test_bad_mat_names_the_file(layout):
    sbd, voc, _, _ = layout
    bad = sbd / "cls" / "2008_000002.mat"
    bad.write_bytes(b"this is not a MATLAB file" * 10)
    with pytest.raises(UserError, match="2008_000002.mat"):
        build_train_aug(sbd, voc, progress=False, workers=1)


def test_mat_without_gtcls_or_bad_values(tmp_path):
    p = tmp_path / "x.mat"
    savemat(str(p), {"GTinst": {"Segmentation": np.zeros((3, 3), np.uint8)}})
    with pytest.raises(UserError, match="x.mat"):
        load_sbd_mask(p)
    savemat(str(p), {"GTcls": {"Segmentation": np.full((3, 3), 42, np.uint8)}})
    with pytest.raises(UserError, match="42"):
        load_sbd_mask(p)


def test_missing_mask_and_missing_dirs(layout, tmp_path):
    sbd, voc, _, _ = layout
    (sbd / "cls" / "2008_000004.mat").unlink()
    with pytest.raises(UserError, match="2008_000004"):
        build_train_aug(sbd, voc, progress=False, workers=1)
    with pytest.raises(UserError, match="benchmark_RELEASE/dataset"):
        build_train_aug(tmp_path / "nope", voc, progress=False)
    with pytest.raises(UserError, match="VOCdevkit/VOC2012"):
        build_train_aug(sbd, tmp_path / "nope", progress=False)


def test_palette_and_save_mask_png(tmp_path):
    assert len(VOC_PALETTE) == 768 and VOC_PALETTE == voc_palette()
    assert VOC_PALETTE[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
    assert VOC_PALETTE[3 * 15: 3 * 16] == [192, 128, 128]  # person
    assert VOC_PALETTE[-3:] == [224, 224, 192]  # 255 = void
    m = np.array([[0, 1, 20], [255, 7, 0]], dtype=np.uint8)
    p = save_mask_png(m, tmp_path / "m.png")
    assert np.array_equal(_read_png(p), m)
