"""Idle workers give their allocation back; one stands by for retries until the budget is done."""

from __future__ import annotations

import dataclasses
import time

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.heartbeat import WorkerIdentity
from cnn_mellin.optim.standby import Standby
from tests.optim_helpers import fake_study, load, start_worker, states

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db


@pytest.fixture
def study(tmp_path):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="idle", num_trials=2)
    return load(url, "idle")


def _elsewhere(me, pid):
    return dataclasses.replace(me, host=f"elsewhere-{pid}", pid=pid)


def test_one_standby_the_others_leave_once_they_see_it_alive(study):
    me = WorkerIdentity.current()
    a, b = Standby(study, _elsewhere(me, 1), 0.5), Standby(study, _elsewhere(me, 2), 0.5)
    assert a.stay()  # nobody stood by: a does now
    assert b.stay() and b.holder.pid == 1  # first look at a: wait to see it alive
    assert a.stay()
    assert not b.stay()  # a's counter moved: b may leave
    a.leave()
    assert b.stay() and b.holder.pid == 2


def test_a_silent_standby_is_replaced_after_the_grace_period(study):
    me = WorkerIdentity.current()
    a, b = Standby(study, _elsewhere(me, 1), 0.3), Standby(study, _elsewhere(me, 2), 0.3)
    assert a.stay()
    assert b.stay() and b.stay() and b.holder.pid == 1  # within the grace: waits
    time.sleep(0.4)
    assert b.stay() and b.holder.pid == 2
    assert not a.stay() or a.holder.pid == 2  # a sees b now; b bumps, so a leaves
    assert b.stay() and not a.stay()


def test_a_standby_whose_process_ended_is_replaced_at_once(study):
    me = WorkerIdentity.current()
    gone = dataclasses.replace(me, pid=2**22 + 7, start="1")
    assert Standby(study, gone, 60).stay()
    assert Standby(study, me, 60).stay()
    assert Standby(study, _elsewhere(me, 3), 60).holder is None  # not looked yet
    b = Standby(study, _elsewhere(me, 3), 60)
    assert b.stay() and b.holder.same_process(me)


@pytest.mark.slow
def test_idle_workers_leave_before_the_last_trial_ends_and_the_budget_is_exact(tmp_path):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="pool", num_trials=4, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 4})
    workers = [start_worker(url, "pool", FAKE_EPOCH_S=0.6) for _ in range(3)]
    exited: dict[int, float] = {}
    deadline = time.time() + 180
    while len(exited) < 3 and time.time() < deadline:
        for i, worker in enumerate(workers):
            if i not in exited and worker.poll() is not None:
                exited[i] = time.time()
        time.sleep(0.05)
    errs = [w.communicate()[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], errs
    study = load(url, "pool")
    assert states(study) == {"COMPLETE": 4}
    last_end = max(t.datetime_complete.timestamp() for t in study.get_trials(
        states=(TrialState.COMPLETE,)))
    assert min(exited.values()) < last_end - 0.5, (exited, last_end)
    assert sum("nothing left to claim: leaving" in err for err in errs) >= 1, errs
