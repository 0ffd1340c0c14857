"""The ``optim run`` worker loop.

Per trial: claim a WAITING trial of the budget → sample the searched parameters →
assemble the configuration (base + parameters) → let the task check it (invalid →
pruned with the reason) → memory admission (over the limit → pruned before training,
the figure recorded and given to the sampler as a constraint) → run the task with
per-epoch reports for the pruner → record wall time, epochs, peak memory, device and
host → tell. Out-of-memory errors and non-finite values prune the trial with the reason;
the worker carries on. Any other error fails the trial (a fresh trial replaces it); a user
error fails it, enqueues its one retry and stops the worker, and that retry failing again is
pruned as invalid (the error goes with the parameters).
SIGTERM / SIGINT fail the running trial as interrupted and enqueue its retry, which
resumes from the trial's checkpoints; a task that stops on request (``asr``) first saves a
checkpoint of the step it is at (within :data:`STOP_GRACE_S`). Signal handlers only set a
flag: the worker acts on it at safe points, and a stop watchdog thread (see
:meth:`Worker.watch_stop`) hands back the trial of a task that cannot stop on request and
ends the process, instead of raising into whatever native code the main thread runs.
The loop ends when the budget is done, or when nothing is left to claim and another idle
worker stands by for retries (:mod:`cnn_mellin.optim.standby`): idle workers give their
allocation back.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim import budget, gpushare, internals, space
from cnn_mellin.optim.attrs import (
    ADMISSION_BYTES,
    ADMISSION_METHOD,
    DRAWS_REJECTED_INVALID,
    DRAWS_REJECTED_MEMORY,
    DUPLICATE_OF,
    EPOCHS,
    FAIL_KIND,
    MEMORY_CONSTRAINT,
    PEAK_BYTES,
    PEAK_METHOD,
    PRUNE_KIND,
    PRUNE_REASON,
    REPLACE_KIND,
    REPLACES,
    RESUMED_FROM,
    RETRY_OF,
    STOPPED_AT_STEP,
    VALID_CONSTRAINT,
    WALL_TIME,
    WORKER_TIME_PREFIX,
)
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.cpus import allocated_cpus, use_threads
from cnn_mellin.optim.defaults import DEFAULT_MAX_OUTAGE_S, SAMPLERS
from cnn_mellin.optim.feasible import Feasibility, FeasibleSampler, NoFeasibleDraw
from cnn_mellin.optim.heartbeat import Monitor, WorkerIdentity
from cnn_mellin.optim.pool import PoolLink
from cnn_mellin.optim.standby import Standby
from cnn_mellin.optim.storage import (
    DatabaseUnreachable,
    load_study,
    open_storage,
)
from cnn_mellin.optim.study import StudySettings, base_params, checkpoint_root, read_settings
from cnn_mellin.tasks import MemoryExceeded, PruneTrial, Task, TrialContext
from cnn_mellin.tasks.base import TrialInterrupted

_log = logging.getLogger("cnn_mellin.optim")

MAX_CONSECUTIVE_ERRORS = 3
CLAIM_REFRESH_S = 5.0
# after SIGTERM, how long a task that stops on request may take to save its step before
# the worker hands its trial back without it; below SLURM's default KillWait (30 s) between
# SIGTERM and SIGKILL
STOP_GRACE_S = 20.0
_WATCH_S = 0.1  # how often the stop watchdog looks at the flags


class WorkerStopped(BaseException):
    """SIGTERM or SIGINT arrived: stop after failing (and re-enqueueing) the current trial.

    Raised by the worker itself at a safe point (never by a signal handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrialLost(Exception):
    """Another worker took this worker for dead and failed its trial."""


class _HandBack(Exception):
    """Out of memory that another process on the device caused: retry, do not prune."""


class _Prune(Exception):
    def __init__(
        self, kind: str, reason: str, constraint: tuple[str, float] | None = None
    ):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.constraint = constraint


@dataclass
class WorkerSummary:
    """Outcomes of the trials one worker ran."""

    outcomes: Counter = field(default_factory=Counter)
    exit_code: int = 0

    def __str__(self) -> str:
        if not self.outcomes:
            return "no trials run"
        return ", ".join(f"{n} {k}" for k, n in sorted(self.outcomes.items()))


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler called ``name`` (see :data:`SAMPLERS`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def make_pruner(settings: StudySettings, task: Task) -> optuna.pruners.BasePruner:
    """The pruner the study was initialised with."""
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Both decide from half the epochs on: CTC models spend their first epochs in the
    # all-blank phase, where small models that plateau high lead, and an earlier rung prunes
    # the eventual winners (bench/replay.py, docs/benchmarks.md "Search efficiency").
    max_epochs = task.max_epochs(settings.config(), settings.searched)
    half = max(1, max_epochs // 2) if max_epochs else 1
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=half)
    # with a minimum of half the epochs and a reduction factor of 3, hyperband has one
    # bracket whose only rung below the last epoch is at half: one decision per trial
    return optuna.pruners.HyperbandPruner(
        min_resource=half, max_resource=max_epochs if max_epochs else "auto", reduction_factor=3
    )


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler seed of one trial: reproducible per trial number, distinct across trials."""
    if seed is None:
        return None
    return (seed * 1_000_003 + number * 7_919 + 17) % (2**32)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a task that never imported torch cannot raise its OOM
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def _free_device_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:500] if text else type(err).__name__


class Worker:
    """One worker process's loop over the budget of one study."""

    def __init__(
        self, db_url: str, study_name: str | None, *, device: str = "cpu",
        sampler: str = "random", seed: int | None = None, max_trials: int | None = None,
        max_outage_s: float = DEFAULT_MAX_OUTAGE_S, keep_checkpoints: bool = False,
        data_dir: str | None = None, checkpoint_dir: str | None = None,
        pool: PoolLink | None = None,
    ):
        if sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
        if max_trials is not None and max_trials < 1:
            raise ConfigError(f"--max-trials must be at least 1, got {max_trials}")
        if not max_outage_s >= 0:
            raise ConfigError(f"--max-outage must be at least 0 seconds, got {max_outage_s}")
        if device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"--device {device}: no CUDA device is usable here")
        self.storage = open_storage(db_url, max_outage_s=max_outage_s)
        self.study = load_study(self.storage, study_name, db_url)
        self.settings = overridden(read_settings(self.study), data_dir, checkpoint_dir)
        self.task = self.settings.build_task()
        self.task.verify()
        self.study.pruner = make_pruner(self.settings, self.task)
        self.device = device
        # the study's limit caps this process's allocator, so a neighbour's trial keeps its own
        fraction = gpushare.apply_cap(device, self.settings.mem_limit_bytes)
        self.cap_bytes = self.settings.mem_limit_bytes if fraction is not None else None
        if fraction is not None:
            _log.info("memory of %s capped at %d bytes (%.3f of it)", device, self.cap_bytes,
                      fraction)
        self.keep_checkpoints = keep_checkpoints
        self.pool = pool  # the local pool this worker belongs to (optim run --workers N)
        self._uid = uuid.uuid4().hex[:8]  # tells apart workers that reuse a pid
        self._started, self._busy_s = time.monotonic(), 0.0
        self._trial_dir: Path | None = None
        self.sampler_name = sampler
        self.seed = seed
        self.max_trials = max_trials
        self.identity = WorkerIdentity.current(device)
        self.base = self.task.config(self.settings.base_config)
        self.params = self.task.params()
        self.base_params = base_params(self.settings)
        self.space = space.distributions(self.settings.searched, self.params)
        self.feasibility = Feasibility(self.task, self.base, device,
                                       self.settings.mem_limit_bytes)
        interval = self.settings.heartbeat_interval
        self.poll_s = max(0.2, min(interval, 5.0))
        self.monitor = Monitor(
            self.study, self.identity, interval, self.settings.heartbeat_grace,
            self.settings.num_trials, self.settings.max_retries,
        )
        # the list of WAITING trials is long (the budget) and re-read at most every few
        # seconds: when it runs out, after this worker enqueued a retry, and before a claim
        # when older than CLAIM_REFRESH_S, so that others' retries (a trial handed back by a
        # preempted worker) are taken before fresh trials
        self.claimer = budget.SlotClaimer(
            self.study, refresh_s=CLAIM_REFRESH_S, seed=self.identity.pid,
            user_attrs={WORKER_ATTR: self.identity.to_attr()},  # written with the claim
        )
        self.monitor.on_enqueue = self.claimer.invalidate
        self.standby = Standby(self.study, self.identity, self.settings.heartbeat_grace,
                               check=self._raise_if_stopped)
        self.stop_signal: int | None = None  # the first SIGTERM/SIGINT (set by on_signal)
        self._urgent = False  # a second signal: hand the trial back now
        self._polite = False  # inside the run of a task that stops on request
        self._owned: FrozenTrial | None = None  # the trial this worker runs now
        self._ending = threading.RLock()  # held while a trial is ended (told, failed)
        self.outcomes: Counter = Counter()  # every trial's outcome, a stopped one included

    # -- signals ------------------------------------------------------------------------

    def on_signal(self, signum: int, _frame=None) -> None:
        """SIGTERM/SIGINT: set the stop flag, nothing else (a second signal: stop now).

        A handler that raised, or did any work, ran inside whatever the main thread was
        doing: torch's backward pass, a checkpoint's fsync, a database transaction.
        """
        if self.stop_signal is None:
            self.stop_signal = signum
        else:
            self._urgent = True

    def _stop_requested(self) -> bool:
        return self.stop_signal is not None

    def _raise_if_stopped(self) -> None:
        """A safe point outside trials: a stop requested ends the worker here."""
        if self.stop_signal is not None:
            raise WorkerStopped(self.stop_signal)

    def watch_stop(self, done: threading.Event) -> None:
        """The stop watchdog, a thread beside the main one until ``done`` is set.

        Once a signal set the flag, a task that stops on request (``asr``) gets
        :data:`STOP_GRACE_S` to save its step and hand its trial back in the main thread;
        a trial of any other task is handed back at once, and so is any trial at a second
        signal or after the grace. Handing back here means: fail the trial as interrupted,
        enqueue its retry, end the process (``os._exit``, 128 + the signal): the main thread
        is never interrupted, whatever native code it runs. The task's children go with it
        (loader workers and the ``command`` guard notice their parent is gone). A worker
        without a trial stops at its next safe point (:meth:`_raise_if_stopped`).
        """
        while self.stop_signal is None:
            if done.wait(_WATCH_S):
                return
        name = signal.Signals(self.stop_signal).name
        polite = self.task.STOPS_ON_REQUEST
        _log.warning("%s: %s", name, "the trial saves the step it is at, then the worker stops"
                     if polite else "the worker hands its trial back and stops")
        deadline = time.monotonic() + STOP_GRACE_S
        while not done.wait(_WATCH_S):
            if self._urgent or time.monotonic() >= deadline or \
                    (self._owned is not None and not polite):
                break
        else:
            return
        with self._ending:
            if done.is_set():  # the main thread got there first
                return
            trial = self._owned
            if trial is not None:
                if polite and not self._urgent:
                    _log.warning("trial %d did not stop within %g s", trial.number,
                                 STOP_GRACE_S)
                if self._hand_back(trial, f"worker stopped by {name}"):
                    self.outcomes["interrupted"] += 1
            _log.warning("worker stopped by %s%s", name,
                         "; its trial was re-enqueued" if trial is not None else "")
            _log.info("worker done: %s", WorkerSummary(self.outcomes))
            for handler in logging.getLogger().handlers:
                handler.flush()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + self.stop_signal)

    def _hand_back(self, trial: FrozenTrial, reason: str) -> bool:
        """Fail the RUNNING ``trial`` as interrupted and enqueue its retry (any thread)."""
        try:
            frozen = internals.storage(self.study).get_trial(internals.trial_id(trial))
            if frozen.state != TrialState.RUNNING:
                return False
            return budget.fail_and_replace(self.study, frozen, "interrupted", reason,
                                           self.settings.max_retries)
        except Exception as err:  # the database is away: the reaper retries the trial
            _log.error("trial %d could not be handed back: %s", trial.number, _one_line(err))
            return False

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> WorkerSummary:
        """Run trials until the study's budget is done (or ``max_trials`` were run here)."""
        summary = WorkerSummary()
        errors = 0
        idle_s = 0.0  # back-off while other workers finish the last trials
        idle = False  # looked at the standby since the last claim
        self.monitor.start()
        self._started, self._busy_s = time.monotonic(), 0.0
        try:
            while True:
                claimed = self.claimer.claim()
                if claimed is None:
                    num_trials = self._budget()
                    counts = budget.counts(self.study, num_trials)  # counted, none read
                    if counts.done >= num_trials:
                        break
                    idle = True
                    if counts.running and self.pool is not None and self.pool.holds_all(
                            budget.running(self.study), self.identity):
                        _log.info("nothing left to claim: leaving (the %d running trials are "
                                  "this pool's, which starts a worker again should one die)",
                                  counts.running)
                        break
                    if not self.standby.stay():
                        holder = self.standby.holder
                        _log.info("nothing left to claim: leaving (%s stands by for retries "
                                  "of the %d running trials)",
                                  f"worker {holder.host}:{holder.pid}" if holder else "another",
                                  counts.running)
                        break
                    if not idle_s:
                        _log.info("no trial left to start; standing by for retries of the %d "
                                  "running elsewhere", counts.running)
                    idle_s = min(self.poll_s, max(0.05, 2 * idle_s))
                    time.sleep(idle_s)
                    continue
                if idle:
                    self.standby.leave()
                    idle = False
                idle_s = 0.0
                began = time.monotonic()
                try:
                    outcome = self.run_trial(claimed)
                finally:
                    self._busy_s += time.monotonic() - began
                    self._record_time()
                summary.outcomes[outcome] += 1
                errors = errors + 1 if outcome == "failed" else 0
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    _log.error("stopping: %d trials in a row failed with errors", errors)
                    summary.exit_code = 1
                    break
                if self.max_trials is not None and sum(summary.outcomes.values()) >= \
                        self.max_trials:
                    break
                if self.stop_signal is not None:  # the trial ended before it saw the stop
                    raise WorkerStopped(self.stop_signal)
        finally:
            self.monitor.stop()
            self._record_time()
            if idle:
                try:
                    self.standby.leave()
                except Exception as err:  # exiting anyway; the next standby takes over
                    _log.debug("leaving the standby: %s", err)
        return summary

    def _record_time(self) -> None:
        """Store this worker's seconds so far, busy with trials and in all (``status``)."""
        key = f"{WORKER_TIME_PREFIX}{self.identity.host}:{self.identity.pid}:{self._uid}"
        seconds = {"seconds": round(time.monotonic() - self._started, 3),
                   "busy_s": round(self._busy_s, 3)}
        try:
            internals.set_study_system_attr(self.study, key, seconds)
        except Exception as err:  # bookkeeping: never the reason a worker or trial fails
            _log.debug("recording worker time: %s", err)

    def _budget(self) -> int:
        """The study's budget now (``grow`` may have raised it since this worker started)."""
        num_trials = int(self.study.user_attrs.get("num_trials", self.settings.num_trials))
        if num_trials != self.settings.num_trials:
            _log.info("the study's budget is now %d trials", num_trials)
            self.settings = dataclasses.replace(self.settings, num_trials=num_trials)
            self.monitor.set_budget(num_trials)
        return num_trials

    # -- one trial ----------------------------------------------------------------------

    def run_trial(self, claimed: FrozenTrial) -> str:
        """Run one claimed (RUNNING) trial to its end; returns the outcome's name."""
        trial_id = internals.trial_id(claimed)
        try:
            if claimed.user_attrs.get(WORKER_ATTR) != self.identity.to_attr():
                internals.storage(self.study).set_trial_user_attr(
                    trial_id, WORKER_ATTR, self.identity.to_attr()
                )
        except UpdateFinishedTrialError:  # taken for dead before it was even started
            _log.warning("trial %d was failed by another worker as it was claimed; dropped",
                         claimed.number)
            return "lost"
        self.monitor.own(trial_id)
        self._trial_dir = None
        self._owned = claimed
        try:
            with self._ending:
                if self.stop_signal is not None:  # claimed as the stop came: not started
                    self._hand_back(claimed, "worker stopped by "
                                    f"{signal.Signals(self.stop_signal).name} before it began")
                    raise WorkerStopped(self.stop_signal)
            outcome = self._run_owned(claimed)
        except WorkerStopped:
            self.outcomes["interrupted"] += 1
            raise
        finally:
            self._owned = None
            self.monitor.release()
        self.outcomes[outcome] += 1
        if outcome in ("complete", "pruned") and self._trial_dir and not self.keep_checkpoints:
            try:
                freed = self.task.discard(self._trial_dir)
            except OSError as err:  # a full or read-only disk must not stop the worker
                _log.warning("trial %d: cannot delete its resume files: %s", claimed.number, err)
            else:
                if freed:
                    _log.info("trial %d: deleted %d bytes of resume files", claimed.number,
                              freed)
        return outcome

    def _run_owned(self, claimed: FrozenTrial) -> str:
        storage = internals.storage(self.study)
        trial_id = internals.trial_id(claimed)
        if REPLACES in claimed.user_attrs:
            earlier = budget.is_duplicate(claimed, self.study.get_trials(deepcopy=False))
            if earlier is not None:
                storage.set_trial_user_attr(trial_id, DUPLICATE_OF, earlier.number)
                storage.set_trial_user_attr(trial_id, FAIL_KIND, "duplicate")
                storage.set_trial_state_values(trial_id, TrialState.FAIL)
                return "duplicate"
        self.study.sampler = FeasibleSampler(
            make_sampler(self.sampler_name, trial_seed(self.seed, claimed.number)),
            self.space, self.feasibility.judge)
        trial = optuna.Trial(self.study, trial_id)
        facts: dict = {}
        reported = self._copy_history(trial, claimed)
        started = time.monotonic()
        checkpoint_dir = (
            checkpoint_root(self.study, self.settings) / f"trial-{budget.root_number(claimed)}"
        )
        self._trial_dir = checkpoint_dir
        try:
            result = self._attempt(trial, claimed, facts, reported, checkpoint_dir)
        except _Prune as prune:
            return self._finish_pruned(trial, facts, started, prune)
        except _HandBack as back:
            _log.warning("trial %d handed back: %s", claimed.number, back)
            self._fail(trial, claimed, "neighbour", str(back))
            return "handed back"
        except optuna.TrialPruned as pruned:
            reason = str(pruned) or "pruned by the pruner"
            return self._finish_pruned(trial, facts, started, _Prune("pruner", reason))
        except MemoryExceeded as over:
            facts[PEAK_BYTES], facts[PEAK_METHOD] = over.peak_bytes, over.method
            return self._finish_pruned(
                trial, facts, started,
                _Prune(over.kind, over.reason, self._memory_violation(over.peak_bytes)),
            )
        except PruneTrial as pruned:
            return self._finish_pruned(trial, facts, started, _Prune(pruned.kind, pruned.reason))
        except (TrialLost, UpdateFinishedTrialError):  # e.g. while its parameters are sampled
            _log.warning("trial %d was failed by another worker (taken for dead); dropped",
                         claimed.number)
            return "lost"
        except WorkerStopped as stop:
            self._fail(trial, claimed, "interrupted", f"worker stopped by {stop}")
            raise
        except TrialInterrupted as stopped:
            signum = self.stop_signal or signal.SIGTERM
            with self._ending:
                for key in (STOPPED_AT_STEP, EPOCHS):
                    if key in facts:
                        storage.set_trial_user_attr(trial_id, key, facts[key])
                self._fail(trial, claimed, "interrupted",
                           f"worker stopped by {signal.Signals(signum).name}: {stopped}")
            raise WorkerStopped(signum) from None
        except DatabaseUnreachable:  # nothing can be written; the reaper retries the trial
            raise
        except ConfigError as err:  # this configuration cannot run (found out late)
            return self._finish_pruned(
                trial, facts, started,
                _Prune("invalid", f"invalid configuration: {err}", (VALID_CONSTRAINT, 1.0)),
            )
        except UserError as err:
            reason = f"{type(err).__name__}: {_one_line(err)}"
            if claimed.user_attrs.get(REPLACE_KIND) == "user":
                # a second worker failed the same way: the error goes with the parameters
                return self._finish_pruned(trial, facts, started, _Prune(
                    "invalid", f"{reason} (again, on the retry)", (VALID_CONSTRAINT, 1.0)))
            # data or environment: every trial would fail here; its one retry goes elsewhere
            self._fail(trial, claimed, "user", reason)
            raise
        except Exception as err:
            if _is_oom(err):
                back = self._neighbour_oom(err)
                _free_device_memory()
                if back is not None:
                    _log.warning("trial %d handed back: %s", claimed.number, back)
                    self._fail(trial, claimed, "neighbour", str(back))
                    return "handed back"
                return self._finish_pruned(
                    trial, facts, started, _Prune("oom", f"out of memory: {_one_line(err)}",
                                                  self._memory_violation(None)),
                )
            _log.warning("trial %d failed:\n%s", claimed.number, traceback.format_exc())
            self._fail(trial, claimed, "error", f"{type(err).__name__}: {_one_line(err)}")
            return "failed"
        facts[WALL_TIME] = round(time.monotonic() - started, 3)
        facts[EPOCHS] = result.epochs
        if result.peak_bytes is not None:
            facts[PEAK_BYTES] = int(result.peak_bytes)
            facts[PEAK_METHOD] = result.peak_method
        elif ADMISSION_BYTES in facts:
            facts[PEAK_BYTES] = facts[ADMISSION_BYTES]
            facts[PEAK_METHOD] = facts[ADMISSION_METHOD]
        if result.resumed_from_epoch is not None:
            facts[RESUMED_FROM] = result.resumed_from_epoch
        facts.update(result.attrs)
        if not math.isfinite(result.value):
            return self._finish_pruned(
                trial, facts, started, _Prune("nonfinite", f"non-finite value {result.value}")
            )
        return self._tell(trial, facts, TrialState.COMPLETE, result.value)

    def _attempt(self, trial, claimed, facts, reported, checkpoint_dir):
        # drawn until valid and under the memory limit (optim/feasible.py): rejected draws
        # never become trials; a retry or the base has its values fixed and is judged below
        sampler = self.study.sampler
        try:
            params = space.suggest(trial, self.settings.searched, self.params)
        except NoFeasibleDraw as err:
            raise _Prune("infeasible", str(err)) from None
        finally:
            if isinstance(sampler, FeasibleSampler):
                facts[DRAWS_REJECTED_MEMORY] = sampler.rejected["memory"]
                facts[DRAWS_REJECTED_INVALID] = sampler.rejected["invalid"]
        try:
            config = self.base.replace(params)
            self.task.check(config)
        except ConfigError as err:
            raise _Prune(
                "invalid", f"invalid configuration: {err}", (VALID_CONSTRAINT, 1.0)
            ) from None
        if self.monitor.lost(internals.trial_id(trial)):
            raise TrialLost()
        self._admit(config, facts)
        # after its last epoch a trial is done: a rung there would prune a finished trial
        last_epoch = self.task.max_epochs(config, [])
        # the base configuration (the first trial; a stage's carried best) is the reference
        # the others are compared with: never pruned, so a stage keeps its known baseline
        # even when a small model that plateaus high leads it at the rung
        prunable = not (self.base_params and all(
            params.get(name) == value for name, value in self.base_params.items()))
        base_seconds = budget.BaseEpochSeconds(self.study)
        time_limit, running_since = self.settings.max_trial_seconds, time.monotonic()
        ratio = self.settings.max_trial_time_ratio

        def report(epoch: int, value: float) -> None:
            if self.monitor.lost(internals.trial_id(trial)):
                raise TrialLost()
            facts[EPOCHS] = epoch
            if not math.isfinite(value):
                raise _Prune("nonfinite", f"non-finite value {value} at epoch {epoch}")
            if epoch not in reported:
                trial.report(value, epoch)
                reported.add(epoch)
            elapsed = time.monotonic() - running_since
            if not prunable and ratio is not None:
                base_seconds.record(epoch, elapsed)
            if self.pool is not None:  # a sibling that left gave its CPUs to this trial
                self.pool.share_cpus()
            if last_epoch is not None and epoch >= last_epoch:
                return
            if prunable and time_limit is not None and elapsed > time_limit:
                raise _Prune("timeout", f"still running after {time_limit:g} s, at epoch "
                             f"{epoch} (value {value:.6g}); --max-trial-seconds")
            reference = base_seconds.at(epoch) if prunable and ratio is not None else None
            if reference is not None and elapsed > ratio * reference:
                raise _Prune("timeout", f"{elapsed:.0f} s to epoch {epoch}, over {ratio:g} x "
                             f"the base configuration's {reference:.0f} s (value "
                             f"{value:.6g}); --max-trial-time-ratio")
            if prunable and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned by the {self.settings.pruner} pruner at epoch {epoch} "
                    f"(value {value:.6g})"
                )

        context = TrialContext(
            device=self.device, checkpoint_dir=checkpoint_dir,
            num_data_workers=self.settings.num_data_workers, report=report,
            trial_number=claimed.number, mem_limit_bytes=self.settings.mem_limit_bytes,
            record=facts.__setitem__,
            record_peak=lambda peak, method: facts.update({PEAK_BYTES: int(peak),
                                                           PEAK_METHOD: method}),
            stop_requested=self._stop_requested,
        )
        self._polite = self.task.STOPS_ON_REQUEST
        try:
            return self.task.run(config, context)
        finally:
            self._polite = False

    def _admit(self, config: Config, facts: dict) -> None:
        limit = self.settings.mem_limit_bytes
        try:
            figure = self.feasibility.figure(config)
        except Exception as err:
            if not _is_oom(err):
                raise
            back = self._neighbour_oom(err)
            _free_device_memory()
            if back is not None:
                raise back from None
            raise _Prune(
                "oom", f"out of memory while measuring admission: {_one_line(err)}",
                self._memory_violation(None),
            ) from None
        if figure is None:
            return
        facts[ADMISSION_BYTES] = int(figure.bytes)
        facts[ADMISSION_METHOD] = figure.method
        if limit is None:
            return
        needed = self.feasibility.needed(figure)  # on CUDA with the allocator's reserve
        violation = self._memory_violation(needed)
        if needed > limit:
            reserve = f" + {gpushare.ALLOCATOR_RESERVE:.0%} allocator reserve" \
                if needed != figure.bytes else ""
            raise _Prune(
                "memory",
                f"needs {figure.bytes} bytes ({figure.method}){reserve} on {self.device}, "
                f"over the limit of {limit} bytes", violation,
            )
        facts["_constraint"] = violation

    def _neighbour_oom(self, err: BaseException) -> _HandBack | None:
        """A hand-back if this out-of-memory error came from a device others filled."""
        if self.cap_bytes is None:
            return None
        import torch

        reserved = torch.cuda.memory_reserved(self.device)
        if not gpushare.caused_by_neighbour(err, reserved, self.cap_bytes):
            return None
        return _HandBack(f"out of memory on {self.device} below this worker's cap of "
                         f"{self.cap_bytes} bytes ({reserved} reserved): another process "
                         f"filled the device; {_one_line(err)}")

    def _memory_violation(self, peak: int | None) -> tuple[str, float] | None:
        limit = self.settings.mem_limit_bytes
        if limit is None:
            return None
        if peak is None:
            return (MEMORY_CONSTRAINT, 1.0)
        return (MEMORY_CONSTRAINT, peak / limit - 1.0)

    def _copy_history(self, trial: optuna.Trial, claimed: FrozenTrial) -> set[int]:
        """A retry starts with its failed predecessor's per-epoch values (kept, not lost)."""
        reported: set[int] = set()
        if RETRY_OF not in claimed.user_attrs:
            return reported
        number = claimed.user_attrs.get(REPLACES)
        try:
            previous = internals.trial_by_number(self.study, int(number))
        except (KeyError, TypeError, ValueError):
            return reported
        for step, value in sorted(previous.intermediate_values.items()):
            trial.report(value, step)
            reported.add(step)
        return reported

    # -- endings ------------------------------------------------------------------------

    def _write_facts(self, trial: optuna.Trial, facts: dict) -> None:
        constraint = facts.pop("_constraint", None)
        if constraint is not None:
            trial.set_constraint(*constraint)
        budget.set_user_attrs(self.study, internals.trial_id(trial), facts)  # one transaction

    def _finish_pruned(self, trial, facts: dict, started: float, prune: _Prune) -> str:
        admitted = facts.pop("_constraint", None)
        facts[WALL_TIME] = round(time.monotonic() - started, 3)
        facts.setdefault(EPOCHS, 0)
        facts[PRUNE_REASON] = prune.reason
        facts[PRUNE_KIND] = prune.kind
        if prune.constraint is not None or admitted is not None:
            facts["_constraint"] = prune.constraint or admitted
        _log.info("trial %d pruned: %s", trial.number, prune.reason)
        return self._tell(trial, facts, TrialState.PRUNED, None)

    def _tell(self, trial, facts: dict, state: TrialState, value: float | None) -> str:
        with self._ending:
            return self._tell_now(trial, facts, state, value)

    def _tell_now(self, trial, facts: dict, state: TrialState, value: float | None) -> str:
        try:
            self._write_facts(trial, facts)
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

    def _fail(self, trial: optuna.Trial, claimed: FrozenTrial, kind: str, reason: str) -> None:
        with self._ending:
            frozen = internals.storage(self.study).get_trial(internals.trial_id(trial))
            if frozen.state != TrialState.RUNNING:
                return
            budget.fail_and_replace(self.study, frozen, kind, reason, self.settings.max_retries)
        self.claimer.invalidate()


