"""`segpipe fetch`: bring a VOC-layout dataset to <data.dir>/raw/ (by data.source).

- sample       the 10 real VOC images bundled in assets/voc-mini.tar
- synthetic    generated VOC-format scenes (data.synthetic.*)
- voc2012      downloads VOCtrainval_11-May-2012.tar (data.voc_url, md5 data.voc_md5)
- voc2012_aug  the same plus SBD (data.sbd_url) -> the 10,582-image train_aug split, VOC12 val held out
- a tar path   a local copy of a VOC tar (any compression)
- a directory  one that holds VOCdevkit/ (read in place, nothing copied)

The new raw/ is built beside the old one and swapped in only when complete, so a refused archive
or a failed download leaves the previous raw/ intact. <data.dir>/raw/source.json tells preprocess
where the VOC root is and which id lists make each split.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline import storage
from pipeline.config import Params
from pipeline.datadir import clean_debris, ensure_dir, os_error, writer_lock
from pipeline.download import ExtractLimits, download, safe_extract
from pipeline.errors import UserError
from pipeline.voc import RawLayout, find_voc_root

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SAMPLE_TAR = ASSETS / "voc-mini.tar"


def _check_splits(voc_root: Path, splits: dict[str, str]) -> None:
    for split, rel in splits.items():
        if not (voc_root / rel).is_file():
            raise UserError(f"{voc_root / rel} is missing: the dataset has no {split!r} split list (data.source)")


def _fetch_into(p: Params, new_raw: Path, progress: bool) -> RawLayout:
    src = p.data.source
    data_dir = Path(p.data.dir)
    downloads = data_dir / "downloads"
    splits = {"train": "ImageSets/Segmentation/train.txt", "val": "ImageSets/Segmentation/val.txt"}

    if src == "synthetic":
        from pipeline.synthetic import generate

        generate(new_raw / "VOCdevkit" / "VOC2012", p.data.synthetic, progress=progress)
        return RawLayout(source=src, voc_root="VOCdevkit/VOC2012", splits=splits)

    if src in ("sample", "voc2012", "voc2012_aug") or Path(src).is_file():
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
        if src == "voc2012_aug":
            from pipeline.sbd import build_train_aug

            url = p.data.sbd_url
            sbd_tar = download(url, downloads / Path(url).name, md5=p.data.sbd_md5,
                               timeout=p.data.download_timeout_s, progress=progress)
            safe_extract(sbd_tar, new_raw / "sbd", progress=progress, limits=limits)
            sbd_root = next((d for d in (new_raw / "sbd").rglob("cls") if d.is_dir()), None)
            if sbd_root is None:
                raise UserError(f"{sbd_tar} has no SBD layout (dataset/cls/*.mat) (data.sbd_url)")
            build_train_aug(sbd_root.parent, voc_root, progress=progress)
            shutil.rmtree(new_raw / "sbd")  # the converted PNGs now live in the VOC root
            splits["train"] = "ImageSets/Segmentation/train_aug.txt"
        # the root is stored relative to raw/ so the directory can be moved into place
        rel = str(voc_root.relative_to(new_raw.resolve()))
        mask_dir = "SegmentationClassAug" if src == "voc2012_aug" else "SegmentationClass"
        return RawLayout(source=src, voc_root=rel, splits=splits, mask_dir=mask_dir)

    # a directory holding VOCdevkit/: read in place
    voc_root = find_voc_root(Path(src).expanduser())  # absolute
    return RawLayout(source=src, voc_root=str(voc_root), splits=splits)


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
            clean_debris(data_dir)
            new_raw.mkdir()
            try:
                layout = _fetch_into(p, new_raw, progress)
                _check_splits(layout.root(new_raw), layout.splits)
                layout.save(new_raw)
                storage.swap_in(new_raw, raw)
            finally:
                if new_raw.exists():
                    shutil.rmtree(new_raw, ignore_errors=True)
        except UserError as exc:
            raise type(exc)(_relabel(str(exc), new_raw, label)) from None
        except OSError as exc:
            raise os_error(exc, data_dir, "write the fetched dataset") from None
    return layout


WEIGHTS_DIR = Path("weights")


def fetch_weights(p: Params, progress: bool = True) -> list[Path]:
    """Download the ImageNet backbone files that families.*.options.backbone_weights name
    (torchvision's published files; their names embed a sha256 prefix, checked here). Writes
    weights/manifest.json (also when no family names one) for DVC."""
    import json

    from pipeline.download import sha256sum
    from seg_models import BACKBONE_WEIGHTS, model_info

    got: dict[str, str] = {}
    for fam, spec in p.families.items():
        where = f"families.{fam}.options.backbone_weights"
        path = spec.options.get("backbone_weights")
        if not path:
            continue
        path = Path(path)
        backbone = model_info(spec.model).get("backbone")
        if backbone not in BACKBONE_WEIGHTS:
            raise UserError(f"{spec.model} has no ImageNet backbone to load ({where})")
        url, fname = BACKBONE_WEIGHTS[backbone]
        if not path.is_file():
            if path.name != fname:
                raise UserError(f"{path} not found; torchvision's {backbone} file is {fname} from {url} ({where})")
            try:
                download(url, path, md5=None, timeout=p.data.download_timeout_s, progress=progress)
            except UserError as exc:
                raise UserError(f"{exc} — or download {url} elsewhere and put it at {path} ({where})") from None
        prefix = fname.rsplit("-", 1)[-1].split(".")[0]
        if path.name == fname and not sha256sum(path).startswith(prefix):
            raise UserError(f"{path}: sha256 does not start with {prefix}: a corrupt or different file; "
                            f"delete it and re-run `segpipe fetch --weights` ({where})")
        got[fam] = str(path)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    (WEIGHTS_DIR / "manifest.json").write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    return [Path(v) for v in got.values()]


def add_arguments(parser) -> None:
    parser.add_argument("--weights", action="store_true",
                        help="instead of the dataset, fetch the ImageNet backbone weights that "
                             "families.*.options.backbone_weights name (torchvision's files, hash-checked)")


def run(p: Params, args) -> int:
    if getattr(args, "weights", False):
        files = fetch_weights(p, progress=not args.quiet)
        print(f"backbone weights ready: {', '.join(map(str, files)) or 'none named by the families'}")
        return 0
    layout = fetch(p, progress=not getattr(args, "quiet", False))
    root = layout.root(Path(p.data.dir) / "raw")
    counts = {s: sum(1 for line in (root / rel).read_text().split() if line) for s, rel in layout.splits.items()}
    print(f"fetched {layout.source}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" -> {root}")
    return 0
