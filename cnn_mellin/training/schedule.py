"""Optimisers by name and the learning-rate schedule (warmup, then none / cosine / plateau)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from cnn_mellin.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


def make_optimizer(
    parameters: Iterable[torch.nn.Parameter], name: str, learning_rate: float,
    weight_decay: float = 0.0, momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """One of adam, adamw, sgd, rmsprop with the given settings."""
    parameters = list(parameters)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(
            parameters, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
    if name == "rmsprop":
        return torch.optim.RMSprop(
            parameters, lr=learning_rate, momentum=momentum, weight_decay=weight_decay
        )
    raise ConfigError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def optimizer_from_params(parameters, params: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The optimiser the ``training`` group (short names) asks for."""
    return make_optimizer(
        parameters, params["optimizer"], params["learning_rate"], params["weight_decay"],
        params["momentum"],
    )


class LRSchedule:
    """Learning rate per optimiser step: linear warmup, then a constant, cosine or plateau rate.

    ``step()`` after every optimiser step (skipped ones too, so the schedule depends on
    the epoch structure only); ``epoch_end(value)`` after each epoch with the monitored
    error (only the plateau schedule uses it); ``bad_step()`` after a step skipped for a
    non-finite loss or gradient scales every later rate by ``bad_step_lr_factor``. Warmup
    lasts ``warmup_steps`` steps, or ``warmup_epochs`` epochs when that is 0. State is
    plain numbers.
    """

    def __init__(self, params: Mapping[str, Any], steps_per_epoch: int):
        self.base_lr = params["learning_rate"]
        self.kind = params["lr_schedule"]
        self.final_ratio = params["final_lr_ratio"]
        self.factor = params["reduce_lr_factor"]
        self.patience = params["reduce_lr_patience"]
        self.threshold = params["reduce_lr_threshold"]
        self.cooldown = params["reduce_lr_cooldown"]
        self.burnin = params["reduce_lr_burnin"]
        self.bad_step_factor = params["bad_step_lr_factor"]
        self.warmup_steps = params["warmup_steps"] or round(
            params["warmup_epochs"] * steps_per_epoch)
        self.total_steps = max(params["num_epochs"] * steps_per_epoch, 1)
        self.steps = 0
        self.epochs = 0
        self.scale = 1.0
        self.best = math.inf
        self.bad_epochs = 0
        self.cooldown_left = 0
        self.bad_scale = 1.0

    def lr(self) -> float:
        """The rate for the next optimiser step."""
        rate = self.base_lr
        if self.warmup_steps > 0 and self.steps < self.warmup_steps:
            rate *= (self.steps + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(max(self.steps - self.warmup_steps, 0) / span, 1.0)
            cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
            rate *= self.final_ratio + (1.0 - self.final_ratio) * cosine
        elif self.kind == "plateau":
            rate *= self.scale
        return rate * self.bad_scale

    def apply(self, optimizer: torch.optim.Optimizer) -> float:
        """Set the optimiser's rate for the next step; returns it."""
        rate = self.lr()
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate

    def step(self) -> None:
        self.steps += 1

    def bad_step(self) -> None:
        """A step was skipped for a non-finite loss or gradient: lower every later rate."""
        self.bad_scale *= self.bad_step_factor

    def epoch_end(self, value: float) -> None:
        """Plateau bookkeeping with the epoch's monitored error (non-finite counts as worse)."""
        self.epochs += 1
        if self.kind != "plateau" or self.epochs <= self.burnin:
            return
        if math.isfinite(value) and value < self.best - self.threshold:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.cooldown_left = self.cooldown
            self.bad_epochs = 0

    _STATE = ("steps", "epochs", "scale", "best", "bad_epochs", "cooldown_left", "bad_scale")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE}

    def load_state_dict(self, state: Mapping) -> None:
        for k in self._STATE:
            # checkpoints older than bad_scale hold no entry for it: 1.0 is what they ran with
            setattr(self, k, state.get(k, 1.0) if k == "bad_scale" else state[k])