def overridden(
    settings: StudySettings, data_dir: str | None, checkpoint_dir: str | None
) -> StudySettings:
    """``settings`` with the data and checkpoint folders a worker elsewhere sees them under
    (``run --data-dir/--checkpoint-dir``: joining from another cluster)."""
    if checkpoint_dir is not None:
        if os.path.exists(checkpoint_dir) and not os.path.isdir(checkpoint_dir):
            raise ConfigError(f"--checkpoint-dir {checkpoint_dir} is not a directory")
        settings = dataclasses.replace(settings, checkpoint_dir=os.path.abspath(checkpoint_dir))
    if data_dir is not None:
        if "data_dir" not in settings.task_info:
            raise ConfigError(f"--data-dir: the {settings.task} task of this study reads no "
                              "data folder")
        settings = dataclasses.replace(
            settings, task_info={**settings.task_info, "data_dir": os.path.abspath(data_dir)}
        )
    return settings


def run_worker(
    db_url: str, study_name: str | None, *, device: str = "cpu", sampler: str = "random",
    seed: int | None = None, max_trials: int | None = None,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S, keep_checkpoints: bool = False,
    data_dir: str | None = None, checkpoint_dir: str | None = None,
    pool: PoolLink | None = None,
) -> WorkerSummary:
    """Run one worker in this process; SIGTERM/SIGINT stop it after re-enqueueing its trial.

    Torch and the task's processes use the CPUs allocated to this process (see
    :mod:`cnn_mellin.optim.cpus`) unless ``OMP_NUM_THREADS`` says otherwise.
    """
    in_main = threading.current_thread() is threading.main_thread()  # else no signals here
    early: list[int] = []  # a stop while the worker is being built: it starts no trial
    previous = {}
    if in_main:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda signum, _frame: early.append(signum))
    try:
        use_threads(allocated_cpus())
        _log.info("worker on %s with %s CPU threads", device, os.environ["OMP_NUM_THREADS"])
        worker = Worker(
            db_url, study_name, device=device, sampler=sampler, seed=seed,
            max_trials=max_trials, max_outage_s=max_outage_s, keep_checkpoints=keep_checkpoints,
            data_dir=data_dir, checkpoint_dir=checkpoint_dir, pool=pool,
        )
        done = threading.Event()
        watchdog = None
        if in_main:
            for signum in previous:
                signal.signal(signum, worker.on_signal)
            for signum in early:
                worker.on_signal(signum)
            watchdog = threading.Thread(target=worker.watch_stop, args=(done,),
                                        name="cnn-mellin-stop", daemon=True)
            watchdog.start()
        try:
            if worker.stop_signal is None:
                summary = worker.run()
            if worker.stop_signal is not None:  # the last trial ended as the stop came
                raise WorkerStopped(worker.stop_signal)
        except WorkerStopped as stop:
            summary = WorkerSummary(Counter(worker.outcomes), exit_code=128 + stop.signum)
            _log.warning("worker stopped by %s%s", stop, "; its trial was re-enqueued"
                         if worker.outcomes["interrupted"] else "")
        finally:
            with worker._ending:  # the watchdog ended the process already, or never will
                done.set()
            if watchdog is not None:
                watchdog.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _log.info("worker done: %s", summary)
    return summary


