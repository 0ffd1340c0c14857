"""Worker pools on a real single-node SLURM (scripts/slurm_local.sh) against PostgreSQL:
job arrays, scancel and time limits mid-trial, idle tasks leaving the queue early."""

from __future__ import annotations

import subprocess
import time

import pytest
from optuna.trial import TrialState

from tests.end_to_end.slurm_helpers import job_records, queued, sbatch, slurm_env, wait_gone
from tests.optim_helpers import fake_study, load, start_worker, states, wait_all

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = [pytest.mark.db, pytest.mark.slurm, pytest.mark.slow]
SEARCH = ["training.learning_rate"]


def _run_args(url, study):
    return ["--device", "cpu", "optim", "--study-name", study, url, "run"]


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_array_of_three_ends_with_exactly_the_budget_and_idle_tasks_leave_early(
    pg_db, tmp_path
):
    environ = slurm_env(FAKE_EPOCH_S="1.0")  # 3-s trials: idle tasks have time to leave
    url = pg_db[0]
    fake_study(url, tmp_path, name="pool", num_trials=7, whitelist=SEARCH)
    job = sbatch(environ, tmp_path / "logs", ["--array=1-3"], _run_args(url, "pool"))
    last_seen = wait_gone(environ, job, timeout=240)
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    study = load(url, "pool")
    assert states(study) == {"COMPLETE": 7}, logs
    records = _wait(lambda: (r := job_records(environ, job)) and len(r) == 3 and r, 30,
                    "the job completion records")
    assert {r["JobState"] for r in records.values()} == {"COMPLETED"}, logs
    for text in logs.values():  # threads from the allocation (--cpus-per-task=1), not the node
        assert "worker on cpu with 1 CPU threads" in text
    last_end = max(t.datetime_complete.timestamp() for t in study.trials)
    assert min(last_seen.values()) < last_end - 0.2, (last_seen, last_end, logs)
    assert any("nothing left to claim: leaving" in text for text in logs.values()), logs


