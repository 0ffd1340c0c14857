"""Stopping a worker on SIGTERM / SIGINT.

Signal handlers only set a flag (:class:`StopFlag`): the worker acts on it at safe points,
failing its running trial as interrupted and enqueueing the retry. A task that stops on
request (``asr``) first saves a checkpoint of the step it is at, within
:data:`STOP_GRACE_S`. The stop watchdog, a thread beside the main one
(:meth:`StopFlag.watch`), tells the worker when it must hand its trial back from that
thread and end the process (:func:`exit_now`) instead of raising into whatever native code
the main thread runs: at once for a task that cannot stop on request, after the grace for
one that can, at once at a second signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

_log = logging.getLogger("cnn_mellin.optim")

# after SIGTERM, how long a task that stops on request may take to save its step before
# the worker hands its trial back without it; below SLURM's default KillWait (30 s) between
# SIGTERM and SIGKILL
STOP_GRACE_S = 20.0
WATCH_S = 0.1  # how often the stop watchdog looks at the flags


class WorkerStopped(BaseException):
    """SIGTERM or SIGINT arrived: stop after failing (and re-enqueueing) the current trial.

    Raised by the worker itself at a safe point (never by a signal handler)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopFlag:
    """The stop a signal asked for; set from a signal handler, read anywhere."""

    def __init__(self):
        self.signum: int | None = None  # the first SIGTERM/SIGINT
        self.urgent = False  # a second signal: hand the trial back now
        self.grace_s = STOP_GRACE_S

    def on_signal(self, signum: int, _frame=None) -> None:
        """SIGTERM/SIGINT: set the flag, nothing else (a second signal: stop now).

        A handler that raised, or did any work, ran inside whatever the main thread was
        doing: torch's backward pass, a checkpoint's fsync, a database transaction.
        """
        if self.signum is None:
            self.signum = signum
        else:
            self.urgent = True

    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def check(self) -> None:
        """A safe point: a stop asked for raises :class:`WorkerStopped` here."""
        if self.signum is not None:
            raise WorkerStopped(self.signum)

    @property
    def name(self) -> str:
        """The name of the signal that asked for the stop (``SIGTERM``)."""
        return signal.Signals(self.signum).name

    def watch(self, done: threading.Event, *, polite: bool, busy: Callable[[], bool]) -> bool:
        """Wait until the main thread must be relieved of its trial (True) or ``done`` is set.

        Once a signal set the flag, a task that stops on request (``polite``) gets
        :attr:`grace_s` to save its step and hand its trial back in the main thread; a trial
        of any other task (``busy()``: the worker runs one) must be handed back at once, and
        so must any trial at a second signal or after the grace.
        """
        while self.signum is None:
            if done.wait(WATCH_S):
                return False
        _log.warning("%s: %s", self.name, "the trial saves the step it is at, then the worker "
                     "stops" if polite else "the worker hands its trial back and stops")
        deadline = time.monotonic() + self.grace_s
        while not done.wait(WATCH_S):
            if self.urgent or time.monotonic() >= deadline or (busy() and not polite):
                return True
        return False


def exit_now(code: int) -> NoReturn:
    """End the process at once with ``code``, its logs flushed (``os._exit``: the main
    thread is never interrupted, whatever native code it runs)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
