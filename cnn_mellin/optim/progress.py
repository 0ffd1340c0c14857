"""Progress of a study against its budget, while workers run.

:func:`measure` reads the counts (done, running, waiting, failed), the best value so far and
an ETA from the finished trials' durations. ``optim status --watch`` redraws it
(:func:`watch`); ``optim run`` on a terminal shows it as a tqdm bar (:class:`RunBar`),
refreshed by a thread of its own that polls the study.
"""

from __future__ import annotations

import logging
import math
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TextIO

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.optim import budget
from cnn_mellin.optim.attrs import WORKER
from cnn_mellin.units import format_duration

_log = logging.getLogger("cnn_mellin.optim")
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


@dataclass(frozen=True)
class Progress:
    """A study's progress against its budget at one moment."""

    counts: budget.Counts
    best_value: float | None
    best_number: int | None
    mean_trial_s: float | None  # over finished (COMPLETE or PRUNED) trials
    eta_s: float | None  # None: unknown (nothing finished yet, or no worker running)

    @property
    def finished(self) -> bool:
        return self.counts.done >= self.counts.budget


def measure(
    trials: Sequence[FrozenTrial], num_trials: int, minimize: bool = True,
    now: datetime | None = None,
) -> Progress:
    """Counts, best so far and ETA of ``trials`` against a budget of ``num_trials``.

    ETA: the trials not started yet take the mean duration of the finished ones, running
    ones the rest of it, spread over as many workers as trials are running now.
    """
    now = now or datetime.now()
    counts = budget.count(trials, num_trials)
    values = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None
              and math.isfinite(t.value)]
    sign = 1 if minimize else -1
    best = min(values, key=lambda t: (sign * t.value, t.number)) if values else None
    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds() for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        and t.datetime_start and t.datetime_complete
    ]
    mean = sum(durations) / len(durations) if durations else None
    eta: float | None = None
    remaining = max(0, num_trials - counts.done)
    if remaining == 0:
        eta = 0.0
    elif mean is not None and counts.running:
        ages = [(now - t.datetime_start).total_seconds() for t in trials
                if t.state == TrialState.RUNNING and t.datetime_start]
        left = max(0, remaining - counts.running) * mean + sum(max(0.0, mean - a) for a in ages)
        eta = left / counts.running
    return Progress(counts, None if best is None else best.value,
                    None if best is None else best.number, mean, eta)


def eta_text(p: Progress) -> str:
    if p.finished:
        return "budget done"
    if p.eta_s is not None:
        return f"ETA {format_duration(p.eta_s)}"
    if p.mean_trial_s is None:
        return "ETA after the first trial finishes"
    return "ETA ? (no trial running)"


def bar(p: Progress, width: int = 30) -> str:
    """``[█████▒▒░░░░]``: done, running, the rest of the budget."""
    total = max(1, p.counts.budget)
    done = min(width, round(width * p.counts.done / total))
    running = min(width - done, round(width * p.counts.running / total))
    return "[" + "█" * done + "▒" * running + "░" * (width - done - running) + "]"


def summary(p: Progress) -> str:
    """One line: done of budget, running, waiting, failed, best, ETA."""
    c = p.counts
    best = "best: none yet" if p.best_value is None else \
        f"best {p.best_value:.6g} (trial {p.best_number})"
    return (f"{c.done}/{c.budget} done ({c.complete} complete, {c.pruned} pruned) · "
            f"{c.running} running · {c.waiting} waiting · {c.fail} failed · {best} · "
            f"{eta_text(p)}")


def _worker(trial: FrozenTrial) -> str:
    ident = trial.user_attrs.get(WORKER)
    if not isinstance(ident, dict) or not ident.get("host"):
        return "?"
    device = f" {ident['device']}" if ident.get("device") else ""
    return f"{ident['host']}:{ident.get('pid', '?')}{device}"


def screen(study_name: str, trials: Sequence[FrozenTrial], p: Progress, interval: float,
           now: datetime | None = None, max_running: int = 20) -> str:
    """What ``status --watch`` draws on a terminal."""
    now = now or datetime.now()
    lines = [
        f"study {study_name} · {now:%H:%M:%S} · every {interval:g} s, Ctrl-C stops",
        "",
        f"{bar(p, 40)} {p.counts.done}/{p.counts.budget}",
        summary(p),
        "" if p.mean_trial_s is None else f"mean finished trial: {format_duration(p.mean_trial_s)}",
    ]
    running = sorted((t for t in trials if t.state == TrialState.RUNNING), key=lambda t: t.number)
    if running:
        lines.append("running:")
        for t in running[:max_running]:
            age = format_duration((now - t.datetime_start).total_seconds()
                                  if t.datetime_start else None)
            lines.append(f"  trial {t.number}: {age} on {_worker(t)}, "
                         f"{len(t.intermediate_values)} epochs reported")
        if len(running) > max_running:
            lines.append(f"  ... and {len(running) - max_running} more")
    return "\n".join(lines) + "\n"