def test_scancel_of_one_task_mid_trial_hands_its_trial_back_at_once_to_resume_there(
    pg_db, tmp_path
):
    environ = slurm_env(FAKE_EPOCH_S="3", FAKE_STEPS="20")
    url = pg_db[0]
    # a 30-s heartbeat grace: a retry within seconds was handed back, not reaped as dead
    fake_study(url, tmp_path, name="cancel", num_trials=3, whitelist=SEARCH,
               base={"training.num_epochs": 2}, heartbeat_interval=10.0)
    job = sbatch(environ, tmp_path / "logs", ["--array=1-2"], _run_args(url, "cancel"))
    ckpt = tmp_path / "ckpt" / "cancel"
    _wait(lambda: len(list(ckpt.glob("*/trial-*/step"))) >= 2, 120, "two trials stepping")
    cancelled = time.monotonic()
    subprocess.run(["scancel", f"{job}_1"], env=environ, check=True, timeout=30)

    def handed_back():
        trials = load(url, "cancel").trials
        failed = [t for t in trials if t.state == TrialState.FAIL]
        retries = [t for t in trials if failed and t.user_attrs.get("retry_of") ==
                   failed[0].number]
        return (failed[0], retries[0]) if retries else None

    failed, _ = _wait(handed_back, 20, "the cancelled task's trial to be handed back")
    assert time.monotonic() - cancelled < 8
    assert failed.user_attrs["fail_kind"] == "interrupted"
    stopped = failed.user_attrs["stopped_at_step"]
    assert 0 < stopped < 40
    wait_gone(environ, job, timeout=240)
    study = load(url, "cancel")
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").iterdir()}
    assert states(study) == {"COMPLETE": 3, "FAIL": 1}, logs
    [retry] = [t for t in study.trials if t.user_attrs.get("retry_of") == failed.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from_step"] == stopped
    # the other task took the retry before the last fresh trial (the one of the first three
    # that nobody took at the start: the base, trial 0, is always taken first)
    fresh = max((t for t in study.trials if t.number < 3), key=lambda t: t.datetime_start)
    assert fresh.number != failed.number
    assert retry.datetime_start < fresh.datetime_start
    records = _wait(lambda: (r := job_records(environ, job)) and len(r) == 2 and r, 30,
                    "the job completion records")
    assert records[f"{job}_1"]["JobState"] == "CANCELLED"
    assert records[f"{job}_2"]["JobState"] == "COMPLETED"


def test_time_limit_signal_hands_the_trial_back_before_the_limit(pg_db, tmp_path):
    environ = slurm_env(FAKE_EPOCH_S="60", FAKE_STEPS="300")
    url = pg_db[0]
    fake_study(url, tmp_path, name="limit", num_trials=1, whitelist=SEARCH,
               base={"training.num_epochs": 2}, heartbeat_interval=10.0)
    # SIGTERM 30 s before a 1-minute limit; SLURM sends it up to a minute early, so as early
    # as the start: a job whose signal came before its trial stepped (its trial, if claimed,
    # is handed back before it began) is followed by another
    for _ in range(5):
        job = sbatch(environ, tmp_path / "logs", ["--time=1", "--signal=B:TERM@30"],
                     _run_args(url, "limit"))
        stepped = _wait(lambda job=job: list((tmp_path / "ckpt").glob("*/*/*/step")) or
                        (not queued(environ, job) and ["gone"]), 120,
                        "the trial to step or the job to end")
        if stepped != ["gone"]:
            break
    wait_gone(environ, job, timeout=120)
    [record] = _wait(lambda: list(job_records(environ, job).values()), 30, "the job record")
    log = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "143:0", (record, log)
    study = load(url, "limit")
    failures = study.get_trials(states=(TrialState.FAIL,))
    assert {t.user_attrs["fail_kind"] for t in failures} == {"interrupted"}, log
    [failed] = [t for t in failures if "stopped_at_step" in t.user_attrs]
    stopped = failed.user_attrs["stopped_at_step"]
    assert 0 < stopped < 300
    [(code, err)] = wait_all([start_worker(url, "limit", FAKE_EPOCH_S="0.5",
                                           FAKE_STEPS="300")])
    assert code == 0, err
    [retry] = load(url, "limit").get_trials(states=(TrialState.COMPLETE,))
    assert retry.user_attrs["resumed_from_step"] == stopped



def test_requeued_job_hands_its_trial_back_and_resumes_it_when_it_runs_again(pg_db, tmp_path):
    environ = slurm_env(FAKE_EPOCH_S="3", FAKE_STEPS="20")
    url = pg_db[0]
    fake_study(url, tmp_path, name="requeue", num_trials=1, whitelist=SEARCH,
               base={"training.num_epochs": 2}, heartbeat_interval=10.0)
    job = sbatch(environ, tmp_path / "logs", ["--requeue"], _run_args(url, "requeue"))
    _wait(lambda: list((tmp_path / "ckpt").glob("*/*/*/step")), 120, "the trial to step")
    subprocess.run(["scontrol", "requeue", job], env=environ, check=True, timeout=30)
    failed = _wait(lambda: load(url, "requeue").get_trials(states=(TrialState.FAIL,)), 20,
                   "the requeued job's trial to be handed back")[0]
    assert failed.user_attrs["fail_kind"] == "interrupted"
    stopped = failed.user_attrs["stopped_at_step"]
    # SLURM holds a requeued job for a while (BeginTime); let it start again now
    _wait(lambda: "PENDING" in subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%T"], env=environ, capture_output=True, text=True,
        timeout=30).stdout, 30, "the job back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=environ,
                   check=True, timeout=30)
    wait_gone(environ, job, timeout=240)
    study = load(url, "requeue")
    log = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert states(study) == {"COMPLETE": 1, "FAIL": 1}, log
    [retry] = study.get_trials(states=(TrialState.COMPLETE,))
    assert retry.user_attrs["resumed_from_step"] == stopped
    assert retry.user_attrs["worker"]["pid"] != failed.user_attrs["worker"]["pid"]


