"""The ImageNet backbone files that families.*.options.backbone_weights name: `segpipe fetch --weights`.

Contract of :func:`fetch_weights`: each named file that is missing is downloaded from torchvision's
published URL (seg_models.BACKBONE_WEIGHTS), its sha256 prefix (embedded in torchvision's file
name) is checked, and weights/manifest.json (family -> file, written also when no family names one)
is the DVC output of the `weights` stage. Problems are UserErrors naming the params key.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params
from pipeline.data.download import download, sha256sum
from pipeline.errors import UserError
from seg_models import BACKBONE_WEIGHTS, model_info

WEIGHTS_DIR = Path("weights")


def fetch_weights(p: Params, progress: bool = True) -> list[Path]:
    """Download the ImageNet backbone files that families.*.options.backbone_weights name
    (torchvision's published files; their names embed a sha256 prefix, checked here). Writes
    weights/manifest.json (also when no family names one) for DVC."""
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
