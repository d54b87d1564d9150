"""Ray Tune search per family (ASHA on val/mIoU), nested MLflow runs, best params.

For each family of tune.families (or --family): checks the whole search space of tune.space.<family>
first (model options such as atrous_rates / output_stride / aspp / upsample, `variant` 32s/16s/8s
for FCN, `model`, and lr / weight_decay / momentum; each a {choice|grid|uniform|loguniform} entry or
a fixed value), then runs one trial per config: the TorchTrainer of `segpipe train` for up to
tune.max_epochs epochs, ASHA stopping weak trials on val/mIoU (tune.grace_period,
tune.reduction_factor). Search: random/grid, or Optuna TPE (tune.search_alg). MLflow: a parent run
(stage=tune) with the best config, trials.csv and plots, one child run per trial (stage=tune-trial).
Writes <reports_dir>/tune/<family>/ best_params.yaml (train it: segpipe train -p ... --family F),
best_config.json, metrics.json, trials.csv and plots/. tune.resume continues the latest interrupted
tune (Ctrl-C exits 130); --apply merges the best config into params.yaml without running anything.
"""

# How it works (developer notes):
# The search space lives in params.yaml (`tune.space.<family>.<entry>`): an entry is a model option of
# the family's model (`atrous_rates`, `output_stride`, `aspp`, `upsample`, ...), `model` (a registry
# name of the family), `variant` (FCN VGG16: 32s / 16s / 8s -> fcn32s_vgg16 / fcn16s_vgg16 /
# fcn8s_vgg16) or an optimiser setting (`lr`, `weight_decay`, `momentum`); its value is
# `{choice: [...]}`, `{grid: [...]}`, `{uniform: [lo, hi]}`, `{loguniform: [lo, hi]}` or a fixed value.
# The whole space is checked before any trial starts: unknown entries and values that do not build
# (every choice is built on the meta device) are `error: ...`, exit 2.
#
# Each trial is a function trainable that builds the TorchTrainer of `segpipe train` (pipeline.stages.train:
# resolve_job / fit / train_loop_per_worker, no second loop) and forwards its per-epoch reports to
# Tune with TuneReportCallback; ASHA stops the weak trials on `val/mIoU` (time attribute: epoch).
# MLflow: one parent run per family and tune (stage=tune) and one nested child run per trial
# (stage=tune-trial, tag mlflow.parentRunId) with the trial's params and per-epoch metrics (logged by
# train's epoch callback). The parent gets the best config, a CSV of all trials and the plots, and
# <reports_dir>/tune/<family>/ gets best_params.yaml (a full params file: `segpipe train -p ...`),
# best_config.json (what `segpipe tune --apply` merges into params.yaml), metrics.json, trials.csv and
# plots/. `tune.resume: true` continues the latest interrupted tune of the family (Tuner.restore).

from __future__ import annotations

import csv
import functools
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Params, family_params
from pipeline.errors import UserError

METRIC = "val/mIoU"
TRAIN_KEYS = ("lr", "weight_decay", "momentum")
FCN_VARIANTS = {"32s": "fcn32s_vgg16", "16s": "fcn16s_vgg16", "8s": "fcn8s_vgg16"}
# an option that only applies when another has one of some values: {option: (other, allowed values)}
APPLIES_ONLY = {"atrous_rates": ("aspp", ("parallel",))}  # cascade DeepLabV3 has no ASPP, so no rates
MAX_COMBOS_CHECKED = 256  # every combination of the discrete entries is built when there are at most this many


class TuneInterrupted(UserError):
    """The tune was stopped before every trial ended: resumable."""

    exit_code = 130


class TuneFailed(UserError):
    """Every trial failed."""

    exit_code = 1


def add_arguments(parser) -> None:
    parser.add_argument("--family", help="tune only this family (a key of `families` with a tune.space entry); "
                                         "default: every family in tune.families")
    parser.add_argument("--apply", action="store_true",
                        help="run no trial: merge the best config of the last tune (<reports_dir>/tune/<family>/"
                             "best_config.json) into the params file (-p), comments kept")


# ------------------------------------------------------------------------------ the search space


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


def _kind(value: Any) -> tuple[str, Any]:
    if isinstance(value, dict):
        return next(iter(value.items()))
    return "fixed", value


def _discrete(kind: str, arg: Any) -> list | None:
    return list(arg) if kind in ("choice", "grid") else [arg] if kind == "fixed" else None


