"""The exact trial budget, shared by any number of workers.

``init`` creates the budget's ``num_trials`` trials up front as WAITING trials with no
fixed parameters (Optuna's enqueue mechanism; the sampler fills them in when a worker
pops one). A worker claims a trial with the storage's own atomic WAITING → RUNNING
transition, so two workers never get the same one and no worker ever creates a trial
beyond the budget. Every trial ends COMPLETE, PRUNED or FAIL; each FAIL is replaced by
exactly one new WAITING trial (a retry with the same parameters that resumes from the
failed trial's checkpoints, or fresh parameters after an error), so the number of
trials that are WAITING, RUNNING, COMPLETE or PRUNED never exceeds ``num_trials`` and
the study ends with exactly ``num_trials`` in COMPLETE or PRUNED.

The one non-atomic step, FAIL then enqueue, is repaired by :class:`Reconciler` if a
worker dies in between; if two workers both repair the same FAIL, the replacement
with the higher trial id is recognised when claimed and dropped (:func:`is_duplicate`).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import optuna
from optuna.exceptions import StorageInternalError, UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.optim import internals
from cnn_mellin.optim.attrs import (
    BASE_EPOCH_SECONDS,
    BEAT_KEY,
    FAIL_KIND,
    FAIL_REASON,
    INTERRUPT_COUNT,
    NUM_TRIALS,
    REPLACE_KIND,
    REPLACE_REASON,
    REPLACES,
    RETRY_COUNT,
    RETRY_OF,
    WORKER,
)

_log = logging.getLogger("cnn_mellin.optim")


# a chain of retries stopped by this many signals (preemptions, time limits) goes on with
# fresh parameters: each interruption resumes where it stopped, so only a trial that never
# gets anywhere reaches it
MAX_INTERRUPTS = 20

LIVE_STATES = (TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class Counts:
    """Trials per state and the budget they count against."""

    waiting: int
    running: int
    complete: int
    pruned: int
    fail: int
    budget: int

    @property
    def done(self) -> int:
        return self.complete + self.pruned

    @property
    def live(self) -> int:
        return self.waiting + self.running + self.complete + self.pruned


def count(trials: Sequence[FrozenTrial], budget: int) -> Counts:
    """Count ``trials`` by state."""
    by_state = {state: 0 for state in TrialState}
    for trial in trials:
        by_state[trial.state] += 1
    return Counts(
        by_state[TrialState.WAITING], by_state[TrialState.RUNNING],
        by_state[TrialState.COMPLETE], by_state[TrialState.PRUNED], by_state[TrialState.FAIL],
        budget,
    )


def trials_in(study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    """The study's trials in ``states``, filtered by the database itself.

    Optuna's caching wrapper of SQL storages re-reads every unfinished trial on each
    listing, which with a budget of WAITING trials is the whole budget; asking the
    underlying storage filters in SQL instead.
    """
    return internals.trials_in(study, states, through_cache=False)


class Slot(NamedTuple):
    """A WAITING trial as the claimer sees it, without reading the trial itself."""

    trial_id: int
    number: int
    retry: bool  # a retry of a failed trial: taken before the others
    fixed: bool  # enqueued with parameters (the base configuration): next


def running(study: optuna.Study) -> list[FrozenTrial]:
    """The study's RUNNING trials with their worker's identity and heartbeat, and nothing
    else read where there is a database (every worker looks at all of them every heartbeat
    interval: W workers read W trials each)."""
    brief = internals.extension(study, "running_brief")
    if brief is None:
        return trials_in(study, (TrialState.RUNNING,))
    return [internals.running_trial(trial_id, number, start,
                                    {WORKER: worker} if worker is not None else {},
                                    {BEAT_KEY: beat} if beat is not None else {})
            for trial_id, number, start, worker, beat in
            brief(internals.study_id(study), WORKER, BEAT_KEY)]


def waiting_slots(study: optuna.Study) -> list[Slot]:
    """The study's WAITING trials: one light query on the SQL database and through the
    proxy (whatever the study's size), a listing of the WAITING trials on the journal."""
    brief = internals.extension(study, "waiting_brief")
    if brief is not None:
        return [Slot(*row) for row in brief(internals.study_id(study), RETRY_OF)]
    return [Slot(internals.trial_id(t), t.number, RETRY_OF in t.user_attrs,
                 bool(internals.fixed_params(t)))
            for t in internals.trials_in(study, (TrialState.WAITING,))]


def state_counts(study: optuna.Study) -> dict[TrialState, int]:
    """Trials of the study per state, counted by the database where there is one."""
    counts = internals.extension(study, "state_counts")
    if counts is not None:
        return counts(internals.study_id(study))
    return dict(Counter(t.state for t in study.get_trials(deepcopy=False)))


def counts(study: optuna.Study, budget: int) -> Counts:
    """The study's trials per state against ``budget``, counted by the database where there
    is one (no trial read: an idle worker's look costs the same with any history)."""
    by_state = state_counts(study)
    return Counts(*(by_state.get(state, 0) for state in (
        TrialState.WAITING, TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED,
        TrialState.FAIL)), budget)


def claim(study: optuna.Study, trial_id: int, user_attrs: dict) -> FrozenTrial | None:
    """Take the WAITING trial ``trial_id`` (now RUNNING) and give it ``user_attrs``; the
    trial, or None if another worker took it first. On the SQL database and through the
    proxy one transaction; on the journal its atomic transition, then the attributes."""
    atomic = internals.extension(study, "claim_waiting")
    if atomic is not None:
        trial = atomic(trial_id, user_attrs)
        if trial is not None:
            internals.adopt(study, trial)
        return trial
    storage = internals.storage(study)
    if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):
        return None
    for key, value in user_attrs.items():
        storage.set_trial_user_attr(trial_id, key, value)
    return storage.get_trial(trial_id)


