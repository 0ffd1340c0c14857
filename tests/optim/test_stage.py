"""``optim stage``: important -> best -> init in one command, the same as the three commands."""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.study import read_settings
from tests.optim_helpers import FAKE_TASK, fake_study, load

pytestmark = pytest.mark.db
SEARCH = ["training.learning_rate", "data.batch_size", "model.window_size",
          "training.optimizer"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stage")
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="sm", num_trials=14, whitelist=SEARCH,
               base={"model.window_stride": 1}, pruner="median")
    assert run_worker(url, "sm", seed=3).exit_code == 0
    return url, tmp_path


def _init_options(tmp_path, name):
    return ["--task", FAKE_TASK, "--num-trials", "5", "--pruner", "none",
            "--checkpoint-dir", tmp_path / "ckpt" / "next"]


def test_stage_reproduces_the_three_commands_and_records_its_lineage(cli, parent, tmp_path):
    url, root = parent
    three, one = tmp_path / "three", tmp_path / "one"
    completed = len(load(url, "sm").get_trials(states=(TrialState.COMPLETE,)))
    code, _, err = cli("optim", "--study-name", "sm", url, "important", "--top-k=2",
                       three / "md.params")
    assert code == 0 and f"sm: ranked from {completed} completed trials" in err, err
    assert cli("optim", "--study-name", "sm", url, "best", "--independent",
               three / "md.ini")[0] == 0
    code, _, err = cli("--read-ini", three / "md.ini", "optim", "--study-name", "md-three", url,
                       "init", root / "data", *_init_options(root, "md"), "--whitelist",
                       *(three / "md.params").read_text().split())
    assert code == 0, err
    code, out, err = cli("optim", "--study-name", "md", url, "stage", "sm", root / "data",
                         "--top-k", "2", "--independent", "--conf-dir", one,
                         *_init_options(root, "md"))
    assert code == 0, err
    assert out.splitlines()[:2] == [str(one / "md.params"), str(one / "md.ini")]
    assert out.splitlines()[2].startswith("created study md in ")
    assert (one / "md.params").read_bytes() == (three / "md.params").read_bytes()
    assert (one / "md.ini").read_bytes() == (three / "md.ini").read_bytes()
    assert sorted(p.name for p in one.iterdir()) == ["md.ini", "md.params"]
    staged, by_hand = load(url, "md"), load(url, "md-three")
    assert read_settings(staged) == read_settings(by_hand)
    assert [t.system_attrs for t in staged.trials] == [t.system_attrs for t in by_hand.trials]
    assert "lineage" not in by_hand.user_attrs
    lineage = staged.user_attrs["lineage"]
    kept = (one / "md.params").read_text().split()
    assert lineage["parent"] == "sm" and list(lineage["kept"]) == kept
    assert lineage["ranked_from"] == completed
    assert all(0 < v <= 1 for v in lineage["kept"].values())
    assert sorted(lineage["carried"]) == sorted(set(SEARCH) - set(kept))
    ini = (one / "md.ini").read_text()
    for name, value in lineage["carried"].items():
        assert f"{name.split('.')[1]} = {value}".lower() in ini.lower()
    code, out, _ = cli("optim", "--study-name", "md", url, "status")
    assert code == 0
    assert f"stage of sm: searching {kept[0]} (" in out and "  carried: " in out
    assert f"  ranked from {completed} completed trials" in out
    # the same stage again is a no-op
    code, out, err = cli("optim", "--study-name", "md", url, "stage", "sm", root / "data",
                         "--top-k", "2", "--independent", "--conf-dir", one,
                         *_init_options(root, "md"))
    assert code == 0 and "nothing to do" in out, err


