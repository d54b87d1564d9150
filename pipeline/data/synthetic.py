"""Synthetic VOC-format scenes: JPEG images and palette PNG masks in the VOC layout.

Two kinds (``data.synthetic.kind``), both with VOC class ids from ``data.synthetic.classes``, a void
(255) band along every object boundary and the same bytes for the same seed:

``scenes`` (the default, the quickstart's task): a class is a (shape, texture) pair, or where the
object sits, never a colour. Every object is painted in one colour drawn from a distribution all
classes share plus a brightness step of the same colour, laid out by its texture (vertical or
horizontal stripes, checkerboard, dots or plain, fixed to the image axes, period 7-12 px), so
colour alone says nothing about the class. The i-th entry of ``classes`` gets row i of
:data:`CLASS_TABLE`; with the default four: an ellipse with vertical stripes, a box with a
checkerboard, a triangle with horizontal stripes, and the first one's twin: the same ellipse with
the same stripes, centred well inside the lake (an elliptic background region with faint waves),
while the first one is always centred outside it, so only the surroundings tell those two apart.
Rows 4 and 5 differ from row 0 by shape only and by texture only. A scene holds half of
``max_objects`` (rounded up) to ``max_objects`` objects, rotated, of varying aspect (some thin) and
size (one in five small); later ones occlude earlier ones.

``context``: a known-answer test of the field of view. All objects look alike (the same near-white
disc of radius max(3, size / 9)); an object's class is given only by what lies farther than
``context_distance`` px from its centre: each object sits in a clear zone of the background of that
radius, and beyond it the object's cell of the image (the pixels nearer to it than to any other
object) is painted in the class's colour (saturated hues, evenly spaced). The painted fields are
labelled background (0). Every scene holds 2+ objects of different classes (where ``max_objects``
and ``classes`` allow), centres >= 2 * distance + 2 px apart, so no clear zone holds another
object's colour. A model whose field of view reaches ``context_distance`` from an object's pixels
can name the class; one that sees less can only say "object" (a global image summary sees every
colour of the image at once, not which one surrounds which object). tests/integration/test_known_answer.py
runs `segpipe tune` on it.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.config import SyntheticParams
from pipeline.data.palette import save_mask_png

# row i = the look of the i-th class of data.synthetic.classes: (shape, texture, where it sits:
# "any", "out" of the lake or "in" it). Rows 0 and 3 look alike and differ only by where they sit;
# rows 4 and 5 differ from row 0 only by shape (4) or texture (5); beyond, every pair is new.
CLASS_TABLE = (
    ("ellipse", "vstripes", "out"), ("box", "checker", "any"), ("triangle", "hstripes", "any"),
    ("ellipse", "vstripes", "in"), ("box", "vstripes", "any"), ("ellipse", "checker", "any"),
    ("bar", "hstripes", "any"), ("annulus", "dots", "any"), ("cross", "plain", "any"),
    ("triangle", "dots", "any"), ("box", "dots", "any"), ("ellipse", "plain", "any"),
    ("bar", "checker", "any"), ("annulus", "vstripes", "any"), ("cross", "hstripes", "any"),
    ("triangle", "checker", "any"), ("box", "hstripes", "any"), ("annulus", "plain", "any"),
    ("cross", "dots", "any"), ("bar", "vstripes", "any"),
)
TEXTURE_CONTRAST = (100.0, 160.0)  # RGB distance between an object's two colours (a brightness step)
LAKE_CONTRAST = (30.0, 50.0)       # the lake's waves: faint
DISC_COLOUR = 245.0                # context: every object is the same near-white disc


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _frame(size: int, cy: float, cx: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in an object's frame: u along its width, v along its height."""
    yy, xx = _grid(size)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    return dx * c + dy * s, -dx * s + dy * c


def _shape(kind: str, u: np.ndarray, v: np.ndarray, h: float, w: float) -> np.ndarray:
    """Pixels inside a shape of height h, width w, centred at u = v = 0."""
    r = (u / (w / 2)) ** 2 + (v / (h / 2)) ** 2
    if kind == "ellipse":
        return r <= 1.0
    if kind in ("box", "bar"):
        return (np.abs(u) <= w / 2) & (np.abs(v) <= h / 2)
    if kind == "triangle":  # apex at v = -h/2, base at v = +h/2
        return (np.abs(v) <= h / 2) & (np.abs(u) <= (v + h / 2) / h * (w / 2))
    if kind == "annulus":
        return (r <= 1.0) & (r >= 0.3)
    if kind == "cross":
        return ((np.abs(u) <= w / 2) & (np.abs(v) <= h / 6)) | ((np.abs(u) <= w / 6) & (np.abs(v) <= h / 2))
    raise ValueError(f"unknown shape {kind!r}")


