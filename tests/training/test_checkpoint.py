"""The resume checkpoint ``last.pt`` (cnn_mellin.training.checkpoint): RNG states, the
file's format, and the signature a restart must match."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cnn_mellin.config import Config
from cnn_mellin.errors import UserError
from cnn_mellin.modelfile import save_atomic
from cnn_mellin.training.checkpoint import (
    RESUME_FILE,
    check_signature,
    load_resume,
    rng_states,
    save_resume,
    set_rng_states,
)


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(),
            random.gauss(0, 1))


def _signature(config: Config | None = None, **data) -> dict:
    return {"config": (config or Config()).to_ini(comments=False), "train_utts": ["a", "b"],
            "dev_utts": ["c"], "data": ["fbank-81-10ms", 8], **data}


def test_restored_rng_states_repeat_every_generators_draws():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's state
    states = rng_states()
    first = _draws()
    _draws()
    set_rng_states(states)
    assert _draws() == first


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    states = rng_states()
    first = _draws()
    torch.save(states, tmp_path / "rng.pt")
    set_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == first


def test_saved_state_loads_back_with_its_signature(tmp_path):
    assert load_resume(tmp_path, _signature()) is None  # nothing saved yet
    save_resume(tmp_path, {"signature": _signature(), "epoch": 3,
                           "weights": torch.arange(4.0)})
    state = load_resume(tmp_path, _signature())
    assert state["epoch"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESUME_FILE]  # no temporary left


def test_a_torch_file_of_another_kind_is_refused(tmp_path):
    save_atomic({"epoch": 3}, tmp_path / RESUME_FILE)
    with pytest.raises(UserError, match="not a cnn-mellin resume checkpoint"):
        load_resume(tmp_path, _signature())


def test_another_configuration_is_refused_naming_what_differs(tmp_path):
    save_resume(tmp_path, {"signature": _signature()})
    changed = Config().replace({"training.learning_rate": 0.5, "data.batch_size": 3})
    with pytest.raises(UserError) as err:
        load_resume(tmp_path, _signature(changed))
    message = str(err.value)
    assert message.startswith(f"{tmp_path}: holds a checkpoint made with a different config")
    assert "data.batch_size" in message and "-> 3)" in message
    assert "training.learning_rate" in message and "-> 0.5)" in message
    assert "more" not in message


def test_many_differences_are_cut_to_five():
    old = Config()
    new = old.replace({"data.batch_size": old["data.batch_size"] + 1,
                       "data.eval_batch_size": old["data.eval_batch_size"] + 1,
                       "training.learning_rate": 0.5, "training.num_epochs": 1,
                       "training.seed": old["training.seed"] + 1,
                       "model.window_size": old["model.window_size"] + 2,
                       "model.recurrent_size": old["model.recurrent_size"] + 1})
    with pytest.raises(UserError, match=r"\(.*\) and 2 more; use another --model-dir"):
        check_signature(Path("m/last.pt"), _signature(old), _signature(new))


@pytest.mark.parametrize("key, what", [("train_utts", "training"), ("dev_utts", "dev"),
                                       ("data", "feature")])
def test_other_data_is_refused(key, what, tmp_path):
    save_resume(tmp_path, {"signature": _signature()})
    with pytest.raises(UserError, match=f"different {what} data"):
        load_resume(tmp_path, _signature(**{key: ["z"]}))


def test_a_parameter_declared_since_counts_as_its_default():
    full = _signature()
    lines = full["config"].splitlines()
    dropped = next(i for i, line in enumerate(lines) if line.startswith("learning_rate = "))
    stored = {**full, "config": "\n".join(lines[:dropped] + lines[dropped + 1:])}
    check_signature(Path("m/last.pt"), stored, full)  # the default: no complaint
    changed = _signature(Config().replace({"training.learning_rate": 0.5}))
    with pytest.raises(UserError, match=r"training.learning_rate \(.* -> 0.5\)"):
        check_signature(Path("m/last.pt"), stored, changed)