def set_user_attrs(study: optuna.Study, trial_id: int, attrs: dict) -> None:
    """Set several user attributes of a trial (one transaction where there is a database)."""
    batch = internals.extension(study, "set_trial_user_attrs")
    if batch is not None:
        batch(trial_id, attrs)
        return
    for key, value in attrs.items():
        internals.storage(study).set_trial_user_attr(trial_id, key, value)


def create_slots(
    study: optuna.Study, num_trials: int, first_params: Sequence[dict] = ()
) -> int:
    """Enqueue WAITING trials until the study has ``num_trials`` trials; returns how many.

    In a study without trials, the first slots get the non-empty ``first_params`` in order
    (the base configuration's values, then any a stage asked to try next), so a stage
    started from an earlier stage's ``.ini`` tries that configuration first.
    """
    existing = len(study.get_trials(deepcopy=False))
    missing = max(0, num_trials - existing)
    fixed = [params for params in first_params if params] if existing == 0 else []
    for i in range(missing):
        study.enqueue_trial(fixed[i] if i < len(fixed) else {})
    return missing


def grow(study: optuna.Study, more: int) -> tuple[int, int]:
    """Raise the study's budget (user attribute ``num_trials``) by ``more`` trials and
    enqueue them; returns (old, new) budget.

    The attribute is raised first, so a worker never sees a slot beyond the budget it knows;
    running workers follow the new budget when they next run out of trials.
    """
    old = int(study.user_attrs[NUM_TRIALS])
    new = old + more
    study.set_user_attr(NUM_TRIALS, new)
    live = count(study.get_trials(deepcopy=False), new).live
    for _ in range(max(0, new - live)):
        study.enqueue_trial({})
    return old, new


def root_number(trial: FrozenTrial) -> int:
    """The number of the first trial in a chain of retries (names its checkpoint folder)."""
    return int(trial.user_attrs.get(RETRY_OF, trial.number))


