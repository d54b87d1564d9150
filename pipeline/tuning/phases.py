"""The two phases of a family's tune, as search spaces: what each compares and what it holds fixed.

1. optimiser: the optimiser entries of `tune.space.<family>` (lr, weight_decay, momentum) searched on
   the family's configured architecture (random / Optuna, `tune.num_samples`, ASHA may stop a trial);
   its best trial's values are then fixed.
2. architecture: every other entry (rates, output stride, ASPP form, upsampling, variant, model) as a
   grid crossed with `tune.seeds` seeds, at the optimiser values of phase 1, every trial trained
   `tune.max_epochs` epochs (nothing stopped on one seed's curve). The family's configured value of
   each axis is always a grid point (added when the grid lacks it): the ablation compares with it.

split(space) -> {phase: Space} for the phases that search something; configured(space) -> the
configured point; points(space) -> every grid point; check_distinct refuses a grid with two points
that are the same computation (an ASPP rate the feature map makes a 1x1 conv).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from typing import Any

from pipeline.display import show
from pipeline.errors import UserError
from pipeline.tuning.space import TRAIN_KEYS, Space, apply_values, _discrete
from seg_models import model_info

OPTIMISER, ARCHITECTURE = "optimiser", "architecture"
PHASES = (OPTIMISER, ARCHITECTURE)
SEED_KEY = "seed"  # the architecture phase's seed axis in a trial's config


def split(space: Space) -> dict[str, Space]:
    """{phase: its Space} for the phases with searched entries (optimiser first)."""
    opt = {n: v for n, v in space.searched.items() if n in TRAIN_KEYS}
    arch = {n: v for n, v in space.searched.items() if n not in TRAIN_KEYS}
    out = {}
    if opt:
        out[OPTIMISER] = replace(space, searched=opt, encoded=space.encoded & set(opt), joint={})
    if arch:
        out[ARCHITECTURE] = _with_configured(replace(space, searched=arch, encoded=space.encoded & set(arch),
                                                     joint=dict(space.joint)))
    return out


def axes(space: Space) -> dict[str, list]:
    """axis -> its values: a joint entry ("aspp+atrous_rates") is one axis of dicts."""
    joined = {n for j in space.joint for n in j.split("+")}
    out = {j: list(values) for j, (_, values) in space.joint.items()}
    out.update({n: list(arg) for n, (kind, arg) in space.searched.items() if n not in joined})
    return out


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def configured(space: Space) -> dict[str, Any]:
    """axis -> the family's configured value (families.<f>.model / options, else the model's default)."""
    defaults = model_info(space.model)["defaults"]
    out = {}
    for name in axes(space):
        if name == "model":
            out[name] = space.model
        elif name == "variant":
            out[name] = next((v for v, m in space.info.variants.items() if m == space.model), None)
        elif name in space.joint:
            other, opt = name.split("+")
            form = space.options.get(other, defaults.get(other))
            allowed = space.info.applies_only[opt][1]
            rates = space.options.get(opt, defaults.get(opt)) if form in allowed else None
            out[name] = {other: form, opt: list(rates) if isinstance(rates, tuple) else rates}
        else:
            v = space.options.get(name, defaults.get(name))
            out[name] = list(v) if isinstance(v, tuple) else v
    return out


def _with_configured(space: Space) -> Space:
    """Every architecture entry becomes a grid that holds the configured value."""
    for name, (kind, arg) in list(space.searched.items()):
        if _discrete(kind, arg) is None:
            raise UserError(f"{name} is an architecture entry: the architecture phase is a grid, give "
                            f"{{grid: [...]}} (tune.space.{space.family}.{name})")
    base = configured(space)
    for name, value in base.items():
        if name in space.joint:
            kind, values = space.joint[name]
            if value is not None and not any(_same(value, v) for v in values):
                space.joint[name] = (kind, [value, *values])
        else:
            kind, arg = space.searched[name]
            values = list(arg)
            if value is not None and not any(_same(value, v) for v in values):
                values = [value, *values]
            space.searched[name] = ("grid", values)
            if any(isinstance(v, (list, dict)) for v in values):
                space.encoded.add(name)
    return space


def values_of(space: Space, point: dict) -> dict:
    """A point (axis -> value) -> the searched values (joint axes spread out), as decode() gives them."""
    out = {}
    for name, v in point.items():
        if name in space.joint:
            out.update(v)
        else:
            out[name] = v
    return {n: out.get(n) for n in space.searched}


def points(space: Space) -> list[dict]:
    """Every grid point of the architecture phase: axis -> value."""
    grid = axes(space)
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def label(point: dict) -> str:
    return ", ".join(f"{k}={show(v)}" for k, v in point.items())


def check_distinct(space: Space, crop_size: int) -> None:
    """Refuse a grid in which two points are the same computation at the training crop (an ASPP rate
    >= the feature-map side is a 1x1 conv: seg_models.aspp_signature), naming both."""
    from seg_models import aspp_signature

    seen: dict[Any, dict] = {}
    for point in points(space):
        model, options, _ = apply_values(space, values_of(space, point))
        key = (model, aspp_signature(model, crop_size, **options))  # equal iff the same computation
        if key in seen:
            raise UserError(f"tune.space.{space.family}: {label(seen[key])} and {label(point)} are the same "
                            f"computation at train.crop_size {crop_size} (an ASPP rate >= the feature-map side is "
                            "a 1x1 conv: `segpipe models --crop N` shows each branch's field of view); drop one "
                            f"or raise train.crop_size (tune.space.{space.family})")
        seen[key] = point


def point_of(space: Space, values: dict) -> dict:
    """A trial's searched values -> its grid point (axis -> value; a joint axis as one dict)."""
    return {axis: ({n: values.get(n) for n in axis.split("+")} if axis in space.joint else values.get(axis))
            for axis in axes(space)}
