"""How a worker's trial ends: the exceptions that end it early, and writing its end.

A trial completes, is pruned (with a kind and a reason, and a constraint figure for the
sampler), is failed with its retry enqueued, is handed back (failed as interrupted or as a
neighbour's out-of-memory error, and retried), or is lost (another worker took this one for
dead and failed it first: the result is dropped).
"""

from __future__ import annotations

import logging
import threading
import time

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.optim import budget, internals
from cnn_mellin.optim.attrs import EPOCHS, PRUNE_KIND, PRUNE_REASON, WALL_TIME

_log = logging.getLogger("cnn_mellin.optim")

CONSTRAINT = "_constraint"  # the facts' key of a constraint figure, set on the trial


class TrialLost(Exception):
    """Another worker took this worker for dead and failed its trial."""


class HandBack(Exception):
    """Out of memory that another process on the device caused: retry, do not prune."""


class Prune(Exception):
    """End the trial as pruned, before or while it runs."""

    def __init__(
        self, kind: str, reason: str, constraint: tuple[str, float] | None = None
    ):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.constraint = constraint


def one_line(err: BaseException) -> str:
    """An error's text on one line, as a reason is recorded."""
    text = " ".join(str(err).split())
    return text[:500] if text else type(err).__name__


class Recorder:
    """Writes how the trials of one worker end, one ending at a time (:attr:`lock`)."""

    def __init__(self, study: optuna.Study, max_retries: int):
        self.study = study
        self.max_retries = max_retries
        # held while a trial is ended (told, failed): the stop watchdog, which may end a
        # trial from its own thread, waits for the main thread's ending to be written
        self.lock = threading.RLock()

    def write_facts(self, trial: optuna.Trial, facts: dict) -> None:
        """Write the trial's user attributes (and its constraint figure, if any)."""
        constraint = facts.pop(CONSTRAINT, None)
        if constraint is not None:
            trial.set_constraint(*constraint)
        budget.set_user_attrs(self.study, internals.trial_id(trial), facts)  # one transaction

    def pruned(self, trial: optuna.Trial, facts: dict, started: float, prune: Prune) -> str:
        """Tell the trial PRUNED for ``prune``'s reason; returns the outcome's name."""
        admitted = facts.pop(CONSTRAINT, None)
        facts[WALL_TIME] = round(time.monotonic() - started, 3)
        facts.setdefault(EPOCHS, 0)
        facts[PRUNE_REASON] = prune.reason
        facts[PRUNE_KIND] = prune.kind
        if prune.constraint is not None or admitted is not None:
            facts[CONSTRAINT] = prune.constraint or admitted
        _log.info("trial %d pruned: %s", trial.number, prune.reason)
        return self.tell(trial, facts, TrialState.PRUNED, None)

    def tell(self, trial: optuna.Trial, facts: dict, state: TrialState,
             value: float | None) -> str:
        """Write the facts and tell the trial's end: ``complete``, ``pruned`` or ``lost``."""
        with self.lock:
            return self._tell(trial, facts, state, value)

    def _tell(self, trial, facts: dict, state: TrialState, value: float | None) -> str:
        try:
            self.write_facts(trial, facts)
            if state == TrialState.COMPLETE:
                self.study.tell(trial, value)
                _log.info("trial %d complete: %.6g", trial.number, value)
            else:
                self.study.tell(trial, state=state)
        except UpdateFinishedTrialError:
            _log.warning("trial %d was failed by another worker meanwhile; result dropped",
                         trial.number)
            return "lost"
        except (RuntimeError, ValueError) as err:
            # Optuna 5 says "Cannot tell a FAIL trial." (a ValueError), earlier ones a
            # RuntimeError naming the trial as finished
            if "finished" not in str(err) and "Cannot tell a" not in str(err):
                raise
            _log.warning("trial %d was finished by another worker meanwhile", trial.number)
            return "lost"
        return "complete" if state == TrialState.COMPLETE else "pruned"

    def fail(self, trial: optuna.Trial | FrozenTrial, kind: str, reason: str) -> bool:
        """Fail the trial with ``kind`` and ``reason`` and enqueue its retry; False if it
        was found no longer RUNNING."""
        with self.lock:
            frozen = internals.storage(self.study).get_trial(internals.trial_id(trial))
            if frozen.state != TrialState.RUNNING:
                return False
            budget.fail_and_replace(self.study, frozen, kind, reason, self.max_retries)
            return True

    def hand_back(self, trial: FrozenTrial, reason: str) -> bool:
        """Fail the RUNNING ``trial`` as interrupted and enqueue its retry (any thread)."""
        try:
            frozen = internals.storage(self.study).get_trial(internals.trial_id(trial))
            if frozen.state != TrialState.RUNNING:
                return False
            return budget.fail_and_replace(self.study, frozen, "interrupted", reason,
                                           self.max_retries)
        except Exception as err:  # the database is away: the reaper retries the trial
            _log.error("trial %d could not be handed back: %s", trial.number, one_line(err))
            return False
