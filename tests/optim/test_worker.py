"""The worker loop on real storages with a cheap task: outcomes, budget, deaths, retries."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cnn_mellin.errors import DataError
from cnn_mellin.optim import budget, internals
from cnn_mellin.optim.attrs import BEAT_KEY, WORKER_TIME_PREFIX
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.heartbeat import Monitor, StaleWatch, WorkerIdentity
from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.status import study_status
from cnn_mellin.optim.study import checkpoint_root, read_settings
from tests.optim.tcp_proxy import CuttableProxy
from tests.optim_helpers import (
    fake_study,
    load,
    start_worker,
    states,
    wait_all,
)

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db


def _journal(tmp_path):
    return str(tmp_path / "studies.journal")


def test_recreated_study_does_not_resume_the_old_studys_checkpoints(tmp_path):
    # a study deleted and created again under the same name (the recipe clears results with
    # "drop database") used to find its predecessor's trial-N checkpoints and resume them
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    assert run_worker(url, "fake", seed=1).exit_code == 0
    old_root = checkpoint_root(load(url, "fake"), read_settings(load(url, "fake")))
    optuna.delete_study(study_name="fake", storage=load(url, "fake")._storage)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    assert run_worker(url, "fake", seed=2).exit_code == 0
    study = load(url, "fake")
    assert checkpoint_root(study, read_settings(study)) != old_root
    for trial in study.get_trials():
        assert trial.state == TrialState.COMPLETE
        assert trial.user_attrs.get("resumed_from_epoch") is None


def test_first_trial_tries_the_base_configuration(tmp_path):
    # a stage initialised from an earlier stage's best .ini starts from that configuration
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=3, whitelist=["training.learning_rate"],
               base={"training.learning_rate": 0.0123})
    assert run_worker(url, "fake", seed=3).exit_code == 0
    trials = sorted(load(url, "fake").get_trials(), key=lambda t: t.number)
    assert trials[0].params == {"training.learning_rate": 0.0123}
    assert all(t.params["training.learning_rate"] != 0.0123 for t in trials[1:])


def test_complete_trials_record_their_facts(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=3, whitelist=["training.learning_rate"],
               mem_limit_bytes=10**9)
    summary = run_worker(url, "fake", sampler="random", seed=1)
    assert summary.exit_code == 0 and summary.outcomes == {"complete": 3}
    for trial in load(url, "fake").get_trials():
        assert trial.state == TrialState.COMPLETE
        attrs = trial.user_attrs
        assert attrs["epochs"] == 3 and attrs["worker"]["device"] == "cpu"
        assert attrs["worker"]["host"] == socket.gethostname()
        assert attrs["wall_time_s"] >= 0 and attrs["peak_bytes"] == 16_000_000
        assert attrs["admission_bytes"] == 16_000_000
        assert attrs["admission_method"] == "estimated"
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.system_attrs["constraints:memory"] <= 0
        assert attrs[WORKER_ATTR]["pid"] == os.getpid()


@pytest.mark.parametrize("base, limit, kind, reason", [
    ({"training.optimizer": "sgd"}, None, "oom", "out of memory: fake allocation failure"),
    ({"training.optimizer": "rmsprop"}, None, "nonfinite", "non-finite value nan at epoch 1"),
])
def test_bad_trials_are_pruned_with_reasons(tmp_path, base, limit, kind, reason):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"], base=base,
               mem_limit_bytes=limit)
    summary = run_worker(url, "fake", seed=0)
    assert summary.exit_code == 0 and summary.outcomes == {"pruned": 2}  # worker carried on
    for trial in load(url, "fake").get_trials():
        assert trial.state == TrialState.PRUNED
        assert trial.user_attrs["prune_kind"] == kind
        assert trial.user_attrs["prune_reason"] == reason


@pytest.mark.parametrize("base, limit, kind, reason, rejected", [
    ({"data.batch_size": 64}, 40_000_000, "memory",
     "needs 64000000 bytes (estimated) on cpu, over the limit of 40000000 bytes",
     "1000 over the memory limit, 0 invalid; the smallest needs 64000000 bytes"),
    ({"model.window_size": 2, "model.window_stride": 4}, None, "invalid",
     "invalid configuration: window_size must be at least window_stride",
     "0 over the memory limit, 1000 invalid)"),
])
def test_a_fixed_configuration_that_cannot_run_is_pruned_and_a_space_without_one_too(
        tmp_path, base, limit, kind, reason, rejected):
    # the base (fixed values: judged as it is) cannot run; no draw of the learning rate
    # changes that, so the sampled trial finds no feasible draw (init refuses such a space)
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"], base=base,
               mem_limit_bytes=limit)
    summary = run_worker(url, "fake", seed=0)
    assert summary.exit_code == 0 and summary.outcomes == {"pruned": 2}
    first, drawn = sorted(load(url, "fake").get_trials(), key=lambda t: t.number)
    assert first.user_attrs["prune_kind"] == kind
    assert first.user_attrs["prune_reason"] == reason
    assert first.user_attrs["epochs"] == 0  # pruned before any training
    if kind == "memory":
        assert first.user_attrs["admission_bytes"] == 64_000_000
        assert first.system_attrs["constraints:memory"] == pytest.approx(0.6)
    assert drawn.user_attrs["prune_kind"] == "infeasible"
    assert drawn.user_attrs["prune_reason"] == f"no feasible configuration in 1000 draws " \
        f"({rejected}" + (" (estimated) on cpu, over the limit of 40000000 bytes)"
                          if kind == "memory" else "")
    assert not (tmp_path / "ckpt" / "fake").exists()


def test_draws_over_the_limit_never_become_trials_nor_take_the_budget(tmp_path):
    # batch sizes 4..64 drawn log-uniformly, 1 MB each: 85 % of draws exceed 5 MB
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=6, whitelist=["data.batch_size",
                                                       "training.learning_rate"],
               base={"data.batch_size": 4}, mem_limit_bytes=5_000_000)
    summary = run_worker(url, "fake", sampler="random", seed=2)
    assert summary.exit_code == 0 and summary.outcomes == {"complete": 6}
    trials = load(url, "fake").get_trials()
    assert len(trials) == 6  # no trial beyond the budget: rejected draws are not trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert all(t.params["data.batch_size"] <= 5 for t in trials)
    assert all(t.system_attrs["constraints:memory"] <= 0 for t in trials)
    drawn = [t for t in trials if t.number > 0]  # trial 0 is the base, nothing drawn
    rejected = sum(t.user_attrs["draws_rejected_memory"] for t in drawn)
    assert rejected >= 10  # about 5.7 per accepted draw here
    assert all(t.user_attrs["draws_rejected_invalid"] == 0 for t in drawn)
    status = study_status(load(url, "fake"), read_settings(load(url, "fake")))
    accepted = [t for t in trials if "draws_rejected_memory" in t.user_attrs]
    total = sum(t.user_attrs["draws_rejected_memory"] for t in accepted)
    assert status["draws"] == {"draws": len(accepted) + total, "accepted": len(accepted),
                               "rejected_memory": total, "rejected_invalid": 0}
    # status shows tenths of a second: six fake trials on a fast machine showed busy 0.0
    # (CI, 2026-12-08); the worker's own record keeps milliseconds
    assert status["workers"]["workers"] == 1 and status["workers"]["busy_s"] >= 0
    assert 0 <= status["workers"]["idle_s"] <= status["workers"]["seconds"]
    [times] = [v for k, v in internals.study_system_attrs(load(url, "fake")).items()
               if k.startswith(WORKER_TIME_PREFIX)]
    assert 0 < times["busy_s"] <= times["seconds"]
    # the same seed draws the same sequence, rejections included
    again = tmp_path / "again"
    again.mkdir()
    fake_study(_journal(again), again, num_trials=6, whitelist=["data.batch_size",
                                                                "training.learning_rate"],
               base={"data.batch_size": 4}, mem_limit_bytes=5_000_000)
    run_worker(_journal(again), "fake", sampler="random", seed=2)
    repeat = {t.number: (t.params, t.user_attrs["draws_rejected_memory"])
              for t in load(_journal(again), "fake").get_trials() if t.number > 0}
    assert repeat == {t.number: (t.params, t.user_attrs["draws_rejected_memory"]) for t in drawn}


def test_errors_fail_and_are_replaced_then_the_worker_stops(tmp_path, monkeypatch):
    url = _journal(tmp_path)
    monkeypatch.setenv("FAKE_ADAMW_ERROR", "bug")
    fake_study(url, tmp_path, num_trials=4, whitelist=["training.learning_rate"],
               base={"training.optimizer": "adamw"})
    summary = run_worker(url, "fake")
    assert summary.exit_code == 1 and summary.outcomes == {"failed": 3}
    study = load(url, "fake")
    assert states(study) == {"FAIL": 3, "WAITING": 4}
    for trial in study.get_trials(states=(TrialState.FAIL,)):
        assert trial.user_attrs["fail_kind"] == "error"
        assert trial.user_attrs["fail_reason"] == "ZeroDivisionError: fake bug"
    replaced = sorted(t.user_attrs["replaces"] for t in study.get_trials()
                      if "replaces" in t.user_attrs)
    assert replaced == [t.number for t in study.get_trials(states=(TrialState.FAIL,))]


def test_data_error_requeues_the_trial_and_stops_the_worker(tmp_path, monkeypatch):
    url = _journal(tmp_path)
    monkeypatch.setenv("FAKE_ADAMW_ERROR", "data")
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"],
               base={"training.optimizer": "adamw"})
    with pytest.raises(DataError, match="fake data went missing"):
        run_worker(url, "fake")
    study = load(url, "fake")
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["fail_kind"] == "user"
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == failed.number]
    assert retry.state == TrialState.WAITING and retry.user_attrs["retry_count"] == 1
    assert states(study) == {"FAIL": 1, "WAITING": 2}


def test_a_user_error_that_goes_with_the_parameters_cannot_drain_the_pool(tmp_path,
                                                                          monkeypatch):
    # a user error re-enqueued the trial unbounded and stopped the worker; the next worker
    # claimed that retry first and stopped the same way, so no pool ever finished
    url = _journal(tmp_path)
    monkeypatch.setenv("FAKE_ADAMW_ERROR", "data")
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"],
               base={"training.optimizer": "adamw"})
    stopped = 0
    for _ in range(8):  # workers started one after the other, as a requeueing pool does
        try:
            if run_worker(url, "fake").exit_code == 0:
                break
        except DataError:
            stopped += 1
    study = load(url, "fake")
    assert states(study)["PRUNED"] == 2 and stopped <= 2
    for trial in study.get_trials(states=(TrialState.PRUNED,)):
        assert trial.user_attrs["prune_kind"] == "invalid"
        assert trial.user_attrs["prune_reason"] == \
            "DataError: fake data went missing (again, on the retry)"
        assert trial.system_attrs["constraints:valid"] == 1.0


def test_data_this_configuration_cannot_use_prunes_the_trial(tmp_path, monkeypatch):
    url = _journal(tmp_path)
    monkeypatch.setenv("FAKE_ADAMW_ERROR", "longdata")
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"],
               base={"training.optimizer": "adamw"})
    summary = run_worker(url, "fake")
    assert summary.exit_code == 0 and summary.outcomes == {"pruned": 2}
    for trial in load(url, "fake").get_trials():
        assert trial.user_attrs["prune_kind"] == "invalid"
        assert "longer than the model's outputs" in trial.user_attrs["prune_reason"]


@pytest.mark.parametrize("kind, bound", [("dead", 2), ("user", 2),
                                         ("interrupted", budget.MAX_INTERRUPTS)])
def test_every_kind_of_retry_is_bounded(tmp_path, kind, bound):
    # interrupted retries were not counted at all
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=1, whitelist=["training.learning_rate"],
               max_retries=2)
    study = load(url, "fake")
    chain = 0
    for _ in range(bound + 1):
        [claimed] = study.get_trials(states=(TrialState.WAITING,))
        study._storage.set_trial_state_values(claimed._trial_id, TrialState.RUNNING)
        assert budget.fail_and_replace(study, study._storage.get_trial(claimed._trial_id),
                                       kind, "again", max_retries=2)
        chain += 1
        [replacement] = study.get_trials(states=(TrialState.WAITING,))
        if "retry_of" not in replacement.user_attrs:
            break
        assert replacement.user_attrs["retry_of"] == 0
    assert chain == bound + 1 and "retry_of" not in replacement.user_attrs


def test_late_config_error_prunes_the_trial(tmp_path, monkeypatch):
    url = _journal(tmp_path)
    monkeypatch.setenv("FAKE_ADAMW_ERROR", "config")
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"],
               base={"training.optimizer": "adamw"})
    assert run_worker(url, "fake").outcomes == {"pruned": 2}
    for trial in load(url, "fake").get_trials():
        assert trial.user_attrs["prune_kind"] == "invalid"
        assert trial.user_attrs["prune_reason"] == \
            "invalid configuration: fake combination that cannot train"


def test_tpe_draws_feasible_trials_and_receives_their_constraint(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=14, whitelist=["data.batch_size",
                                                        "training.learning_rate"],
               mem_limit_bytes=30_000_000)
    assert run_worker(url, "fake", sampler="tpe", seed=5).exit_code == 0
    study = load(url, "fake")
    trials = study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for trial in trials:  # what TPE reads (Trial.set_constraint): the margin under the limit
        assert trial.system_attrs["constraints:memory"] == pytest.approx(
            trial.params["data.batch_size"] * 1_000_000 / 30_000_000 - 1)
    # every drawn trial, past TPE's 10 random start-up trials too, was judged before it ran
    assert {t.number for t in trials if "draws_rejected_memory" in t.user_attrs} >= \
        set(range(1, 14))


def test_sampling_is_reproducible_per_trial_number(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for where in (first, second):
        where.mkdir()
        fake_study(_journal(where), where, num_trials=3, whitelist=["training.learning_rate"])
        run_worker(_journal(where), "fake", seed=11)
    params = [[t.params for t in load(_journal(w), "fake").get_trials()] for w in (first, second)]
    assert params[0] == params[1]
    assert len({p["training.learning_rate"] for p in params[0]}) == 3


def test_every_worker_claims_the_base_configuration_before_the_sampled_trials(tmp_path):
    # the main job's sm stage lost a minute: one worker took four memory-capped draws
    # before trial 0, the base, while the other worker had finished and stood idle
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=8, whitelist=["training.learning_rate"])
    study = load(url, "fake")
    assert study.get_trials()[0].system_attrs.get("fixed_params")
    for seed in range(12):
        claimer = budget.SlotClaimer(study, refresh_s=60, seed=seed)
        claimer._refresh()
        assert claimer._queue[0].number == 0
    assert budget.SlotClaimer(study, refresh_s=60, seed=5).claim().number == 0


def test_orphaned_failure_is_reconciled_and_duplicates_dropped(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=3, whitelist=["training.learning_rate"])
    study = load(url, "fake")
    claimer = budget.SlotClaimer(study, refresh_s=60)
    orphan = claimer.claim()
    study._storage.set_trial_state_values(orphan._trial_id, TrialState.FAIL)  # reaper died
    patient = budget.Reconciler(study, 3, settle_s=60, max_retries=2)
    assert patient() == 0  # seen once: not yet settled
    reconcile = budget.Reconciler(study, 3, settle_s=0, max_retries=2)
    assert reconcile() == 1
    assert reconcile() == 0 and patient() == 0
    # a second reconciler that raced the first makes a duplicate replacement
    budget.replace(study, study._storage.get_trial(orphan._trial_id), "dead", "raced", 2)
    summary = run_worker(url, "fake")
    assert summary.outcomes == {"complete": 3, "duplicate": 1}
    assert states(load(url, "fake")) == {"COMPLETE": 3, "FAIL": 2}


def test_stale_watch_needs_unchanged_heartbeats_for_the_grace_period():
    me = WorkerIdentity.current()
    other = WorkerIdentity("elsewhere", 1, "1", "boot", "ns", "cuda:0")
    watch = StaleWatch(me, grace_s=0.3)
    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING, user_attrs={WORKER_ATTR: other.to_attr()},
        system_attrs={BEAT_KEY: 1.0},
    )
    trial._trial_id = 7
    assert watch.check([trial]) == []
    time.sleep(0.4)
    trial.system_attrs[BEAT_KEY] = 2.0  # a fresh heartbeat resets the clock
    assert watch.check([trial]) == []
    time.sleep(0.4)
    [(stale, reason)] = watch.check([trial])
    assert stale is trial and "no heartbeat from worker elsewhere:1" in reason
    mine = optuna.trial.create_trial(state=TrialState.RUNNING,
                                     user_attrs={WORKER_ATTR: me.to_attr()})
    mine._trial_id = 8
    assert watch.check([mine]) == [] and (time.sleep(0.4) or watch.check([mine]) == [])


def test_monitor_that_lost_the_database_restarts_its_heartbeat_clocks(tmp_path, monkeypatch):
    """After an outage the observer counts the grace from its own recovery plus the longest
    retry pause: a live worker's heartbeat thread may sleep that long before it writes again
    (the PostgreSQL outage test once took a live worker for dead 3.3 s after the restore)."""
    import types

    from cnn_mellin.optim import heartbeat
    from cnn_mellin.optim.storage import RETRY_PAUSE_MAX_S

    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=1, whitelist=["training.learning_rate"])
    study = load(url, "fake")
    trial = budget.SlotClaimer(study, 60).claim()
    other = WorkerIdentity("elsewhere", 1, "1", "boot", "ns", "cpu")
    study._storage.set_trial_user_attr(trial._trial_id, WORKER_ATTR, other.to_attr())
    study._storage.set_trial_system_attr(trial._trial_id, BEAT_KEY, 1.0)
    recoveries, now = [0], [1000.0]
    monkeypatch.setattr(heartbeat, "outage_recoveries", lambda storage: recoveries[0])
    monkeypatch.setattr(heartbeat, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], time=time.time))
    grace = 3.0
    monitor = Monitor(study, WorkerIdentity.current(), 1.0, grace, 1, 2)
    assert monitor.reap() == 0
    now[0] += grace + 1  # no beat seen for longer than the grace, but the database was away
    recoveries[0] += 1
    assert monitor.reap() == 0
    now[0] += grace + 1  # the grace from the recovery, but not the retry pause on top
    assert monitor.reap() == 0
    assert study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING
    now[0] += RETRY_PAUSE_MAX_S  # and now no beat for the grace after the longest pause
    assert monitor.reap() == 1
    assert study._storage.get_trial(trial._trial_id).state == TrialState.FAIL


def test_monitor_whose_own_heartbeat_was_held_up_restarts_its_heartbeat_clocks(
    tmp_path, monkeypatch
):
    """A worker killed while it held the journal's lock stalls every write for Optuna's 30-s
    lock grace: an observer blocked in its own heartbeat meanwhile took a live worker (as
    blocked) for dead, 'no heartbeat from worker ... for 30 s', under load."""
    import types

    from cnn_mellin.optim import heartbeat
    from cnn_mellin.optim.storage import RETRY_PAUSE_MAX_S

    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    study = load(url, "fake")
    claimer = budget.SlotClaimer(study, 60)
    mine, theirs = claimer.claim(), claimer.claim()
    other = WorkerIdentity("elsewhere", 1, "1", "boot", "ns", "cpu")
    study._storage.set_trial_user_attr(theirs._trial_id, WORKER_ATTR, other.to_attr())
    study._storage.set_trial_system_attr(theirs._trial_id, BEAT_KEY, 1.0)
    now, grace = [1000.0], 3.0
    monkeypatch.setattr(heartbeat, "time", types.SimpleNamespace(
        monotonic=lambda: now[0], time=time.time))
    monitor = Monitor(study, WorkerIdentity.current(), 1.0, grace, 2, 2)
    monitor.own(mine._trial_id)
    monitor.cycle()
    write = study._storage.set_trial_system_attr

    def held_up(*args):
        now[0] += grace + 1  # longer than the grace, and far longer than an interval
        write(*args)

    monkeypatch.setattr(study._storage, "set_trial_system_attr", held_up)
    monitor.cycle()
    monkeypatch.setattr(study._storage, "set_trial_system_attr", write)
    now[0] += grace + 1
    monitor.cycle()
    assert study._storage.get_trial(theirs._trial_id).state == TrialState.RUNNING
    now[0] += RETRY_PAUSE_MAX_S
    monitor.cycle()
    assert study._storage.get_trial(theirs._trial_id).state == TrialState.FAIL


def test_heartbeat_on_a_finished_trial_marks_it_lost(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=1, whitelist=["training.learning_rate"])
    study = load(url, "fake")
    trial = budget.SlotClaimer(study, 60).claim()
    monitor = Monitor(study, WorkerIdentity.current(), 1.0, 3.0, 1, 2)
    monitor.own(trial._trial_id)
    monitor.beat()
    assert not monitor.lost(trial._trial_id)
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    monitor.beat()
    assert monitor.lost(trial._trial_id)


@pytest.mark.slow
def test_four_processes_end_with_exactly_the_budget(any_url, tmp_path):
    fake_study(any_url, tmp_path, name="four", num_trials=14, mem_limit_bytes=50_000_000)
    workers = [start_worker(any_url, "four", seed=0, FAKE_EPOCH_S=0.05)
               for _ in range(4)]
    results = wait_all(workers)
    assert [code for code, _ in results] == [0] * 4, results
    counts = states(load(any_url, "four"))
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 14, counts
    assert set(counts) <= {"COMPLETE", "PRUNED"}, counts


def _wait_for_progress(url, name, min_epoch, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in load(url, name).get_trials(states=(TrialState.RUNNING,)):
            if WORKER_ATTR in trial.user_attrs and \
                    max(trial.intermediate_values, default=0) >= min_epoch:
                return trial
        time.sleep(0.2)
    raise AssertionError("no trial got far enough")


def _kill_mid_trial(url, name, min_epoch, timeout=120):
    """SIGKILL the worker of a RUNNING trial past ``min_epoch``; returns that trial.

    The worker is frozen (SIGSTOP) first and killed only if its trial is still RUNNING then:
    a trial seen running may end before a plain kill lands (on a loaded machine it did, and
    the kill then hit a worker between trials: nothing to retry).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        victim = _wait_for_progress(url, name, min_epoch, timeout=deadline - time.monotonic())
        pid = victim.user_attrs[WORKER_ATTR]["pid"]
        os.kill(pid, signal.SIGSTOP)
        now = load(url, name)._storage.get_trial(victim._trial_id)
        if now.state == TrialState.RUNNING and \
                now.user_attrs.get(WORKER_ATTR, {}).get("pid") == pid:
            os.kill(pid, signal.SIGKILL)
            return now
        os.kill(pid, signal.SIGCONT)
    raise AssertionError("no trial could be caught running")