def _sleep_unless(condition, seconds):
    """Sleep ``seconds``, or less once ``condition()`` holds."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        time.sleep(0.01)


def _cancel_once(environ, url, logs, rng, anywhere):
    """One job of the study "cancel" cancelled by scancel; checks how it ended."""
    job = sbatch(environ, logs, ["--cpus-per-task=2"], _run_args(url, "cancel"))

    def text():
        return "".join(p.read_text() for p in logs.glob(f"{job}_*.out"))

    # never later than the end of this attempt's first (anywhere) or second epoch: on a fast
    # machine an epoch takes 0.1 s, and the trial must outlast the ten cancels
    if anywhere:  # from the start on: imports, claim, admission, loader start, training
        _wait(lambda: queued(environ, job) and text(), 60, "the job to start")
        _sleep_unless(lambda: text().count("epoch ") >= 1, rng.uniform(0.5, 6.0))
    else:  # mid-epoch or while the dev set is scored, after an epoch of this attempt
        _wait(lambda: "epoch " in text(), 120, "an epoch")
        _sleep_unless(lambda: text().count("epoch ") >= 2, rng.uniform(0.0, 0.6))
    subprocess.run(["scancel", job], env=environ, check=True, timeout=30)
    wait_gone(environ, job, timeout=120)
    [record] = _wait(lambda: list(job_records(environ, job).values()), 30, "its record")
    log = text()
    assert record["JobState"] == "CANCELLED", (record, log)
    # SIGTERM is caught from the line "worker on ..." on: the worker then ends by itself
    # (SLURM records no exit code for a cancelled job), else the SIGTERM itself ended it;
    # never SIGKILL after KillWait or an abort (no "worker done" line then)
    assert "worker on cpu" not in log or "worker done:" in log, log
    for bad in ("Traceback", "exited unexpectedly", "killed by signal", "corrupted"):
        assert bad not in log, log
    trials = load(url, "cancel").get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], log


def test_repeated_scancel_of_an_asr_worker_with_loader_workers_always_hands_back_the_trial(
    pg_db, tmp_path
):
    """scancel signals every process of the job, the 2 loader workers of the trial included,
    at random moments (starting, training mid-epoch, scoring): each time the trial is handed
    back (interrupted, never an error, never fresh parameters), nothing stays RUNNING, the
    worker exits by itself (143) or dies of that SIGTERM before it could catch it, never of
    another signal (SIGKILL after KillWait, a glibc abort); the retries go on from the step
    saved last, and the trial completes (issue 23: the recipe's 4 loader workers lost trials,
    once corrupted the heap)."""
    import random

    from cnn_mellin.optim.study import build_settings, init_study
    from tests.training_fixtures import tiny_config, write_store

    environ = slurm_env()
    url = pg_db[0]
    settings = build_settings(
        tiny_config(num_epochs=24), write_store(tmp_path / "train", 48, seed=0), task="asr",
        whitelist=SEARCH, num_trials=1, mem_limit_bytes=None, pruner="none",
        checkpoint_dir=tmp_path / "ckpt", task_options={"dev_proportion": 0.25},
        num_data_workers=2, heartbeat_interval=10.0)  # no reaping: each hand-back is its own
    init_study(url, "cancel", settings)
    rng = random.Random(2312)
    for round_ in range(10):
        _cancel_once(environ, url, tmp_path / "logs", rng, anywhere=bool(round_ % 2))
    [(code, err)] = wait_all([start_worker(url, "cancel")], timeout=300)
    assert code == 0, err
    trials = load(url, "cancel").get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert {t.user_attrs["fail_kind"] for t in failed} == {"interrupted"}
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 1
    assert all(t.params == trials[0].params for t in trials)  # never fresh parameters
    assert all(t.user_attrs["retry_of"] == 0 for t in trials[1:])
    steps = [t.user_attrs["stopped_at_step"] for t in failed if "stopped_at_step" in t.user_attrs]
    assert len(steps) >= 4 and steps == sorted(steps)  # each went on from the one before
    [done] = [t for t in trials if t.state == TrialState.COMPLETE]
    assert done.user_attrs["resumed_from_step"] >= steps[-1]
