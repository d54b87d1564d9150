"""segpipe's ASHA (pipeline.tuning.asha.Asha) on known sequences: a trial below the median of those
recorded before it at a rung stops there, one at or above goes on; a trial past its rung is never
judged again; a tune restored from its pickle refills the rungs from the trials' histories before
its first decision, as if it had never been interrupted. (The integration tune checks the same rule
on a real tune, replayed in the order the trials arrived.)"""

from __future__ import annotations

import functools
import pickle
from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from pipeline.tuning.asha import Asha
from pipeline.tuning.space import METRIC

STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def _mark(store: list, trial: str, epoch: int) -> None:
    store.append((trial, epoch))


def _no_history() -> dict:
    return {}


CALLS: list = []


def _history() -> dict:
    """Two trials judged before the interruption; "e", running again after the resume, logged its
    epoch 1 (0.30) before its result reached the restored scheduler."""
    CALLS.append(1)
    return {"a": [(1, 0.50, 100.0), (2, 0.70, 200.0)], "b": [(1, 0.40, 150.0)], "e": [(1, 0.30, 4e9)]}


def _asha(history=_no_history, marks=None):
    # module-level callables, as the runner's functools.partial of tracking functions: Tune pickles them
    marks = [] if marks is None else marks
    return Asha(functools.partial(_mark, marks), history, max_t=4, grace_period=1, reduction_factor=2)


def _result(asha, trial: str, epoch: int, value: float) -> str:
    return asha.on_trial_result(None, SimpleNamespace(trial_id=trial), {"epoch": epoch, METRIC: value})


def test_rungs_and_decisions_follow_the_median_rule():
    marks: list = []
    a = _asha(marks=marks)
    assert [m for m, _ in a.rungs] == [4, 2, 1]  # grace 1, factor 2, max 4
    assert _result(a, "a", 1, 0.50) == GO          # first at the rung: nothing to compare with
    assert _result(a, "b", 1, 0.40) == STOP        # below the median of {0.50}
    assert _result(a, "c", 1, 0.60) == GO          # above the median of {0.50, 0.40}
    assert _result(a, "d", 1, 0.44) == STOP        # below the median of {0.5, 0.4, 0.6} = 0.5
    assert marks == [("b", 1), ("d", 1)]           # every stop is recorded with its epoch
    assert _result(a, "a", 2, 0.70) == GO          # first at rung 2
    assert _result(a, "c", 2, 0.65) == STOP        # below 0.70
    assert _result(a, "a", 3, 0.10) == GO          # past rung 2 already: not judged again before 4
    assert _result(a, "a", 4, 0.72) == GO and marks[-1] == ("c", 2)  # at max_t: ends by itself, no mark


def test_a_restored_tune_refills_its_rungs_before_deciding():
    CALLS.clear()
    a = pickle.loads(pickle.dumps(_asha(_history)))  # what Tune does to a tune it restores
    assert _result(a, "c", 1, 0.42) == STOP  # median of the refilled {0.50, 0.40} is 0.45
    assert _result(a, "d", 2, 0.69) == STOP  # rung 2 holds a's 0.70
    assert _result(a, "e", 1, 0.30) == STOP  # logged after the resume: judged now, not taken as passed
    assert CALLS == [1]  # read once
    fresh = _asha(_history)  # a new tune reads no history
    assert _result(fresh, "c", 1, 0.42) == GO and CALLS == [1]
