"""``cnn-mellin optim`` end to end: important, best, status, report, Optuna's own CLI, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from cnn_mellin.config import Config
from cnn_mellin.optim.best import best_trial, lowest_median_value, trial_config
from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.study import read_settings
from tests.optim_helpers import (
    FAKE_TASK,
    env,
    fake_study,
    load,
    pg_tables,
)

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db
OPTUNA = str(Path(sys.executable).with_name("optuna"))
SEARCH = ["training.learning_rate", "data.batch_size", "model.window_size",
          "training.optimizer"]
BASE = {"model.window_stride": 1}


def _finished(url, tmp_path, name="done", num_trials=14):
    fake_study(url, tmp_path, name=name, num_trials=num_trials, whitelist=SEARCH, base=BASE,
               pruner="median")
    assert run_worker(url, name, seed=3).exit_code == 0
    return load(url, name)


@pytest.fixture
def done(tmp_path):
    url = str(tmp_path / "studies.journal")
    _finished(url, tmp_path)
    return url


def test_important_is_byte_identical_and_selectable(cli, done, tmp_path):
    code, first, err = cli("optim", done, "important", "-")
    assert code == 0, err
    code, second, _ = cli("optim", "--study-name", "done", done, "important")
    assert first == second
    names = first.splitlines()
    assert sorted(names) == sorted(read_settings(load(done, "done")).searched)
    out = tmp_path / "exp" / "conf" / "top.params"
    assert cli("optim", done, "important", "--top-k=2", str(out))[0] == 0
    assert out.read_text().splitlines() == names[:2]
    for hash_seed in ("1", "2"):  # separate processes, different hash randomisation
        other = subprocess.run(
            [sys.executable, "-m", "cnn_mellin", "optim", done, "important"],
            capture_output=True, text=True, env=env(PYTHONHASHSEED=hash_seed), timeout=120,
        )
        assert other.returncode == 0 and other.stdout == first, other.stderr
    code, some, _ = cli("optim", done, "important", "--threshold", "0.0")
    assert some == first
    code, _, err = cli("optim", done, "important", "--threshold", "2")
    assert code == 2 and "--threshold" in err


def test_trials_of_one_value_important_is_one_line_error_report_skips_importance(
    cli, tmp_path, monkeypatch
):
    # e.g. a first stage whose trials all stayed in CTC's all-blank phase: PER 1.0 each
    monkeypatch.setenv("FAKE_VALUE", "1.0")
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="flat", num_trials=4, pruner="none", base=BASE,
               whitelist=["training.learning_rate", "data.batch_size"])
    assert run_worker(url, "flat", seed=3).outcomes == {"complete": 4}
    code, out, err = cli("optim", url, "important", "--top-k=2", str(tmp_path / "top.params"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "all have the value 1" in err and "Traceback" not in err
    assert not (tmp_path / "top.params").exists()
    # the report leaves the importance plot out instead of failing
    code, _, err = cli("optim", url, "report", tmp_path / "report", "--no-png")
    assert code == 0, err
    page = (tmp_path / "report" / "index.html").read_text()
    assert "all have the value 1" in page and (tmp_path / "report" / "trials.csv").is_file()


def test_best_ini_reproduces_the_best_trial(cli, done, tmp_path):
    out = tmp_path / "best.ini"
    assert cli("optim", done, "best", str(out))[0] == 0
    study = load(done, "done")
    trial = best_trial(study)
    expected = trial_config(read_settings(study), trial)
    assert Config.from_ini([out]) == expected
    code, text, _ = cli("optim", done, "best", "-")
    assert code == 0 and text == out.read_text()
    code, text, err = cli("--read-ini", str(out), "--print-ini")
    assert code == 0, err


def test_best_independent_is_valid_and_readable(cli, done, tmp_path):
    out = tmp_path / "independent.ini"
    code, _, err = cli("optim", done, "best", "--independent", str(out))
    assert code == 0, err
    config = Config.from_ini([out])
    assert config["model.window_size"] >= config["model.window_stride"]
    assert config["training.num_epochs"] == 3  # base values are kept
    code, _, err = cli("--read-ini", str(out), "--print-ini")
    assert code == 0, err


def test_lowest_median_value_rules():
    pairs = [("a", 0.5), ("a", 0.1), ("b", 0.3), ("b", 0.2), ("b", 0.25)]
    assert lowest_median_value(pairs, categorical=True) == "b"
    many = [(float(v), 1.0 if v < 50 else 0.1) for v in range(100)]
    chosen = lowest_median_value(many, categorical=False)
    assert 50 <= chosen < 100 and chosen in {v for v, _ in many}


def test_status_text_and_json(cli, done):
    code, text, err = cli("optim", done, "status")
    assert code == 0, err
    assert text.startswith("study done (task tests.optim_fake:FakeTask): 14/14 done")
    assert "best: trial" in text
    code, raw, _ = cli("optim", done, "status", "--json")
    status = json.loads(raw)
    study = load(done, "done")
    completes = study.get_trials(states=(TrialState.COMPLETE,))
    assert status["counts"]["complete"] == len(completes)
    assert status["counts"]["done"] == 14 and status["budget"] == 14
    assert status["best"]["number"] == best_trial(study).number
    assert sum(status["prune_kinds"].values()) == status["counts"]["pruned"]
    assert all(p["reason"] != "unknown" for p in status["pruned"])


def test_report_writes_csv_and_html(cli, done, tmp_path):
    out = tmp_path / "report"
    code, text, err = cli("optim", done, "report", str(out))
    assert code == 0, err
    files = {str(Path(line).relative_to(out)) for line in text.splitlines()}
    assert {"trials.csv", "index.html", "plotly.min.js", "done/importance.png"} <= files
    assert all((out / name).is_file() for name in files)
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 14 and "user_attrs_wall_time_s" in rows[0]
    assert not list(out.parent.glob(".report.*"))


@pytest.mark.parametrize("kind", ["journal", "postgresql", "mariadb"])
def test_optuna_cli_reads_our_studies(kind, tmp_path, request):
    if kind == "journal":
        url = str(tmp_path / "studies.journal")
    else:
        url = request.getfixturevalue("pg_db" if kind == "postgresql" else "my_db")[0]
    _finished(url, tmp_path, num_trials=6)
    listing = subprocess.run(
        [OPTUNA, "trials", "--study-name", "done", "--storage", url, "-f", "yaml"],
        capture_output=True, text=True, env=env(), timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    finished = [line for line in listing.stdout.splitlines()
                if line.strip() in ("state: COMPLETE", "state: PRUNED")]
    assert len(finished) == 6
    best = subprocess.run(
        [OPTUNA, "best-trial", "--study-name", "done", "--storage", url, "-f", "json"],
        capture_output=True, text=True, env=env(), timeout=120,
    )
    assert best.returncode == 0, best.stderr
    assert json.loads(best.stdout)["number"] == best_trial(load(url, "done")).number


def _one_line_error(code, out, err):
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and err.startswith("cnn-mellin: error: "), err
    assert "Traceback" not in err


def test_user_errors_exit_2_with_one_line_and_write_nothing(cli, pg_db, tmp_path):
    url, name = pg_db
    data = tmp_path / "data"
    data.mkdir()
    init = ["optim", "--study-name", "s", url, "init", str(data), "--task", FAKE_TASK]
    _one_line_error(*cli("optim", "oracle://u:pw@h/db", "status"))
    code, out, err = cli("optim", "postgresql+psycopg2://postgres:pw@127.0.0.1:1/x", "status")
    _one_line_error(code, out, err)
    assert "cannot connect" in err and ":pw@" not in err
    _one_line_error(*cli("optim", url, "status"))  # no studies yet
    _one_line_error(*cli(*init, "--whitelist", "nothing.*"))
    _one_line_error(*cli(*init, "--blacklist", "(("))
    _one_line_error(*cli(*init[:-2], "--task", "attack"))
    _one_line_error(*cli("optim", url, "init", str(tmp_path / "missing"), "--task", FAKE_TASK))
    assert pg_tables(name) == []
    assert cli(*init, "--whitelist", "training.learning_rate", "--num-trials", "2")[0] == 0
    before = load(url, "s")
    code, out, err = cli(*init, "--whitelist", "training.learning_rate", "--num-trials", "3")
    _one_line_error(code, out, err)
    assert "already exists with other settings" in err and "num_trials" in err
    code, out, err = cli("optim", "--study-name", "nope", url, "status")
    _one_line_error(code, out, err)
    assert "studies there: s" in err
    after = load(url, "s")
    assert after.user_attrs == before.user_attrs and len(after.get_trials()) == 2
    code, out, _ = cli(*init, "--whitelist", "training.learning_rate", "--num-trials", "2")
    assert code == 0 and "nothing to do" in out