@pytest.mark.slow
def test_killed_worker_trial_is_retried_from_its_checkpoint(any_url, tmp_path):
    fake_study(any_url, tmp_path, name="kill", num_trials=4, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 5})
    workers = [start_worker(any_url, "kill", FAKE_EPOCH_S=0.4) for _ in range(2)]
    try:
        victim = _kill_mid_trial(any_url, "kill", 2)
    except AssertionError:
        wait_all(workers, timeout=1)
        raise
    pid = victim.user_attrs[WORKER_ATTR]["pid"]
    results = wait_all(workers)
    by_pid = {p.pid: code for p, (code, _) in zip(workers, results, strict=True)}
    assert by_pid.pop(pid) == -signal.SIGKILL and list(by_pid.values()) == [0], results
    study = load(any_url, "kill")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in failed] == [victim.number]
    assert failed[0].user_attrs["fail_kind"] == "dead"
    assert f"worker {failed[0].user_attrs[WORKER_ATTR]['host']}:{pid} died" in \
        failed[0].user_attrs["fail_reason"]
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == failed[0].params
    assert retry.user_attrs[WORKER_ATTR]["pid"] != pid
    resumed = retry.user_attrs["resumed_from_epoch"]
    assert resumed >= 2
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5]  # kept from the failed try
    root = checkpoint_root(study, read_settings(study))
    assert root.parent == tmp_path / "ckpt" / "kill"
    assert (root / f"trial-{victim.number}" / "epoch").read_text() == "5"
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4 and counts["FAIL"] == 1


