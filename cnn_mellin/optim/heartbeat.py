"""Noticing dead workers on any storage: identities, heartbeats and the reaper.

Each RUNNING trial carries its worker's identity (user attribute ``worker``: host,
device, pid, process start time, boot id, pid namespace) and a heartbeat timestamp
(system attribute), which a background thread of the worker refreshes every
``heartbeat_interval`` seconds. This
works the same on the SQL databases and on the journal file (which has no heartbeat of
its own). Another worker declares a trial's worker dead when

- the worker ran on the same machine and its process is gone (seen at once), or
- the trial's heartbeat has not changed for ``heartbeat_grace`` seconds of the
  observer's own clock (so clocks of different hosts never need to agree). An observer
  that lost the database meanwhile, or whose own heartbeat write was held up for longer
  than an interval, starts its clocks again when it is back, and gives every worker
  :data:`~cnn_mellin.optim.storage.RETRY_PAUSE_MAX_S` more: it could not see heartbeats
  that the others could not write either, and a live worker may be asleep between two
  retries for that long after the database is back.

The dead worker's trial is then failed and its retry enqueued (:mod:`budget`).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import FrozenTrial

from cnn_mellin.optim import budget, internals
from cnn_mellin.optim.attrs import BEAT_KEY
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.storage import RETRY_PAUSE_MAX_S, outage_recoveries

_log = logging.getLogger("cnn_mellin.optim")



def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, or None if it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[0], fields[19]


@dataclass(frozen=True)
class WorkerIdentity:
    """Who runs a trial: enough to tell, on the same machine, whether it still lives."""

    host: str
    pid: int
    start: str
    boot: str
    pidns: str
    device: str = ""

    @classmethod
    def current(cls, device: str = "") -> WorkerIdentity:
        pid = os.getpid()
        stat = _proc_stat(pid)
        try:
            pidns = str(os.stat("/proc/self/ns/pid").st_ino)
        except OSError:
            pidns = ""
        return cls(
            socket.gethostname(), pid, stat[1] if stat else "",
            _read("/proc/sys/kernel/random/boot_id"), pidns, device,
        )

    def to_attr(self) -> dict:
        return asdict(self)

    @classmethod
    def from_attr(cls, attr) -> WorkerIdentity | None:
        if not isinstance(attr, dict):
            return None
        try:
            return cls(**attr)
        except TypeError:
            return None

    def same_process(self, other: WorkerIdentity) -> bool:
        return self.same_machine(other) and (self.pid, self.start) == (other.pid, other.start)

    def same_machine(self, other: WorkerIdentity) -> bool:
        return (self.host, self.boot, self.pidns) == (other.host, other.boot, other.pidns)

    def alive(self) -> bool:
        """Whether this process still runs (call only on the same machine)."""
        stat = _proc_stat(self.pid)
        if stat is not None:
            state, start = stat
            return state not in ("Z", "X") and (not self.start or start == self.start)
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return not Path("/proc").is_dir()  # /proc exists but has no entry: gone


class StaleWatch:
    """Decides which RUNNING trials of other workers are dead, from repeated observations."""

    def __init__(self, me: WorkerIdentity, grace_s: float):
        self._me = me
        self._grace_s = grace_s
        self._seen: dict[int, tuple[object, float]] = {}
        self._hold_until = -math.inf

    def restart(self, hold_s: float = 0.0) -> None:
        """Forget the observations so far (they span a time this observer was blind); the
        grace of every trial counts from ``hold_s`` seconds from now."""
        self._seen.clear()
        self._hold_until = time.monotonic() + hold_s

    def check(self, running: list[FrozenTrial]) -> list[tuple[FrozenTrial, str]]:
        """The dead ones among ``running`` with the reason, as far as seen so far."""
        now = time.monotonic()
        stale = []
        for trial in running:
            ident = WorkerIdentity.from_attr(trial.user_attrs.get(WORKER_ATTR))
            if ident is not None and ident.same_process(self._me):
                continue
            if ident is not None and ident.same_machine(self._me) and not ident.alive():
                stale.append((trial, f"worker {ident.host}:{ident.pid} died"))
                continue
            token = (trial.system_attrs.get(BEAT_KEY), ident)
            seen = self._seen.get(internals.trial_id(trial))
            if seen is None or seen[0] != token:
                self._seen[internals.trial_id(trial)] = (token, max(now, self._hold_until))
            elif now - seen[1] > self._grace_s:
                who = f"worker {ident.host}:{ident.pid}" if ident else "its worker"
                stale.append((trial, f"no heartbeat from {who} for {self._grace_s:g} s"))
        ids = {internals.trial_id(t) for t in running}
        for trial_id in list(self._seen):
            if trial_id not in ids:
                del self._seen[trial_id]
        return stale


class Monitor:
    """A worker's background thread: heartbeats for its trial, reaping, reconciling.

    ``lost(trial_id)`` turns true when the worker's own trial was finished by someone
    else (another worker took it for dead); the trial must then stop at once.
    """

    def __init__(
        self, study: optuna.Study, identity: WorkerIdentity, interval_s: float,
        grace_s: float, num_trials: int, max_retries: int,
    ):
        self._study = study
        self._identity = identity
        self._interval_s = interval_s
        self._max_retries = max_retries
        settle_s = 2 * grace_s + 10
        self._reconcile = budget.Reconciler(study, num_trials, settle_s, max_retries)
        self._reconcile_every = max(interval_s, settle_s / 4)
        self._watch = StaleWatch(identity, grace_s)
        self._lock = threading.Lock()
        self._own: int | None = None
        self._lost: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = time.monotonic()
        self._recoveries = outage_recoveries(internals.storage(study))
        self.on_enqueue: Callable[[], None] | None = None  # after retries were enqueued

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cnn-mellin-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def own(self, trial_id: int) -> None:
        """Start heartbeating ``trial_id`` (after its identity was written)."""
        with self._lock:
            self._own = trial_id

    def release(self) -> None:
        with self._lock:
            self._own = None

    def set_budget(self, num_trials: int) -> None:
        """The study's budget was raised (``grow``): reconcile against the new one."""
        self._reconcile.num_trials = num_trials

    def lost(self, trial_id: int) -> bool:
        with self._lock:
            return trial_id in self._lost

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.cycle()
            except Exception as err:  # a storage hiccup must not kill the worker
                _log.warning("monitor: %s: %s", type(err).__name__, err)

    def cycle(self) -> None:
        """One round of the thread: beat, reap, now and then reconcile."""
        began = time.monotonic()
        self.beat()
        # a heartbeat held up for longer than a beat period (a journal lock that a killed
        # worker left behind, for Optuna's 30 s; a hung connection) held up the others'
        # too: this observer was blind meanwhile
        enqueued = self.reap(blind=time.monotonic() - began > self._interval_s)
        if time.monotonic() - self._last_reconcile > self._reconcile_every:
            self._last_reconcile = time.monotonic()
            enqueued += self._reconcile()
        if enqueued and self.on_enqueue is not None:
            self.on_enqueue()

    def beat(self) -> None:
        """Refresh the heartbeat of the trial this worker runs, if any."""
        with self._lock:
            trial_id = self._own
        if trial_id is None:
            return
        try:
            internals.storage(self._study).set_trial_system_attr(trial_id, BEAT_KEY, time.time())
        except UpdateFinishedTrialError:
            with self._lock:
                if self._own == trial_id:
                    self._lost.add(trial_id)

    def reap(self, blind: bool = False) -> int:
        """Fail the trials of dead workers and enqueue their retries; returns how many.

        ``blind``: this worker's own heartbeat was held up, so it judges no one by heartbeats
        it could not have seen either, as after an outage.
        """
        running = budget.running(self._study)
        recoveries = outage_recoveries(internals.storage(self._study))
        if recoveries != self._recoveries or blind:
            # the others' heartbeat threads may still sleep between two retries
            self._recoveries = recoveries
            self._watch.restart(hold_s=RETRY_PAUSE_MAX_S)
            self._reconcile.restart()
        reaped = 0
        for trial, reason in self._watch.check(running):
            if budget.fail_and_replace(self._study, trial, "dead", reason, self._max_retries):
                reaped += 1
        return reaped
