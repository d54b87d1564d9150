"""pipeline.data.synthetic: the generated scenes have the properties the experiments rely on, measured
on the decoded JPEGs and the masks: same seed -> same bytes; only the configured class ids and void;
a void band between any two labels; in `scenes` no class is told by its colour; in `context` all
objects look alike, only the ring at context_distance around each says its class, and each image holds
2+ classes."""

import io

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.config import SyntheticParams
from pipeline.data.synthetic import generate, make_scene

CLASSES = [1, 7, 12, 15]


def params(**kw) -> SyntheticParams:
    base = dict(train_count=4, val_count=2, size=64, seed=0, max_objects=3, classes=CLASSES, kind="scenes",
                context_distance=20)
    return SyntheticParams(**{**base, **kw})


def decoded(index: int, p: SyntheticParams) -> tuple[np.ndarray, np.ndarray]:
    jpeg, mask = make_scene(index, p)
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(np.float32), mask


def fisher(groups: dict[int, list[np.ndarray]]) -> float:
    """Spread of the class means over the mean spread within a class (summed over features): ~0 when
    the feature says nothing about the class, large when it separates the classes."""
    means = np.array([np.mean(g, 0) for g in groups.values()])
    within = np.mean([np.var(g, 0) for g in groups.values()], 0)
    return float(np.var(means, 0).sum() / within.sum())


def nearest_mean_accuracy(groups: dict[int, list[np.ndarray]]) -> float:
    """Accuracy of naming each sample's class by the nearest class mean (fitted on the samples themselves)."""
    keys = list(groups)
    means = np.array([np.mean(groups[k], 0) for k in keys])
    hits = total = 0
    for i, k in enumerate(keys):
        x = np.array(groups[k])
        hits += int((np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1) == i).sum())
        total += len(x)
    return hits / total


@pytest.mark.parametrize("kind", ["scenes", "context"])
def test_same_seed_same_bytes_other_seed_other_bytes(kind, tmp_path):
    p = params(kind=kind)
    for i in range(3):
        a, b = make_scene(i, p), make_scene(i, p)
        assert a[0] == b[0] and np.array_equal(a[1], b[1])
    assert make_scene(0, p)[0] != make_scene(0, params(kind=kind, seed=1))[0]
    assert make_scene(0, p)[0] != make_scene(1, p)[0]
    for run in ("a", "b"):
        generate(tmp_path / run, p, progress=False)
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert len(files) == 2 * 6 + 3
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


@pytest.mark.parametrize("kind", ["scenes", "context"])
@pytest.mark.parametrize("classes", [CLASSES, [3, 20]])
def test_only_the_configured_ids_and_a_void_band_between_labels(kind, classes):
    p = params(kind=kind, classes=classes)
    seen = set()
    for i in range(20):
        _, m = decoded(i, p)
        assert m.dtype == np.uint8 and m.shape == (64, 64)
        seen |= set(np.unique(m).tolist())
        for a, b in ((m[1:], m[:-1]), (m[:, 1:], m[:, :-1])):  # two different labels never touch
            touch = (a != b) & (a != 255) & (b != 255)
            assert not touch.any(), (i, np.unique(a[touch]), np.unique(b[touch]))
    assert seen == {0, 255, *classes}


def object_means(p: SyntheticParams, n: int) -> dict[int, list[np.ndarray]]:
    """class id -> the mean colour of its pixels in each image where it appears."""
    groups: dict[int, list[np.ndarray]] = {c: [] for c in p.classes}
    for i in range(n):
        img, m = decoded(i, p)
        for c in np.unique(m):
            if c in groups and (m == c).sum() >= 8:
                groups[int(c)].append(img[m == c].mean(0))
    return groups


def test_scenes_no_class_is_told_by_its_colour():
    groups = object_means(params(), 80)
    assert min(len(g) for g in groups.values()) >= 12
    # here: fisher ~0.02, accuracy ~0.3 (chance 0.25); the colour-coded scenes these replaced: ~99 and 100%
    assert fisher(groups) < 0.1
    assert nearest_mean_accuracy(groups) < 1 / len(CLASSES) + 0.2