def watch(study: optuna.Study, num_trials: int, interval: float, out: TextIO | None = None,
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Redraw the progress every ``interval`` seconds until the budget is done or Ctrl-C.

    On a terminal the screen is cleared and redrawn; otherwise one line is appended per look
    (for logs). Returns the exit code (0).
    """
    out = out or sys.stdout
    tty = out.isatty()
    minimize = study.direction != StudyDirection.MAXIMIZE
    try:
        while True:
            trials = study.get_trials(deepcopy=False)
            p = measure(trials, num_trials, minimize)
            if tty:
                out.write(CLEAR + screen(study.study_name, trials, p, interval))
            else:
                out.write(f"{datetime.now():%H:%M:%S} {summary(p)}\n")
            out.flush()
            if p.finished:
                return 0
            sleep(interval)
    except KeyboardInterrupt:
        out.write("\n")
        return 0


DRAIN_S = 0.5  # how long the stderr relay waits for more once the workers are done


class RunBar:
    """A tqdm bar over a study's budget at the bottom of the terminal on standard error.

    Use as a context manager around the workers. A thread polls the study over a
    connection of its own; if that fails (e.g. the study does not exist) there is no bar
    and the worker reports the error. Everything else written to standard error while the
    bar is up, by this process or by the worker processes it starts (which inherit the
    descriptor), goes through a pipe and is printed above the bar, so that log lines and
    the bar never share a line.
    """

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{postfix}"

    def __init__(self, db_url: str, study_name: str | None, interval: float = 2.0):
        self._db_url = db_url
        self._study_name = study_name
        self._interval = interval
        self._stop = threading.Event()
        self._restored = threading.Event()  # standard error is the terminal again
        self._thread = threading.Thread(target=self._loop, name="progress-bar", daemon=True)
        self._relay: threading.Thread | None = None
        self._stream: TextIO | None = None  # the terminal, once fd 2 is the pipe
        self._bar = None
        self._study = None
        self._num_trials = 0

    def __enter__(self) -> RunBar:
        # multiprocessing's resource tracker, started by the first worker process, lives
        # until this process exits; started now, it holds the terminal and not the pipe,
        # whose end would otherwise never come (`run --workers 2` hung 30 s at its end)
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        fd = sys.stderr.fileno()
        self._stream = os.fdopen(os.dup(fd), "w", buffering=1, errors="replace")
        read_end, write_end = os.pipe()
        sys.stderr.flush()
        os.dup2(write_end, fd)
        os.close(write_end)
        self._relay = threading.Thread(target=self._forward, args=(read_end,),
                                       name="stderr-relay", daemon=True)
        self._relay.start()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        sys.stderr.flush()
        os.dup2(self._stream.fileno(), sys.stderr.fileno())  # closes this process's writer
        self._restored.set()
        self._relay.join(timeout=30)  # a process left holding the pipe: drained, not awaited
        if self._bar is not None:
            try:
                self._update()
            except Exception as err:  # the bar must never change the worker's exit
                _log.debug("progress bar: %s", err)
            self._bar.close()
        self._stream.close()

    def _forward(self, read_end: int) -> None:
        """Print the pipe's lines above the bar until every writer has closed it, or, once
        the workers are done, until it has been quiet for :data:`DRAIN_S` (a process that
        outlives them, e.g. one a task's script left behind, may hold it open)."""
        from tqdm import tqdm

        pending = b""
        try:
            while True:
                ready, _, _ = select.select([read_end], [], [], DRAIN_S)
                if not ready:
                    if self._restored.is_set():  # before, this process may still write
                        break
                    continue
                data = os.read(read_end, 65536)
                if not data:
                    break
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    tqdm.write(line.decode(errors="replace"), file=self._stream)
            if pending:
                tqdm.write(pending.decode(errors="replace"), file=self._stream)
        finally:
            os.close(read_end)

    def _open(self) -> None:
        from tqdm import tqdm

        from cnn_mellin.optim.storage import load_study, open_storage
        from cnn_mellin.optim.study import read_settings

        self._study = load_study(open_storage(self._db_url), self._study_name, self._db_url)
        self._num_trials = read_settings(self._study).num_trials
        try:  # a terminal that reports no size (a bare pty) gets a fixed width
            sized = os.get_terminal_size(self._stream.fileno()).columns > 0
        except (OSError, ValueError, AttributeError):
            sized = False
        self._bar = tqdm(total=self._num_trials, desc=self._study.study_name, unit="trial",
                         file=self._stream, dynamic_ncols=sized, ncols=None if sized else 100,
                         nrows=None if sized else 24, bar_format=self.FORMAT)

    def _update(self) -> None:
        p = measure(self._study.get_trials(deepcopy=False), self._num_trials,
                    self._study.direction != StudyDirection.MAXIMIZE)
        best = "-" if p.best_value is None else f"{p.best_value:.4g}"
        self._bar.n = p.counts.done
        self._bar.set_postfix_str(f"{p.counts.running} running, {p.counts.fail} failed, "
                                  f"best {best}, {eta_text(p)}", refresh=False)
        self._bar.refresh()

    def _loop(self) -> None:
        try:
            self._open()
            while True:
                self._update()
                if self._stop.wait(self._interval):
                    return
        except Exception as err:  # never let the bar disturb the worker
            _log.debug("progress bar stopped: %s", err)