def _show(v: Any) -> str:
    """A value as people read it: (6, 12, 18), 0.0123, parallel, n/a (None: does not apply)."""
    if v is None:
        return "n/a"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_show(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _strip_where(msg: str) -> str:
    return msg.removesuffix(" (model options)")


def _build_error(where: str, model: str, options: dict) -> str | None:
    from pipeline.stages.train import check_model

    try:
        check_model(model, options)
    except UserError as exc:
        return f"{where}: {_strip_where(str(exc))}"
    return None


def resolve_space(p: Params, family: str) -> Space:
    """Check `tune.space.<family>` against the registry and the train schema; UserError names the entry."""
    from pydantic import ValidationError

    from pipeline.config import TrainParams
    from seg_models import list_models, model_info

    if family not in p.families:
        raise UserError(f"unknown family {family!r}: params.yaml `families` has {sorted(p.families)} (tune.families)")
    if family not in p.tune.space:
        raise UserError(f"no search space for {family!r}: add tune.space.{family} "
                        f"(spaces given: {sorted(p.tune.space)}) (tune.space)")
    # an entry set to null is left out: `dvc exp run -S` merges mappings, so null is how it drops an
    # entry of params.yaml's space
    entries = {k: v for k, v in (p.tune.space[family] or {}).items() if v is not None}
    where = f"tune.space.{family}"
    p = family_params(p, family)  # trials start from what the family trains with
    global_batch = p.train.batch_size * p.ray.num_workers
    if global_batch % p.tune.num_workers:
        raise UserError(f"trials train at the training run's global batch ({p.ray.num_workers} workers x "
                        f"{p.train.batch_size} = {global_batch}), which tune.num_workers={p.tune.num_workers} "
                        "does not divide (tune.num_workers)")
    base_model = p.families[family].model
    base_options = {**p.families[family].options, **p.train.model_options}
    err = _build_error("", base_model, base_options)
    if err:
        raise UserError(f"{err.removeprefix(': ')} (families.{family})")
    space = Space(family=family, model=base_model, options=base_options, train={})

    # 1. the model itself: `model` (registry names of the family) or `variant` (FCN VGG16)
    if "model" in entries and "variant" in entries:
        raise UserError(f"{where}: give `model` or `variant`, not both ({where}.variant)")
    models = [base_model]
    if "model" in entries:
        kind, arg = _kind(entries["model"])
        models = _discrete(kind, arg)
        if models is None:
            raise UserError(f"model takes a fixed name, choice or grid, not {kind} ({where}.model)")
        for m in models:
            if m not in list_models() or model_info(m)["family"] != family:
                own = [n for n in list_models() if model_info(n)["family"] == family]
                raise UserError(f"{m!r} is not a {family} model; {family} models: {', '.join(own)} ({where}.model)")
    if "variant" in entries:
        kind, arg = _kind(entries["variant"])
        variants = _discrete(kind, arg)
        if variants is None:
            raise UserError(f"variant takes a fixed value, choice or grid, not {kind} ({where}.variant)")
        if base_model not in FCN_VARIANTS.values():
            raise UserError(f"only the FCN VGG16 models ({', '.join(FCN_VARIANTS.values())}) have a variant; "
                            f"families.{family}.model is {base_model} ({where}.variant)")
        bad = [v for v in variants if v not in FCN_VARIANTS]
        if bad:
            raise UserError(f"unknown FCN variant {bad[0]!r}: use {', '.join(FCN_VARIANTS)} ({where}.variant)")
        models = [FCN_VARIANTS[v] for v in variants]
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

    # 2. every other entry: an optimiser setting or an option of (each of) the model(s)
    train_base = p.train.model_dump()
    for name, value in entries.items():
        if name in ("model", "variant"):
            continue
        kind, arg = _kind(value)
        here = f"{where}.{name}"
        if name in TRAIN_KEYS:
            probe = _discrete(kind, arg) or list(arg)
            for v in probe:
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
                                    f"{', variant' if family == 'fcn' else ''} ({here})")
            values = _discrete(kind, arg)
            # a continuous range over a model option: both ends and the middle (not an int) must build
            probe = values if values is not None else [arg[0], arg[1], (arg[0] + arg[1]) / 2]
            for m in models:
                for v in probe:
                    err = _build_error(f"{name} = {_show(v)}", *_apply(space, {"model": m, name: v})[:2])
                    if err:
                        raise UserError(f"{err} ({here})")
        if kind == "fixed":
            space.fixed[name] = arg
            (space.train if name in TRAIN_KEYS else space.options)[name] = arg
        else:
            space.searched[name] = (kind, arg)
            if kind in ("choice", "grid") and any(isinstance(v, (list, dict)) for v in arg):
                space.encoded.add(name)

    # 3. an option that applies to some values of another only (atrous_rates: aspp=parallel) is searched
    #    jointly with it, so the grid holds one cascade trial, not one per rate
    for opt, (other, allowed) in APPLIES_ONLY.items():
        ko, ao = space.searched.get(opt, (None, None))
        kt, at = space.searched.get(other, (None, None))
        if ko in ("choice", "grid") and kt in ("choice", "grid"):
            values = []
            for t in at:
                for o in (ao if t in allowed else [None]):
                    if {other: t, opt: o} not in values:
                        values.append({other: t, opt: o})
            space.joint[f"{other}+{opt}"] = ("grid" if "grid" in (ko, kt) else "choice", values)

    # 4. the combinations of the discrete entries must build too (e.g. an option one variant lacks)
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
            model, options, _ = _apply(space, values)
            err = _build_error(", ".join(f"{n} = {_show(v)}" for n, v in values.items()), model, options)
            if err:
                raise UserError(f"{err} ({where})")
    return space


def _options_for(model: str, options: dict) -> dict:
    """The family's options a (tuned) model takes: a UNet trial keeps `upsample` of families.unet but
    drops the `backbone_weights` of a ResNet UNet."""
    from seg_models import model_info

    known = model_info(model)["options"]
    return {k: v for k, v in options.items() if k in known}


def _apply(space: Space, values: dict) -> tuple[str, dict, dict]:
    """Decoded trial values -> (model, options, train updates)."""
    model, train = space.model, dict(space.train)
    extra = {}
    for name, v in values.items():
        if name == "model":
            model = v
        elif name == "variant":
            model = FCN_VARIANTS[v]
        elif name in TRAIN_KEYS:
            train[name] = v
        else:
            extra[name] = v
    options = {**_options_for(model, space.options), **extra}
    for opt, (other, allowed) in APPLIES_ONLY.items():
        from seg_models import model_info

        info = model_info(model)
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
    from ray import tune

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


def trial_params(p: Params, space: Space, values: dict) -> Params:
    """The params one trial trains with: the family's model/options, its train block and the optimiser
    values of the trial, at the training run's global batch, tune.max_epochs epochs, evaluated every
    epoch (ASHA reads val/mIoU each epoch)."""
    from pipeline.config import FamilyParams

    p = family_params(p, space.family)  # families.<f>.train over the shared train block
    model, options, train = _apply(space, values)
    families = dict(p.families)
    families[space.family] = FamilyParams.model_construct(model=model, options=options, train={})
    # the training run's global batch (ray.num_workers x train.batch_size) on tune.num_workers workers,
    # so tuned optimiser settings transfer without LR scaling
    batch = p.train.batch_size * p.ray.num_workers // p.tune.num_workers
    return p.model_copy(update={
        "families": families,
        "train": p.train.model_copy(update={**train, "model_options": {}, "epochs": p.tune.max_epochs, "eval_every": 1,
                                            "resume": False, "sample_images": 0, "batch_size": batch}),
        "ray": p.ray.model_copy(update={"num_workers": p.tune.num_workers, "cpus_per_worker": p.tune.cpus_per_worker}),
    })


