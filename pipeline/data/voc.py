"""PASCAL VOC constants and the layout of a fetched raw dataset."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.errors import UserError

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
NUM_CLASSES = len(VOC_CLASSES)
IGNORE_INDEX = 255


# VOC ids are 2008_000123 (SBD: the same), the synthetic scenes syn_000001: letters, digits, '_'
# and '-' only. An id is joined into file paths, so separators, dots ('..') and anything else
# that could leave the dataset directory are refused.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def read_id_list(path: Path) -> list[str]:
    """The ids of an ImageSets-style list (first word of each non-blank line), each checked
    against :data:`ID_PATTERN`; a bad one is a UserError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read the split list {path} ({exc.strerror or exc}) (data.source)") from None
    ids = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words:
            continue
        sid = words[0]
        if not ID_PATTERN.fullmatch(sid):
            shown = sid if len(sid) <= 60 else sid[:57] + "..."
            raise UserError(f"{path} line {n}: bad image id {shown!r} (ids are letters, digits, '_' and '-', "
                            f"like 2008_000123; no '/', '\\' or '..') (data.source)")
        ids.append(sid)
    return ids


# a raw/ fetched before the ownership mark (pipeline.storage.OWNER_MARK) existed has its source.json
RAW_LEGACY = ("source.json",)


@dataclass
class RawLayout:
    """What `segpipe fetch` leaves for `segpipe preprocess`: where the VOC root is and which
    id lists / mask folder form each split. Stored as <data.dir>/raw/source.json."""

    source: str
    voc_root: str                    # .../VOCdevkit/VOC2012: absolute, or relative to raw/
    splits: dict[str, str]           # split -> id list file, relative to voc_root
    mask_dir: str = "SegmentationClass"
    image_dir: str = "JPEGImages"
    mask_dirs: dict[str, str] = field(default_factory=dict)  # split -> mask folder where not mask_dir
    train_from: str = "VOC train.txt"  # what the train list was built from (printed, in manifest.json)

    def masks(self, split: str) -> str:
        return self.mask_dirs.get(split, self.mask_dir)

    def save(self, raw_dir: Path) -> Path:
        raw_dir.mkdir(parents=True, exist_ok=True)
        path = raw_dir / "source.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(path)
        return path

    def root(self, raw_dir: Path) -> Path:
        return raw_dir / self.voc_root  # an absolute voc_root wins over raw_dir

    @classmethod
    def load(cls, raw_dir: Path) -> "RawLayout":
        path = raw_dir / "source.json"
        if not path.is_file():
            raise UserError(f"no fetched dataset in {raw_dir} (missing source.json): run `segpipe fetch` first (data.dir)")
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            raise UserError(f"{path} is damaged (not the JSON `segpipe fetch` writes): re-run `segpipe fetch` "
                            "(data.dir)") from None


def find_voc_root(path: Path) -> Path:
    """Accept a dir holding VOCdevkit/, VOCdevkit/ itself or VOC2012/ itself."""
    for cand in (path / "VOCdevkit" / "VOC2012", path / "VOC2012", path):
        if (cand / "JPEGImages").is_dir() and (cand / "ImageSets" / "Segmentation").is_dir():
            return cand.resolve()
    raise UserError(
        f"{path} does not hold a VOC layout (expected VOCdevkit/VOC2012/JPEGImages and "
        "ImageSets/Segmentation) (data.source)"
    )
