"""The search space of `segpipe tune`: `tune.space.<family>` checked against the model registry and
the train schema (resolve_space), turned into Tune's param_space, and a Tune trial config decoded
back into the model, options and train settings of the trial (decode, apply_values, trial_params).

Entries: a model option of the family's model (`atrous_rates`, `output_stride`, `aspp`, `upsample`,
...), `model` (a registry name of the family), `variant` (a named variant of the family's models:
seg_models FAMILIES[f].variants, e.g. FCN VGG16 32s / 16s / 8s) or an optimiser setting (TRAIN_KEYS).
Family knowledge (variants, which option applies only when another has given values) comes from
seg_models.FAMILIES; nothing here names a family.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from ray import tune

from pipeline.config import FamilyParams, Params, TrainParams, family_params
from pipeline.data.loaders import load_manifest
from pipeline.display import show
from pipeline.errors import UserError
from pipeline.training.job import check_model
from pipeline.training.resources import trial_batch_size
from seg_models import FAMILIES, list_models, model_info
from seg_models.registry import Family

METRIC = "val/mIoU"
TRAIN_KEYS = ("lr", "weight_decay", "momentum")
MAX_COMBOS_CHECKED = 256  # every combination of the discrete entries is built when there are at most this many
_NO_FAMILY = Family("", "", {}, {}, ())


@dataclass
class Space:
    """One family's search space, validated: base model/options/train values plus the searched entries."""

    family: str
    model: str                      # base registry name (families.<f>.model, or a fixed `model` / `variant`)
    options: dict                   # families.<f>.options + train.model_options + fixed option entries
    train: dict                     # fixed optimiser entries (lr: 0.01)
    searched: dict[str, tuple[str, Any]] = field(default_factory=dict)  # name -> (kind, arg)
    encoded: set[str] = field(default_factory=set)  # entries whose values travel as JSON strings (lists)
    joint: dict[str, tuple[str, list[dict]]] = field(default_factory=dict)  # "aspp+atrous_rates" -> (kind, values)
    fixed: dict = field(default_factory=dict)       # every fixed entry as written (for the record)

    @property
    def info(self) -> Family:
        """The registry's record of the family of the base model (variants, applies_only)."""
        return family_of_model(self.model)


def family_of_model(model: str) -> Family:
    return FAMILIES.get(model_info(model)["family"], _NO_FAMILY) if model in list_models() else _NO_FAMILY


def _kind(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict):
        return next(iter(value.items()))
    return "fixed", value


def _discrete(kind: str, arg: Any) -> list | None:
    return list(arg) if kind in ("choice", "grid") else [arg] if kind == "fixed" else None


def _build_error(where: str, model: str, options: dict) -> str | None:
    try:
        check_model(model, options)
    except UserError as exc:
        return f"{where}: {str(exc).removesuffix(' (model options)')}"
    return None


# ------------------------------------------------------------------------------ resolve


def resolve_space(p: Params, family: str) -> Space:
    """Check `tune.space.<family>` against the registry and the train schema; UserError names the entry."""
    entries = _entries(p, family)
    where = f"tune.space.{family}"
    p = family_params(p, family)  # trials start from what the family trains with
    base_model = p.families[family].model
    base_options = {**p.families[family].options, **p.train.model_options}
    err = _build_error("", base_model, base_options)
    if err:
        raise UserError(f"{err.removeprefix(': ')} (families.{family})")
    space = Space(family=family, model=base_model, options=base_options, train={})
    models = _resolve_models(space, entries, where)
    train_base = p.train.model_dump()
    for name, value in entries.items():
        if name not in ("model", "variant"):
            _resolve_entry(space, models, train_base, name, value, where)
    _join_applies_only(space)
    _check_combinations(space, where)
    return space


def _entries(p: Params, family: str) -> dict:
    """The family's entries (null ones left out) after the checks that need no model."""
    if family not in p.families:
        raise UserError(f"unknown family {family!r}: params.yaml `families` has {sorted(p.families)} (tune.families)")
    if family not in p.tune.space:
        raise UserError(f"no search space for {family!r}: add tune.space.{family} "
                        f"(spaces given: {sorted(p.tune.space)}) (tune.space)")
    fp = family_params(p, family)
    global_batch = fp.train.batch_size * fp.ray.num_workers
    if global_batch % fp.tune.num_workers:
        raise UserError(f"trials train at the training run's global batch ({fp.ray.num_workers} workers x "
                        f"{fp.train.batch_size} = {global_batch}), which tune.num_workers={fp.tune.num_workers} "
                        "does not divide (tune.num_workers)")
    # an entry set to null is left out: `dvc exp run -S` merges mappings, so null is how it drops an
    # entry of params.yaml's space
    return {k: v for k, v in (p.tune.space[family] or {}).items() if v is not None}


