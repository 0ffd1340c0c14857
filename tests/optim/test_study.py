"""``optim init``: validation before writing, stored attributes, no-op and conflicts, splits."""

from __future__ import annotations

import logging

import optuna
import pytest
from optuna.trial import TrialState

from cnn_mellin import __version__
from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, DataError
from cnn_mellin.optim.study import (
    StudySettings,
    build_settings,
    default_study_name,
    init_study,
    is_ready,
    read_settings,
)
from cnn_mellin.tasks.asr import AsrTask, split_dev
from tests.optim_helpers import FAKE_TASK, fake_study, load, pg_tables
from tests.training_fixtures import tiny_config, write_store

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures


def test_init_stores_settings_and_the_budget(tmp_path):
    url = str(tmp_path / "s.journal")
    settings = fake_study(url, tmp_path, num_trials=5, mem_limit_bytes=123)
    study = load(url, "fake")
    assert is_ready(study)
    stored = read_settings(study)
    assert stored == settings
    attrs = study.user_attrs
    assert attrs["num_trials"] == 5 and attrs["mem_limit_bytes"] == 123
    assert attrs["version"] == __version__ and attrs["task"] == FAKE_TASK
    assert attrs["base_config"]["training.num_epochs"] == 3
    assert set(attrs["searched"]) >= {"training.learning_rate", "data.batch_size"}
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 5


def test_same_init_is_a_no_op_and_writes_nothing(tmp_path):
    url = str(tmp_path / "s.journal")
    settings = fake_study(url, tmp_path, num_trials=4)
    size = (tmp_path / "s.journal").stat().st_size
    result = init_study(url, "fake", settings)
    assert not result.created
    assert (tmp_path / "s.journal").stat().st_size == size


@pytest.mark.parametrize("change", [
    {"num_trials": 7}, {"pruner": "median"}, {"mem_limit_bytes": 10},
    {"whitelist": ["training.learning_rate"]}, {"base": {"training.num_epochs": 4}},
])
def test_conflicting_init_is_an_error_and_writes_nothing(tmp_path, change):
    url = str(tmp_path / "s.journal")
    fake_study(url, tmp_path, num_trials=4)
    size = (tmp_path / "s.journal").stat().st_size
    options = {"num_trials": 4, **change}
    with pytest.raises(ConfigError, match="already exists with other settings") as err:
        fake_study(url, tmp_path, **options)
    assert "\n" not in str(err.value)
    assert (tmp_path / "s.journal").stat().st_size == size


