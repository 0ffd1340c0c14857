"""The ``optim run`` worker loop.

Per trial: claim a WAITING trial of the budget → sample the searched parameters →
assemble the configuration (base + parameters) → let the task check it (invalid →
pruned with the reason) → memory admission (:mod:`~cnn_mellin.optim.admission`: over the
limit → pruned before training, the figure recorded and given to the sampler as a
constraint) → run the task with per-epoch reports for the pruner → record wall time,
epochs, peak memory, device and host → tell (:mod:`~cnn_mellin.optim.outcome`).
Out-of-memory errors and non-finite values prune the trial with the reason; the worker
carries on. Any other error fails the trial (a fresh trial replaces it); a user error fails
it, enqueues its one retry and stops the worker, and that retry failing again is pruned as
invalid (the error goes with the parameters).
SIGTERM / SIGINT fail the running trial as interrupted and enqueue its retry, which
resumes from the trial's checkpoints (:mod:`~cnn_mellin.optim.stop`: the flag, the grace
of a task that stops on request, the watchdog). The loop ends when the budget is done, or
when nothing is left to claim and another idle worker stands by for retries
(:mod:`cnn_mellin.optim.standby`): idle workers give their allocation back.
:mod:`~cnn_mellin.optim.launch` runs workers, in this process or as children.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim import admission, budget, gpushare, internals, space
from cnn_mellin.optim.algorithms import make_pruner, make_sampler, trial_seed
from cnn_mellin.optim.attrs import (
    ADMISSION_BYTES,
    ADMISSION_METHOD,
    DRAWS_REJECTED_INVALID,
    DRAWS_REJECTED_MEMORY,
    DUPLICATE_OF,
    EPOCHS,
    FAIL_KIND,
    NUM_TRIALS,
    PEAK_BYTES,
    PEAK_METHOD,
    REPLACE_KIND,
    REPLACES,
    RESUMED_FROM,
    RESUMED_FROM_STEP,
    RETRY_OF,
    STOPPED_AT_STEP,
    VALID_CONSTRAINT,
    WALL_TIME,
    WORKER_TIME_PREFIX,
)
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.defaults import DEFAULT_MAX_OUTAGE_S, SAMPLERS
from cnn_mellin.optim.feasible import Feasibility, FeasibleSampler, NoFeasibleDraw
from cnn_mellin.optim.heartbeat import Monitor, WorkerIdentity
from cnn_mellin.optim.outcome import HandBack, Prune, Recorder, TrialLost, one_line
from cnn_mellin.optim.pool import PoolLink
from cnn_mellin.optim.standby import Standby
from cnn_mellin.optim.stop import StopFlag, WorkerStopped, exit_now
from cnn_mellin.optim.storage import DatabaseUnreachable, load_study, open_storage
from cnn_mellin.optim.study import StudySettings, base_params, checkpoint_root, read_settings
from cnn_mellin.tasks import MemoryExceeded, PruneTrial, TrialContext
from cnn_mellin.tasks.base import TrialInterrupted

_log = logging.getLogger("cnn_mellin.optim")

MAX_CONSECUTIVE_ERRORS = 3
CLAIM_REFRESH_S = 5.0


@dataclass
class WorkerSummary:
    """Outcomes of the trials one worker ran."""

    outcomes: Counter = field(default_factory=Counter)
    exit_code: int = 0

    def __str__(self) -> str:
        if not self.outcomes:
            return "no trials run"
        return ", ".join(f"{n} {k}" for k, n in sorted(self.outcomes.items()))


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
        self.recorder = Recorder(self.study, self.settings.max_retries)
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
        self.stop = StopFlag()  # set by the signal handlers (launch.py)
        self.standby = Standby(self.study, self.identity, self.settings.heartbeat_grace,
                               check=self.stop.check)
        self._owned: FrozenTrial | None = None  # the trial this worker runs now
        self.outcomes: Counter = Counter()  # every trial's outcome, a stopped one included

    # -- stopping ---------------------------------------------------------------------

    def watch_stop(self, done: threading.Event) -> None:
        """The stop watchdog, a thread beside the main one until ``done`` is set.

        When the main thread cannot hand its trial back itself (see
        :meth:`StopFlag.watch <cnn_mellin.optim.stop.StopFlag.watch>`), this thread does:
        it fails the trial as interrupted, enqueues its retry and ends the process
        (:func:`~cnn_mellin.optim.stop.exit_now`, 128 + the signal); the main thread is
        never interrupted, whatever native code it runs. The task's children go with it
        (loader workers and the ``command`` guard notice their parent is gone). A worker
        without a trial stops at its next safe point (:meth:`StopFlag.check`).
        """
        polite = self.task.STOPS_ON_REQUEST
        if not self.stop.watch(done, polite=polite, busy=lambda: self._owned is not None):
            return
        with self.recorder.lock:
            if done.is_set():  # the main thread got there first
                return
            name, trial = self.stop.name, self._owned
            if trial is not None:
                if polite and not self.stop.urgent:
                    _log.warning("trial %d did not stop within %g s", trial.number,
                                 self.stop.grace_s)
                if self.recorder.hand_back(trial, f"worker stopped by {name}"):
                    self.outcomes["interrupted"] += 1
            _log.warning("worker stopped by %s%s", name,
                         "; its trial was re-enqueued" if trial is not None else "")
            _log.info("worker done: %s", WorkerSummary(self.outcomes))
            exit_now(128 + self.stop.signum)

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
                self.stop.check()  # the trial ended before it saw the stop
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
        num_trials = int(self.study.user_attrs.get(NUM_TRIALS, self.settings.num_trials))
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
            with self.recorder.lock:
                if self.stop.requested():  # claimed as the stop came: not started
                    self.recorder.hand_back(claimed, f"worker stopped by {self.stop.name} "
                                            "before it began")
                    self.stop.check()
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
        seed = trial_seed(self.seed, claimed.number)
        self.study.sampler = FeasibleSampler(make_sampler(self.sampler_name, seed), self.space,
                                             self.feasibility.judge, seed=seed)
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
        except Prune as prune:
            return self.recorder.pruned(trial, facts, started, prune)
        except HandBack as back:
            _log.warning("trial %d handed back: %s", claimed.number, back)
            self._fail(trial, "neighbour", str(back))
            return "handed back"
        except optuna.TrialPruned as pruned:
            reason = str(pruned) or "pruned by the pruner"
            return self.recorder.pruned(trial, facts, started, Prune("pruner", reason))
        except MemoryExceeded as over:
            facts[PEAK_BYTES], facts[PEAK_METHOD] = over.peak_bytes, over.method
            limit = self.settings.mem_limit_bytes
            return self.recorder.pruned(trial, facts, started, Prune(
                over.kind, over.reason, admission.violation(over.peak_bytes, limit)))
        except PruneTrial as pruned:
            return self.recorder.pruned(trial, facts, started, Prune(pruned.kind, pruned.reason))
        except (TrialLost, UpdateFinishedTrialError):  # e.g. while its parameters are sampled
            _log.warning("trial %d was failed by another worker (taken for dead); dropped",
                         claimed.number)
            return "lost"
        except WorkerStopped as stop:
            self._fail(trial, "interrupted", f"worker stopped by {stop}")
            raise
        except TrialInterrupted as stopped:
            signum = self.stop.signum or signal.SIGTERM
            if stopped.step is not None:
                facts[STOPPED_AT_STEP] = stopped.step
            with self.recorder.lock:
                for key in (STOPPED_AT_STEP, EPOCHS):
                    if key in facts:
                        storage.set_trial_user_attr(trial_id, key, facts[key])
                self._fail(trial, "interrupted",
                           f"worker stopped by {signal.Signals(signum).name}: {stopped}")
            raise WorkerStopped(signum) from None
        except DatabaseUnreachable:  # nothing can be written; the reaper retries the trial
            raise
        except ConfigError as err:  # this configuration cannot run (found out late)
            return self.recorder.pruned(
                trial, facts, started,
                Prune("invalid", f"invalid configuration: {err}", (VALID_CONSTRAINT, 1.0)),
            )
        except UserError as err:
            reason = f"{type(err).__name__}: {one_line(err)}"
            if claimed.user_attrs.get(REPLACE_KIND) == "user":
                # a second worker failed the same way: the error goes with the parameters
                return self.recorder.pruned(trial, facts, started, Prune(
                    "invalid", f"{reason} (again, on the retry)", (VALID_CONSTRAINT, 1.0)))
            # data or environment: every trial would fail here; its one retry goes elsewhere
            self._fail(trial, "user", reason)
            raise
        except Exception as err:
            if admission.is_oom(err):
                back = admission.neighbour_oom(err, self.device, self.cap_bytes)
                admission.free_device_memory()
                if back is not None:
                    _log.warning("trial %d handed back: %s", claimed.number, back)
                    self._fail(trial, "neighbour", str(back))
                    return "handed back"
                unknown = admission.violation(None, self.settings.mem_limit_bytes)
                return self.recorder.pruned(trial, facts, started, Prune(
                    "oom", f"out of memory: {one_line(err)}", unknown))
            _log.warning("trial %d failed:\n%s", claimed.number, traceback.format_exc())
            self._fail(trial, "error", f"{type(err).__name__}: {one_line(err)}")
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
        if result.resumed_from_step is not None:
            facts[RESUMED_FROM_STEP] = result.resumed_from_step
        facts.update(result.attrs)
        if not math.isfinite(result.value):
            return self.recorder.pruned(
                trial, facts, started, Prune("nonfinite", f"non-finite value {result.value}")
            )
        return self.recorder.tell(trial, facts, TrialState.COMPLETE, result.value)

    def _attempt(self, trial, claimed, facts, reported, checkpoint_dir):
        # drawn until valid and under the memory limit (optim/feasible.py): rejected draws
        # never become trials; a retry or the base has its values fixed and is judged below
        sampler = self.study.sampler
        try:
            params = space.suggest(trial, self.settings.searched, self.params)
        except NoFeasibleDraw as err:
            raise Prune("infeasible", str(err)) from None
        finally:
            if isinstance(sampler, FeasibleSampler):
                facts[DRAWS_REJECTED_MEMORY] = sampler.rejected["memory"]
                facts[DRAWS_REJECTED_INVALID] = sampler.rejected["invalid"]
        try:
            config = self.base.replace(params)
            self.task.check(config)
        except ConfigError as err:
            raise Prune(
                "invalid", f"invalid configuration: {err}", (VALID_CONSTRAINT, 1.0)
            ) from None
        if self.monitor.lost(internals.trial_id(trial)):
            raise TrialLost()
        admission.admit(self.feasibility, config, facts, self.cap_bytes)
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
                raise Prune("nonfinite", f"non-finite value {value} at epoch {epoch}")
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
                raise Prune("timeout", f"still running after {time_limit:g} s, at epoch "
                            f"{epoch} (value {value:.6g}); --max-trial-seconds")
            reference = base_seconds.at(epoch) if prunable and ratio is not None else None
            if reference is not None and elapsed > ratio * reference:
                raise Prune("timeout", f"{elapsed:.0f} s to epoch {epoch}, over {ratio:g} x "
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
            stop_requested=self.stop.requested,
        )
        return self.task.run(config, context)

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

    def _fail(self, trial: optuna.Trial, kind: str, reason: str) -> None:
        """Fail the trial and enqueue its retry, which the next claim sees."""
        if self.recorder.fail(trial, kind, reason):
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
