"""A local pool (``optim run --workers N``): an idle worker leaves instead of standing by for
its siblings, gives them its CPUs, and a killed worker is started again."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.attrs import WORKER
from cnn_mellin.optim.heartbeat import WorkerIdentity
from cnn_mellin.optim.pool import PoolLink, parent_pid
from tests.optim_helpers import ROOT, env, fake_study, load, states


def _trial(identity: WorkerIdentity | None):
    from optuna.trial import create_trial

    trial = create_trial(state=TrialState.RUNNING)
    if identity is not None:
        trial.user_attrs[WORKER] = identity.to_attr()
    return trial


def _identity(pid: int) -> WorkerIdentity:
    me = WorkerIdentity.current()
    with open(f"/proc/{pid}/stat") as handle:
        start = handle.read().rsplit(")", 1)[-1].split()[19]
    return WorkerIdentity(me.host, pid, start, me.boot, me.pidns)


def test_a_pool_holds_a_trial_only_when_a_live_sibling_runs_it():
    me = WorkerIdentity.current()
    pool = PoolLink(os.getpid(), 4, multiprocessing.Value("i", 2))
    sibling = subprocess.Popen(["sleep", "30"])  # a child of this process, as workers are
    try:
        assert parent_pid(sibling.pid) == os.getpid()
        theirs = _identity(sibling.pid)
        assert pool.holds_all([_trial(theirs)], me)
        assert not pool.holds_all([], me)  # nothing running: stand by as before
        assert not pool.holds_all([_trial(theirs), _trial(None)], me)
        elsewhere = WorkerIdentity("other-host", sibling.pid, theirs.start, "b", "n")
        assert not pool.holds_all([_trial(theirs), _trial(elsewhere)], me)
        stranger = _identity(os.getppid())  # on this machine, not of this pool
        assert not pool.holds_all([_trial(stranger)], me)
    finally:
        sibling.kill()
        sibling.wait()
    assert not pool.holds_all([_trial(theirs)], me)  # dead: the parent starts another


def test_a_workers_threads_follow_the_live_workers_of_its_pool():
    live = multiprocessing.Value("i", 2)
    pool = PoolLink(os.getpid(), 4, live)
    assert pool.threads() == 2
    live.value = 1
    assert pool.threads() == 4
    live.value = 3
    assert pool.threads() == 1


def _pool(url: str, study: str, **extra) -> subprocess.Popen:
    variables = env(**extra)
    variables.pop("OMP_NUM_THREADS")  # the pool shares its CPUs out itself
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_mellin", "--device", "cpu", "optim", "--study-name",
         study, url, "run", "--workers", "2"],
        cwd=ROOT, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers_of(pid: int) -> list[int]:
    """The pool's worker processes (not multiprocessing's resource tracker)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_pid(int(entry)) == pid:
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if b"spawn_main" in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.slow
def test_an_idle_pool_worker_leaves_and_its_sibling_takes_its_cpus(tmp_path):
    url = str(tmp_path / "studies.journal")
    # 3 trials on 2 workers: one worker's second trial runs while the other has nothing
    fake_study(url, tmp_path, name="pool", num_trials=3, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 6})
    parent = _pool(url, "pool", FAKE_EPOCH_S=0.3, SLURM_CPUS_PER_TASK=4)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 0, err
    assert "the 1 running trials are this pool's" in err, err
    assert "standing by" not in err
    assert "now 4 CPU threads (1 live workers in the pool)" in err, err
    assert states(load(url, "pool")) == {"COMPLETE": 3}


@pytest.mark.slow
def test_a_killed_pool_worker_is_started_again_and_its_trial_retried(tmp_path):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="pool", num_trials=3, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 20}, heartbeat_grace=3.0)
    parent = _pool(url, "pool", FAKE_EPOCH_S=0.3)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the last trial runs and the idle worker left
            study = load(url, "pool")
            running = study.get_trials(states=(TrialState.RUNNING,))
            if (len(running) == 1 and len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
                    and running[0].intermediate_values and len(_workers_of(parent.pid)) == 1):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the pool never ran its last trial alone")
        victim = running[0]
        os.kill(victim.user_attrs[WORKER]["pid"], signal.SIGKILL)
        _, err = parent.communicate(timeout=120)
    finally:
        if parent.poll() is None:
            parent.kill()
    assert "was killed (signal 9): starting a worker in its place" in err, err
    assert parent.returncode == 128 + signal.SIGKILL  # the worst of its workers' exits
    study = load(url, "pool")
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].user_attrs.get("resumed_from_epoch", 0) >= 1