@pytest.mark.slow
def test_epoch_checkpointed_but_not_reported_before_a_kill_is_reported_by_the_retry(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="gap", num_trials=1, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 4})
    [(code, err)] = wait_all([start_worker(url, "gap", FAKE_DIE_BEFORE_REPORT="2")])
    assert code == -signal.SIGKILL, err
    [(code, err)] = wait_all([start_worker(url, "gap")])
    assert code == 0, err
    study = load(url, "gap")
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert sorted(failed.intermediate_values) == [1]
    [retry] = study.get_trials(states=(TrialState.COMPLETE,))
    assert retry.user_attrs["retry_of"] == failed.number
    assert retry.user_attrs["resumed_from_epoch"] == 2
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_requeues_the_trial_and_a_later_worker_resumes_it(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="term", num_trials=2, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 4})
    [worker] = [start_worker(url, "term", FAKE_EPOCH_S=0.4)]
    victim = _wait_for_progress(url, "term", 1)
    worker.send_signal(signal.SIGTERM)
    [(code, err)] = wait_all([worker])
    assert code == 128 + signal.SIGTERM, err
    study = load(url, "term")
    failed = study._storage.get_trial(victim._trial_id)
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_kind"] == "interrupted"
    [(code, err)] = wait_all([start_worker(url, "term", FAKE_EPOCH_S=0.05)])
    assert code == 0, err
    study = load(url, "term")
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
    assert "retry_count" in retry.user_attrs and retry.user_attrs["retry_count"] == 0
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}