def _texture(kind: str, size: int, period: float, rng: np.random.Generator) -> np.ndarray:
    """Per pixel, the weight (0..1) of an object's second colour: a pattern fixed to the image axes
    (its orientation is part of the texture), at a random phase."""
    yy, xx = _grid(size)
    y, x = yy + rng.uniform(0, period), xx + rng.uniform(0, period)
    if kind == "vstripes":
        return (np.sin(2 * np.pi * x / period) > 0).astype(np.float32)
    if kind == "hstripes":
        return (np.sin(2 * np.pi * y / period) > 0).astype(np.float32)
    if kind == "checker":
        return ((np.floor(x / period) + np.floor(y / period)) % 2).astype(np.float32)
    if kind == "dots":
        dx, dy = x / period - np.round(x / period), y / period - np.round(y / period)
        return (dx * dx + dy * dy <= 0.09).astype(np.float32)
    if kind == "plain":
        return np.zeros_like(x)
    if kind == "waves":  # the lake's own texture
        return (np.sin(2 * np.pi * (y + 1.5 * np.sin(x / 3.0)) / period) > 0.3).astype(np.float32)
    raise ValueError(f"unknown texture {kind!r}")


def _paint(img: np.ndarray, region: np.ndarray, texture: np.ndarray, rng: np.random.Generator,
           contrast: tuple[float, float] = TEXTURE_CONTRAST) -> None:
    """Paint `region` in two colours mixed by `texture`, from the distribution every class shares:
    any colour, and the same one a brightness step of `contrast` RGB units lighter or darker
    (towards mid-grey, so the step is never clipped away), plus grain."""
    c1 = rng.uniform(30, 225, size=3)
    step = rng.uniform(*contrast) / np.sqrt(3) * (1.0 if c1.mean() < 127.5 else -1.0)
    t = texture[region][:, None]
    img[region] = c1 + step * t + rng.normal(0, 8, size=(int(region.sum()), 3))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A muted grey level with a tint, a gradient and grain."""
    yy, xx = _grid(size)
    base = rng.uniform(60, 190) + rng.uniform(-25, 25, size=3)
    slope = rng.uniform(-40, 40, size=(2, 1)) + rng.uniform(-15, 15, size=(2, 3))
    img = base + (yy / size)[..., None] * slope[0] + (xx / size)[..., None] * slope[1]
    return img + rng.normal(0, 10, size=(size, size, 3))


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


def _pick(rng: np.random.Generator, allowed: np.ndarray) -> tuple[float, float] | None:
    """A random pixel (y, x) where `allowed` holds, or None."""
    idx = np.flatnonzero(allowed)
    if idx.size == 0:
        return None
    k = int(idx[int(rng.integers(idx.size))])
    return float(k // allowed.shape[1]), float(k % allowed.shape[1])


def _lake(size: int, rng: np.random.Generator) -> np.ndarray:
    """The lake's normalised radius per pixel (< 1 inside): an ellipse of 0.25-0.4 x size semi-axes."""
    a, b = rng.uniform(0.25, 0.4, size=2) * size
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    u, v = _frame(size, cy, cx, rng.uniform(0, np.pi))
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def _object(size: int, shape: str, centre: tuple[float, float], rng: np.random.Generator,
            scale: float) -> np.ndarray:
    """One object's pixels: rotated, 0.5-0.9 x size long (one in five small: 0.15-0.3), aspect
    0.4-1; bars 0.4-0.75 long and 6-10 % of size wide."""
    u, v = _frame(size, *centre, rng.uniform(0, np.pi))
    if shape == "bar":
        h = rng.uniform(0.4, 0.75) * size * scale
        w = max(4.0, rng.uniform(0.06, 0.1) * size)
    else:
        h = (rng.uniform(0.15, 0.3) if rng.random() < 0.2 else rng.uniform(0.5, 0.9)) * size * scale
        w = h * rng.uniform(0.4, 1.0)
    return _shape(shape, u, v, h, w)