def _resolve_models(space: Space, entries: dict, where: str) -> list[str]:
    """The model(s) trials build: `model` (registry names of the family) or `variant`."""
    family, base_model = space.family, space.model
    if "model" in entries and "variant" in entries:
        raise UserError(f"{where}: give `model` or `variant`, not both ({where}.variant)")
    models = [base_model]
    if "model" in entries:
        kind, arg = _kind(entries["model"])
        models = _discrete(kind, arg)
        if models is None:
            raise UserError(f"model takes a fixed name, choice or grid, not {kind} ({where}.model)")
        own = [n for n in list_models() if model_info(n)["family"] == family]
        for m in models:
            if m not in own:
                raise UserError(f"{m!r} is not a {family} model; {family} models: {', '.join(own)} ({where}.model)")
    if "variant" in entries:
        models = _variant_models(space, entries["variant"], where)
    for name in ("model", "variant"):
        if name in entries:
            kind, arg = _kind(entries[name])
            if kind == "fixed" and models[0] != base_model:
                raise UserError(f"{name} {arg!r} is fixed to {models[0]} but families.{family}.model is {base_model}: "
                                f"trials must tune the model that is trained; drop the entry or change "
                                f"families.{family}.model ({where}.{name})")
            if kind == "fixed":
                space.model = models[0]
                space.fixed[name] = arg
            else:
                space.searched[name] = (kind, arg)
    return models


def _variant_models(space: Space, value: Any, where: str) -> list[str]:
    kind, arg = _kind(value)
    variants = _discrete(kind, arg)
    if variants is None:
        raise UserError(f"variant takes a fixed value, choice or grid, not {kind} ({where}.variant)")
    info = space.info
    if space.model not in info.variants.values():
        with_variants = [m for f in FAMILIES.values() for m in f.variants.values()]
        raise UserError(f"only the models with variants ({', '.join(with_variants)}) have a variant; "
                        f"families.{space.family}.model is {space.model} ({where}.variant)")
    bad = [v for v in variants if v not in info.variants]
    if bad:
        raise UserError(f"unknown {info.display} variant {bad[0]!r}: use {', '.join(info.variants)} ({where}.variant)")
    return [info.variants[v] for v in variants]


def _resolve_entry(space: Space, models: list[str], train_base: dict, name: str, value: Any, where: str) -> None:
    """An optimiser setting or an option of (each of) the model(s): every value checked."""
    kind, arg = _kind(value)
    here = f"{where}.{name}"
    if name in TRAIN_KEYS:
        for v in _discrete(kind, arg) or list(arg):
            try:
                TrainParams.model_validate({**train_base, name: v})
            except ValidationError as exc:
                msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise UserError(f"{name} = {v!r}: {msg} ({here})") from None
    else:
        for m in models:
            known = model_info(m)["options"]
            if name not in known:
                raise UserError(f"unknown entry {name!r} for {m}: its options are {', '.join(known) or 'none'}; "
                                f"also tunable: {', '.join(TRAIN_KEYS)}, model"
                                f"{', variant' if space.info.variants else ''} ({here})")
        values = _discrete(kind, arg)
        # a continuous range over a model option: both ends and the middle (not an int) must build
        probe = values if values is not None else [arg[0], arg[1], (arg[0] + arg[1]) / 2]
        for m in models:
            for v in probe:
                err = _build_error(f"{name} = {show(v)}", *apply_values(space, {"model": m, name: v})[:2])
                if err:
                    raise UserError(f"{err} ({here})")
    if kind == "fixed":
        space.fixed[name] = arg
        (space.train if name in TRAIN_KEYS else space.options)[name] = arg
    else:
        space.searched[name] = (kind, arg)
        if kind in ("choice", "grid") and any(isinstance(v, (list, dict)) for v in arg):
            space.encoded.add(name)


def _join_applies_only(space: Space) -> None:
    """An option that applies to some values of another only (atrous_rates: aspp=parallel) is searched
    jointly with it, so the grid holds one cascade trial, not one per rate."""
    for opt, (other, allowed) in space.info.applies_only.items():
        ko, ao = space.searched.get(opt, (None, None))
        kt, at = space.searched.get(other, (None, None))
        if ko in ("choice", "grid") and kt in ("choice", "grid"):
            values = []
            for t in at:
                for o in (ao if t in allowed else [None]):
                    if {other: t, opt: o} not in values:
                        values.append({other: t, opt: o})
            space.joint[f"{other}+{opt}"] = ("grid" if "grid" in (ko, kt) else "choice", values)