@pytest.mark.slow
def test_local_workers_share_the_budget_and_sigterm_reaches_them(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="pool", num_trials=4, whitelist=["training.learning_rate"])
    [(code, err)] = wait_all([start_worker(url, "pool", "--workers", "2")])
    assert code == 0, err
    assert states(load(url, "pool")) == {"COMPLETE": 4}
    fake_study(url, tmp_path, name="slow", num_trials=4, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 20})
    parent = start_worker(url, "slow", "--workers", "2", FAKE_EPOCH_S=0.3)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        running = load(url, "slow").get_trials(states=(TrialState.RUNNING,))
        if len(running) == 2 and all(t.intermediate_values for t in running):
            break
        time.sleep(0.1)
    parent.send_signal(signal.SIGTERM)
    [(code, err)] = wait_all([parent])
    assert code == 128 + signal.SIGTERM, err
    study = load(url, "slow")
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 2 and {t.user_attrs["fail_kind"] for t in failed} == {"interrupted"}
    retries = {t.user_attrs["retry_of"] for t in study.get_trials(states=(TrialState.WAITING,))
               if "retry_of" in t.user_attrs}
    assert retries == {t.number for t in failed}
    assert states(study) == {"FAIL": 2, "WAITING": 4}


def _proxied(kind, request):
    url = request.getfixturevalue("pg_db" if kind == "postgresql" else "my_db")[0]
    proxy = CuttableProxy(5432 if kind == "postgresql" else 3306)
    request.addfinalizer(proxy.close)
    return url, proxy


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_workers_ride_out_a_database_outage_longer_than_the_heartbeat_grace(
    kind, request, tmp_path
):
    url, proxy = _proxied(kind, request)
    settings = fake_study(url, tmp_path, name="outage", num_trials=6,
                          whitelist=["training.learning_rate"], base={"training.num_epochs": 5})
    assert settings.heartbeat_grace < 8
    workers = [start_worker(proxy.url(url), "outage", FAKE_EPOCH_S=0.3) for _ in range(2)]
    try:
        _wait_for_progress(url, "outage", 1)
    except AssertionError:
        wait_all(workers, timeout=1)
        raise
    proxy.cut()
    time.sleep(8)  # every worker's heartbeat is older than the grace when the link is back
    proxy.restore()
    results = wait_all(workers)
    assert [code for code, _ in results] == [0, 0], results
    # a worker that made no database call during the cut (its pool reconnects quietly) has
    # nothing to recover from; at least one saw the outage
    assert any("reachable again" in err for _, err in results), results
    # nobody was taken for dead: no trial failed, the budget is exact
    assert states(load(url, "outage")) == {"COMPLETE": 6}