def _child(db_url, study_name, device, sampler, seed, max_trials, max_outage_s, verbose,
           threads, folders, pool) -> None:
    use_threads(threads)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(processName)s %(levelname)s: %(message)s",
    )
    optuna.logging.set_verbosity(optuna.logging.DEBUG if verbose else optuna.logging.WARNING)
    try:
        summary = run_worker(
            db_url, study_name, device=device, sampler=sampler, seed=seed,
            max_trials=max_trials, max_outage_s=max_outage_s, pool=pool, **folders,
        )
    except UserError as err:
        logging.getLogger("cnn_mellin.optim").error("%s", err)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(summary.exit_code)


def worker_devices(device: str, workers: int) -> list[str]:
    """Devices for ``workers`` local workers: plain ``cuda`` is spread over all GPUs."""
    if device == "cuda":
        try:
            import torch

            count = torch.cuda.device_count()
        except ImportError:
            count = 0
        if count > 1:
            return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def run_workers(
    workers: int, db_url: str, study_name: str | None, *, device: str = "cpu",
    sampler: str = "random", seed: int | None = None, max_trials: int | None = None,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S, verbose: bool = False,
    keep_checkpoints: bool = False, data_dir: str | None = None,
    checkpoint_dir: str | None = None,
) -> int:
    """Run ``workers`` worker processes here; returns the worst exit code."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    # fail fast, in this process, on a bad URL, study or folder override, or too many
    # workers for a device's memory
    settings = overridden(read_settings(load_study(open_storage(db_url), study_name, db_url)),
                          data_dir, checkpoint_dir)
    devices = worker_devices(device, workers)
    if device.startswith("cuda"):
        gpushare.check_sharing(devices, settings.mem_limit_bytes, gpushare.device_total_bytes)
    folders = {"keep_checkpoints": keep_checkpoints, "data_dir": data_dir,
               "checkpoint_dir": checkpoint_dir}
    context = multiprocessing.get_context("spawn")
    # workers share the job's CPUs instead of each taking all of the node's cores; those
    # of a worker that left go to the others (pool.py)
    cpus = allocated_cpus()
    threads = max(1, cpus // workers)
    live = context.Value("i", workers)
    pool = PoolLink(os.getpid(), cpus, live, elastic="OMP_NUM_THREADS" not in os.environ)

    def start(i: int, dev: str, name: str):
        process = context.Process(
            target=_child, name=name,
            args=(db_url, study_name, dev, sampler, seed, max_trials, max_outage_s, verbose,
                  threads, folders, pool),
        )
        process.start()
        return process

    processes = [start(i, dev, f"worker-{i}") for i, dev in enumerate(devices)]
    slots = dict(enumerate(processes))  # the process now in each worker slot
    restarts, max_restarts = 0, workers * (settings.max_retries + 1)

    received: list[int] = []

    def note(signum, _frame):  # a flag only; the loop below acts on it
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        passed = 0
        while True:
            # a worker killed (OOM killer, kill -9) while nobody stops the pool is started
            # again: its trial is retried, and the others may have left (pool.py)
            for i, process in list(slots.items()):
                if (process.exitcode is not None and process.exitcode < 0 and not received
                        and restarts < max_restarts):
                    restarts += 1
                    _log.warning("%s was killed (signal %d): starting a worker in its place",
                                 process.name, -process.exitcode)
                    slots[i] = start(i, devices[i], f"worker-{i}.{restarts}")
                    processes.append(slots[i])
            alive = [p for p in processes if p.is_alive()]
            live.value = max(1, len(alive))
            if not alive:
                break
            # Ctrl-C reaches the children through the process group; SIGTERM (e.g. from
            # SLURM to this process only) is passed on, a second one too
            terms = received.count(signal.SIGTERM)
            if terms > passed:
                passed = terms
                for process in alive:
                    process.terminate()
            alive[0].join(timeout=_WATCH_S)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [p.exitcode if p.exitcode >= 0 else 128 - p.exitcode for p in processes]
    return max(codes)

