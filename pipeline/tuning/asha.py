"""ASHA early stopping for `segpipe tune`, on Tune's public scheduler API: the scheduler (on epochs,
val/mIoU), the record of each stop (ASHA_STOPS in the driver, a `tune.asha_stopped_at` tag on the
trial's MLflow run), and the refill of its rungs when a tune resumes (Tune saves the trials and the
searcher, not the scheduler's rungs: the scheduler is the one pickled when the tune started).

The rule is Ray's ASHAScheduler with one bracket (Li et al., "A System for Massively Parallel
Hyperparameter Tuning", 2020): rungs at grace_period x reduction_factor^k epochs; a trial reaching a
rung is stopped when its val/mIoU is below the (1 - 1/reduction_factor) quantile of what that rung
recorded so far. Written here rather than subclassed so its state is ours to refill.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from pipeline.tracking import tune as tune_runs
from pipeline.tuning.space import METRIC

ASHA_STOPS: dict[str, int] = {}  # trial id -> epoch, this driver's ASHA decisions (for the progress lines)


def mark_asha_stop(uri: str, experiment: str, parent_run_id: str, trial_id: str, epoch: int) -> None:
    """Record ASHA's decision on the trial's child run at once (a resumed tune still knows it)."""
    ASHA_STOPS[trial_id] = epoch
    tune_runs.mark_asha_stop(uri, experiment, parent_run_id, trial_id, epoch)


def trial_histories(uri: str, experiment: str, parent_run_id: str) -> dict[str, list[tuple[int, float]]]:
    """trial id -> [(epoch, val/mIoU, when logged)] of the trials a tune already ran (its MLflow child runs)."""
    out = {}
    for trial_id, run in tune_runs.trial_runs(uri, experiment, parent_run_id).items():
        hist = tune_runs.metric_history(uri, run.info.run_id, METRIC, timed=True)
        if hist and trial_id:
            out[trial_id] = hist
    return out


class Asha(FIFOScheduler):
    """One-bracket ASHA on `epoch` / val/mIoU (higher is better). `mark(trial_id, epoch)` is called
    for each trial stopped before max_t; `history()` returns the trials already run (trial id ->
    [(epoch, val/mIoU)]). Tune pickles the scheduler when a tune starts and unpickles it when the
    tune resumes: an unpickled Asha reads `history()` once, before its first decision, to refill
    its rungs; a new one starts empty."""

    def __init__(self, mark: Callable[[str, int], None], history: Callable[[], dict], *, max_t: int,
                 grace_period: int, reduction_factor: float):
        super().__init__()
        self.mark, self.history = mark, history
        self.max_t, self.rf = max_t, reduction_factor
        count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
        self.rungs = [(grace_period * reduction_factor ** k, {}) for k in reversed(range(count))]  # descending
        self.refilled = True  # a new tune: nothing to refill

    def __setstate__(self, state: dict) -> None:  # unpickled: a resumed tune
        self.__dict__.update(state)
        self.refilled = False
        self.resumed_at = time.time()  # what was logged after this was reported to this instance too

    def cutoff(self, recorded: dict) -> float | None:
        return float(np.nanpercentile(list(recorded.values()), (1 - 1 / self.rf) * 100)) if recorded else None

    def refill(self, histories: dict[str, list[tuple]]) -> None:
        """Each rung gets each trial's first val/mIoU at or past its milestone (as if never interrupted),
        from what was logged before the resume: a value logged since (a trial that runs again reports
        it to this instance, maybe after its run logged it) is judged when it is reported."""
        since = getattr(self, "resumed_at", float("inf"))
        for milestone, recorded in self.rungs:
            for trial_id, hist in histories.items():
                first = next((e[1] for e in hist if e[0] >= milestone and (len(e) < 3 or e[2] < since)), None)
                if first is not None:
                    recorded.setdefault(trial_id, first)

    def decide(self, trial_id: str, epoch: int, value: float) -> str:
        for milestone, recorded in self.rungs:
            if epoch >= milestone and trial_id in recorded:
                return TrialScheduler.CONTINUE  # this trial passed its highest rung already
            if epoch < milestone:
                continue
            cutoff = self.cutoff(recorded)
            recorded[trial_id] = value
            return TrialScheduler.STOP if cutoff is not None and value < cutoff else TrialScheduler.CONTINUE
        return TrialScheduler.CONTINUE

    def on_trial_result(self, tune_controller, trial, result):
        if not self.refilled:
            self.refilled = True
            try:
                self.refill(self.history())
            except Exception:  # bookkeeping only: a fresh rung set is still a valid ASHA
                pass
        if "epoch" not in result or result.get(METRIC) is None:
            return TrialScheduler.CONTINUE
        epoch = int(result["epoch"])
        action = self.decide(trial.trial_id, epoch, float(result[METRIC]))
        if action == TrialScheduler.STOP and epoch < self.max_t:
            try:
                self.mark(trial.trial_id, epoch)
            except Exception:  # bookkeeping only: never stop the tune for it
                pass
        return action

    def debug_string(self) -> str:
        return f"ASHA on {METRIC}: rungs at {[m for m, _ in reversed(self.rungs)]} epochs, factor {self.rf}"


def asha_scheduler(t, mark: Callable[[str, int], None], history: Callable[[], dict]) -> Asha:
    """ASHA on epochs over tune.grace_period / tune.reduction_factor / tune.max_epochs. A trial that
    reaches max_epochs ends by itself (its TorchTrainer shuts down cleanly)."""
    return Asha(mark, history, max_t=t.max_epochs, grace_period=t.grace_period, reduction_factor=t.reduction_factor)
