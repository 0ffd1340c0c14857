"""``cnn-mellin train`` and ``decode`` on the command line, including resume after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnn_mellin.modelfile import load_checkpoint_file
from tests.conftest import ROOT
from tests.training_fixtures import TINY_MODEL, write_store

_INI = """
[model]
{model}

[training]
num_epochs = {epochs}
learning_rate = 0.05
lr_schedule = none
warmup_epochs = 0.5
noise_std = 0.1
num_time_masks = 1

[data]
batch_size = 4
eval_batch_size = 8
num_buckets = 2
"""


def _ini(path, epochs):
    model = "\n".join(f"{k.split('.')[1]} = {v}" for k, v in TINY_MODEL.items())
    path.write_text(_INI.format(model=model, epochs=epochs))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-stores")
    return write_store(root / "train", 24, seed=0), write_store(root / "dev", 8, seed=1, prefix="d")


def test_train_then_decode(cli, stores, tmp_path):
    train_dir, dev_dir = stores
    ini = _ini(tmp_path / "tiny.ini", 3)
    code, out, err = cli("--read-ini", ini, "--device", "cpu", "train", train_dir, dev_dir,
                         "--model-dir", tmp_path / "m", "--quiet")
    assert code == 0, err
    assert "best dev PER" in out
    assert (tmp_path / "m" / "model.pt").exists() and (tmp_path / "m" / "last.pt").exists()
    hyp = tmp_path / "hyp.txt"
    code, out, err = cli("decode", tmp_path / "m", dev_dir, "--out", hyp)
    assert code == 0, err
    assert out.startswith("PER ") and "over 8 utterances" in out
    lines = hyp.read_text().splitlines()
    assert [line.split()[0] for line in lines] == [f"d{i:03d}" for i in range(8)]
    code, out, err = cli("decode", tmp_path / "m", dev_dir, "--out", "-", "--quiet")
    assert code == 0 and out.splitlines() == lines and err == ""


def test_user_mistakes_give_one_line_and_exit_2(cli, stores, tmp_path):
    train_dir, dev_dir = stores
    code, _, err = cli("decode", tmp_path / "none", dev_dir)
    assert code == 2 and err.count("\n") == 1 and "no such file" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.pt").write_text("not a checkpoint")
    code, _, err = cli("decode", tmp_path / "junk", dev_dir)
    assert code == 2 and err.count("\n") == 1 and "not a readable cnn-mellin checkpoint" in err
    code, _, err = cli("--device", "cpu", "train", tmp_path / "missing", "--model-dir",
                       tmp_path / "m")
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    code, _, err = cli("--device", "cpu", "train", train_dir, "--model-dir", tmp_path / "m",
                       "--num-data-workers", "-1")
    assert code == 2 and "--num-data-workers" in err


def _train_process(ini, train_dir, dev_dir, model_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_mellin", "--read-ini", str(ini), "--device", "cpu", "train",
         str(train_dir), str(dev_dir), "--model-dir", str(model_dir), "--quiet"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )


@pytest.mark.slow
def test_sigkill_during_epoch_3_then_same_command_matches_straight_run(tmp_path):
    # big enough that an epoch takes a noticeable time, so the kill lands inside epoch 3
    train_dir = write_store(tmp_path / "train", 400, seed=5)
    dev_dir = write_store(tmp_path / "dev", 8, seed=6, prefix="d")
    ini = _ini(tmp_path / "tiny.ini", 4)

    straight = _train_process(ini, train_dir, dev_dir, tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()

    killed = _train_process(ini, train_dir, dev_dir, tmp_path / "killed")
    seconds = None
    for line in killed.stderr:
        if "epoch 2/4:" in line:
            seconds = float(line.split("skipped steps, ")[1].split()[0])
            break
    assert seconds is not None, "training never reported epoch 2"
    time.sleep(0.3 * seconds)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint_file(tmp_path / "killed" / "last.pt")["epoch"] == 2

    again = _train_process(ini, train_dir, dev_dir, tmp_path / "killed")
    err = again.stderr.read()
    assert again.wait(timeout=600) == 0, err
    assert "resuming" in err and "after epoch 2" in err

    a = load_checkpoint_file(tmp_path / "straight" / "last.pt")
    b = load_checkpoint_file(tmp_path / "killed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    for name, value in a["model"].items():
        assert torch.allclose(value, b["model"][name], rtol=0, atol=1e-6), name
    assert abs(a["history"][-1]["dev_error"] - b["history"][-1]["dev_error"]) <= 1e-6