@pytest.mark.slow
def test_worker_stops_with_one_line_after_max_outage_and_its_trial_is_retried(
    request, tmp_path
):
    url, proxy = _proxied("postgresql", request)
    fake_study(url, tmp_path, name="gone", num_trials=2, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 4})
    worker = start_worker(proxy.url(url), "gone", "--max-outage", "2", FAKE_EPOCH_S=0.4)
    try:
        victim = _wait_for_progress(url, "gone", 1)
    except AssertionError:
        wait_all([worker], timeout=1)
        raise
    proxy.cut()
    [(code, err)] = wait_all([worker], timeout=60)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "unreachable for" in last and "Traceback" not in err, err
    assert "invalid data" not in last  # the connection error itself, not Optuna's wrapper
    assert load(url, "gone")._storage.get_trial(victim._trial_id).state == TrialState.RUNNING
    [(code, err)] = wait_all([start_worker(url, "gone")])
    assert code == 0, err
    study = load(url, "gone")
    assert study._storage.get_trial(victim._trial_id).user_attrs["fail_kind"] == "dead"
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["resumed_from_epoch"] >= 1
    assert states(study) == {"COMPLETE": 2, "FAIL": 1}


def test_sigterm_hands_back_at_the_step_and_the_retry_resumes_there(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="steps", num_trials=1, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 2})
    worker = start_worker(url, "steps", FAKE_EPOCH_S=4, FAKE_STEPS=40)
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        victim = next(iter(load(url, "steps").get_trials(states=(TrialState.RUNNING,))), None)
        time.sleep(0.1)
    assert victim is not None
    step_file = next((tmp_path / "ckpt" / "steps").glob("*/trial-0"), tmp_path) / "step"
    while not step_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    sent = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    [(code, err)] = wait_all([worker])
    assert code == 128 + signal.SIGTERM, err
    assert time.monotonic() - sent < 5  # a step is 0.1 s: no waiting for the epoch to end
    study = load(url, "steps")
    failed = study._storage.get_trial(victim._trial_id)
    stopped = failed.user_attrs["stopped_at_step"]
    assert failed.state == TrialState.FAIL and 0 < stopped < 40
    assert int(step_file.read_text()) == stopped
    [waiting] = study.get_trials(states=(TrialState.WAITING,))
    assert waiting.user_attrs["retry_of"] == victim.number
    [(code, err)] = wait_all([start_worker(url, "steps", FAKE_EPOCH_S=0.4, FAKE_STEPS=40)])
    assert code == 0, err
    [retry] = load(url, "steps").get_trials(states=(TrialState.COMPLETE,))
    assert retry.user_attrs["resumed_from_step"] == stopped


