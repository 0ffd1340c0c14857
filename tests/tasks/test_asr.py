"""The ``asr`` task behind the worker: admission, divergence, OOM, and live multi-worker runs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from cnn_mellin.config import Config
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.status import format_bytes
from cnn_mellin.optim.study import build_settings, init_study
from tests.optim_helpers import load, start_worker, states, wait_all
from tests.training_fixtures import tiny_config, write_store

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db


def _asr_study(url, tmp_path, name="asr", num_trials=2, limit=None, config=None, data=None,
               **options):
    data = data or write_store(tmp_path / "train", 24, seed=0)
    settings = build_settings(
        config or tiny_config(num_epochs=2), data, task="asr",
        whitelist=["training.learning_rate", "model.recurrent_size"], num_trials=num_trials,
        mem_limit_bytes=limit, pruner="none", checkpoint_dir=tmp_path / "ckpt" / name,
        heartbeat_interval=1.0, task_options={"dev_proportion": 0.25}, **options,
    )
    init_study(url, name, settings)
    return settings


def test_a_space_mostly_over_the_limit_trains_only_feasible_trials(tmp_path):
    # recurrent sizes 32..512 drawn log-uniformly: about 90 % of draws need more than a
    # 42-unit model, the limit here
    url = str(tmp_path / "s.journal")
    probe = _asr_study(url, tmp_path, name="probe")
    task = probe.build_task()
    figure = task.peak_memory(task.config({**probe.base_config, "model.recurrent_size": 42}),
                              "cpu")
    _asr_study(url, tmp_path, num_trials=3, limit=figure.bytes)
    summary = run_worker(url, "asr", seed=0)
    assert summary.outcomes == {"complete": 3}
    trials = load(url, "asr").get_trials()
    assert len(trials) == 3  # rejected draws take no slot of the budget
    assert all(t.params["model.recurrent_size"] <= 42 for t in trials)
    assert all(t.user_attrs["admission_bytes"] <= figure.bytes for t in trials)
    assert sum(t.user_attrs.get("draws_rejected_memory", 0) for t in trials) >= 3
    assert all(t.user_attrs["epochs"] == 2 for t in trials)


def test_init_refuses_a_space_where_nothing_fits(tmp_path, cli):
    data = write_store(tmp_path / "train", 24, seed=0)
    ini = tmp_path / "tiny.ini"
    tiny_config(num_epochs=2).write_ini(ini)
    code, out, err = cli("--read-ini", ini, "optim", "--study-name", "none",
                         tmp_path / "s.journal", "init", data, "--whitelist",
                         "model.recurrent_size", "--mem-limit-bytes", "1000",
                         "--checkpoint-dir", tmp_path / "ckpt")
    assert code == 2 and out == ""
    assert err.startswith("cnn-mellin: error: no configuration of the search space fits: "
                          "none of ")
    assert "over the memory limit of 1000 bytes, 0 invalid; the smallest needs " in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.journal").exists()  # nothing written
    code, out, err = cli("--read-ini", ini, "optim", "--study-name", "some",
                         tmp_path / "s.journal", "init", data, "--whitelist",
                         "model.recurrent_size", "--checkpoint-dir", tmp_path / "ckpt")
    assert code == 0, err
    assert "feasible: " in out and " uniform draws of the space are feasible (100%;" in out


@pytest.mark.parametrize("how, kind, reason", [
    ("diverge", "diverged", "diverged: 20 consecutive non-finite steps"),
    ("nan", "nonfinite", "non-finite value nan at epoch 1"),
])
def test_non_finite_training_is_pruned_with_the_reason(tmp_path, monkeypatch, how, kind,
                                                       reason):
    import cnn_mellin.training as training

    def non_finite(config, *args, epoch_callback=None, **kwargs):
        if how == "diverge":
            raise training.TrainingDiverged("20 consecutive non-finite steps")
        epoch_callback(1, float("nan"), float("nan"))
        raise AssertionError("the report of a NaN must stop training")

    monkeypatch.setattr(training, "train", non_finite)
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path)
    summary = run_worker(url, "asr", seed=0)
    assert summary.exit_code == 0 and summary.outcomes == {"pruned": 2}
    for trial in load(url, "asr").get_trials():
        assert trial.user_attrs["prune_kind"] == kind
        assert trial.user_attrs["prune_reason"] == reason


def test_out_of_memory_is_pruned_and_the_worker_carries_on(tmp_path, monkeypatch):
    import cnn_mellin.training as training

    def out_of_memory(config, *args, epoch_callback=None, **kwargs):
        epoch_callback(1, 1.0, 0.5)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training, "train", out_of_memory)
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, limit=10**9)
    summary = run_worker(url, "asr", seed=0)
    assert summary.exit_code == 0 and summary.outcomes == {"pruned": 2}
    for trial in load(url, "asr").get_trials():
        assert trial.user_attrs["prune_kind"] == "oom"
        assert trial.user_attrs["prune_reason"] == \
            "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
        assert trial.intermediate_values == {1: 0.5}
        assert trial.system_attrs["constraints:memory"] == 1.0


def test_worker_refuses_data_that_vanished(tmp_path, cli):
    import shutil

    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path)
    shutil.rmtree(tmp_path / "train")
    code, _, err = cli("--device", "cpu", "optim", url, "run")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err, err
    assert states(load(url, "asr")) == {"WAITING": 2}


def test_completed_asr_trial_records_the_model(tmp_path):
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, num_trials=1)
    assert run_worker(url, "asr", seed=1).outcomes == {"complete": 1}
    [trial] = load(url, "asr").get_trials()
    attrs = trial.user_attrs
    assert 0.0 <= trial.value <= 1.0 and trial.value == min(trial.intermediate_values.values())
    assert attrs["epochs"] == 2 and attrs["best_epoch"] in (1, 2)
    assert os.path.isfile(attrs["model_path"])
    assert attrs["peak_bytes"] == attrs["admission_bytes"] > 0
    assert attrs["peak_bytes_method"] == "estimated" and attrs["worker"]["device"] == "cpu"
    assert Config(load(url, "asr").user_attrs["base_config"])["training.num_epochs"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql", "mariadb"])
def test_four_workers_one_killed_budget_exact_and_resumed(kind, tmp_path, request):
    if kind == "journal":
        url = str(tmp_path / "studies.journal")
    else:
        url = request.getfixturevalue("pg_db" if kind == "postgresql" else "my_db")[0]
    epochs = 6
    # the killed worker is seen dead at once (same machine, its pid is gone); a long grace
    # keeps the living ones, whose heartbeat threads a loaded 2-core box can starve for
    # seconds, from being taken for dead
    _asr_study(url, tmp_path, name="live", num_trials=5, config=tiny_config(num_epochs=epochs),
               data=write_store(tmp_path / "train", 24, seed=0), heartbeat_grace=30.0)
    workers = [start_worker(url, "live") for _ in range(4)]
    watched = load(url, "live")
    deadline = time.monotonic() + 240
    victim = None
    while victim is None and time.monotonic() < deadline:
        trials = watched.get_trials(deepcopy=False)
        for trial in trials:
            # some epochs checkpointed, at least two to go: surely mid-trial when killed
            if trial.state == TrialState.RUNNING and WORKER_ATTR in trial.user_attrs and \
                    1 <= len(trial.intermediate_values) <= epochs - 2:
                victim = trial
                break
        if victim is None and all(t.state.is_finished() for t in trials):
            break  # every trial ran past the window: fail now, not at the deadline
        time.sleep(0.05)
    assert victim is not None, (states(watched), wait_all(workers, timeout=1))
    pid = victim.user_attrs[WORKER_ATTR]["pid"]
    os.kill(pid, signal.SIGKILL)
    results = wait_all(workers, timeout=600)
    codes = {p.pid: code for p, (code, _) in zip(workers, results, strict=True)}
    assert codes.pop(pid) == -signal.SIGKILL
    assert set(codes.values()) == {0}, results
    study = load(url, "live")
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 5, counts
    failures = {t.number: t.user_attrs.get("fail_reason")
                for t in study.get_trials(states=(TrialState.FAIL,))}
    assert counts["FAIL"] == 1 and set(counts) <= {"COMPLETE", "PRUNED", "FAIL"}, failures
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == victim.number and failed.user_attrs["fail_kind"] == "dead"
    host = failed.user_attrs[WORKER_ATTR]["host"]
    assert failed.user_attrs["fail_reason"] == f"worker {host}:{pid} died"
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs[WORKER_ATTR]["pid"] != pid
    assert retry.user_attrs["resumed_from_epoch"] >= 1
    assert sorted(retry.intermediate_values) == list(range(1, epochs + 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_admission_is_measured_on_cuda(tmp_path):
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, num_trials=1, limit=10**10)
    assert run_worker(url, "asr", device="cuda", seed=0).outcomes == {"complete": 1}
    [trial] = load(url, "asr").get_trials()
    assert trial.user_attrs["admission_method"] == "measured"
    assert trial.user_attrs["peak_bytes_method"] == "measured during training"
    assert 0 < trial.user_attrs["admission_bytes"] < 10**10
    assert trial.user_attrs["worker"]["device"] == "cuda"


def test_sigterm_checkpoints_the_step_and_the_retry_ends_as_an_uninterrupted_run(tmp_path):
    """SIGTERM mid-training: the trial hands back at once with the step it saved; its retry
    resumes from that step and ends with the weights of a run never stopped."""
    import threading

    from cnn_mellin.data.store import read_info
    from cnn_mellin.modelfile import load_checkpoint_file
    from cnn_mellin.training import train

    url = str(tmp_path / "s.journal")
    config = tiny_config(num_epochs=3, noise_std=0.2)
    settings = _asr_study(url, tmp_path, num_trials=1, config=config)

    def send_after_first_epoch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list((tmp_path / "ckpt" / "asr").glob("*/trial-0/last.pt")):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.005)

    sender = threading.Thread(target=send_after_first_epoch)
    sender.start()
    began = time.monotonic()
    summary = run_worker(url, "asr", seed=0)
    sender.join()
    assert summary.exit_code == 128 + signal.SIGTERM
    assert time.monotonic() - began < 60
    study = load(url, "asr")
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    [retry] = study.get_trials(states=(TrialState.WAITING,))
    assert failed.user_attrs["fail_kind"] == "interrupted"
    stopped = failed.user_attrs["stopped_at_step"]
    [last] = (tmp_path / "ckpt" / "asr").glob("*/trial-0/last.pt")
    assert load_checkpoint_file(last)["schedule"]["steps"] == stopped > 0
    assert retry.user_attrs["retry_of"] == 0
    assert retry.system_attrs["fixed_params"] == failed.params

    assert run_worker(url, "asr", seed=0, keep_checkpoints=True).exit_code == 0
    [done] = load(url, "asr").get_trials(states=(TrialState.COMPLETE,))
    assert done.user_attrs["resumed_from_step"] == stopped
    task = settings.build_task()
    train_utts, dev_utts = task.split(read_info(settings.task_info["data_dir"]).utt_ids)
    straight = train(settings.config().replace(failed.params), settings.task_info["data_dir"],
                     model_dir=tmp_path / "straight", train_utts=train_utts, dev_utts=dev_utts)
    a = load_checkpoint_file(tmp_path / "straight" / "last.pt")["model"]
    b = load_checkpoint_file(last)["model"]
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert done.value == pytest.approx(straight.best_dev_error)


@pytest.mark.parametrize("keep", [False, True])
def test_finished_trial_keeps_its_model_and_drops_its_resume_state(tmp_path, cli, keep):
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, num_trials=1)
    code, _, err = cli("--device", "cpu", "optim", url, "run",
                       *(["--keep-checkpoints"] if keep else []))
    assert code == 0, err
    [trial] = load(url, "asr").get_trials()
    folder = Path(trial.user_attrs["model_path"]).parent
    assert (folder / "model.pt").is_file() and (folder / "metrics.jsonl").is_file()
    assert (folder / "last.pt").exists() == keep
    code, out, _ = cli("optim", url, "status")
    used = sum(p.stat().st_size for p in folder.parent.rglob("*") if p.is_file())
    assert code == 0 and f"checkpoints: {format_bytes(used)} in {folder.parent}\n" in out, out
    assert format_bytes(999) == "999 bytes" and format_bytes(3_052_200) == "3.1 MB"


def test_run_folder_overrides_that_cannot_work_are_one_line_errors(tmp_path, cli):
    url = str(tmp_path / "s.journal")
    _asr_study(url, tmp_path, num_trials=1)
    code, _, err = cli("--device", "cpu", "optim", url, "run", "--data-dir", tmp_path / "nope")
    assert code == 2 and err.count("\n") == 1 and "nope" in err, err
    (tmp_path / "file").write_text("")
    code, _, err = cli("--device", "cpu", "optim", url, "run", "--checkpoint-dir",
                       tmp_path / "file")
    assert code == 2 and err.count("\n") == 1 and "is not a directory" in err, err
    assert states(load(url, "asr")) == {"WAITING": 1}
