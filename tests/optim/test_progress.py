"""Progress while a study runs: ``status --watch`` and ``run``'s bar on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from datetime import datetime, timedelta

import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.optim.progress import CLEAR, eta_text, measure, summary
from tests.optim_helpers import ROOT, env, fake_study, start_worker, wait_all

SEARCH = ["training.learning_rate", "data.batch_size"]
NOW = datetime(2026, 1, 1, 12, 0, 0)


def _trial(number, state, value=None, start_s=None, length_s=None):
    start = None if start_s is None else NOW - timedelta(seconds=start_s)
    end = None if length_s is None else start + timedelta(seconds=length_s)
    return FrozenTrial(
        number=number, state=state, value=value, datetime_start=start, datetime_complete=end,
        params={"x": 0.1}, distributions={"x": FloatDistribution(0, 1)}, user_attrs={},
        system_attrs={}, intermediate_values={}, trial_id=number,
    )


def test_measure_counts_best_and_eta_from_finished_durations():
    trials = [
        _trial(0, TrialState.COMPLETE, 0.5, start_s=300, length_s=60),
        _trial(1, TrialState.COMPLETE, 0.3, start_s=200, length_s=60),
        _trial(2, TrialState.PRUNED, None, start_s=150, length_s=30),
        _trial(3, TrialState.RUNNING, start_s=10),
        _trial(4, TrialState.RUNNING, start_s=100),  # over the mean already: counts 0
        _trial(5, TrialState.FAIL, None, start_s=400, length_s=5),
        *[_trial(n, TrialState.WAITING) for n in range(6, 11)],
    ]
    p = measure(trials, 10, now=NOW)
    c = p.counts
    assert (c.done, c.complete, c.pruned, c.running, c.waiting, c.fail) == (3, 2, 1, 2, 5, 1)
    assert (p.best_value, p.best_number) == (0.3, 1)
    assert p.mean_trial_s == pytest.approx(50)  # the failed trial's 5 s do not count
    # 5 not started x 50 s + 40 s left of trial 3, over 2 running workers
    assert p.eta_s == pytest.approx((5 * 50 + 40) / 2)
    assert summary(p) == ("3/10 done (2 complete, 1 pruned) · 2 running · 5 waiting · "
                          "1 failed · best 0.3 (trial 1) · ETA 2 min")
    assert measure(trials, 10, minimize=False, now=NOW).best_number == 0
    idle = [t for t in trials if t.state != TrialState.RUNNING]
    assert eta_text(measure(idle, 10, now=NOW)) == "ETA ? (no trial running)"
    fresh = [_trial(0, TrialState.RUNNING, start_s=5), _trial(1, TrialState.WAITING)]
    assert eta_text(measure(fresh, 2, now=NOW)) == "ETA after the first trial finishes"
    assert eta_text(measure(trials[:3], 3, now=NOW)) == "budget done"


def _study(tmp_path, num_trials=6):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="p", num_trials=num_trials, whitelist=SEARCH,
               base={"training.num_epochs": 2})
    return url


def _cli(*argv):
    return [sys.executable, "-m", "cnn_mellin", *map(str, argv)]


def _on_terminal(argv, timeout=120, **extra_env) -> tuple[int, str]:
    """Run ``argv`` with a 30x120 pseudo-terminal as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=ROOT,
                               env=env(**extra_env), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the terminal closed: every writer has exited
                    break
                if not data:
                    break
                chunks.append(data)
            elif process.poll() is not None:
                break
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    return process.wait(), b"".join(chunks).decode(errors="replace")


def _visible(line: str) -> str:
    """What a terminal shows of ``line`` after its carriage returns."""
    shown = ""
    for part in line.split("\r"):
        shown = part + shown[len(part):]
    return shown.rstrip()


@pytest.mark.parametrize("workers", [1, 2])
def test_run_on_a_terminal_shows_a_bar_over_the_budget(tmp_path, workers):
    url = _study(tmp_path)
    started = time.monotonic()
    code, shown = _on_terminal(
        _cli("--device", "cpu", "optim", url, "run", "--workers", workers), FAKE_EPOCH_S=0.3)
    assert code == 0, shown
    # 6 trials of 0.6 s take about 3 s; with 2 workers the run hung 30 s at its end, the bar
    # waiting for the end of a pipe that multiprocessing's resource tracker held open
    assert time.monotonic() - started < 20
    assert "p:   0%|" in shown  # drawn before the first trial finished
    assert "p: 100%|" in shown and "6/6, 0 running, 0 failed, best" in shown
    assert "budget done" in shown.rsplit("p: 100%", 1)[1]
    # the log lines, of this process or of its worker processes, come above the bar
    logged = [_visible(line) for line in shown.split("\n") if "INFO:" in line]
    assert sum("complete:" in line for line in logged) == 6
    assert all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in logged), logged


def test_run_not_on_a_terminal_is_quiet(tmp_path):
    url = _study(tmp_path)
    done = subprocess.run(_cli("--device", "cpu", "optim", url, "run"), capture_output=True,
                          text=True, env=env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr and "\r" not in done.stderr and "ETA" not in done.stderr
    assert "worker done: 6 complete" in done.stderr


def test_status_watch_not_on_a_terminal_appends_a_line_per_look_until_done(tmp_path):
    url = _study(tmp_path)
    worker = start_worker(url, "p", FAKE_EPOCH_S=0.3)
    try:
        watched = subprocess.run(_cli("optim", url, "status", "--watch", "0.5"),
                                 capture_output=True, text=True, env=env(), timeout=120)
    finally:
        [(code, err)] = wait_all([worker])
    assert code == 0, err
    assert watched.returncode == 0, watched.stderr
    lines = watched.stdout.splitlines()
    assert len(lines) >= 3 and "\x1b" not in watched.stdout
    assert "1 running" in watched.stdout and "ETA" in lines[-2]
    assert "6/6 done (6 complete, 0 pruned) · 0 running · 0 waiting · 0 failed" in lines[-1]
    assert lines[-1].endswith("budget done")


def test_status_watch_on_a_terminal_redraws(tmp_path):
    url = _study(tmp_path)
    worker = start_worker(url, "p", FAKE_EPOCH_S=0.3)
    try:
        code, shown = _on_terminal(_cli("optim", url, "status", "--watch", "0.5"))
    finally:
        wait_all([worker])
    assert code == 0, shown
    screens = shown.split(CLEAR)[1:]
    assert len(screens) >= 3, shown
    assert "every 0.5 s, Ctrl-C stops" in screens[0] and "[" in screens[0]
    assert any("running:\r\n  trial" in s for s in screens)
    assert "[" + "█" * 40 + "] 6/6" in screens[-1] and "budget done" in screens[-1]


@pytest.mark.parametrize("argv, message", [
    (["--watch", "--json"], "not allowed with"),
    (["--watch", "0"], "positive number of seconds"),
    (["--watch", "soon"], "expected seconds"),
])
def test_status_watch_bad_arguments(cli, tmp_path, argv, message):
    url = _study(tmp_path, num_trials=2)
    code, _, err = cli("optim", url, "status", *argv)
    assert code == 2 and message in err
