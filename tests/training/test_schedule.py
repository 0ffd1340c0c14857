"""Optimisers by name and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from cnn_mellin.errors import ConfigError
from cnn_mellin.training.schedule import OPTIMIZERS, LRSchedule, make_optimizer

BASE = {
    "learning_rate": 1.0, "lr_schedule": "none", "final_lr_ratio": 0.1, "warmup_epochs": 0.0,
    "num_epochs": 10, "reduce_lr_factor": 0.5, "reduce_lr_patience": 1,
    "reduce_lr_threshold": 0.0, "reduce_lr_cooldown": 0, "reduce_lr_burnin": 0,
    "warmup_steps": 0, "bad_step_lr_factor": 1.0,
}


def _rates(params, steps):
    s = LRSchedule(params, steps_per_epoch=10)
    out = []
    for _ in range(steps):
        out.append(s.lr())
        s.step()
    return out


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_builds_and_steps(name):
    w = torch.nn.Parameter(torch.ones(3))
    opt = make_optimizer([w], name, 0.1, weight_decay=0.01, momentum=0.5)
    (w**2).sum().backward()
    opt.step()
    assert (w < 1).all()
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="allowed: adam, adamw, sgd, rmsprop"):
        make_optimizer([torch.nn.Parameter(torch.ones(1))], "adagrad", 0.1)


def test_linear_warmup_then_constant():
    rates = _rates({**BASE, "warmup_epochs": 0.5}, 20)  # 5 warmup steps
    assert rates[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert rates[5:] == pytest.approx([1.0] * 15)


def test_cosine_decays_from_peak_to_final_ratio_over_all_epochs():
    rates = _rates({**BASE, "lr_schedule": "cosine", "warmup_epochs": 1.0}, 100)
    assert rates[9] == pytest.approx(1.0)  # end of warmup: the peak
    assert all(a >= b for a, b in zip(rates[10:-1], rates[11:], strict=True))
    assert rates[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    s = LRSchedule({**BASE, "lr_schedule": "cosine"}, steps_per_epoch=10)
    s.steps = 100
    assert s.lr() == pytest.approx(0.1)


def test_plateau_reduces_after_patience_with_cooldown_and_burnin():
    params = {**BASE, "lr_schedule": "plateau", "reduce_lr_patience": 1, "reduce_lr_cooldown": 1,
              "reduce_lr_burnin": 1}
    s = LRSchedule(params, steps_per_epoch=1)
    scales = []
    for value in [0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4]:
        s.epoch_end(value)
        scales.append(s.lr())
    # epoch 1 is burn-in; 0.5 is the best at epoch 2; epochs 3, 4 bad -> halve at 4;
    # epoch 5 cooldown; epochs 6, 7 bad -> halve at 7; improvement at 8 keeps it
    assert scales == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25])


def test_plateau_threshold_and_non_finite_values_count_as_no_improvement():
    params = {**BASE, "lr_schedule": "plateau", "reduce_lr_patience": 0,
              "reduce_lr_threshold": 0.05}
    s = LRSchedule(params, steps_per_epoch=1)
    s.epoch_end(0.5)
    assert s.lr() == 1.0
    s.epoch_end(0.47)  # better, but not by more than the threshold
    assert s.lr() == 0.5
    s.epoch_end(math.nan)
    assert s.lr() == 0.25


def test_state_round_trip_continues_identically():
    params = {**BASE, "lr_schedule": "plateau", "warmup_epochs": 0.3}
    a = LRSchedule(params, steps_per_epoch=10)
    for value in [0.5, 0.6, 0.7]:
        for _ in range(10):
            a.step()
        a.epoch_end(value)
    b = LRSchedule(params, steps_per_epoch=10)
    b.load_state_dict(torch.load(_saved(a.state_dict()), weights_only=True))
    for value in [0.8, 0.3]:
        a.epoch_end(value)
        b.epoch_end(value)
        assert a.lr() == b.lr()


def _saved(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
