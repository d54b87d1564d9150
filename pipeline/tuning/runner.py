"""Runs the Ray Tune search of one family: the function trainable (one TorchTrainer of `segpipe train`
per trial, reported to Tune), the Tuner (new or restored), progress lines, and the release of the
placement group of each trial Tune ends (release_placement_group).

tune_family(p, space) -> the summary written to metrics.json; TuneInterrupted (exit 130, resumable
with tune.resume=true) or TuneFailed (exit 1) otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import sys
import time
from pathlib import Path

import ray
from ray import tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipeline import storage, system, tracking
from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.training.job import fit, resolve_job
from pipeline.training.progress import make_epoch_callback
from pipeline.training.worker import PLACEMENT_GROUP_KEY
from pipeline.tracking import tune as tune_runs
from pipeline.tuning import results
from pipeline.tuning.results import trial_number
from pipeline.tuning.asha import ASHA_STOPS, asha_scheduler, mark_asha_stop, trial_histories
from pipeline.display import show
from pipeline.tuning.phases import ARCHITECTURE, OPTIMISER, PHASES, SEED_KEY, split
from pipeline.tuning.space import METRIC, Space, decode, expected_trials, param_space, trial_params, trial_splits
from seg_models.summary import model_cost

log = logging.getLogger(__name__)


class TuneInterrupted(UserError):
    """The tune was stopped before every trial ended: resumable."""

    exit_code = 130


class TuneFailed(UserError):
    """Every trial failed."""

    exit_code = 1


# ------------------------------------------------------------------------------ the trial (runs in Ray)


def run_trial(config: dict, ctx: dict) -> None:
    """The function trainable: one TorchTrainer run of pipeline.training.job.fit, reported to Tune."""
    space: Space = ctx["space"]
    values = decode(space, config)
    p = trial_params(ctx["params"], space, values)
    if SEED_KEY in config:  # the architecture phase: each grid point once per seed
        p = p.model_copy(update={"seed": int(config[SEED_KEY])})
    job = resolve_job(p, space.family)
    trial_id = tune.get_context().get_trial_id()
    splits = trial_splits(p)
    job = job.with_(storage_path=ctx["train_storage"], ray_name=trial_id, spec=job.spec.replace(**splits))
    job = job.with_(run_id=tune_runs.open_trial_run(
        job.tracking_uri, p, family=space.family, model=job.model, options=job.options,
        parent_run_id=ctx["parent_run_id"], trial_id=trial_id, ray_experiment=ctx["name"], splits=splits,
        hp={k: show(v) for k, v in values.items()}, phase=ctx["phase"], seed=p.seed,
        cost=model_cost(job.model, p.train.crop_size, job.options)))
    try:
        fit(job, callbacks=[make_epoch_callback(job), TuneReportCallback()])
    except BaseException:
        tracking.end_run(job.tracking_uri, job.run_id, "FAILED")
        raise
    tracking.end_run(job.tracking_uri, job.run_id, "FINISHED")


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


RELEASE_AFTER_S = 5.0  # a trial's actor (and the Train controller it owns) is gone by then


def release_placement_group(pg_hex: str) -> bool:
    """Remove the placement group a trial's Ray Train workers ran in (they report its id with each
    epoch: pipeline.training.worker, PLACEMENT_GROUP_KEY); True when one was removed.

    When ASHA stops a trial, Tune kills the trial actor and with it the Train controller it owns.
    Ray Train V2 frees that controller's worker group through a cleaner actor that asks the State
    API whether the controller lives; on a Ray without a dashboard (segpipe's local Ray) the State
    API cannot answer, and Ray itself removes a placement group only once both its creating actor
    and its job (this driver) are dead. The group would keep its CPUs until the tune ends, so later
    trials wait for workers forever. Progress calls this RELEASE_AFTER_S after Tune ended the
    trial, when its actor and controller are gone (removing the group of a live controller would
    make it start a new one), so nothing alive loses resources; a group Train already removed
    (a trial that ran to its end) is left alone."""
    from ray.util.placement_group import remove_placement_group

    group = _held(pg_hex)
    if group is None:
        return False
    try:
        remove_placement_group(group)
        return True
    except Exception:  # gone meanwhile, or Ray shutting down: nothing to free
        return False


def _held(pg_hex: str):
    """The placement group of that id while it still holds (or waits for) resources, else None."""
    from ray.util.placement_group import PlacementGroup, placement_group_table

    try:
        group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_hex)))
        return None if placement_group_table(group).get("state") in (None, "REMOVED") else group
    except Exception:  # a bad id, or Ray shutting down
        return None


def group_ids() -> set[str]:
    """The ids of every placement group Ray knows now (any state)."""
    from ray.util.placement_group import placement_group_table

    return set(placement_group_table())


def release_groups_left(grid, local_since: set[str] | None = None) -> int:
    """After Tuner.fit: release the placement group of every trial of the grid that Ray Train left
    behind (a trial stopped by Ctrl-C or a failure never reaches Progress's delayed release), once
    the trial actors Tune killed are gone; returns how many were released. In a `segpipe tune`
    process Ray would free them when the driver exits; a driver that goes on (train after tune in
    one process, a test, a notebook) would otherwise find its CPUs held forever. A trial stopped
    before its first epoch never reported its group: on a local Ray (nobody else's runs on it;
    `local_since`: the ids that existed when the tune started) every group made since is the tune's."""
    groups = {r.metrics.get(PLACEMENT_GROUP_KEY) for r in grid if r.metrics} - {None}
    if local_since is not None:
        groups |= group_ids() - local_since
    if not any(_held(g) for g in groups):
        return 0
    time.sleep(RELEASE_AFTER_S)  # the killed trial actors and the Train controllers they own are gone by then
    return sum(release_placement_group(g) for g in groups)


class Progress(Callback):
    """One line per trial epoch and per trial end, in the driver; releases the placement group of
    each trial that ended, RELEASE_AFTER_S later (release_placement_group)."""

    def __init__(self, space: Space, max_epochs: int):
        self.space, self.max_epochs = space, max_epochs
        self.ended: dict[str, tuple[float, str]] = {}  # trial id -> (when it ended, its placement group)

    def _ended(self, trial) -> None:
        pg_hex = (trial.last_result or {}).get(PLACEMENT_GROUP_KEY)
        if pg_hex:
            self.ended[trial.trial_id] = (time.time(), pg_hex)

    def on_step_begin(self, iteration, trials, **info):
        for trial_id, (when, pg_hex) in list(self.ended.items()):
            if time.time() - when >= RELEASE_AFTER_S:
                del self.ended[trial_id]
                release_placement_group(pg_hex)

    def _label(self, trial) -> str:
        cfg = ", ".join(f"{k}={show(v)}" for k, v in decode(self.space, trial.config).items())
        return f"[{self.space.family} trial {trial_number(trial.trial_id)} {trial.trial_id}] {cfg}"

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info(f"{self._label(trial)}: started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        val = f"  val mIoU {result[METRIC]:.3f}" if METRIC in result else ""
        log.info(f"{self._label(trial)}: epoch {result.get('epoch')}/{self.max_epochs}  loss "
                 f"{result.get('train/loss', float('nan')):.4f}{val}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)
        epoch = (trial.last_result or {}).get("epoch", 0)
        if trial.trial_id in ASHA_STOPS:
            how = f"stopped early by ASHA at epoch {ASHA_STOPS[trial.trial_id]}"
        elif epoch >= self.max_epochs:
            how = "done"
        else:  # resumed at its final checkpoint: its last epochs ran before the interruption
            how = "done (its last epochs ran before the interruption)"
        log.info(f"{self._label(trial)}: {how}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
        log.info(f"{self._label(trial)}: FAILED (see {getattr(trial, 'error_file', None) or 'the Ray logs'})")


# ------------------------------------------------------------------------------ driver


def storage_root(p: Params) -> str:
    """ray.storage_path: a URI (s3://, gs://, ...) as is, a local path made absolute."""
    return storage.resolve(Path(p.ray.storage_path).expanduser() if not storage.is_uri(p.ray.storage_path)
                           else p.ray.storage_path)


def check_resources(p: Params) -> None:
    """A trial that can never get its CPUs would wait forever: fail first (a cluster may grow: warn)."""
    need = p.tune.trainable_cpus + p.tune.num_workers * p.tune.cpus_per_worker
    if ray.is_initialized():
        have = ray.cluster_resources().get("CPU", 0.0)
    elif system.ray_is_local(p.ray.address):
        have = float(os.cpu_count() or 1)  # what a local ray.init() gets
    else:
        return
    if need > have + 1e-9:
        msg = (f"a trial needs {need:g} CPUs (tune.trainable_cpus + tune.num_workers x tune.cpus_per_worker) but "
               f"Ray has {have:g}: lower tune.num_workers or tune.cpus_per_worker")
        if not system.ray_is_local(p.ray.address):
            print(f"warning: {msg} (waiting for the cluster to grow)", file=sys.stderr, flush=True)
        else:
            raise UserError(f"{msg} (tune.cpus_per_worker)")


def _resume_target(p: Params, family: str, uri: str) -> tuple[str, str] | None:
    """(parent run id, Ray experiment name) of the latest unfinished tune of `family`, if restorable."""
    run = tune_runs.latest_tune(uri, p.mlflow.experiment, family)
    if run is None or run.info.status == "FINISHED":
        return None
    name = run.data.tags.get("ray_experiment", "")
    if name and any(tune.Tuner.can_restore(f"{storage_root(p)}/{name}-{phase}") for phase in PHASES):
        return run.info.run_id, name
    return None


def _search_alg(p: Params):
    if p.tune.search_alg == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch  # optional extra: only this search needs it
        except ImportError:  # pragma: no cover - optuna is a dependency
            raise UserError("tune.search_alg optuna needs the optuna package: pip install optuna (tune.search_alg)") from None
        return OptunaSearch(seed=p.seed)
    # a SearchGenerator ignores TuneConfig.max_concurrent_trials: it limits itself
    return BasicVariantGenerator(random_state=p.seed, max_concurrent=p.tune.max_concurrent_trials)


def _start(p: Params, space: Space, uri: str) -> tuple[str, str, bool]:
    """(parent run id, Ray experiment name, resumed): the interrupted tune tune.resume continues, or a new one."""
    family, t = space.family, p.tune
    target = _resume_target(p, family, uri) if t.resume else None
    if t.resume and target is None:
        log.info(f"[{family}] tune.resume: no interrupted tune of {family} to continue: starting a new one")
    if target:
        parent_run_id, name = target
        tune_runs.reopen(uri, parent_run_id)
        log.info(f"[{family}] resuming tune {name} (MLflow run {parent_run_id})")
        return parent_run_id, name, True
    name = f"tune-{family}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # unique per tune
    parent_run_id = tune_runs.start_tune(uri, p, family=family, model=space.model, options=space.options,
                                         ray_experiment=name)
    phases = split(space)
    said = []
    if OPTIMISER in phases:
        said.append(f"optimiser phase: {', '.join(phases[OPTIMISER].searched)} ({t.search_alg}, "
                    f"{expected_trials(phases[OPTIMISER], t, OPTIMISER)} trials, ASHA grace {t.grace_period} factor "
                    f"{t.reduction_factor})")
    if ARCHITECTURE in phases:
        said.append(f"architecture phase: {', '.join(phases[ARCHITECTURE].searched)} "
                    f"({expected_trials(phases[ARCHITECTURE], t, ARCHITECTURE)} trials = grid x {t.seeds} seeds, "
                    f"{t.max_epochs} epochs each)")
    log.info(f"[{family}] tune {name}: {'; then '.join(said) or 'nothing searched'}; MLflow run {parent_run_id}")
    return parent_run_id, name, False


def _tuner(p: Params, space: Space, phase: str, trainable, uri: str, root: str, name: str, parent_run_id: str,
           resumed: bool):
    t = p.tune
    if resumed and tune.Tuner.can_restore(f"{root}/{name}"):
        # the scheduler and callbacks come back as pickled when the phase started (ASHA refills its
        # rungs from the trials' MLflow histories before its first decision)
        return tune.Tuner.restore(f"{root}/{name}", trainable=trainable, resume_unfinished=True, resume_errored=True)
    if phase == OPTIMISER:
        mark = functools.partial(mark_asha_stop, uri, p.mlflow.experiment, parent_run_id)
        history = functools.partial(trial_histories, uri, p.mlflow.experiment, parent_run_id)
        grid, samples, scheduler, search = param_space(space, t.search_alg), t.num_samples, \
            asha_scheduler(t, mark, history), _search_alg(p)
    else:  # every grid point x seed, trained to the end: FIFO, no early stop
        grid = {**param_space(space, "random"), SEED_KEY: tune.grid_search([p.seed + k for k in range(t.seeds)])}
        samples, scheduler = 1, FIFOScheduler()
        search = BasicVariantGenerator(random_state=p.seed, max_concurrent=t.max_concurrent_trials)
    return tune.Tuner(
        trainable,
        param_space=grid,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", num_samples=samples,
            max_concurrent_trials=t.max_concurrent_trials if phase == OPTIMISER and t.search_alg != "random" else None,
            scheduler=scheduler, search_alg=search, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=root, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[Progress(space, t.max_epochs)]),
    )


def _check_ended(p: Params, space: Space, phase: str, rows: list[dict], uri: str, where: str) -> None:
    """TuneInterrupted when a trial did not end (its run KILLED), TuneFailed when none reported."""
    expected = expected_trials(space, p.tune, phase)
    unfinished = [r for r in rows if r["status"] not in ("completed", "early_stopped", "error")]
    if unfinished or len(rows) < expected:
        for r in unfinished:  # RUNNING again when the tune resumes
            if r["mlflow_run_id"]:
                tune_runs.kill_if_running(uri, r["mlflow_run_id"])
        raise TuneInterrupted(f"tune of {space.family} interrupted with {len(rows) - len(unfinished)} of {expected} "
                              f"trials ended: re-run with -S tune.resume=true to continue {where} (tune.resume)")
    if not [r for r in rows if r["status"] != "error" and r["val_mIoU"] is not None]:
        first = next((r["error"] for r in rows if r["error"]), "no trial reported val/mIoU")
        raise TuneFailed(f"every trial of the {space.family} tune's {phase} phase failed; first error: {first}")


def tune_family(p: Params, space: Space) -> dict:
    """Run (or resume) the tune of one family, its optimiser phase then its architecture phase;
    returns the summary written to metrics.json."""
    uri = tracking.resolve_tracking_uri(p.mlflow.tracking_uri)
    # trials run in other processes and directories: every path absolute
    trial_p = p.model_copy(update={
        "data": p.data.model_copy(update={"dir": storage.resolve(p.data.dir)}),
        "mlflow": p.mlflow.model_copy(update={"tracking_uri": uri}),
    })
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables, our lines only
    system.ray_init(p.ray.address)  # on a local Ray also: no preemption watcher per trial
    check_resources(p)
    root = storage_root(p)
    local_since = group_ids() if system.ray_is_local(p.ray.address) else None
    parent_run_id, name, resumed = _start(p, space, uri)
    started = time.time()
    phases, rows, fixed = split(space), {}, {}
    with tracking.ending_run(uri, parent_run_id, killed_by=(KeyboardInterrupt, TuneInterrupted)):
        for phase, phase_space in phases.items():
            if phase == ARCHITECTURE and fixed:  # the optimiser phase's best values, held fixed
                phase_space = dataclasses.replace(phase_space, train={**phase_space.train, **fixed})
                phases[phase] = phase_space
            ctx = {"params": trial_p, "space": phase_space, "parent_run_id": parent_run_id, "phase": phase,
                   "name": f"{name}-{phase}", "train_storage": f"{root}/{name}-train", "local_since": local_since}
            rows[phase] = _run_phase(p, phase_space, phase, ctx, uri, root, resumed)
            if phase == OPTIMISER:
                fixed = results.best_train_values(rows[phase])
                log.info(f"[{space.family}] optimiser phase done: "
                         + ", ".join(f"{k}={show(v)}" for k, v in fixed.items()) + " held fixed from here on")
        return results.finish(p, phases, rows, uri, parent_run_id, name, time.time() - started)


def _run_phase(p: Params, space: Space, phase: str, ctx: dict, uri: str, root: str, resumed: bool) -> list[dict]:
    """One phase as one Ray Tune run (new, or restored when the tune resumes); its trial rows."""
    name = ctx["name"]
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": p.tune.trainable_cpus})
    try:
        grid = _tuner(p, space, phase, trainable, uri, root, name, ctx["parent_run_id"], resumed).fit()
    except KeyboardInterrupt:  # SIGTERM (errors.Terminated) mid-step: Tune did not stop its trials
        for run in tune_runs.trial_runs(uri, p.mlflow.experiment, ctx["parent_run_id"]).values():
            tune_runs.kill_if_running(uri, run.info.run_id)
        raise
    release_groups_left(grid, ctx["local_since"])
    # the trials as saved: on Ctrl-C Tune saves the live trials as RUNNING and then stops them
    # (TERMINATED in memory); the saved state is what a resume continues
    trials = tune.ExperimentAnalysis(f"{root}/{name}", default_metric=METRIC, default_mode="max").trials
    rows = results.rows(p, space, phase, trials, uri, ctx["parent_run_id"])
    _check_ended(p, space, phase, rows, uri, f"{root}/{name}")
    return rows
