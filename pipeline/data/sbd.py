"""Build VOC2012 "train_aug" from the Semantic Boundaries Dataset (SBD, Hariharan et al. 2011).

Input: the extracted SBD ``benchmark_RELEASE/dataset`` directory (``cls/<id>.mat``, ``img/<id>.jpg``,
``train.txt``, ``val.txt``) and ``VOCdevkit/VOC2012``. Output, inside the VOC root:

- ``SegmentationClassAug/<id>.png``: one-channel VOC-palette PNGs, one per train_aug id, plus
  every VOC ``SegmentationClass`` mask (so val ids are there too). VOC's own mask wins where both exist (it has
  the 255 void borders); otherwise the SBD ``GTcls.Segmentation`` map is converted (SBD has no
  void label, which is the standard SegmentationClassAug convention).
- ``JPEGImages/<id>.jpg`` for SBD ids VOC lacks (copied from SBD ``img/``).
- ``ImageSets/Segmentation/train_aug.txt`` = sorted((SBD train ∪ SBD val ∪ VOC train) − VOC val):
  10,582 ids on the real data.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy.io import loadmat
from tqdm import tqdm

from pipeline.data.voc import read_id_list
from pipeline.errors import UserError
from pipeline.data.palette import save_mask_png

__all__ = ["build_train_aug", "load_sbd_mask", "read_ids"]

NUM_CLASSES = 21
VOID = 255
_PARALLEL_MIN = 500  # fewer conversions than this: not worth starting processes


def read_ids(path: Path) -> list[str]:
    """Ids of an ImageSets-style list (one id per line; blank lines ignored), each checked
    against the VOC id grammar (pipeline.data.voc.read_id_list)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing id list {path}: is the dataset extracted completely?")
    return read_id_list(path)


def load_sbd_mask(mat_path: Path) -> np.ndarray:
    """The H×W uint8 class map (0..20) of an SBD ``cls/<id>.mat`` file (struct ``GTcls``, field
    ``Segmentation``). Any problem is a :class:`UserError` naming the file."""
    mat_path = Path(mat_path)
    try:
        mat = loadmat(str(mat_path), struct_as_record=False, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError / TypeError / OSError / MatReadError
        raise UserError(
            f"cannot read SBD mask {mat_path} ({type(e).__name__}: {e}): the SBD archive looks "
            f"corrupt; delete the extracted SBD directory and re-run"
        ) from None
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None) if gt is not None else None
    if seg is None:
        raise UserError(
            f"bad SBD mask {mat_path}: no GTcls.Segmentation field (is this SBD's cls/ directory, "
            f"not inst/?)"
        )
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.size == 0 or not np.issubdtype(seg.dtype, np.integer):
        raise UserError(
            f"bad SBD mask {mat_path}: GTcls.Segmentation should be a 2-D integer class map, got "
            f"{seg.dtype} of shape {seg.shape}"
        )
    bad = (seg < 0) | ((seg >= NUM_CLASSES) & (seg != VOID))
    if bad.any():
        raise UserError(
            f"bad SBD mask {mat_path}: class values must be 0..{NUM_CLASSES - 1} (or {VOID}), "
            f"found {int(seg[bad].flat[0])}"
        )
    return seg.astype(np.uint8)


def _is_fresh(out: Path, src: Path) -> bool:
    """out exists and is at least as new as src (outputs are written atomically)."""
    try:
        return out.stat().st_mtime >= src.stat().st_mtime
    except FileNotFoundError:
        return False


def _convert(job: tuple[str, str]) -> None:
    mat, png = job
    save_mask_png(load_sbd_mask(Path(mat)), Path(png))


