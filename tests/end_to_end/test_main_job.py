"""The README's main job (scripts/staged_search.sh), shrunk: every stage runs for real."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from cnn_mellin.config import read_ini
from cnn_mellin.optim.study import read_settings
from tests.conftest import ROOT, run_cli
from tests.optim_helpers import load

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "cnn-mellin").exists(),
                    reason="the main job runs from .venv (bash scripts/setup.sh makes it)")
def test_staged_search_end_to_end(tmp_path):
    # Small enough for CI: 60 utterances, 3 epochs of batches of 2, and a base configuration
    # small enough to leave CTC's all-blank phase in those 80 steps, so that the sm stage has
    # something to rank whatever the random draws (a stage whose trials all score PER 1.0 stops
    # with that error); the seed fixes which models the random stage draws.
    fast = tmp_path / "fast.ini"
    fast.write_text("[training]\nnum_epochs = 3\n[data]\nbatch_size = 2\n"
                    "[model]\nconvolutional_layers = 0\nrecurrent_layers = 0\n")
    journal = tmp_path / "exp" / "optim" / "studies.journal"  # the default under EXP
    env = {
        **{k: v for k, v in os.environ.items() if k != "DB_URL"},
        "DATA": str(tmp_path / "data"), "EXP": str(tmp_path / "exp"),
        "EXTRA_INI": str(fast), "UTTERANCES": "60", "BUDGET_MINUTES": "6",
        "SM_TRIALS": "4", "LG_TRIALS": "2", "TOP_K": "2", "WORKERS": "2", "SEED": "2",
        # the tiny base is many times faster than most of the space: no time limit here
        "SM_TIME_RATIO": "1000", "LG_TIME_RATIO": "1000",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(["bash", "scripts/staged_search.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== done" in done.stdout

    sm, lg = "demo-model-mcorr-sm-fbank-81-10ms", "demo-model-mcorr-lg-fbank-81-10ms"
    conf = tmp_path / "exp" / "conf"
    top = (conf / f"{lg}.params").read_text().split()
    assert len(top) == 2 and all(name.startswith("model.") for name in top)
    carried = read_ini(conf / f"{lg}.ini")
    assert carried["training.num_epochs"] == 3  # the extra .ini reached both stages
    best = read_ini(conf / f"{lg}-best.ini")
    assert set(best) == set(carried)

    def status(name):
        shown = run_cli("optim", "--study-name", name, journal, "status", "--json")
        assert shown.returncode == 0, shown.stderr
        return json.loads(shown.stdout)

    plan = (conf / "plan-mcorr.sh").read_text()
    assert "sm_trials=4\n" in plan and "lg_trials=2\n" in plan  # sized from the measured step
    # the lg stage planned again from the sm base trial's epochs
    assert "lg_epochs=" in (conf / "plan-lg-mcorr.sh").read_text()
    for name, trials in ((sm, 4), (lg, 2)):
        shown = status(name)
        counts = shown["counts"]
        assert shown["budget"] == trials, shown["budget"]
        assert counts["done"] == counts["complete"] + counts["pruned"] == trials, counts
        assert counts["fail"] == 0, counts
    # every sm trial trained: draws over the memory limit were redrawn, never trials
    assert status(sm)["counts"]["complete"] == 4
    assert status(sm)["prune_kinds"] == {}
    # the lg stage tried its base first: the carried configuration, then the planned epochs
    # and EXTRA_INI (read after it in both stages)
    study = load(str(journal), lg)
    settings = read_settings(study)
    searched = settings.searched  # the top ones that can matter given the .ini
    assert searched and set(searched) <= set(top)
    base = settings.config()
    assert study.trials[0].params == {name: base[name] for name in searched}
    assert all(base[name] == carried[name] for name in carried
               if not name.startswith(("model.convolutional_layers", "model.recurrent_layers",
                                       "data.batch_size")))
    report = tmp_path / "exp" / "report" / lg
    assert (report / "trials.csv").exists() and (report / "index.html").exists()

    before = {name: status(name) for name in (sm, lg)}
    again = subprocess.run(["bash", "scripts/staged_search.sh"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    def trials_of(shown):  # a re-run's workers start, find nothing and record their seconds
        return {k: v for k, v in shown.items() if k != "workers"}

    # finished stages: no-ops
    assert {n: trials_of(status(n)) for n in (sm, lg)} == \
        {n: trials_of(shown) for n, shown in before.items()}