def replace(
    study: optuna.Study, failed: FrozenTrial, kind: str, reason: str, max_retries: int
) -> None:
    """Enqueue the one replacement of a trial that has just been failed by this process.

    ``kind`` ``dead`` (worker died), ``user`` (a user error stopped the worker) and
    ``interrupted`` (worker stopped by a signal) and ``neighbour`` (out of memory another
    process on the GPU caused) give a retry with the same parameters and checkpoint folder.
    Every retry is bounded: ``dead`` and ``user`` count against ``max_retries``,
    ``interrupted`` and ``neighbour`` against :data:`MAX_INTERRUPTS`. ``error``, or a bound
    reached, gives fresh parameters.
    """
    attrs: dict = {REPLACES: failed.number, REPLACE_REASON: reason, REPLACE_KIND: kind}
    params: dict = {}
    retries = int(failed.user_attrs.get(RETRY_COUNT, 0)) + (kind in ("dead", "user"))
    interrupts = int(failed.user_attrs.get(INTERRUPT_COUNT, 0)) + \
        (kind in ("interrupted", "neighbour"))
    if kind in ("dead", "user", "interrupted", "neighbour") and retries <= max_retries \
            and interrupts <= MAX_INTERRUPTS:
        # a trial failed before it drew (handed back as it was claimed) has only the
        # parameters fixed for it: a retry's, which must not turn into fresh ones
        params = {**internals.fixed_params(failed), **failed.params}
        attrs[RETRY_OF] = root_number(failed)
        attrs[RETRY_COUNT] = retries
        if interrupts:
            attrs[INTERRUPT_COUNT] = interrupts
    study.enqueue_trial(params, user_attrs=attrs)
    _log.info(
        "trial %d failed (%s); %s", failed.number, reason,
        f"retry enqueued (retry {retries} of trial {attrs[RETRY_OF]})" if RETRY_OF in attrs
        else "replaced by a fresh trial",
    )


def fail_and_replace(
    study: optuna.Study, trial: FrozenTrial, kind: str, reason: str, max_retries: int
) -> bool:
    """Record why, mark ``trial`` FAIL and enqueue its replacement; False if it had finished.

    Only the process whose FAIL transition succeeds enqueues, so concurrent reapers of
    one dead trial create a single replacement.
    """
    storage, trial_id = internals.storage(study), internals.trial_id(trial)
    try:
        storage.set_trial_user_attr(trial_id, FAIL_REASON, reason)
        storage.set_trial_user_attr(trial_id, FAIL_KIND, kind)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except UpdateFinishedTrialError:
        return False
    replace(study, storage.get_trial(trial_id), kind, reason, max_retries)
    return True


def is_duplicate(trial: FrozenTrial, trials: Sequence[FrozenTrial]) -> FrozenTrial | None:
    """The earlier replacement of the same failed trial, if ``trial`` duplicates one."""
    target = trial.user_attrs.get(REPLACES)
    if target is None:
        return None
    for other in trials:
        if internals.trial_id(other) < internals.trial_id(trial) and \
                other.user_attrs.get(REPLACES) == target:
            if other.user_attrs.get(FAIL_KIND) != "duplicate":
                return other
    return None


class Reconciler:
    """Replaces FAIL trials that have no replacement because their reaper died.

    Acts only while fewer than ``num_trials`` trials are live, and only on orphans this
    process has seen for ``settle_s`` seconds of its own clock (so a reaper that is merely
    slow is not raced, and the clocks of other hosts do not matter).
    """

    def __init__(self, study: optuna.Study, num_trials: int, settle_s: float, max_retries: int):
        self._study = study
        self.num_trials = num_trials
        self._settle_s = settle_s
        self._max_retries = max_retries
        self._seen: dict[int, float] = {}

    def restart(self) -> None:
        """Forget how long orphans have been seen (after this process lost the database)."""
        self._seen.clear()

    def __call__(self) -> int:
        """One look; returns how many replacements were enqueued."""
        # counted by the database: reading every trial, each look of each worker, would
        # cost the study's whole remaining budget
        counts = state_counts(self._study)
        if self.num_trials - sum(counts.get(state, 0) for state in LIVE_STATES) <= 0:
            self._seen.clear()
            return 0
        trials = self._study.get_trials(deepcopy=False)  # a replacement is missing: rare
        deficit = self.num_trials - count(trials, self.num_trials).live
        if deficit <= 0:
            self._seen.clear()
            return 0
        replaced = {t.user_attrs.get(REPLACES) for t in trials if REPLACES in t.user_attrs}
        orphans = [
            t for t in trials
            if t.state == TrialState.FAIL and t.number not in replaced
            and t.user_attrs.get(FAIL_KIND) != "duplicate"
        ]
        now = time.monotonic()
        self._seen = {t.number: self._seen.get(t.number, now) for t in orphans}
        settled = [t for t in orphans if now - self._seen[t.number] >= self._settle_s]
        for trial in settled[:deficit]:
            kind = trial.user_attrs.get(FAIL_KIND, "dead")
            reason = trial.user_attrs.get(FAIL_REASON, "failed outside cnn-mellin")
            replace(self._study, trial, kind, reason, self._max_retries)
        return min(len(settled), deficit)


