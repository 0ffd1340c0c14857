"""How a worker stops on SIGTERM/SIGINT (issue 23): signal handlers only set a flag.

A task that stops on request hands its trial back from its step; the stop watchdog hands
back a trial that cannot stop (at once) or did not within the grace (after it), and the
process ends; an idle worker stops at its next look; the summary counts every trial. Loader
workers get the signal too (SLURM signals every process of a job) and must not decide the
trial's fate.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from cnn_mellin.config import Config
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.study import build_settings, init_study
from tests.optim_helpers import FAKE_BASE, ROOT, env, fake_study, load, states

pytestmark = pytest.mark.slow
SEARCH = ["training.learning_rate"]
QUICK = 15  # seconds: far below the 20-s grace, far above a hand-back on a slow machine


def _start(url, study, log, *args, code="pass", session=False, **env_extra):
    """A worker process (``optim run``) logging to the file ``log``; ``code`` runs first."""
    run = ("import sys; from cnn_mellin.cli import main; " + code +
           f"; sys.exit(main(['--device', 'cpu', 'optim', '--study-name', {study!r}, "
           f"{url!r}, 'run', *{list(args)!r}]))")
    return subprocess.Popen([sys.executable, "-c", run], cwd=ROOT, env=env(**env_extra),
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            start_new_session=session)


def _until(condition, what, timeout=120, workers=()):
    """``condition()`` once true; fails at once if one of the (process, log) ``workers``
    ended meanwhile."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        for process, log in workers:
            assert process.poll() is None, f"{what}: worker ended\n{log.read_text()}"
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _running(url, study):
    """The RUNNING trial a worker has started, or None."""
    return next((t for t in load(url, study).get_trials(states=(TrialState.RUNNING,))
                 if WORKER_ATTR in t.user_attrs), None)


def _in_task(url, study, ckpt):
    """The RUNNING trial whose task has started (made its checkpoint folder under ``ckpt``):
    a signal now reaches the task, not the worker's claim."""
    trial = _running(url, study)
    return trial if trial and list(ckpt.glob(f"*/trial-{trial.number}")) else None


def _exit(process, timeout=120):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def _handed_back(url, study, number):
    """The failed trial ``number`` (interrupted) and its waiting retry."""
    trials = load(url, study).get_trials()
    [failed] = [t for t in trials if t.number == number]
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_kind"] == "interrupted"
    [retry] = [t for t in trials if t.user_attrs.get("retry_of") == number]
    assert retry.state == TrialState.WAITING
    return failed, retry