# ------------------------------------------------------------------------------ the trial (runs in Ray)


def trial_splits(p: Params) -> dict:
    """Where trials train and select: train-minus-tune / tune when preprocess wrote a tune split
    (data.tune_split), else train / val (the published split: the report says so)."""
    from pipeline.data.loaders import load_manifest

    if load_manifest(p.data.dir)["splits"].get("tune", {}).get("count", 0):
        return {"train_split": "train-tune", "val_split": "tune"}
    return {"train_split": "train", "val_split": "val"}



def _find_child(uri: str, experiment: str, parent_run_id: str, trial_id: str):
    from pipeline import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' "
                                                          f"and tags.trial_id = '{trial_id}'", max_results=1)
    return runs[0] if runs else None


def run_trial(config: dict, ctx: dict) -> None:
    """The function trainable: one TorchTrainer run of pipeline.stages.train, reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline import tracking
    from pipeline.stages.train import fit, make_epoch_callback, resolve_job

    space: Space = ctx["space"]
    values = decode(space, config)
    p = trial_params(ctx["params"], space, values)
    job = resolve_job(p, space.family)
    trial_id = tune.get_context().get_trial_id()
    job.storage_path, job.ray_name = ctx["train_storage"], trial_id
    job.extra_config.update(trial_splits(p))
    existing = _find_child(job.tracking_uri, p.mlflow.experiment, ctx["parent_run_id"], trial_id)
    if existing is not None:  # a resumed trial keeps its run; the epoch callback continues its history
        job.run_id = existing.info.run_id
        tracking.client(job.tracking_uri).update_run(job.run_id, status="RUNNING")
    else:
        job.run_id = tracking.start_run(
            job.tracking_uri, p, family=space.family, model=job.model, options=job.options, stage="tune-trial",
            run_name=f"{space.family}-{trial_id}", parent_run_id=ctx["parent_run_id"],
            extra_tags={"trial_id": trial_id, "ray_experiment": ctx["name"], "train_split": job.extra_config["train_split"],
                        "eval_split": job.extra_config["val_split"]})
        from mlflow.entities import Param

        tracking.client(job.tracking_uri).log_batch(
            job.run_id, params=[Param(f"hp.{k}", _show(v)) for k, v in values.items()])
    try:
        fit(job, callbacks=[make_epoch_callback(job), TuneReportCallback()])
    except BaseException:
        tracking.end_run(job.tracking_uri, job.run_id, "FAILED")
        raise
    tracking.end_run(job.tracking_uri, job.run_id, "FINISHED")


def _trial_number(trial_id: str) -> int:
    """Tune's trial ids end in a running index (3e4a1_00002 -> trial 3)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) + 1 if tail.isdigit() else 0


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def reap_orphan_placement_groups() -> int:
    """Remove the placement groups whose creating actor is dead; returns how many.

    Ray Train V2 frees the workers' placement group of a controller that dies (as it does when ASHA
    stops a trial: Tune kills the trial actor, which owns the controller) through a detached
    cleaner actor that asks the State API whether the controller lives. Where several Ray instances
    run on one machine that query fails ("Found multiple active Ray instances") and the group keeps
    its CPUs until the tune's driver ends, so later trials wait for workers forever. A group is
    only removed when the actor that created it is dead, so nothing alive loses resources."""
    try:
        import ray
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        live = (gcs_pb2.PlacementGroupTableData.PENDING, gcs_pb2.PlacementGroupTableData.CREATED)
        n = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state in live and pg.creator_actor_dead and not pg.is_detached and pg.creator_actor_id
                    and not ray.ActorID(pg.creator_actor_id).is_nil()):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                n += 1
        return n
    except Exception:  # a private API: if it moves, Train's own cleaner is all there is
        return 0