def test_run_overrides_the_data_and_checkpoint_folders(cli, tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="moved", num_trials=1, whitelist=["training.learning_rate"])
    (tmp_path / "data").rename(tmp_path / "elsewhere")
    code, _, err = cli("--device", "cpu", "optim", url, "run", "--data-dir",
                       tmp_path / "elsewhere", "--checkpoint-dir", tmp_path / "here")
    assert code == 0, err
    assert states(load(url, "moved")) == {"COMPLETE": 1}
    assert list((tmp_path / "here").glob("*/trial-0/epoch"))
    assert not (tmp_path / "ckpt" / "moved").exists()


def test_data_dir_override_for_a_task_without_data_is_an_error(tmp_path):
    import dataclasses

    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.worker import overridden

    settings = fake_study(_journal(tmp_path), tmp_path, name="x", num_trials=1,
                          whitelist=["training.learning_rate"])
    bare = dataclasses.replace(settings, task_info={"num_coeffs": 41})
    with pytest.raises(ConfigError, match="--data-dir: the .* task of this study reads no"):
        overridden(bare, "somewhere", None)
    assert overridden(settings, None, "c").checkpoint_dir == str(Path("c").resolve())


@pytest.mark.slow
def test_a_busy_worker_takes_anothers_retry_before_fresh_trials(tmp_path):
    url = _journal(tmp_path)
    fake_study(url, tmp_path, name="order", num_trials=3, whitelist=["training.learning_rate"],
               base={"training.num_epochs": 2}, heartbeat_interval=10.0)
    # 12-s trials: the handed-back retry is there well before the other worker's next claim
    workers = [start_worker(url, "order", FAKE_EPOCH_S=6, FAKE_STEPS=20) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "ckpt" / "order").glob("*/trial-*/step"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers[0].send_signal(signal.SIGTERM)
    results = wait_all(workers)
    assert results[0][0] == 128 + signal.SIGTERM and results[1][0] == 0, results
    study = load(url, "order")
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == failed.number]
    # the fresh trial is the one of the first three that nobody took at the start
    fresh = max((t for t in study.trials if t.number < 3), key=lambda t: t.datetime_start)
    assert fresh.number != failed.number
    assert retry.state == fresh.state == TrialState.COMPLETE
    assert retry.datetime_start < fresh.datetime_start


