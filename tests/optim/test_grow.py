"""``optim grow N``: a study's budget raised after init, followed by running workers."""

from __future__ import annotations

import time

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.study import read_settings
from tests.optim_helpers import FAKE_TASK, fake_study, load, start_worker, states, wait_all

pytestmark = pytest.mark.db


def test_grow_adds_trials_that_a_worker_then_runs(cli, tmp_path):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="g", num_trials=2, whitelist=["training.learning_rate"])
    assert run_worker(url, "g").exit_code == 0
    code, out, err = cli("optim", url, "grow", "3")
    assert code == 0, err
    assert out == "study g: budget raised from 2 to 5 trials\n"
    study = load(url, "g")
    assert read_settings(study).num_trials == 5
    assert states(study) == {"COMPLETE": 2, "WAITING": 3}
    assert "2/5 done" in cli("optim", url, "status")[1]
    assert run_worker(url, "g").exit_code == 0
    assert states(load(url, "g")) == {"COMPLETE": 5}


@pytest.mark.parametrize("args, message", [
    (["grow", "0"], "grow needs N >= 1 more trials, got 0"),
    (["grow", "x"], "expected an integer"),
    (["--study-name", "nope", "grow", "2"], "no study named 'nope'"),
])
def test_bad_grow_is_a_one_line_error(cli, tmp_path, args, message):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="g", num_trials=2, whitelist=["training.learning_rate"])
    at = args.index("grow")
    code, _, err = cli("optim", *args[:at], url, *args[at:])
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert states(load(url, "g")) == {"WAITING": 2}


def test_init_with_another_budget_points_to_grow(cli, tmp_path):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="g", num_trials=2, whitelist=["training.learning_rate"])
    code, _, err = cli("optim", "--study-name", "g", url, "init", tmp_path / "data", "--task",
                       FAKE_TASK, "--whitelist", "training.learning_rate", "--num-trials", "4")
    assert code == 2 and "num_trials (stored 2, given 4)" in err and "grow N" in err, err


@pytest.mark.slow
def test_a_running_worker_follows_the_raised_budget(cli, tmp_path):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, name="g", num_trials=2, whitelist=["training.learning_rate"])
    worker = start_worker(url, "g", FAKE_EPOCH_S=0.5)
    deadline = time.monotonic() + 60
    while not load(url, "g").get_trials(states=(TrialState.RUNNING,)):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert cli("optim", url, "grow", "2")[0] == 0
    [(code, err)] = wait_all([worker])
    assert code == 0, err
    assert states(load(url, "g")) == {"COMPLETE": 4}
