"""Synthetic VOC-format scenes: JPEG images and palette PNG masks in the VOC layout.

Each scene is a noisy textured background with 1..max_objects shapes. A shape's class decides its
colour family and its outline (box, ellipse or triangle), so a small network learns the task in a
few CPU minutes, while the data still has what real VOC has: several classes per image, occlusion,
and a void (255) band along every object boundary. Same seed -> same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import SyntheticParams
from pipeline.data.palette import save_mask_png

def _class_colour(cls: int) -> np.ndarray:
    """A distinct, saturated base colour per VOC class id 1..20 (hues 18 degrees apart)."""
    h = (cls - 1) / 20.0
    # HSV (h, 0.85, 0.9) -> RGB
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    v, s = 0.9, 0.85
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _shape_mask(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    h = rng.uniform(0.25, 0.5) * size
    w = rng.uniform(0.25, 0.5) * size
    cy, cx = rng.uniform(h / 2, size - h / 2), rng.uniform(w / 2, size - w / 2)
    if kind == 0:  # box
        return (np.abs(yy - cy) <= h / 2) & (np.abs(xx - cx) <= w / 2)
    if kind == 1:  # ellipse
        return ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1.0
    # triangle pointing up: inside if below the two slanted edges and above the base
    top, base = cy - h / 2, cy + h / 2
    half = (yy - top) / max(h, 1.0) * (w / 2)
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the mask's edge (inside or outside)."""
    grown, shrunk = mask.copy(), mask.copy()
    for _ in range(width):
        g = grown.copy()
        g[1:] |= grown[:-1]; g[:-1] |= grown[1:]; g[:, 1:] |= grown[:, :-1]; g[:, :-1] |= grown[:, 1:]
        s = shrunk.copy()
        s[1:] &= shrunk[:-1]; s[:-1] &= shrunk[1:]; s[:, 1:] &= shrunk[:, :-1]; s[:, :-1] &= shrunk[:, 1:]
        grown, shrunk = g, s
    return grown & ~shrunk


def make_scene(index: int, p: SyntheticParams) -> tuple[bytes, np.ndarray]:
    """One scene -> (JPEG bytes, uint8 mask with VOC ids and 255 void)."""
    rng = np.random.default_rng([p.seed, index])
    size = p.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    # muted (low-saturation) background: a grey level with a slight tint, a gradient and grain
    base = rng.uniform(70, 170) + rng.uniform(-15, 15, size=3)
    slope = rng.uniform(-30, 30, size=(2, 1)) + rng.uniform(-8, 8, size=(2, 3))
    img = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    img += rng.normal(0, 12, size=(size, size, 3))
    mask = np.zeros((size, size), np.uint8)
    void = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, p.max_objects + 1))):
        cls = int(rng.choice(p.classes))
        shape = _shape_mask(cls % 3, size, rng)
        colour = _class_colour(cls) + rng.normal(0, 10, size=3)
        img[shape] = colour + rng.normal(0, 14, size=(int(shape.sum()), 3))
        mask[shape] = cls
        void &= ~shape
        void |= _boundary(shape, max(1, size // 64))
    mask[void] = 255
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), mask


def generate(voc_root: Path, p: SyntheticParams, progress: bool = True) -> dict[str, int]:
    """Write the scenes under voc_root (= .../VOCdevkit/VOC2012) in the VOC layout."""
    (voc_root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (voc_root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    sets = voc_root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True, exist_ok=True)
    splits = {"train": range(p.train_count), "val": range(p.train_count, p.train_count + p.val_count)}
    total = p.train_count + p.val_count
    with tqdm(total=total, desc="synthetic", unit="img", disable=not progress) as bar:
        for split, idx in splits.items():
            ids = []
            for i in idx:
                sid = f"syn_{i:06d}"
                jpeg, mask = make_scene(i, p)
                (voc_root / "JPEGImages" / f"{sid}.jpg").write_bytes(jpeg)
                save_mask_png(mask, voc_root / "SegmentationClass" / f"{sid}.png")
                ids.append(sid)
                bar.update()
            (sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (sets / "trainval.txt").write_text(
        "\n".join(f"syn_{i:06d}" for i in range(total)) + "\n"
    )
    return {"train": p.train_count, "val": p.val_count}
