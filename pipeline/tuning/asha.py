"""ASHA early stopping for `segpipe tune`: the scheduler (on epochs, val/mIoU), the record of each stop
(ASHA_STOPS in the driver, a `tune.asha_stopped_at` tag on the trial's MLflow run), and the refill of
its rungs when a tune resumes (Tune saves trials and searcher, not the scheduler)."""

from __future__ import annotations

from typing import Callable

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from pipeline.tracking import tune as tune_runs
from pipeline.tuning.space import METRIC

ASHA_STOPS: dict[str, int] = {}  # trial id -> epoch, this driver's ASHA decisions (for the progress lines)


def mark_asha_stop(uri: str, experiment: str, parent_run_id: str, trial_id: str, epoch: int) -> None:
    """Record ASHA's decision on the trial's child run at once (a resumed tune still knows it)."""
    ASHA_STOPS[trial_id] = epoch
    tune_runs.mark_asha_stop(uri, experiment, parent_run_id, trial_id, epoch)


class Asha(ASHAScheduler):
    """ASHAScheduler that calls mark(trial_id, epoch) for each trial it stops before max_t."""

    def __init__(self, mark: Callable[[str, int], None], **kwargs):
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


def asha_scheduler(t, mark: Callable[[str, int], None]) -> Asha:
    """ASHA on epochs over tune.grace_period / tune.reduction_factor / tune.max_epochs."""
    # stop_last_trials=False: a trial that reaches max_epochs ends by itself (its TorchTrainer shuts
    # down cleanly) instead of being killed on its last report
    return Asha(mark, time_attr="epoch", max_t=t.max_epochs, grace_period=t.grace_period,
                reduction_factor=t.reduction_factor, stop_last_trials=False)


def restore_asha_rungs(tuner, uri: str, experiment: str, parent_run_id: str) -> None:
    """Refill ASHA's rungs of a restored Tuner from the val/mIoU history of the trials already run
    (their MLflow child runs), so a resumed tune stops trials against the same cutoffs as if it had
    never been interrupted. Reads Tune's private _local_tuner / _brackets / _rungs."""
    scheduler = getattr(getattr(getattr(tuner, "_local_tuner", None), "_tune_config", None), "scheduler", None)
    brackets = getattr(scheduler, "_brackets", None)
    if not brackets:
        return
    histories = {}
    for trial_id, run in tune_runs.trial_runs(uri, experiment, parent_run_id).items():
        hist = tune_runs.metric_history(uri, run.info.run_id, METRIC)
        if hist and trial_id:
            histories[trial_id] = hist
    for bracket in brackets:
        for milestone, recorded in bracket._rungs:
            for trial_id, hist in histories.items():
                first = next((v for step, v in hist if step >= milestone), None)
                if first is not None:
                    recorded.setdefault(trial_id, first)  # mode max: ASHA records the metric as is