def _scenes(p: SyntheticParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A `scenes` image (float RGB) and its mask (see the module docstring)."""
    size = p.size
    img = _background(size, rng)
    rho = _lake(size, rng)
    _paint(img, rho <= 1.0, _texture("waves", size, rng.uniform(5, 8), rng), rng, LAKE_CONTRAST)
    where = {"in": rho <= 0.5, "out": rho >= 1.2, "any": np.ones_like(rho, bool)}
    mask = np.zeros((size, size), np.uint8)
    void = np.zeros((size, size), bool)
    for _ in range(int(rng.integers((p.max_objects + 1) // 2, p.max_objects + 1))):
        k = int(rng.integers(len(p.classes)))
        shape, tex, place = CLASS_TABLE[k % len(CLASS_TABLE)]
        centre = _pick(rng, where[place])
        if centre is None:
            continue
        obj = _object(size, shape, centre, rng, 0.7 if place == "in" else 1.0)  # in the lake: inside it
        if not obj.any():
            continue
        _paint(img, obj, _texture(tex, size, rng.uniform(7, 12), rng), rng)
        mask[obj] = p.classes[k]
        void &= ~obj
        void |= _boundary(obj, max(1, size // 64))
    mask[void] = 255
    return img, mask


def _field_colour(k: int, n: int) -> np.ndarray:
    """The field colour of the k-th of n classes: hues evenly spaced, full saturation."""
    h = k / max(n, 1)
    i, f = int(h * 6) % 6, h * 6 - int(h * 6)
    v, s = 235.0, 0.9
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _context_centres(p: SyntheticParams, rng: np.random.Generator, want: int) -> list[tuple[float, float]]:
    """Up to `want` centres at least 2 * distance + 2 apart (two wherever two fit)."""
    size, d = p.size, p.context_distance
    yy, xx = _grid(size)
    lo, hi = _context_margin(p), size - 1 - _context_margin(p)
    inside = (yy >= lo) & (yy <= hi) & (xx >= lo) & (xx <= hi)
    sep = 2 * d + 2  # each clear zone stays clear of the other cell's colour
    best: list[tuple[float, float]] = []
    for _ in range(8):  # redraw the first centre when it leaves no room for a second
        centres: list[tuple[float, float]] = []
        free = inside.copy()
        while len(centres) < want:
            c = _pick(rng, free)
            if c is None:
                break
            centres.append(c)
            free &= (yy - c[0]) ** 2 + (xx - c[1]) ** 2 >= sep * sep
        if len(centres) > len(best):
            best = centres
        if len(best) >= min(2, want):
            break
    return best


def _context_margin(p: SyntheticParams) -> int:
    """Centres keep this far from the border: the object and a third of its clear zone stay in the image."""
    return max(_disc_radius(p.size) + 2, p.context_distance // 3)


def _disc_radius(size: int) -> float:
    """Discs of ~4% of the image each: small enough for a far context, large enough to be learnt."""
    return max(3.0, size / 9)


def _context(p: SyntheticParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A `context` image (float RGB) and its mask (see the module docstring)."""
    size, n = p.size, len(p.classes)
    img = _background(size, rng)
    mask = np.zeros((size, size), np.uint8)
    void = np.zeros((size, size), bool)
    want = int(rng.integers(min(2, p.max_objects), p.max_objects + 1)) if n > 1 else 1
    want = min(want, n)
    centres = _context_centres(p, rng, want)
    ks = rng.permutation(n)[:len(centres)].tolist()
    yy, xx = _grid(size)
    dist = np.stack([np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) for cy, cx in centres])
    nearest, r = dist.argmin(0), dist.min(0)
    for j in range(len(centres)):
        field = (nearest == j) & (r > p.context_distance)  # its cell of the image, beyond the clear zone
        img[field] = _field_colour(ks[j], n) + rng.normal(0, 8, size=(int(field.sum()), 3))
        disc = dist[j] <= _disc_radius(size)
        img[disc] = DISC_COLOUR + rng.normal(0, 10, size=(int(disc.sum()), 3))  # every object alike
        mask[disc] = p.classes[ks[j]]
        void |= _boundary(disc, max(1, size // 64))
    mask[void] = 255
    return img, mask


def make_scene(index: int, p: SyntheticParams) -> tuple[bytes, np.ndarray]:
    """One scene -> (JPEG bytes, uint8 mask with VOC ids and 255 void)."""
    rng = np.random.default_rng([p.seed, index])
    img, mask = (_context if p.kind == "context" else _scenes)(p, rng)
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
