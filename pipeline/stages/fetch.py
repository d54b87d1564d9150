"""Bring a VOC-layout dataset to <data.dir>/raw/.

By data.source: `sample` (10 real VOC images bundled in assets/), `synthetic` (generated
VOC-format scenes, data.synthetic.*), `voc2012` (downloads the official trainval tar with
resume and md5 check), `voc2012_aug` (plus SBD -> the 10,582-image train_aug split), a path
to a VOC tar, or a directory holding VOCdevkit/. Archives are extracted safely (no absolute
paths, '..', outside links or device files); a failure leaves the previous raw/ intact.
--weights fetches the ImageNet backbone files that families.*.options.backbone_weights name instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--weights", action="store_true",
                        help="instead of the dataset, fetch the ImageNet backbone weights that "
                             "families.*.options.backbone_weights name (torchvision's files, hash-checked)")


def run(p, args) -> int:
    if getattr(args, "weights", False):
        from pipeline.data.weights import fetch_weights

        files = fetch_weights(p, progress=not args.quiet)
        log.info(f"backbone weights ready: {', '.join(map(str, files)) or 'none named by the families'}")
        return 0
    from pipeline.data.sources import fetch

    layout = fetch(p, progress=not getattr(args, "quiet", False))
    root = layout.root(Path(p.data.dir) / "raw")
    counts = {s: sum(1 for line in (root / rel).read_text().split() if line) for s, rel in layout.splits.items()}
    log.info(f"fetched {layout.source}: " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" -> {root}")
    log.info(f"train list: {Path(layout.splits['train']).stem} (from {layout.train_from})")
    return 0