def _copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def _run_conversions(jobs: list[tuple[str, str]], workers: int | None, progress: bool) -> None:
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if len(jobs) >= _PARALLEL_MIN else 1
    disable = None if progress else True
    bar = tqdm(total=len(jobs), unit="mask", desc="SBD .mat -> png", disable=disable, leave=False)
    with bar:
        if workers <= 1 or len(jobs) < 2:
            for job in jobs:
                _convert(job)
                bar.update(1)
        else:
            # spawn: safe with threads in the parent (tqdm, Ray, MLflow); costs one import each
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                for _ in ex.map(_convert, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
                    bar.update(1)


def build_train_aug(
    sbd_root: Path, voc_root: Path, progress: bool = True, workers: int | None = None
) -> dict:
    """Build SegmentationClassAug and ``train_aug.txt`` in ``voc_root`` from SBD.

    ``sbd_root``: SBD's ``benchmark_RELEASE/dataset``; ``voc_root``: ``VOCdevkit/VOC2012``.
    ``workers``: processes for the .mat conversion (None: up to 4 when there are many files).
    Re-running is cheap: outputs newer than their source are kept.

    Returns ``{"train_aug": number of train_aug ids, "converted": number of masks taken from SBD
    .mat files (written now or kept from an earlier run), "val": number of VOC val ids}``.
    """
    sbd_root = Path(sbd_root)
    voc_root = Path(voc_root)
    cls_dir, img_dir = sbd_root / "cls", sbd_root / "img"
    if not cls_dir.is_dir():
        raise UserError(
            f"{cls_dir} not found: sbd_root must be SBD's benchmark_RELEASE/dataset directory "
            f"(holding cls/, img/, train.txt, val.txt)"
        )
    sets = voc_root / "ImageSets" / "Segmentation"
    voc_masks = voc_root / "SegmentationClass"
    jpegs = voc_root / "JPEGImages"
    for d in (sets, voc_masks, jpegs):
        if not d.is_dir():
            raise UserError(f"{d} not found: voc_root must be VOCdevkit/VOC2012 of the VOC2012 trainval tar")

    sbd_train = read_ids(sbd_root / "train.txt")
    sbd_val = read_ids(sbd_root / "val.txt")
    voc_train = read_ids(sets / "train.txt")
    voc_val = read_ids(sets / "val.txt")
    voc_val_set = set(voc_val)
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - voc_val_set)

    out_dir = voc_root / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)

    have_voc = _copy_voc_masks(voc_masks, out_dir, voc_val)
    from_sbd = _convert_sbd_masks(train_aug, have_voc, cls_dir, voc_masks, out_dir, workers, progress)
    _copy_missing_images(train_aug, jpegs, img_dir)
    split = sets / "train_aug.txt"
    tmp = split.with_name(f".{split.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{i}\n" for i in train_aug))
    os.replace(tmp, split)

    return {"train_aug": len(train_aug), "converted": from_sbd, "val": len(voc_val)}


def _copy_voc_masks(voc_masks: Path, out_dir: Path, voc_val: list[str]) -> dict[str, Path]:
    """VOC's own masks into out_dir (all of them: they win wherever they exist); every val id must
    have one. Returns id -> VOC mask."""
    have_voc = {p.stem: p for p in voc_masks.glob("*.png")}
    for stem, src in have_voc.items():
        dst = out_dir / f"{stem}.png"
        if not _is_fresh(dst, src):
            _copy(src, dst)
    no_val_mask = [i for i in voc_val if i not in have_voc]
    if no_val_mask:
        raise UserError(
            f"VOC val id {no_val_mask[0]} has no mask {voc_masks}/{no_val_mask[0]}.png "
            f"({len(no_val_mask)} missing): the VOC2012 extraction is incomplete; extract it again"
        )
    return have_voc


def _convert_sbd_masks(train_aug: list[str], have_voc: dict, cls_dir: Path, voc_masks: Path, out_dir: Path,
                       workers: int | None, progress: bool) -> int:
    """Every train_aug id without a VOC mask from SBD's .mat (stale PNGs converted again). Returns
    how many masks come from SBD."""
    jobs: list[tuple[str, str]] = []
    from_sbd = 0
    missing: list[str] = []
    for i in train_aug:
        if i in have_voc:
            continue
        mat = cls_dir / f"{i}.mat"
        if not mat.is_file():
            missing.append(i)
            continue
        from_sbd += 1
        png = out_dir / f"{i}.png"
        if not _is_fresh(png, mat):
            jobs.append((str(mat), str(png)))
    if missing:
        raise UserError(
            f"no mask for {len(missing)} id(s), e.g. {missing[0]}: neither {voc_masks}/{missing[0]}.png "
            f"nor {cls_dir}/{missing[0]}.mat exists (incomplete SBD or VOC extraction?)"
        )
    _run_conversions(jobs, workers, progress)
    return from_sbd


def _copy_missing_images(train_aug: list[str], jpegs: Path, img_dir: Path) -> None:
    """The train_aug images VOC lacks, from SBD's img/."""
    for i in train_aug:
        dst = jpegs / f"{i}.jpg"
        if dst.is_file():
            continue
        src = img_dir / f"{i}.jpg"
        if not src.is_file():
            raise UserError(f"no image for {i}: neither {dst} nor {src} exists (incomplete SBD extraction?)")
        _copy(src, dst)