def _check_combinations(space: Space, where: str) -> None:
    """The combinations of the discrete entries must build too (e.g. an option one variant lacks)."""
    dims = {}
    for n, (k, a) in space.searched.items():
        if k in ("choice", "grid") and n not in TRAIN_KEYS and not any(n in j.split("+") for j in space.joint):
            dims[n] = [{n: v} for v in a]
    for j, (_, values) in space.joint.items():
        dims[j] = values
    n_combos = math.prod(len(v) for v in dims.values()) if dims else 0
    if 1 <= n_combos <= MAX_COMBOS_CHECKED:
        for combo in itertools.product(*dims.values()):
            values = {k: v for part in combo for k, v in part.items()}
            model, options, _ = apply_values(space, values)
            err = _build_error(", ".join(f"{n} = {show(v)}" for n, v in values.items()), model, options)
            if err:
                raise UserError(f"{err} ({where})")


# ------------------------------------------------------------------------------ trial values


def _options_for(model: str, options: dict) -> dict:
    """The family's options a (tuned) model takes: a UNet trial keeps `upsample` of families.unet but
    drops the `backbone_weights` of a ResNet UNet."""
    known = model_info(model)["options"]
    return {k: v for k, v in options.items() if k in known}


def apply_values(space: Space, values: dict) -> tuple[str, dict, dict]:
    """Decoded trial values -> (model, options, train updates)."""
    model, train = space.model, dict(space.train)
    extra = {}
    for name, v in values.items():
        if name == "model":
            model = v
        elif name == "variant":
            model = space.info.variants[v]
        elif name in TRAIN_KEYS:
            train[name] = v
        else:
            extra[name] = v
    options = {**_options_for(model, space.options), **extra}
    info = model_info(model)
    for opt, (other, allowed) in space.info.applies_only.items():
        if opt in options and other in info["options"] and options.get(other, info["defaults"][other]) not in allowed:
            if extra.get(opt) is None:  # a family default (or n/a in a joint entry): does not apply here
                options.pop(opt)
    return model, options, train


def decode(space: Space, config: dict) -> dict:
    """A Tune trial config -> the searched values (lists back from their JSON strings; None: n/a)."""
    out = {}
    for name in space.joint:
        v = config.get(name)
        out.update(json.loads(v) if isinstance(v, str) else v or {})
    for name in space.searched:
        if name in out:
            continue
        v = config.get(name)
        if name in space.encoded and isinstance(v, str):
            v = json.loads(v)
        out[name] = v
    return {name: out.get(name) for name in space.searched}


def param_space(space: Space, search_alg: str) -> dict:
    """Tune's param_space: grids stay grids for the random search (optuna: choices); list values and
    joint entries travel as JSON strings."""
    out = {}
    for name, (kind, values) in space.joint.items():
        values = [json.dumps(v) for v in values]
        out[name] = tune.grid_search(values) if kind == "grid" and search_alg == "random" else tune.choice(values)
    for name, (kind, arg) in space.searched.items():
        if any(name in j.split("+") for j in space.joint):
            continue
        if kind in ("choice", "grid"):
            values = [json.dumps(v) if name in space.encoded else v for v in arg]
            grid = kind == "grid" and search_alg == "random"
            out[name] = tune.grid_search(values) if grid else tune.choice(values)
        elif kind == "uniform":
            out[name] = tune.uniform(*arg)
        else:
            out[name] = tune.loguniform(*arg)
    return out


def expected_trials(space: Space, t, phase: str = "optimiser") -> int:
    """How many trials a phase makes: the architecture phase runs its grid x tune.seeds; the optimiser
    phase: random crosses its grids num_samples times, optuna runs num_samples."""
    grids = param_space(space, "random")
    n = math.prod(len(v["grid_search"]) for v in grids.values() if isinstance(v, dict) and "grid_search" in v)
    if phase == "architecture":
        return n * t.seeds
    return t.num_samples if t.search_alg != "random" else t.num_samples * n


def trial_params(p: Params, space: Space, values: dict) -> Params:
    """The params one trial trains with: the family's model/options, its train block and the optimiser
    values of the trial, at the training run's global batch, tune.max_epochs epochs, evaluated every
    epoch (ASHA reads val/mIoU each epoch)."""
    p = family_params(p, space.family)  # families.<f>.train over the shared train block
    model, options, train = apply_values(space, values)
    families = dict(p.families)
    families[space.family] = FamilyParams.model_construct(model=model, options=options, train={})
    batch = trial_batch_size(p)
    return p.model_copy(update={
        "families": families,
        "train": p.train.model_copy(update={**train, "model_options": {}, "epochs": p.tune.max_epochs, "iterations": 0, "eval_every": 1,
                                            "resume": False, "sample_images": 0, "batch_size": batch}),
        "ray": p.ray.model_copy(update={"num_workers": p.tune.num_workers, "cpus_per_worker": p.tune.cpus_per_worker}),
    })


def trial_splits(p: Params) -> dict:
    """Where trials train and select: train-minus-tune / tune when preprocess wrote a tune split
    (data.tune_split), else train / val (the published split: the report says so)."""
    if load_manifest(p.data.dir)["splits"].get("tune", {}).get("count", 0):
        return {"train_split": "train-tune", "val_split": "tune"}
    return {"train_split": "train", "val_split": "val"}
