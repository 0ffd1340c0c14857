"""Search space: distributions, white/blacklists, parameters that cannot matter, suggest."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from cnn_mellin.config import Config, parameters
from cnn_mellin.errors import ConfigError
from cnn_mellin.optim import space


def test_distributions_follow_declarations():
    params = parameters()
    lr = space.distribution(params["training.learning_rate"])
    assert isinstance(lr, FloatDistribution) and lr.log
    assert (lr.low, lr.high) == (params["training.learning_rate"].search.low,
                                 params["training.learning_rate"].search.high)
    assert isinstance(space.distribution(params["model.convolutional_layers"]), IntDistribution)
    assert isinstance(space.distribution(params["training.optimizer"]), CategoricalDistribution)
    mellin = space.distribution(params["model.convolutional_mellin"])
    assert set(mellin.choices) == {False, True}


def test_recipe_blacklist_keeps_model_parameters_only():
    base = dict(Config())
    chosen = space.select(
        base, 81, blacklist=["training.*", "data.*", "model.convolutional_mellin"]
    )
    assert chosen.names and all(n.startswith("model.") for n in chosen.names)
    assert "model.convolutional_mellin" not in chosen.names
    # raw-audio windows cannot matter for 81 coefficients, and are named as dropped
    assert "model.raw_window_size" in chosen.dropped
    assert "model.window_size" in chosen.names


def test_raw_audio_drops_frequency_parameters():
    chosen = space.select(dict(Config()), 1, whitelist=["model.*", "training.*freq.*"])
    assert "model.raw_window_size" in chosen.names
    for name in ("model.window_size", "model.convolutional_kernel_freq",
                 "training.num_freq_masks", "training.max_freq_warp"):
        assert name in chosen.dropped and name not in chosen.names


def test_dependent_parameter_kept_when_its_switch_is_searched():
    base = dict(Config())  # no time masks in the base configuration
    searched = space.select(base, 81, whitelist=["training.num_time_masks",
                                                 "training.max_time_mask"])
    assert searched.names == ("training.num_time_masks", "training.max_time_mask")
    alone = space.select(base, 81, whitelist=["training.num_time_masks", "training.max_.*"])
    assert "training.max_time_mask" in alone.names
    with pytest.raises(ConfigError, match="every match was dropped"):
        space.select(base, 81, whitelist=["training.max_time_mask"])


def test_momentum_dropped_unless_optimizer_can_use_it():
    base = dict(Config({"training.optimizer": "adam"}))
    assert "training.momentum" in space.select(
        base, 81, whitelist=["training.momentum", "training.learning_rate"]).dropped
    assert "training.momentum" in space.select(
        base, 81, whitelist=["training.momentum", "training.optimizer"]).names


def test_whitelist_errors():
    with pytest.raises(ConfigError, match="matches no parameter"):
        space.select(dict(Config()), 81, whitelist=["nothing.*"])
    with pytest.raises(ConfigError, match="bad regular expression"):
        space.select(dict(Config()), 81, whitelist=["model.(("])
    partial = space.select(dict(Config()), 81, whitelist=["model.dropout", "nope"])
    assert partial.names == ("model.dropout",) and partial.unmatched == ("nope",)


def test_untunable_whitelisted_parameter_is_reported():
    chosen = space.select(dict(Config()), 81, whitelist=["training.seed", "model.dropout"])
    assert chosen.names == ("model.dropout",) and "training.seed" in chosen.dropped


def test_suggest_stays_inside_the_declared_ranges():
    names = space.select(dict(Config()), 81, blacklist=[]).names
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    params = parameters()
    for _ in range(20):
        trial = study.ask()
        values = space.suggest(trial, names)
        assert list(values) == list(names)
        Config(values)  # every value passes the parameter's own checks
        for name, value in values.items():
            search = params[name].search
            if search.choices is not None:
                assert value in search.choices
            elif params[name].type is not bool:
                assert search.low <= value <= search.high
        study.tell(trial, 0.0)