def fields(img: np.ndarray, m: np.ndarray, p: SyntheticParams):
    """For each object: its class, the colour saturation (RGB peak-to-peak) of the mean colour along
    each 1 px circle around its centre (from the mask) up to the distance + 4 within its own cell of
    the image (nan where < 8 px of it are there), the pixels between it and the distance (disc and
    void band left out), the mean colour just beyond the distance in its cell, and the labels there."""
    yy, xx = np.mgrid[0:p.size, 0:p.size]
    classes = sorted(set(np.unique(m).tolist()) - {0, 255})
    centres = [np.argwhere(m == c).mean(0) for c in classes]
    dist = np.stack([np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) for cy, cx in centres])
    for j, c in enumerate(classes):
        r, own = dist[j], dist.argmin(0) == j
        profile = [np.ptp(img[own & (np.abs(r - k) <= 0.5)].mean(0)) if (own & (np.abs(r - k) <= 0.5)).sum() >= 8
                   else np.nan for k in range(p.context_distance + 5)]
        disc = np.sqrt((m == c).sum() / np.pi) + 3
        between = img[own & (r > disc) & (r < p.context_distance - 1)]
        beyond = own & (r > p.context_distance + 1) & (r < p.context_distance + 4)
        yield c, np.array(profile), between, img[beyond].mean(0), m[beyond]


@pytest.mark.parametrize("size,distance", [(96, 24), (96, 28), (64, 20), (80, 26)])
def test_context_colour_begins_at_the_configured_distance_and_nothing_nearer(size, distance):
    p = params(kind="context", size=size, context_distance=distance)
    for i in range(15):
        img, m = decoded(i, p)
        for c, sat, between, colour, labels in fields(img, m, p):
            lo = int(np.sqrt((m == c).sum() / np.pi)) + 4
            first = lo + int(np.argmax(np.nan_to_num(sat[lo:]) > 100))  # saturated hues, a muted background
            assert first in (distance, distance + 1, distance + 2), (i, c, sat.round())
            assert np.linalg.norm(between - colour, axis=1).min() > 40, (i, c)  # nothing of it nearer
            assert set(np.unique(labels).tolist()) <= {0, 255}, (i, c)  # the field is background


def test_context_objects_look_alike_only_the_field_tells_the_class():
    p = params(kind="context", size=80, context_distance=24)
    inside: dict[int, list[np.ndarray]] = {c: [] for c in p.classes}
    field: dict[int, list[np.ndarray]] = {c: [] for c in p.classes}
    for i in range(40):
        img, m = decoded(i, p)
        for c, _, _, colour, _ in fields(img, m, p):
            pix = img[m == c]
            inside[c].append(np.concatenate([pix.mean(0), pix.std(0), [(m == c).sum()]]))
            field[c].append(colour)
    assert min(len(g) for g in inside.values()) >= 15
    assert fisher(inside) < 0.1 and nearest_mean_accuracy(inside) < 1 / len(CLASSES) + 0.25
    assert fisher(field) > 10 and nearest_mean_accuracy(field) == 1.0


@pytest.mark.parametrize("max_objects,classes,want", [(3, CLASSES, (2, 3)), (2, CLASSES, (2, 2)),
                                                      (4, [5, 9], (2, 2)), (1, CLASSES, (1, 1))])
def test_context_two_or_more_classes_per_image_where_allowed(max_objects, classes, want):
    p = params(kind="context", size=96, context_distance=24, max_objects=max_objects, classes=classes)
    counts = [len(set(np.unique(make_scene(i, p)[1]).tolist()) - {0, 255}) for i in range(30)]
    assert want[0] <= min(counts) and max(counts) <= want[1], counts


def test_context_distance_must_fit_the_image():
    assert params(kind="context", size=96, context_distance=32).context_distance == 32
    for bad in (8, 33):
        with pytest.raises(ValidationError, match="context_distance"):
            params(kind="context", size=96, context_distance=bad)
    assert params(kind="scenes", size=96, context_distance=60).kind == "scenes"  # unused there
    with pytest.raises(ValidationError, match="kind"):
        params(kind="rings")
    with pytest.raises(ValidationError, match="distinct"):
        params(classes=[1, 1])