def _progress_callback(space: Space, max_epochs: int):
    from ray.tune import Callback

    class Progress(Callback):
        """One line per trial epoch and per trial end, in the driver; frees the placement groups
        of stopped trials (reap_orphan_placement_groups)."""

        def __init__(self):
            self.last_reap = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.time() - self.last_reap > 2.0:
                self.last_reap = time.time()
                reap_orphan_placement_groups()

        def _label(self, trial) -> str:
            cfg = ", ".join(f"{k}={_show(v)}" for k, v in decode(space, trial.config).items())
            return f"[{space.family} trial {_trial_number(trial.trial_id)} {trial.trial_id}] {cfg}"

        def on_trial_start(self, iteration, trials, trial, **info):
            print(f"{self._label(trial)}: started", flush=True)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            val = f"  val mIoU {result[METRIC]:.3f}" if METRIC in result else ""
            print(f"{self._label(trial)}: epoch {result.get('epoch')}/{max_epochs}  loss "
                  f"{result.get('train/loss', float('nan')):.4f}{val}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            epoch = (trial.last_result or {}).get("epoch", 0)
            if trial.trial_id in ASHA_STOPS:
                how = f"stopped early by ASHA at epoch {ASHA_STOPS[trial.trial_id]}"
            elif epoch >= max_epochs:
                how = "done"
            else:  # resumed at its final checkpoint: its last epochs ran before the interruption
                how = "done (its last epochs ran before the interruption)"
            print(f"{self._label(trial)}: {how}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"{self._label(trial)}: FAILED (see {getattr(trial, 'error_file', None) or 'the Ray logs'})",
                  flush=True)

    return Progress()


# ------------------------------------------------------------------------------ driver


def storage_root(p: Params) -> str:
    """ray.storage_path: a URI (s3://, gs://, ...) as is, a local path made absolute."""
    from pipeline import storage

    return storage.resolve(Path(p.ray.storage_path).expanduser() if not storage.is_uri(p.ray.storage_path)
                           else p.ray.storage_path)


def out_dir(p: Params, family: str) -> Path:
    return Path(p.train.reports_dir) / "tune" / family


def _check_resources(p: Params) -> None:
    """A trial that can never get its CPUs would wait forever: fail first (a cluster may grow: warn)."""
    import ray

    need = p.tune.trainable_cpus + p.tune.num_workers * p.tune.cpus_per_worker
    if ray.is_initialized():
        have = ray.cluster_resources().get("CPU", 0.0)
    elif not (p.ray.address or os.environ.get("RAY_ADDRESS")):
        have = float(os.cpu_count() or 1)  # what a local ray.init() gets
    else:
        return
    if need > have + 1e-9:
        msg = (f"a trial needs {need:g} CPUs (tune.trainable_cpus + tune.num_workers x tune.cpus_per_worker) but "
               f"Ray has {have:g}: lower tune.num_workers or tune.cpus_per_worker")
        if p.ray.address or os.environ.get("RAY_ADDRESS"):
            print(f"warning: {msg} (waiting for the cluster to grow)", file=sys.stderr, flush=True)
        else:
            raise UserError(f"{msg} (tune.cpus_per_worker)")


def _resume_target(p: Params, family: str, uri: str) -> tuple[str, str] | None:
    """(parent run id, Ray experiment name) of the latest unfinished tune of `family`, if restorable."""
    from ray import tune

    from pipeline import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(p.mlflow.experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.stage = 'tune' and tags.family = '{family}'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    if not runs or runs[0].info.status == "FINISHED":
        return None
    name = runs[0].data.tags.get("ray_experiment", "")
    if name and tune.Tuner.can_restore(f"{storage_root(p)}/{name}"):
        return runs[0].info.run_id, name
    return None


def tune_family(p: Params, space: Space) -> dict:
    """Run (or resume) the tune of one family; returns the summary written to metrics.json."""
    from ray import tune

    from pipeline import storage, tracking
    from pipeline.stages.train import ray_init

    family, t = space.family, p.tune
    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    # trials run in other processes and directories: every path absolute
    trial_p = p.model_copy(update={
        "data": p.data.model_copy(update={"dir": storage.resolve(p.data.dir)}),
        "mlflow": p.mlflow.model_copy(update={"tracking_uri": uri}),
    })
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our lines only
    if not (p.ray.address or os.environ.get("RAY_ADDRESS")):
        # one machine cannot be preempted: one process less per trial (the setting travels to
        # every trial's TorchTrainer with Train's propagated variables)
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray_init(p)
    _check_resources(p)
    root = storage_root(p)
    target = _resume_target(p, family, uri) if t.resume else None
    if t.resume and target is None:
        print(f"[{family}] tune.resume: no interrupted tune of {family} to continue: starting a new one", flush=True)
    if target:
        parent_run_id, name = target
        tracking.client(uri).update_run(parent_run_id, status="RUNNING")
        print(f"[{family}] resuming tune {name} (MLflow run {parent_run_id})", flush=True)
    else:
        name = f"tune-{family}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_run_id = tracking.start_run(
            uri, p, family=family, model=space.model, options=space.options, stage="tune", run_name=f"tune-{family}",
            extra_tags={"ray_experiment": name, "tune.search_alg": t.search_alg})
        print(f"[{family}] tune {name}: {len(space.searched)} searched entr{'y' if len(space.searched) == 1 else 'ies'} "
              f"({', '.join(space.searched) or 'none'}), search {t.search_alg}, ASHA on {METRIC} "
              f"(grace {t.grace_period}, factor {t.reduction_factor}, max {t.max_epochs} epochs), MLflow run {parent_run_id}",
              flush=True)
    ctx = {"params": trial_p, "space": space, "parent_run_id": parent_run_id, "name": name,
           "train_storage": f"{root}/{name}-train"}
    started = time.time()
    status = "FAILED"
    try:
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": t.trainable_cpus})
        if target:
            tuner = tune.Tuner.restore(f"{root}/{name}", trainable=trainable, resume_unfinished=True,
                                       resume_errored=True)
            _restore_asha_rungs(tuner, uri, p.mlflow.experiment, parent_run_id)
            # the restored run config holds the callbacks pickled at the start: use this version's
            run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
            if run_config is not None:
                run_config.callbacks = [_progress_callback(space, t.max_epochs)]
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(space, t.search_alg),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode="max", num_samples=t.num_samples,
                    max_concurrent_trials=t.max_concurrent_trials if t.search_alg != "random" else None,
                    scheduler=asha_scheduler(t, functools.partial(mark_asha_stop, uri, p.mlflow.experiment,
                                                                  parent_run_id)),
                    search_alg=_search_alg(p), trial_dirname_creator=_trial_dirname),
                run_config=tune.RunConfig(name=name, storage_path=root, verbose=0,
                                          failure_config=tune.FailureConfig(max_failures=0),
                                          callbacks=[_progress_callback(space, t.max_epochs)]),
            )
        tuner.fit()
        # the trials as saved: on Ctrl-C Tune saves the live trials as RUNNING and then stops them
        # (TERMINATED in memory); the saved state is what a resume continues
        trials = tune.ExperimentAnalysis(f"{root}/{name}", default_metric=METRIC, default_mode="max").trials
        rows = _rows(p, space, trials, uri, parent_run_id)
        unfinished = [r for r in rows if r["status"] not in ("completed", "early_stopped", "error")]
        if unfinished or len(rows) < expected_trials(space, t):
            status = "KILLED"
            c = tracking.client(uri)
            for r in unfinished:  # RUNNING again when the tune resumes
                if r["mlflow_run_id"] and c.get_run(r["mlflow_run_id"]).info.status == "RUNNING":
                    c.set_terminated(r["mlflow_run_id"], status="KILLED")
            done = len(rows) - len(unfinished)
            raise TuneInterrupted(f"tune of {family} interrupted with {done} of {expected_trials(space, t)} trials ended: re-run with "
                                  f"-S tune.resume=true to continue {root}/{name} (tune.resume)")
        ok = [r for r in rows if r["status"] != "error" and r["val_mIoU"] is not None]
        if not ok:
            first = next((r["error"] for r in rows if r["error"]), "no trial reported val/mIoU")
            raise TuneFailed(f"every trial of the {family} tune failed; first error: {first}")
        summary = finish(p, space, rows, uri, parent_run_id, name, time.time() - started)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.end_run(uri, parent_run_id, status)