def _stubborn_study(url, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    settings = build_settings(
        Config({**FAKE_BASE, "training.num_epochs": 1}), data,
        task="tests.optim_fake:StubbornFakeTask", whitelist=SEARCH, num_trials=1,
        mem_limit_bytes=None, pruner="none", checkpoint_dir=tmp_path / "ckpt",
        heartbeat_interval=1.0)
    init_study(url, "stubborn", settings)


def test_a_task_that_cannot_stop_on_request_is_handed_back_at_once(tmp_path):
    url, log = str(tmp_path / "s.journal"), tmp_path / "worker.log"
    _stubborn_study(url, tmp_path)
    worker = _start(url, "stubborn", log, FAKE_EPOCH_S=120)
    victim = _until(lambda: _in_task(url, "stubborn", tmp_path / "ckpt"), "the trial to start",
                    workers=[(worker, log)])
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert _exit(worker) == 128 + signal.SIGTERM, log.read_text()
    assert time.monotonic() - sent < QUICK
    text = log.read_text()
    failed, _ = _handed_back(url, "stubborn", victim.number)
    assert "stopped_at_step" not in failed.user_attrs
    assert "SIGTERM: the worker hands its trial back and stops" in text
    assert "worker done: 1 interrupted" in text and "Traceback" not in text, text


def test_a_task_that_does_not_stop_within_the_grace_is_handed_back_after_it(tmp_path):
    url, log = str(tmp_path / "s.journal"), tmp_path / "worker.log"
    fake_study(url, tmp_path, name="slow", num_trials=1, whitelist=SEARCH,
               base={"training.num_epochs": 1})
    # one step of 2 minutes: no chance to stop politely within a grace of 1 s
    worker = _start(url, "slow", log, code="import cnn_mellin.optim.stop as s; "
                    "s.STOP_GRACE_S = 1.0", FAKE_EPOCH_S=120)
    victim = _until(lambda: _in_task(url, "slow", tmp_path / "ckpt" / "slow"),
                    "the trial to start", workers=[(worker, log)])
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert _exit(worker) == 128 + signal.SIGTERM, log.read_text()
    assert 1.0 <= time.monotonic() - sent < QUICK
    text = log.read_text()
    failed, _ = _handed_back(url, "slow", victim.number)
    assert "stopped_at_step" not in failed.user_attrs
    assert "the trial saves the step it is at" in text
    assert f"trial {victim.number} did not stop within 1 s" in text, text
    assert "worker done: 1 interrupted" in text and "Traceback" not in text, text


def test_a_second_signal_hands_the_trial_back_at_once(tmp_path):
    url, log = str(tmp_path / "s.journal"), tmp_path / "worker.log"
    fake_study(url, tmp_path, name="twice", num_trials=1, whitelist=SEARCH,
               base={"training.num_epochs": 1})
    worker = _start(url, "twice", log, FAKE_EPOCH_S=120)
    victim = _until(lambda: _in_task(url, "twice", tmp_path / "ckpt" / "twice"),
                    "the trial to start", workers=[(worker, log)])
    sent = time.monotonic()
    worker.send_signal(signal.SIGINT)  # Ctrl-C, then Ctrl-C again
    _until(lambda: "SIGINT: the trial saves the step" in log.read_text(), "the first stop",
           workers=[(worker, log)])
    worker.send_signal(signal.SIGINT)
    assert _exit(worker) == 128 + signal.SIGINT, log.read_text()
    assert time.monotonic() - sent < QUICK
    _handed_back(url, "twice", victim.number)


def test_an_idle_worker_stops_at_once(tmp_path):
    url = str(tmp_path / "s.journal")
    busy_log, idle_log = tmp_path / "busy.log", tmp_path / "idle.log"
    fake_study(url, tmp_path, name="pool", num_trials=1, whitelist=SEARCH,
               base={"training.num_epochs": 1})
    busy = _start(url, "pool", busy_log, FAKE_EPOCH_S=120)  # one step: it cannot end now
    victim = _until(lambda: _in_task(url, "pool", tmp_path / "ckpt" / "pool"),
                    "the trial to start",
                    workers=[(busy, busy_log)])
    idle = _start(url, "pool", idle_log)  # nothing to claim: it stands by for retries
    _until(lambda: "standing by" in idle_log.read_text(), "the other worker standing by",
           workers=[(busy, busy_log), (idle, idle_log)])
    sent = time.monotonic()
    idle.send_signal(signal.SIGTERM)
    assert _exit(idle) == 128 + signal.SIGTERM, idle_log.read_text()
    assert time.monotonic() - sent < QUICK
    text = idle_log.read_text()
    assert "worker stopped by SIGTERM\n" in text and "re-enqueued" not in text, text
    assert "worker done: no trials run" in text  # true here: it ran none
    assert _running(url, "pool").number == victim.number  # the other one's trial goes on
    for _ in range(2):  # the second signal: at once
        busy.send_signal(signal.SIGTERM)
        _until(lambda: "SIGTERM: the trial saves" in busy_log.read_text(), "the first stop",
               workers=[(busy, busy_log)])
    assert _exit(busy) == 128 + signal.SIGTERM, busy_log.read_text()
    _handed_back(url, "pool", victim.number)


def _step(tmp_path, name, trial):
    """The steps a fake trial has checkpointed (0 before its first)."""
    files = list((tmp_path / "ckpt" / name).glob(f"*/trial-{trial.number}/step"))
    return int(files[0].read_text()) if files else 0


def test_a_stopped_worker_counts_every_trial_it_ran(tmp_path):
    url, log = str(tmp_path / "s.journal"), tmp_path / "worker.log"
    fake_study(url, tmp_path, name="count", num_trials=6, whitelist=SEARCH,
               base={"training.num_epochs": 2})
    # 2-s trials of 8 steps; each stops at its next step, unless that is its last one
    worker = _start(url, "count", log, FAKE_EPOCH_S=1, FAKE_STEPS=4)

    def early():  # a trial after the first two, between its first and third steps
        trial = _running(url, "count")
        return states(load(url, "count")).get("COMPLETE", 0) >= 2 and trial and \
            1 <= _step(tmp_path, "count", trial) <= 3 and trial

    while True:  # frozen, it is checked again: still running, before its last step
        victim = _until(early, "a later trial early in its run", workers=[(worker, log)])
        worker.send_signal(signal.SIGSTOP)
        now = load(url, "count")._storage.get_trial(victim._trial_id)
        caught = now.state == TrialState.RUNNING and _step(tmp_path, "count", now) <= 5
        if caught:
            worker.send_signal(signal.SIGTERM)  # delivered as it goes on
        worker.send_signal(signal.SIGCONT)
        if caught:
            break
    assert _exit(worker) == 128 + signal.SIGTERM, log.read_text()
    failed, _ = _handed_back(url, "count", victim.number)
    assert failed.user_attrs["stopped_at_step"] > 0
    done = states(load(url, "count"))["COMPLETE"]
    # it had run trials before the stop: they count (the summary said "no trials run")
    assert f"worker done: {done} complete, 1 interrupted" in log.read_text(), log.read_text()


def _asr_study(url, tmp_path, loaders):
    from tests.training_fixtures import tiny_config, write_store

    data = write_store(tmp_path / "train", 48, seed=0)
    settings = build_settings(
        tiny_config(num_epochs=12), data, task="asr", whitelist=SEARCH, num_trials=1,
        mem_limit_bytes=None, pruner="none", checkpoint_dir=tmp_path / "ckpt",
        heartbeat_interval=1.0, task_options={"dev_proportion": 0.25},
        num_data_workers=loaders)
    init_study(url, "asr", settings)


def test_a_cancel_that_signals_the_loader_workers_too_hands_the_trial_back(tmp_path):
    """SIGTERM to every process of the worker's group, as SLURM's scancel does, at a random
    moment: the trial is handed back from its step (it was failed as an error when a loader
    worker died first, or left RUNNING), then resumes there and completes."""
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, loaders=2)
    log = tmp_path / "cancel.log"
    worker = _start(url, "asr", log, session=True,
                    code="import cnn_mellin.data.loader as l; l.allowed_workers = lambda: 2")
    def epochs():
        trial = _running(url, "asr")
        return len(trial.intermediate_values) if trial else 0

    _until(epochs, "an epoch", workers=[(worker, log)])
    # somewhere in the next epoch (test_slurm.py cancels ten times at random moments), and
    # never after it: on a fast machine 12 epochs take a second
    deadline = time.monotonic() + random.Random(23).uniform(0, 1.5)
    while time.monotonic() < deadline and epochs() < 2:
        time.sleep(0.01)
    os.killpg(worker.pid, signal.SIGTERM)
    assert _exit(worker) == 128 + signal.SIGTERM, log.read_text()
    text = log.read_text()
    for bad in ("Traceback", "exited unexpectedly", "killed by signal", "no trials run"):
        assert bad not in text, text
    [failed] = load(url, "asr").get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["fail_kind"] == "interrupted", failed.user_attrs
    stopped_at = failed.user_attrs["stopped_at_step"]
    assert stopped_at > 0 and states(load(url, "asr")) == {"FAIL": 1, "WAITING": 1}
    log = tmp_path / "last.log"
    assert _exit(_start(url, "asr", log)) == 0, log.read_text()
    [done] = load(url, "asr").get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["resumed_from_step"] == stopped_at
    assert states(load(url, "asr")) == {"COMPLETE": 1, "FAIL": 1}


def test_a_retry_handed_back_before_it_drew_keeps_the_parameters_of_its_chain(tmp_path):
    """A worker cancelled right after it claimed a retry hands it back before sampling: its
    own parameters are still empty, those fixed for it are the chain's (the SLURM cancel
    test once saw "replaced by a fresh trial" there)."""
    import optuna

    from cnn_mellin.optim import budget, internals

    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="chain", num_trials=1, whitelist=SEARCH)
    study = load(url, "chain")
    first = budget.SlotClaimer(study, 60).claim()
    rate = optuna.Trial(study, first._trial_id).suggest_float(
        "training.learning_rate", 1e-4, 1e-1, log=True)
    assert budget.fail_and_replace(study, first, "interrupted", "stopped", 2)
    retry = budget.SlotClaimer(study, 60).claim()
    assert retry.params == {} and internals.fixed_params(retry) == {
        "training.learning_rate": rate}
    assert budget.fail_and_replace(study, retry, "interrupted", "stopped before it began", 2)
    [again] = load(url, "chain").get_trials(states=(TrialState.WAITING,))
    assert internals.fixed_params(again) == {"training.learning_rate": rate}
    assert again.user_attrs["retry_of"] == first.number