class SlotClaimer:
    """Claims WAITING trials for one worker, retries first, from a periodically refreshed list.

    The list (:func:`waiting_slots`: ids, no trial read) is kept and refreshed when it runs
    out or is older than ``refresh_s``; a stale entry costs one failed claim. Retries come
    first, then trials enqueued with a configuration (the base), then the others in a
    per-worker random order so that workers rarely compete for the same one. Only the
    claimed trial is then read.
    """

    def __init__(self, study: optuna.Study, refresh_s: float, seed: int | None = None,
                 user_attrs: dict | None = None):
        self._study = study
        self._user_attrs = user_attrs or {}  # written with the claim (the worker's identity)
        self._refresh_s = refresh_s
        self._queue: list[Slot] = []
        self._fetched = -float("inf")
        self._rng = random.Random(seed)

    def _refresh(self) -> None:
        waiting = waiting_slots(self._study)
        retries = sorted((s for s in waiting if s.retry), key=lambda s: s.number)
        fresh = [s for s in waiting if not s.retry]
        self._rng.shuffle(fresh)
        # the base configuration (enqueued with its values) before the sampler's draws: it
        # is what pays most, and a worker busy with other claims must not delay it
        fresh.sort(key=lambda s: not s.fixed)  # stable: the rest stay shuffled
        self._queue = retries + fresh
        self._fetched = time.monotonic()

    def invalidate(self) -> None:
        """Re-read the WAITING trials at the next claim (e.g. a retry was just enqueued)."""
        self._fetched = -float("inf")

    def claim(self) -> FrozenTrial | None:
        """Atomically take one WAITING trial (now RUNNING and ours), or None if none is left."""
        refreshed = False
        if not self._queue or time.monotonic() - self._fetched > self._refresh_s:
            self._refresh()
            refreshed = True
        while True:
            # a second taken entry in a row means the list has gone stale: re-read it
            trial = self._pop(max_misses=None if refreshed else 2)
            if trial is not None or refreshed:
                return trial
            self._refresh()
            refreshed = True

    def _pop(self, max_misses: int | None) -> FrozenTrial | None:
        misses = 0
        while self._queue and (max_misses is None or misses < max_misses):
            slot = self._queue.pop(0)
            try:
                trial = claim(self._study, slot.trial_id, self._user_attrs)
                if trial is not None:
                    return trial
            except (UpdateFinishedTrialError, StorageInternalError):
                pass  # taken and finished meanwhile; or SQLite lock contention
            misses += 1
        return None


class BaseEpochSeconds:
    """Seconds the base configuration's trial took to reach each epoch (a study system
    attribute): the reference of ``init --max-trial-time-ratio``, measured on the machines
    the study runs on, so the limit travels where absolute seconds do not."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def record(self, epoch: int, seconds: float) -> None:
        """The base reached ``epoch`` after ``seconds`` (the first record of it stays)."""
        known = self._read()
        if str(epoch) not in known:
            internals.set_study_system_attr(
                self._study, BASE_EPOCH_SECONDS, {**known, str(epoch): round(seconds, 3)})

    def at(self, epoch: int) -> float | None:
        """Seconds the base took to reach ``epoch``; None while it has not reached it."""
        value = self._read().get(str(epoch))
        return None if value is None else float(value)

    def _read(self) -> dict:
        known = internals.study_system_attrs(self._study).get(BASE_EPOCH_SECONDS)
        return known if isinstance(known, dict) else {}