ASHA_STOPS: dict[str, int] = {}  # trial id -> epoch, this driver's ASHA decisions (for the progress lines)


def mark_asha_stop(uri: str, experiment: str, parent_run_id: str, trial_id: str, epoch: int) -> None:
    """Record ASHA's decision on the trial's child run at once (a resumed tune still knows it)."""
    ASHA_STOPS[trial_id] = epoch
    run = _find_child(uri, experiment, parent_run_id, trial_id)
    if run is not None:
        from pipeline import tracking

        tracking.client(uri).set_tag(run.info.run_id, "tune.asha_stopped_at", str(epoch))


def asha_scheduler(t, mark):
    """ASHAScheduler on epochs that calls mark(trial_id, epoch) for each trial it stops early."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class Asha(ASHAScheduler):
        def __init__(self, mark, **kwargs):
            super().__init__(**kwargs)
            self.mark = mark

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            epoch = int(result.get("epoch") or 0)
            if action == TrialScheduler.STOP and epoch < self._max_t:
                try:
                    self.mark(trial.trial_id, epoch)
                except Exception:  # bookkeeping only: never stop the tune for it
                    pass
            return action

    # stop_last_trials=False: a trial that reaches max_epochs ends by itself (its TorchTrainer shuts
    # down cleanly) instead of being killed on its last report
    return Asha(mark, time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                reduction_factor=t.reduction_factor, stop_last_trials=False)


def expected_trials(space: Space, t) -> int:
    """How many trials the search makes: random crosses the grids num_samples times, optuna runs num_samples."""
    if t.search_alg != "random":
        return t.num_samples
    grids = param_space(space, "random")
    return t.num_samples * math.prod(len(v["grid_search"]) for v in grids.values() if isinstance(v, dict) and "grid_search" in v)


def _restore_asha_rungs(tuner, uri: str, experiment: str, parent_run_id: str) -> None:
    """Tune saves trials and searcher on interruption but not the scheduler: refill ASHA's rungs
    from the val/mIoU history of the trials already run (their MLflow child runs), so a resumed
    tune stops trials against the same cutoffs as if it had never been interrupted."""
    from pipeline import tracking

    scheduler = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "scheduler", None)
    brackets = getattr(scheduler, "_brackets", None)
    if not brackets:
        return
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    histories = {}
    for r in c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                           max_results=5000):
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, METRIC))
        if hist and r.data.tags.get("trial_id"):
            histories[r.data.tags["trial_id"]] = hist
    for bracket in brackets:
        for milestone, recorded in bracket._rungs:
            for trial_id, hist in histories.items():
                first = next((v for step, v in hist if step >= milestone), None)
                if first is not None:
                    recorded.setdefault(trial_id, first)  # mode max: ASHA records the metric as is


def _search_alg(p: Params):
    if p.tune.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:  # pragma: no cover - optuna is a dependency
            raise UserError("tune.search_alg optuna needs the optuna package: pip install optuna (tune.search_alg)") from None
        return OptunaSearch(seed=p.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # a SearchGenerator ignores TuneConfig.max_concurrent_trials: it limits itself
    return BasicVariantGenerator(random_state=p.seed, max_concurrent=p.tune.max_concurrent_trials)


def _rows(p: Params, space: Space, trials, uri: str, parent_run_id: str) -> list[dict]:
    """One row per trial (status completed / early_stopped / error / pending / running), its child run
    tagged with the outcome and closed."""
    from pipeline import tracking

    c = tracking.client(uri)
    children = {}
    exp = c.get_experiment_by_name(p.mlflow.experiment)
    if exp is not None:
        for r in c.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                               max_results=5000):
            children[r.data.tags.get("trial_id")] = r
    rows = []
    for trial in sorted(trials, key=lambda tr: tr.trial_id):
        n = _trial_number(trial.trial_id)
        last = trial.last_result or {}
        run = children.get(trial.trial_id)
        # the child run's history is the record of the epochs trained: Tune may have missed the report
        # of an epoch in flight when it was interrupted or stopped the trial
        history = [] if run is None else sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, METRIC))
        epoch = history[-1][0] if history else int(last.get("epoch") or 0)
        final = history[-1][1] if history else last.get(METRIC)
        stopped_at = run.data.tags.get("tune.asha_stopped_at") if run is not None else None
        if trial.status == "ERROR":
            status = "error"
        elif trial.status == "TERMINATED":
            status = "early_stopped" if stopped_at else "completed"
        else:
            status = trial.status.lower()
        values = decode(space, trial.config)
        model, options, train = _apply(space, values)
        if run is not None and status in ("completed", "early_stopped", "error"):
            c.set_tag(run.info.run_id, "tune.status", status)
            c.set_tag(run.info.run_id, "early_stopped", str(status == "early_stopped").lower())
            # a trial ASHA stops is killed: its run may still be RUNNING (or FAILED by the kill)
            want = "FAILED" if status == "error" else "FINISHED"
            if run.info.status != want:
                c.set_terminated(run.info.run_id, status=want)
        error = ""
        if status == "error":
            error = _error_text(trial)
        rows.append({
            "trial": n, "trial_id": trial.trial_id, "status": status, "epochs": epoch,
            "stopped_at": int(stopped_at) if stopped_at else None,
            "val_mIoU": float(final) if final is not None else None,
            "best_val_mIoU": max((v for _, v in history), default=final),
            "val_pixel_acc": (run.data.metrics if run is not None else last).get("val/pixel_acc"),
            "train_loss": (run.data.metrics if run is not None else last).get("train/loss"),
            "model": model, "options": options, "train": {**{k: getattr(p.train, k) for k in TRAIN_KEYS}, **train},
            "values": values, "mlflow_run_id": run.info.run_id if run is not None else "", "error": error,
        })
    return rows


def _error_text(trial) -> str:
    try:
        err = trial.get_error()
        text = str(err) if err else ""
    except Exception:  # the error file may be gone
        text = ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "segpipe:" in ln or "Error" in ln:
            return ln[:300]
    return (lines[-1] if lines else "trial failed")[:300]


# ------------------------------------------------------------------------------ results


def finish(p: Params, space: Space, rows: list[dict], uri: str, parent_run_id: str, name: str, seconds: float) -> dict:
    from mlflow.entities import Metric, Param

    from pipeline import tracking

    family = space.family
    ok = [r for r in rows if r["status"] != "error" and r["val_mIoU"] is not None]
    best = max(ok, key=lambda r: (r["val_mIoU"], r["epochs"]))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
    summary = {
        "family": family, "best_val_mIoU": best["val_mIoU"], "best_epochs": best["epochs"],
        "trials": len(rows), "completed": counts["completed"], "early_stopped": counts["early_stopped"],
        "errored": counts["error"], "best_trial": best["trial_id"], "best_model": best["model"],
        "best_config": {k: v if isinstance(v, (int, float, str)) else _show(v) for k, v in best["values"].items()},
        "mlflow_parent_run_id": parent_run_id, "mlflow_best_run_id": best["mlflow_run_id"],
        "ray_experiment": name, "tune_seconds": round(seconds, 1),
    }
    best_config = {"family": family, "model": best["model"], "options": best["options"],
                   "train": {k: v for k, v in best["train"].items() if k in space.searched or k in space.train},
                   "values": best["values"], "val_mIoU": best["val_mIoU"], "epochs": best["epochs"],
                   "trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"],
                   "mlflow_parent_run_id": parent_run_id}

    final = out_dir(p, family)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=final.parent))
    try:
        (tmp / "plots").mkdir()
        _write_csv(rows, space, tmp / "trials.csv")
        (tmp / "best_config.json").write_text(json.dumps(best_config, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "best_params.yaml").write_text(best_params_yaml(p, family, best_config))
        plots = make_plots(rows, space, tmp / "plots")
        c = tracking.client(uri)
        c.log_batch(parent_run_id,
                    metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in {
                        "best/val_mIoU": best["val_mIoU"], "tune/trials": len(rows),
                        "tune/completed": counts["completed"], "tune/early_stopped": counts["early_stopped"],
                        "tune/errored": counts["error"], "tune/seconds": seconds}.items()],
                    params=[Param(f"best.{k}", _show(v)) for k, v in best["values"].items()]
                    + [Param("best.model", best["model"])],
                    tags=[])
        c.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
        c.set_tag(parent_run_id, "best_run_id", best["mlflow_run_id"])
        for f in ("trials.csv", "best_params.yaml", "best_config.json", "metrics.json"):
            c.log_artifact(parent_run_id, str(tmp / f))
        for f in plots:
            c.log_artifact(parent_run_id, str(f), artifact_path="plots")
        if final.exists():
            old = final.with_name(f".{family}-old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _print_table(rows, space, best, final)
    return summary


def _write_csv(rows: list[dict], space: Space, path: Path) -> None:
    hps = list(space.searched)
    cols = ["trial", "trial_id", "status", "epochs", "stopped_at", "val_mIoU", "best_val_mIoU", "val_pixel_acc", "train_loss", "model",
            *hps, "mlflow_run_id", "error"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in sorted(rows, key=lambda r: -(r["val_mIoU"] if r["val_mIoU"] is not None else -1)):
            vals = {**r, **{h: json.dumps(r["values"].get(h)) if isinstance(r["values"].get(h), (list, dict))
                            else r["values"].get(h) for h in hps}}
            w.writerow(["" if vals.get(c) is None else vals.get(c) for c in cols])


def best_params_yaml(p: Params, family: str, best: dict) -> str:
    import yaml

    d = p.model_dump(mode="json")
    d["families"][family] = {"model": best["model"], "options": best["options"],
                             "train": {**p.families[family].train, **best["train"]}}  # never the shared train block
    d["tune"]["resume"] = False
    where = out_dir(p, family)
    head = (f"# segpipe tune: the best {family} trial ({best['trial_id']}, val mIoU {best['val_mIoU']:.4f} after "
            f"{best['epochs']} epochs, MLflow run {best['mlflow_run_id']}) merged into the params it ran with.\n"
            f"# searched: {', '.join(f'{k}={_show(v)}' for k, v in best['values'].items()) or 'nothing'}\n"
            f"# train it:  segpipe train -p {where / 'best_params.yaml'} --family {family}\n"
            f"# or merge it into params.yaml:  segpipe tune --apply --family {family}\n")
    return head + yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=110)


def _print_table(rows: list[dict], space: Space, best: dict, where: Path) -> None:
    hps = list(space.searched)
    widths = {h: max([len(h)] + [len(_show(r["values"].get(h))) for r in rows]) for h in hps}
    lines = [f"{'trial':>5}  {'status':<13} {'epochs':>6} {'val mIoU':>8}  " + "  ".join(f"{h:<{widths[h]}}" for h in hps)]
    for r in sorted(rows, key=lambda r: -(r["val_mIoU"] if r["val_mIoU"] is not None else -1)):
        miou = f"{r['val_mIoU']:.3f}" if r["val_mIoU"] is not None else "-"
        mark = "*" if r is best else " "
        lines.append(f"{r['trial']:>5}{mark} {r['status']:<13} {r['epochs']:>6} {miou:>8}  "
                     + "  ".join(f"{_show(r['values'].get(h)):<{widths[h]}}" for h in hps))
    lines.append("(* best)")
    print("\n".join(lines))
    print(f"[{space.family}] best: {best['model']} "
          + ", ".join(f"{k}={_show(v)}" for k, v in best["values"].items())
          + f" -> val mIoU {best['val_mIoU']:.3f}; wrote {where}/best_params.yaml, metrics.json, trials.csv, plots/",
          flush=True)


# ------------------------------------------------------------------------------ plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _option(r: dict, name: str):
    """The value a trial ran with: its own, the family's, or the model's default."""
    from seg_models import model_info

    if name in r["options"]:
        return r["options"][name]
    info = model_info(r["model"])
    if name not in info["options"]:
        return "fixed"  # e.g. MobileNetV3 DeepLabV3 has no output_stride option
    return info["defaults"][name]


def _variant(model: str) -> str:
    return next((v for v, m in FCN_VARIANTS.items() if m == model), model)


def make_plots(rows: list[dict], space: Space, outdir: Path) -> list[Path]:
    plt = _plt()
    done = [r for r in rows if r["val_mIoU"] is not None]
    paths = []
    fam = space.family
    for hp, (kind, arg) in space.searched.items():
        fig, ax = plt.subplots(figsize=(6.2, 4.2))
        if kind in ("uniform", "loguniform"):
            for status, marker in (("completed", "o"), ("early_stopped", "x")):
                pts = [(r["values"][hp], r["val_mIoU"]) for r in done if r["status"] == status]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, s=40, label=status.replace("_", " "))
            if kind == "loguniform":
                ax.set_xscale("log")
        else:
            cats = [_show(v) for v in arg]
            cats += sorted({_show(r["values"][hp]) for r in done} - set(cats))  # n/a: cascade has no rates
            for status, marker in (("completed", "o"), ("early_stopped", "x")):
                pts = [(cats.index(_show(r["values"][hp])), r["val_mIoU"]) for r in done if r["status"] == status]
                if pts:
                    ax.scatter(*zip(*pts), marker=marker, s=40, label=status.replace("_", " "))
            best = [max((r["val_mIoU"] for r in done if _show(r["values"][hp]) == c), default=float("nan")) for c in cats]
            ax.plot(range(len(cats)), best, "-", color="0.6", lw=1, zorder=0, label="best per value")
            ax.set_xticks(range(len(cats)), cats, rotation=20 if len(cats) > 3 else 0)
        ax.set_xlabel(hp)
        ax.set_ylabel("val mIoU (last epoch of the trial)")
        ax.set_title(f"{fam}: val mIoU vs {hp}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"miou_vs_{hp}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    if fam == "deeplabv3" and done:
        paths.append(_heatmap(plt, done, outdir / "miou_by_rates_stride.png"))
    if fam in ("fcn", "unet") and done:
        paths.append(_upsample_bars(plt, done, fam, outdir / "miou_by_upsample.png"))
    return paths


def _heatmap(plt, rows: list[dict], path: Path) -> Path:
    import numpy as np

    def rates_of(r):
        v = _option(r, "atrous_rates")
        if v is None:  # cascade: no ASPP; parallel: the paper's rates for the output stride
            return "n/a (cascade)" if _option(r, "aspp") == "cascade" else "default"
        return _show(v)

    def order(label):
        nums = [int(x) for x in label.strip("()").split(",") if x.strip().isdigit()]
        return (0, nums) if nums else (1, [label])

    rates = sorted({rates_of(r) for r in rows}, key=order)
    strides = sorted({_show(_option(r, "output_stride")) for r in rows}, key=order)
    aspps = sorted({_show(_option(r, "aspp")) for r in rows})
    fig, axes = plt.subplots(1, len(aspps), squeeze=False,
                             figsize=(max(6.0, 2.6 + 1.5 * len(strides) * len(aspps)), 1.8 + 0.55 * len(rates)))
    vmax = max(0.05, max(r["val_mIoU"] for r in rows))
    for ax, aspp in zip(axes[0], aspps):
        grid = np.full((len(rates), len(strides)), np.nan)
        for r in rows:
            if _show(_option(r, "aspp")) == aspp:
                i, j = rates.index(rates_of(r)), strides.index(_show(_option(r, "output_stride")))
                grid[i, j] = np.nanmax([grid[i, j], r["val_mIoU"]])
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for i in range(len(rates)):
            for j in range(len(strides)):
                v = grid[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.3f}", ha="center", va="center", fontsize=9,
                        color="0.4" if np.isnan(v) else ("k" if v > 0.6 * vmax else "w"))
        ax.set_xticks(range(len(strides)), strides)
        ax.set_yticks(range(len(rates)), rates)
        ax.set_xlabel("output_stride")
        ax.set_ylabel("atrous_rates")
        if aspp not in ("fixed", "n/a"):
            ax.set_title(f"aspp = {aspp}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.04)
    fig.suptitle("deeplabv3: best val mIoU by atrous_rates x output_stride", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _upsample_bars(plt, rows: list[dict], family: str, path: Path) -> Path:
    import numpy as np

    methods = ["bilinear", "transposed", "unpool"]
    methods = [m for m in methods if any(_option(r, "upsample") == m for r in rows)] or ["n/a"]
    groups = sorted({_variant(r["model"]) if family == "fcn" else r["model"] for r in rows},
                    key=lambda g: (len(g), g))
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(methods) * max(1, len(groups) / 2), 4.2))
    for k, g in enumerate(groups):
        mine = [r for r in rows if (_variant(r["model"]) if family == "fcn" else r["model"]) == g]
        best = [max((r["val_mIoU"] for r in mine if _option(r, "upsample") == m), default=np.nan) for m in methods]
        xs = np.arange(len(methods)) - 0.4 + width * (k + 0.5)
        label = f"FCN-{g}" if family == "fcn" else g
        ax.bar(xs, best, width, label=label, alpha=0.8)
        for r in mine:
            if _option(r, "upsample") in methods:
                x = xs[methods.index(_option(r, "upsample"))]
                ax.scatter([x], [r["val_mIoU"]], color="k", s=12, marker="x" if r["status"] == "early_stopped" else "o",
                           zorder=3)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_xlabel("upsampling method")
    ax.set_ylabel("val mIoU")
    ax.text(0.99, 0.01, "bar: best trial; dots: trials (x: stopped early)", transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7, color="0.35")
    ax.set_title(f"{family}: val mIoU by upsampling method" + (" and FCN variant" if family == "fcn" else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ --apply


def apply_best(params_path: str, p: Params, families: list[str]) -> list[str]:
    """Merge the best config of each family's last tune into the params file, comments kept; returns
    the changes. Only the searched entries change: a searched model option in families.<f>.options
    (an option that does not apply to the best trial, e.g. atrous_rates for aspp=cascade, is removed),
    a searched optimiser setting in families.<f>.train (never the shared train block), a searched
    model / variant in families.<f>.model. Everything else (backbone_weights included) is kept. A tune
    of another model than the file's families.<f>.model is refused: its values are for that model."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    from seg_models import list_models, model_info

    bests = {}
    for fam in families:
        path = out_dir(p, fam) / "best_config.json"
        if not path.is_file():
            raise UserError(f"no tune result for {fam}: {path} is missing; run `segpipe tune --family {fam}` first (--apply)")
        bests[fam] = json.loads(path.read_text())

    def flow(v):
        if isinstance(v, list):
            s = CommentedSeq(flow(x) for x in v)
            s.fa.set_flow_style()
            return s
        if isinstance(v, dict):
            m = CommentedMap((k, flow(x)) for k, x in v.items())
            m.fa.set_flow_style()
            return m
        return v

    def plain(v):
        return json.loads(json.dumps(v))

    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 120
    src = Path(params_path)
    doc = yml.load(src.read_text())
    changes = []
    for fam, b in bests.items():
        entry = (doc.get("families") or {}).get(fam)
        if entry is None:
            raise UserError(f"{params_path} has no families.{fam} to apply the {fam} tune to (--apply)")
        values = b.get("values", {})
        searched_model = "model" in values or "variant" in values
        if not searched_model and entry.get("model") != b["model"]:
            raise UserError(f"the {fam} tune trained {b['model']} but {params_path} has families.{fam}.model "
                            f"{entry.get('model')}: its values are for another model; tune the model you train (--apply)")
        if searched_model and entry.get("model") != b["model"]:
            changes.append(f"families.{fam}.model: {entry.get('model')} -> {b['model']}")
            entry["model"] = b["model"]
        options = entry.get("options")
        if options is None:
            options = entry["options"] = flow({})
        if searched_model and b["model"] in list_models():
            known = model_info(b["model"])["options"]
            for k in [k for k in options if k not in known]:
                changes.append(f"families.{fam}.options.{k}: {plain(options[k])} removed ({b['model']} has no such option)")
                del options[k]
        train = entry.get("train")
        for name, v in values.items():
            if name in ("model", "variant"):
                continue
            if name in TRAIN_KEYS:
                if train is None:
                    train = entry["train"] = flow({})
                if train.get(name) != v:
                    changes.append(f"families.{fam}.train.{name}: {train.get(name)} -> {_show(v)}")
                    train[name] = v
            elif v is None:  # does not apply to the best trial (atrous_rates of a cascade DeepLabV3)
                if name in options:
                    changes.append(f"families.{fam}.options.{name}: {plain(options[name])} removed (n/a)")
                    del options[name]
            elif plain(options.get(name)) != plain(v):
                changes.append(f"families.{fam}.options.{name}: {plain(options.get(name))} -> {plain(v)}")
                options[name] = flow(v)
    fd, tmp = tempfile.mkstemp(prefix=".params-", suffix=".yaml", dir=src.parent)
    try:
        with os.fdopen(fd, "w") as f:
            yml.dump(doc, f)
        from pipeline.config import load_params

        load_params(tmp)  # never leave an invalid params file
        os.replace(tmp, src)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return changes


# ------------------------------------------------------------------------------ CLI


def run(p: Params, args) -> int:
    families = [args.family] if args.family else list(p.tune.families)
    if args.apply:
        changes = apply_best(args.params, p, families)
        print(f"{args.params}: " + ("; ".join(changes) if changes else "already holds the best config")
              + f" (from {', '.join(str(out_dir(p, f) / 'best_config.json') for f in families)})")
        return 0
    spaces = [resolve_space(p, fam) for fam in families]  # the whole space is checked before any trial
    from pipeline.stages.train import check_data

    check_data(p)
    from pipeline import tracking
    from pipeline.data.loaders import verify_shards

    tracking.preflight(p)  # the store answers and is writable (else one error line), before Ray
    if p.data.verify_shards:
        verify_shards(p.data.dir)  # every shard against manifest.json, before Ray
    _check_resources(p)
    for space in spaces:
        s = tune_family(p, space)
        print(f"[{space.family}] tune done in {s['tune_seconds']:.0f}s: {s['trials']} trials "
              f"({s['completed']} completed, {s['early_stopped']} stopped early, {s['errored']} failed), best val mIoU "
              f"{s['best_val_mIoU']:.3f} (MLflow run {s['mlflow_parent_run_id']})", flush=True)
    return 0
