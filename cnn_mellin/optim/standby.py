"""Which idle worker stays: the others give their allocation back.

A worker that finds nothing left to claim while trials still run elsewhere is not needed,
except to pick up a retry should one of those trials' workers die. One idle worker per
study, the *standby*, stays for that; every other idle worker exits. The standby is named in
a study system attribute with a counter it bumps at each idle look; another worker takes
over when the named one is gone (same machine: its process ended) or its counter has not
moved for the heartbeat grace period of the observer's own clock. A standby that starts a
trial clears the attribute, so another idle worker (if any) takes its place.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from cnn_mellin.optim import internals
from cnn_mellin.optim.attrs import STANDBY_KEY
from cnn_mellin.optim.heartbeat import WorkerIdentity


class Standby:
    """One worker's view of the study's standby."""

    def __init__(self, study: optuna.Study, me: WorkerIdentity, grace_s: float,
                 check: Callable[[], None] | None = None):
        self._study = study
        self._check = check  # runs before every idle look; raises to end the waiting
        self._me = me
        self._grace_s = grace_s
        self._count = 0
        self._seen: tuple[object, float] | None = None  # (someone else's token, since)
        self.holder: WorkerIdentity | None = None  # the standby, as last seen

    def _write(self) -> None:
        self._count += 1
        internals.set_study_system_attr(
            self._study, STANDBY_KEY, {"worker": self._me.to_attr(), "count": self._count}
        )

    def _read(self) -> tuple[dict | None, WorkerIdentity | None]:
        value = internals.study_system_attrs(self._study).get(STANDBY_KEY)
        if not isinstance(value, dict):
            return None, None
        return value, WorkerIdentity.from_attr(value.get("worker"))

    def stay(self) -> bool:
        """One idle look: True if this worker is (now) the standby, False if it may leave."""
        if self._check is not None:
            self._check()
        value, holder = self._read()
        self.holder = holder
        if holder is not None and holder.same_process(self._me):
            self._write()
            return True
        if holder is not None and not (holder.same_machine(self._me) and not holder.alive()):
            token, now = (value.get("count"), value.get("worker")), time.monotonic()
            if self._seen is None or self._seen[0] != token:
                moved = self._seen is not None
                self._seen = (token, now)
                if moved:
                    return False  # it is bumping its counter: alive and standing by
                return True  # first look: wait to see it move
            if now - self._seen[1] <= self._grace_s:
                return True
        self._seen = None
        self._write()
        _, holder = self._read()  # concurrent candidates: the last write wins
        self.holder = holder
        return holder is not None and holder.same_process(self._me)

    def leave(self) -> None:
        """Stop being the standby (this worker starts a trial or exits)."""
        value, holder = self._read()
        if holder is not None and holder.same_process(self._me):
            internals.set_study_system_attr(self._study, STANDBY_KEY, None)
