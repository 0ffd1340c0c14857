"""The Optuna samplers and pruners a worker runs a study with."""

from __future__ import annotations

import warnings

import optuna

from cnn_mellin.errors import ConfigError
from cnn_mellin.optim.defaults import SAMPLERS
from cnn_mellin.optim.study import StudySettings
from cnn_mellin.tasks import Task


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    """The sampler called ``name`` (see :data:`SAMPLERS`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def make_pruner(settings: StudySettings, task: Task) -> optuna.pruners.BasePruner:
    """The pruner the study was initialised with."""
    if settings.pruner == "none":
        return optuna.pruners.NopPruner()
    # Both decide from half the epochs on: CTC models spend their first epochs in the
    # all-blank phase, where small models that plateau high lead, and an earlier rung prunes
    # the eventual winners (bench/replay.py, docs/benchmarks.md "Search efficiency").
    max_epochs = task.max_epochs(settings.config(), settings.searched)
    half = max(1, max_epochs // 2) if max_epochs else 1
    if settings.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=half)
    # with a minimum of half the epochs and a reduction factor of 3, hyperband has one
    # bracket whose only rung below the last epoch is at half: one decision per trial
    return optuna.pruners.HyperbandPruner(
        min_resource=half, max_resource=max_epochs if max_epochs else "auto", reduction_factor=3
    )


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler seed of one trial: reproducible per trial number, distinct across trials."""
    if seed is None:
        return None
    return (seed * 1_000_003 + number * 7_919 + 17) % (2**32)