def _taken_for_dead(study, trial_id):
    """What another worker does to a trial it takes for dead."""
    budget.fail_and_replace(study, study._storage.get_trial(trial_id), "dead", "taken for dead",
                            max_retries=2)


def _assert_one_lost_two_completed(summary, url):
    """The worker dropped the trial taken for dead and completed the two others."""
    assert summary.exit_code == 0 and summary.outcomes == {"lost": 1, "complete": 2}
    assert states(load(url, "fake")) == {"COMPLETE": 2, "FAIL": 1}


def test_a_trial_taken_for_dead_while_it_is_sampled_is_dropped(tmp_path, monkeypatch):
    # found by bench/scale_faults.py on a loaded box: UpdateFinishedTrialError from the
    # sampling counted as a trial error, three of them stopped the worker with exit 1
    from cnn_mellin.optim import worker as worker_module

    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    original, calls = worker_module.space.suggest, []

    def suggest(trial, searched, params):
        if not calls:
            _taken_for_dead(load(url, "fake"), trial._trial_id)
        calls.append(trial.number)
        return original(trial, searched, params)

    monkeypatch.setattr(worker_module.space, "suggest", suggest)
    summary = run_worker(url, "fake")
    _assert_one_lost_two_completed(summary, url)


def test_a_trial_taken_for_dead_just_before_it_is_told_is_dropped(tmp_path, monkeypatch):
    # found by bench/scale_faults.py: Optuna 5's "Cannot tell a FAIL trial." (ValueError)
    # ended the worker with a traceback
    from cnn_mellin.optim.outcome import Recorder

    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    original, calls = Recorder.write_facts, []

    def write_facts(self, trial, facts):
        original(self, trial, facts)
        if not calls:
            _taken_for_dead(self.study, trial._trial_id)
        calls.append(trial.number)

    monkeypatch.setattr(Recorder, "write_facts", write_facts)
    summary = run_worker(url, "fake")
    _assert_one_lost_two_completed(summary, url)


