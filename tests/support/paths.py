"""Where things are: the checkout, the bundled sample archive, the virtualenv's bin/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_TAR = ROOT / "assets" / "voc-mini.tar"
BIN = Path(sys.executable).parent  # segpipe, ray, dvc of this virtualenv
