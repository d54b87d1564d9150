"""Bring a VOC-layout dataset to <data.dir>/raw/, by data.source: the logic of `segpipe fetch`.

- sample       the 10 real VOC images bundled in assets/voc-mini.tar
- synthetic    generated VOC-format scenes (data.synthetic.*, :mod:`pipeline.data.synthetic`)
- voc2012      downloads VOCtrainval_11-May-2012.tar (data.voc_url, md5 data.voc_md5)
- voc2012_aug  the same plus SBD (data.sbd_url) -> the 10,582-image train_aug split, VOC12 val held out
- a tar path   a local copy of a VOC tar (any compression)
- a directory  one that holds VOCdevkit/ (read in place, nothing copied)

data.sbd_source (a local SBD archive / extracted dir, or a SegmentationClassAug folder) adds
train_aug to any VOC source without a download (:mod:`pipeline.data.sbd`).

Contract of :func:`fetch`: under the data.dir writer lock the new raw/ is built in
<data.dir>/.raw-new and swapped in by :func:`pipeline.storage.swap_in` only when complete, so a
refused archive or a failed download leaves the previous raw/ intact; <data.dir>/raw/source.json
(:class:`pipeline.data.voc.RawLayout`) tells preprocess where the VOC root is and which id lists
make each split. Every failure the user can act on is a UserError that never names the staging dir.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from pipeline import storage
from pipeline.config import Params
from pipeline.data.archive import ExtractLimits, safe_extract
from pipeline.data.download import download
from pipeline.data.sbd import build_train_aug, read_ids
from pipeline.data.synthetic import generate
from pipeline.data.voc import ID_PATTERN, RAW_LEGACY, RawLayout, find_voc_root
from pipeline.errors import UserError
from pipeline.storage import REPO, clean_debris, ensure_dir, os_error, writer_lock

ASSETS = REPO / "assets"
SAMPLE_TAR = ASSETS / "voc-mini.tar"


def _check_splits(voc_root: Path, splits: dict[str, str]) -> None:
    for split, rel in splits.items():
        if not (voc_root / rel).is_file():
            raise UserError(f"{voc_root / rel} is missing: the dataset has no {split!r} split list (data.source)")


TRAIN_AUG = "ImageSets/Segmentation/train_aug.txt"


def _sbd_kind(src: Path) -> str:
    """What data.sbd_source names: an SBD archive ("tar"), an extracted SBD ("sbd": a dir holding
    cls/*.mat somewhere below, e.g. benchmark_RELEASE/dataset) or a SegmentationClassAug folder
    ("aug": the pre-converted one-channel PNG masks)."""
    if src.is_file():
        return "tar"
    if not src.is_dir():
        raise UserError(f"{src} not found (data.sbd_source)")
    for cand in (src, src / "dataset", src / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return "sbd"
    if any(src.glob("*.png")) or (src / "SegmentationClassAug").is_dir():
        return "aug"
    raise UserError(f"{src} is neither SBD (benchmark.tgz, or a dir holding dataset/cls/*.mat) nor a "
                    "SegmentationClassAug folder of PNG masks (data.sbd_source)")


def _sbd_dataset_dir(root: Path, what: str) -> Path:
    for cand in (root, root / "dataset", root / "benchmark_RELEASE" / "dataset"):
        if (cand / "cls").is_dir():
            return cand
    found = next((d for d in sorted(root.rglob("cls")) if d.is_dir()), None)
    if found is None:
        raise UserError(f"{what} has no SBD layout (dataset/cls/*.mat) (data.sbd_source / data.sbd_url)")
    return found.parent


def _aug_ids(path: Path) -> list[str]:
    """The ids of a train_aug list: plain ids, or the widely shared `/JPEGImages/<id>.jpg
    /SegmentationClassAug/<id>.png` pairs (the id is the first word's file stem); every id is
    checked against the VOC id grammar (pipeline.data.voc.ID_PATTERN)."""
    ids = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        words = line.split()
        if not words:
            continue
        word = words[0]
        pair = re.fullmatch(r"/?(?:JPEGImages/(.+)\.jpg|SegmentationClassAug/(.+)\.png)", word)
        sid = (pair.group(1) or pair.group(2)) if pair else word
        if not ID_PATTERN.fullmatch(sid):
            shown = word if len(word) <= 60 else word[:57] + "..."
            raise UserError(f"{path} line {n}: bad image id {shown!r} (data.sbd_source)")
        ids.append(sid)
    return ids


def _shadow_voc(voc_root: Path, new_raw: Path) -> Path:
    """A writable VOC root in new_raw for a VOC dir read in place: symlinks to its images and masks,
    copies of its id lists (train_aug is built here; the user's dataset is never written)."""
    shadow = new_raw / "VOCdevkit" / "VOC2012"
    for sub, pattern in (("JPEGImages", "*.jpg"), ("SegmentationClass", "*.png")):
        (shadow / sub).mkdir(parents=True)
        for f in (voc_root / sub).glob(pattern):
            (shadow / sub / f.name).symlink_to(f.resolve())
    sets = shadow / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    for f in (voc_root / "ImageSets" / "Segmentation").glob("*.txt"):
        shutil.copyfile(f, sets / f.name)
    return shadow


def _add_aug(p: Params, new_raw: Path, voc_root: Path, in_place: bool, progress: bool,
             downloads: Path) -> dict:
    """train_aug from SBD (data.sbd_source, else the data.sbd_url download) or from a
    SegmentationClassAug folder. Returns the RawLayout fields that change."""
    limits = ExtractLimits.from_params(p.data)
    local = p.data.sbd_source
    kind = _sbd_kind(Path(local).expanduser()) if local else "download"
    sets = voc_root / "ImageSets" / "Segmentation"
    if kind == "aug":
        aug = Path(local).expanduser().resolve()
        if (aug / "SegmentationClassAug").is_dir():
            aug = aug / "SegmentationClassAug"
        masks = {f.stem for f in aug.glob("*.png")}
        val = read_ids(sets / "val.txt")
        lists = [aug / "train_aug.txt", aug.parent / "train_aug.txt", sets / "train_aug.txt"]
        lst = next((f for f in lists if f.is_file()), None)
        # no list: every mask of the folder but VOC val (12,031 - 1,449 = 10,582 on the real folder)
        ids = _aug_ids(lst) if lst else sorted(masks - set(val))
        ids = sorted(set(ids) - set(val))
        missing = [i for i in ids if i not in masks]
        if missing:
            raise UserError(f"{aug} has no mask for {len(missing)} train_aug id(s), e.g. {missing[0]} "
                            "(data.sbd_source)")
        if in_place:  # the user's VOC dir stays untouched: the list goes into a shadow root in raw/
            voc_root = _shadow_voc(voc_root, new_raw)
        (voc_root / TRAIN_AUG).write_text("".join(f"{i}\n" for i in ids))
        return {"splits_train": TRAIN_AUG, "mask_dirs": {"train": str(aug)}, "voc_root": voc_root,
                "train_from": f"SegmentationClassAug {aug}"}

    if kind == "sbd":
        sbd_root = _sbd_dataset_dir(Path(local).expanduser().resolve(), local)
        what = local
    else:
        if kind == "tar":
            sbd_tar = Path(local).expanduser()
        else:
            url = p.data.sbd_url
            sbd_tar = download(url, downloads / Path(url).name, md5=p.data.sbd_md5,
                               timeout=p.data.download_timeout_s, progress=progress)
        safe_extract(sbd_tar, new_raw / "sbd", progress=progress, limits=limits)
        sbd_root, what = _sbd_dataset_dir(new_raw / "sbd", str(sbd_tar)), str(sbd_tar)
    if in_place:
        voc_root = _shadow_voc(voc_root, new_raw)
    build_train_aug(sbd_root, voc_root, progress=progress)
    if (new_raw / "sbd").exists():
        shutil.rmtree(new_raw / "sbd")  # the converted PNGs now live in the VOC root
    return {"splits_train": TRAIN_AUG, "mask_dir": "SegmentationClassAug", "voc_root": voc_root,
            "train_from": f"SBD {what}"}


def _fetch_into(p: Params, new_raw: Path, progress: bool) -> RawLayout:
    src = p.data.source
    data_dir = Path(p.data.dir)
    downloads = data_dir / "downloads"
    splits = {"train": "ImageSets/Segmentation/train.txt", "val": "ImageSets/Segmentation/val.txt"}
    want_aug = src == "voc2012_aug" or bool(p.data.sbd_source)

    if src == "synthetic":
        if p.data.sbd_source:
            raise UserError("data.sbd_source adds SBD to a VOC source; data.source=synthetic has none "
                            "(data.sbd_source)")
        generate(new_raw / "VOCdevkit" / "VOC2012", p.data.synthetic, progress=progress)
        return RawLayout(source=src, voc_root="VOCdevkit/VOC2012", splits=splits)

    in_place = not (src in ("sample", "voc2012", "voc2012_aug") or Path(src).is_file())
    if not in_place:
        if src == "sample":
            archive = SAMPLE_TAR
            if not archive.is_file():
                raise UserError(f"the bundled sample {archive} is missing from this checkout (data.source=sample)")
        elif src in ("voc2012", "voc2012_aug"):
            url = p.data.voc_url
            archive = download(url, downloads / Path(url).name, md5=p.data.voc_md5,
                               timeout=p.data.download_timeout_s, progress=progress)
        else:
            archive = Path(src).expanduser()
        limits = ExtractLimits.from_params(p.data)
        safe_extract(archive, new_raw, progress=progress, limits=limits)
        voc_root = find_voc_root(new_raw)
    else:  # a directory holding VOCdevkit/: read in place
        voc_root = find_voc_root(Path(src).expanduser())  # absolute
    extra: dict = {}
    train_from = "VOC train.txt"
    if want_aug:
        _check_splits(voc_root, {"val": splits["val"]})
        aug = _add_aug(p, new_raw, voc_root, in_place, progress, downloads)
        voc_root = aug.get("voc_root", voc_root)
        splits["train"] = aug["splits_train"]
        if "mask_dir" in aug:
            extra["mask_dir"] = aug["mask_dir"]
        if "mask_dirs" in aug:
            extra["mask_dirs"] = aug["mask_dirs"]
        train_from = aug["train_from"]
    # the root is stored relative to raw/ so the directory can be moved into place
    resolved = voc_root.resolve()
    rel = str(resolved.relative_to(new_raw.resolve())) if resolved.is_relative_to(new_raw.resolve()) else str(resolved)
    return RawLayout(source=src, voc_root=rel, splits=splits, train_from=train_from, **extra)


def _relabel(msg: str, new_raw: Path, label: str) -> str:
    """Messages name what the user knows (the archive's own paths), never the staging dir."""
    for form in (str(new_raw.resolve()), str(new_raw.absolute()), str(new_raw)):
        msg = msg.replace(form + "/", f"{label}:").replace(form, label)
    return msg


def fetch(p: Params, progress: bool = True) -> RawLayout:
    data_dir = Path(p.data.dir)
    ensure_dir(data_dir)
    with writer_lock(data_dir):
        raw = data_dir / "raw"
        new_raw = data_dir / ".raw-new"
        src = p.data.source
        label = "the fetched dataset" if src in ("synthetic",) else f"{Path(src).name if Path(src).is_file() else src} (extracted)"
        try:
            storage.check_owned(raw, "data.dir", RAW_LEGACY)
            clean_debris(data_dir)
            new_raw.mkdir()
            try:
                layout = _fetch_into(p, new_raw, progress)
                _check_splits(layout.root(new_raw), layout.splits)
                layout.save(new_raw)
                storage.swap_in(new_raw, raw, "data.dir", RAW_LEGACY)
            finally:
                if new_raw.exists():
                    shutil.rmtree(new_raw, ignore_errors=True)
        except UserError as exc:
            raise type(exc)(_relabel(str(exc), new_raw, label)) from None
        except OSError as exc:
            raise os_error(exc, data_dir, "write the fetched dataset") from None
    return layout