def test_a_trial_taken_for_dead_as_it_is_claimed_is_dropped(tmp_path, monkeypatch):
    # found by bench/scale_faults.py on the journal: the worker's identity write raised
    # UpdateFinishedTrialError and ended the worker with a traceback
    from cnn_mellin.optim.worker import Worker

    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=2, whitelist=["training.learning_rate"])
    worker = Worker(url, "fake")
    original, calls = worker.claimer.claim, []

    def claim():
        claimed = original()
        if claimed is not None and not calls:
            _taken_for_dead(worker.study, claimed._trial_id)
        calls.append(claimed)
        return claimed

    monkeypatch.setattr(worker.claimer, "claim", claim)
    summary = worker.run()
    _assert_one_lost_two_completed(summary, url)


def test_two_workers_both_train_when_most_draws_exceed_the_limit(tmp_path):
    # the main job's sm stage had one worker idle while the other trained the base alone:
    # the rest of the budget had gone to draws over the limit, pruned in seconds
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=6, whitelist=["data.batch_size",
                                                       "training.learning_rate"],
               base={"data.batch_size": 4}, mem_limit_bytes=5_000_000)
    workers = [start_worker(url, "fake", seed=i, FAKE_EPOCH_S=0.3) for i in range(2)]
    assert [code for code, _ in wait_all(workers)] == [0, 0]
    study = load(url, "fake")
    trials = study.get_trials()
    assert len(trials) == 6 and all(t.state == TrialState.COMPLETE for t in trials)
    ran = Counter(t.user_attrs[WORKER_ATTR]["pid"] for t in trials)
    assert sorted(ran) == sorted(w.pid for w in workers) and min(ran.values()) >= 2
    times = study_status(study, read_settings(study))["workers"]
    assert times["workers"] == 2 and times["busy_s"] >= 6 * 3 * 0.3


def test_time_limits_spare_the_base_and_a_ratio_follows_the_base_trials_speed(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("FAKE_EPOCH_S", "0.2")
    monkeypatch.setenv("FAKE_EPOCH_BY_BATCH", "1")  # an epoch takes 0.2 s x batch / 16
    url = _journal(tmp_path)
    fake_study(url, tmp_path, num_trials=10, whitelist=["data.batch_size"],
               max_trial_time_ratio=1.5)
    assert run_worker(url, "fake", seed=4).exit_code == 0
    trials = sorted(load(url, "fake").get_trials(), key=lambda t: t.number)
    assert trials[0].params == {"data.batch_size": 16} and trials[0].state == TrialState.COMPLETE
    for trial in trials[1:]:
        batch = trial.params["data.batch_size"]
        if batch >= 32:  # twice the base's time or more: pruned at its first epoch
            assert trial.state == TrialState.PRUNED, batch
            assert trial.user_attrs["prune_kind"] == "timeout"
            assert "over 1.5 x the base configuration's" in trial.user_attrs["prune_reason"]
        elif batch <= 20:
            assert trial.state == TrialState.COMPLETE, batch
    assert any(t.params["data.batch_size"] >= 32 for t in trials)
    # an absolute limit no trial can meet prunes every trial but the base
    other = tmp_path / "seconds"
    other.mkdir()
    fake_study(_journal(other), other, num_trials=3, whitelist=["data.batch_size"],
               max_trial_seconds=0.01)
    assert run_worker(_journal(other), "fake", seed=4).exit_code == 0
    kinds = {t.number: (t.state, t.user_attrs.get("prune_kind"))
             for t in load(_journal(other), "fake").get_trials()}
    assert kinds == {0: (TrialState.COMPLETE, None), 1: (TrialState.PRUNED, "timeout"),
                     2: (TrialState.PRUNED, "timeout")}