def test_invalid_arguments_write_nothing(tmp_path, pg_db):
    url, name = pg_db
    with pytest.raises(ConfigError, match="--num-trials"):
        fake_study(url, tmp_path, num_trials=0)
    with pytest.raises(ConfigError, match="--whitelist"):
        fake_study(url, tmp_path, whitelist=["no.such.*"])
    with pytest.raises(DataError):
        build_settings(Config(), tmp_path / "missing", task=FAKE_TASK,
                       checkpoint_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        build_settings(Config(), tmp_path, task="nosuch", checkpoint_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="--task attack needs --victim"):
        build_settings(Config(), tmp_path, task="attack", checkpoint_dir=tmp_path / "c")
    assert pg_tables(name) == []


def test_dropped_parameters_are_named_in_warnings(tmp_path, caplog):
    url = str(tmp_path / "s.journal")
    with caplog.at_level(logging.WARNING, logger="cnn_mellin.optim"):
        settings = fake_study(
            url, tmp_path, whitelist=["training.momentum", "training.learning_rate", "zzz"]
        )
    assert "training.momentum" not in settings.searched
    assert "training.momentum" in settings.dropped
    assert "not searching training.momentum" in caplog.text
    assert "'zzz' matches no parameter" in caplog.text


def test_interrupted_init_is_completed(tmp_path):
    url = str(tmp_path / "s.journal")
    settings = build_settings(
        Config({"training.num_epochs": 3}), tmp_path, task=FAKE_TASK, num_trials=3,
        whitelist=["training.learning_rate"], checkpoint_dir=tmp_path / "c",
    )
    from cnn_mellin.optim.storage import open_storage

    study = optuna.create_study(study_name="half", storage=open_storage(url, create=True))
    study.set_user_attr("task", settings.task)  # ... and then the process died
    with pytest.raises(Exception, match="incomplete"):
        read_settings(load(url, "half"))
    result = init_study(url, "half", settings, stall_s=0.5)
    study = load(url, "half")
    assert result.created is False and is_ready(study)
    assert read_settings(study) == settings and len(study.get_trials()) == 3


def test_concurrent_inits_make_one_budget(tmp_path):
    import threading

    url = str(tmp_path / "s.journal")
    settings = build_settings(
        Config({"training.num_epochs": 3}), tmp_path, task=FAKE_TASK, num_trials=40,
        whitelist=["training.learning_rate"], checkpoint_dir=tmp_path / "c",
    )
    results = []
    threads = [threading.Thread(target=lambda: results.append(init_study(url, "race", settings)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.created for r in results) == [False, False, True]
    assert len(load(url, "race").get_trials()) == 40


def test_foreign_study_is_refused(tmp_path):
    url = str(tmp_path / "s.journal")
    from cnn_mellin.optim.storage import open_storage

    study = optuna.create_study(study_name="theirs", storage=open_storage(url, create=True))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    with pytest.raises(ConfigError, match="not made by"):
        fake_study(url, tmp_path, name="theirs")


def test_default_study_names_follow_the_recipe():
    ini = ["conf/optim/model-mcorr-sm.ini"]
    assert default_study_name("data/timit/fbank-81-10ms/train", ini, "asr") == \
        "model-mcorr-sm-fbank-81-10ms"
    later = ["exp/conf/model-lcorr-lg-raw.ini"]
    assert default_study_name("data/timit/raw/train", later, "asr") == "model-lcorr-lg-raw"
    assert default_study_name("data/timit/raw/train", [], "asr") == "asr-raw"


def test_split_by_speaker_is_deterministic_and_disjoint():
    utts = [f"SPK{s}_SX{u}" for s in range(20) for u in range(5)]
    by, dev = split_dev(utts, 0.1)
    assert by == "speaker" and len(dev) == 2
    assert split_dev(list(reversed(utts)), 0.1) == (by, dev)
    task = AsrTask({"split_by": by, "dev": dev})
    train, dev_utts = task.split(utts)
    assert len(dev_utts) == 10 and len(train) == 90
    assert {u.split("_")[0] for u in train}.isdisjoint({u.split("_")[0] for u in dev_utts})


def test_split_by_utterance_without_speakers():
    utts = [f"u{n:03d}" for n in range(30)]
    by, dev = split_dev(utts, 0.2)
    assert by == "utterance" and len(dev) == 6
    with pytest.raises(DataError):
        split_dev(["only"], 0.5)


def test_asr_init_reads_the_store(tmp_path):
    data = write_store(tmp_path / "train", 12, seed=0, prefix="spk1_")
    write_store(tmp_path / "other", 3, seed=1)
    settings = build_settings(
        tiny_config(num_epochs=1), data, task="asr", whitelist=["training.learning_rate"],
        checkpoint_dir=tmp_path / "c", task_options={"dev_proportion": 0.25},
    )
    info = settings.task_info
    assert info["num_coeffs"] == 8 and info["num_utts"] == 12
    assert info["split_by"] == "utterance" and len(info["dev"]) == 3
    assert info["max_frames"] > 0
    assert StudySettings.from_attrs(settings.to_attrs()) == settings
    with pytest.raises(DataError, match="does not exist"):
        build_settings(Config(), tmp_path / "nope", task="asr", checkpoint_dir=tmp_path)