@pytest.mark.parametrize("args, message", [
    (["stage", "sm", "--top-k", "2"], "stage needs --study-name"),
    (["--study-name", "x", "stage", "nope", "--top-k", "2"], "no study named 'nope'"),
    (["--study-name", "sm", "stage", "sm", "--top-k", "2"], "needs its own --study-name"),
    (["--study-name", "x", "stage", "sm", "--threshold", "1.5"], "--threshold must be in"),
    (["--study-name", "x", "stage", "sm", "--threshold", "1.0"], "keeps no parameter"),
    (["--study-name", "x", "stage", "sm", "--top-k", "0"], "--top-k must be at least 1"),
    (["--study-name", "x", "stage", "sm", "--top-k", "2", "--num-trials", "0"],
     "--num-trials must be at least 1"),
    (["--study-name", "x", "stage", "sm"], "one of the arguments --top-k --threshold"),
    (["--study-name", "x", "stage", "sm", "--top-k", "1", "--threshold", "0.1"],
     "not allowed with argument"),
])
def test_bad_stage_arguments_are_one_line_errors_and_write_nothing(cli, parent, tmp_path, args,
                                                                   message):
    url, root = parent
    at = args.index("stage")
    full = ["optim", *args[:at], url, *args[at:at + 2], root / "data", *args[at + 2:],
            "--conf-dir", tmp_path / "conf", "--task", FAKE_TASK]
    code, out, err = cli(*full)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "conf").exists() or not list((tmp_path / "conf").iterdir())
    assert "x" not in [s.study_name for s in load(url, "sm")._storage.get_all_studies()]


def test_stage_keeps_only_parameters_that_can_matter_with_the_carried_configuration(parent):
    # found by the recipe on SLURM: the top two of a training stage were momentum and the
    # final learning-rate ratio, both inactive once adam and a constant schedule were carried,
    # so init refused an empty whitelist; stage now takes the next ones in the ranking
    from cnn_mellin.config import Config
    from cnn_mellin.optim.stage import _active

    url, _ = parent
    settings = read_settings(load(url, "sm"))
    carried = Config({**settings.base_config, "training.optimizer": "adam"})
    names = ["training.momentum", "training.learning_rate", "data.batch_size"]
    assert _active(settings, carried, names) == {"training.learning_rate", "data.batch_size"}
    sgd = carried.replace({"training.optimizer": "sgd"})
    assert _active(settings, sgd, names) == set(names)


def test_important_warns_when_it_ranks_from_too_few_trials(cli, tmp_path):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="few", num_trials=4,
               whitelist=["training.learning_rate", "data.batch_size"])
    assert run_worker(url, "few", seed=1).exit_code == 0
    code, out, err = cli("optim", "--study-name", "few", url, "important", "--top-k=2", "-")
    assert code == 0 and len(out.split()) == 2  # the names alone on standard output
    assert "few: ranked from 4 completed trials; warning: below 12 a ranking is mostly " \
        "noise" in err


def test_stage_from_base_tries_the_base_then_the_best_values_of_the_kept_parameters(
        cli, tmp_path):
    from cnn_mellin.optim import internals
    from cnn_mellin.optim.best import best_trial

    url, root = str(tmp_path / "studies.journal"), tmp_path
    # a base far from the fake task's optimum (learning rate 1e-3): a draw beats it
    fake_study(url, tmp_path, name="sm", num_trials=10, whitelist=SEARCH,
               base={"model.window_stride": 1, "training.learning_rate": 0.05})
    assert run_worker(url, "sm", seed=3).exit_code == 0
    sm = load(url, "sm")
    base = read_settings(sm).base_config
    best = best_trial(sm)
    code, out, err = cli("optim", "--study-name", "md-base", url, "stage", "sm", root / "data",
                         "--top-k", "2", "--from-base", "--conf-dir", tmp_path / "conf",
                         *_init_options(root, "md"))
    assert code == 0 and "not trying" not in err, err
    kept = (tmp_path / "conf/md-base.params").read_text().split()
    ini = (tmp_path / "conf/md-base.ini").read_text()
    assert ini.startswith("# study sm: its base configuration\n")
    staged = load(url, "md-base")
    settings = read_settings(staged)
    for name in SEARCH:  # every value carried is the base's, not the best trial's
        if name not in kept:
            assert settings.base_config[name] == base[name], name
    lineage = staged.user_attrs["lineage"]
    assert lineage["from"] == "base" and list(lineage["kept"]) == kept
    first, second, *rest = [internals.fixed_params(t) for t in staged.trials]
    assert first == {name: base[name] for name in kept}
    assert second == {name: best.params[name] for name in kept} != first
    assert best.number != 0 and rest == [{}] * 3  # the sampler's
    code, out, _ = cli("optim", "--study-name", "md-base", url, "status")
    assert "stage of sm from its base configuration: searching" in out
    code, out, err = cli("optim", "--study-name", "x", url, "stage", "sm", root / "data",
                         "--top-k", "2", "--from-base", "--independent", "--conf-dir",
                         tmp_path / "no", "--task", FAKE_TASK)
    assert code == 2 and "not allowed with argument" in err and not (tmp_path / "no").exists()
