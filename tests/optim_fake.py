"""A cheap trial task for worker-loop tests (real storages and processes, no training).

Its value is a smooth function of a few parameters. It runs ``training.num_epochs``
epochs of ``FAKE_EPOCH_S`` seconds each (environment variable, default 0), writes an
epoch checkpoint so a retry resumes, and misbehaves on request: optimizer ``sgd`` runs
out of memory (message ``FAKE_OOM``), ``rmsprop`` reports a NaN, ``adamw`` raises the
error ``FAKE_ADAMW_ERROR`` names (``bug``, ``data``, ``config`` or ``longdata``: data this
configuration cannot use) when that is set. Memory needed: ``data.batch_size`` MB. It
does not import torch, so its worker processes start fast.
An epoch is ``FAKE_STEPS`` steps (default 1); the task stops on request after any step,
checkpointing it (file ``step``), and a retry goes on from there like ``asr`` does. With
``FAKE_RUN_LOG`` set, every run appends a line to that file (the scale bench counts them).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from pathlib import Path

from cnn_mellin.errors import ConfigError, DataConfigError, DataError
from cnn_mellin.tasks import MemoryFigure, Task, TaskResult
from cnn_mellin.tasks.base import TrialInterrupted

MB = 1_000_000


def fake_value(config) -> float:
    """The trial value of ``config``: best near learning rate 1e-3 and batch size 16."""
    lr = config["training.learning_rate"]
    return (math.log10(lr) + 3.0) ** 2 + abs(config["data.batch_size"] - 16) / 16


def _write(path: Path, value: int) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(value))
    os.replace(tmp, path)


class FakeTask(Task):
    name = "fake"
    STOPS_ON_REQUEST = True

    @classmethod
    def prepare(cls, options, config):
        data_dir = Path(options["data_dir"])
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: no such directory")
        return {"num_coeffs": 41, "data_dir": str(data_dir.resolve())}

    def check(self, config):
        if config["model.window_size"] < config["model.window_stride"]:
            raise ConfigError("window_size must be at least window_stride")

    def repair(self, config):
        if config["model.window_size"] < config["model.window_stride"]:
            return config.replace({"model.window_size": config["model.window_stride"]})
        return config

    def max_epochs(self, config, searched):
        return config["training.num_epochs"]

    def peak_memory(self, config, device):
        return MemoryFigure(config["data.batch_size"] * MB, "estimated")

    def run(self, config, context):
        epoch_s = float(os.environ.get("FAKE_EPOCH_S", "0"))
        if os.environ.get("FAKE_EPOCH_BY_BATCH"):  # larger batches are slower, as in training
            epoch_s *= config["data.batch_size"] / 16
        optimizer = config["training.optimizer"]
        error = os.environ.get("FAKE_ADAMW_ERROR") if optimizer == "adamw" else None
        if error == "bug":
            raise ZeroDivisionError("fake bug")
        if error == "data":
            raise DataError("fake data went missing")
        if error == "config":
            raise ConfigError("fake combination that cannot train")
        if error == "longdata":
            raise DataConfigError("fake utterances longer than the model's outputs")
        context.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get("FAKE_RUN_LOG"):  # one line per run: "pid trial checkpoint-folder"
            with open(os.environ["FAKE_RUN_LOG"], "a") as log:
                log.write(f"{os.getpid()} {context.trial_number} {context.checkpoint_dir.name}\n")
        state = context.checkpoint_dir / "epoch"
        start = int(state.read_text()) if state.exists() else 0
        steps = int(os.environ.get("FAKE_STEPS", "1"))
        step_file = context.checkpoint_dir / "step"
        step = int(step_file.read_text()) if step_file.exists() else start * steps
        resumed_step = step if step else None
        value = float(os.environ.get("FAKE_VALUE", fake_value(config)))
        epochs = config["training.num_epochs"]
        for epoch in range(1, start + 1):  # replayed: the kill may have come before the report
            context.report(epoch, value + 1 / epoch)
        for epoch in range(start + 1, epochs + 1):
            while step < epoch * steps:
                time.sleep(epoch_s / steps)
                step += 1
                if step < epoch * steps:
                    _write(step_file, step)
                    if context.stop_requested():
                        raise TrialInterrupted(f"stopped at step {step}", step=step)
            if optimizer == "sgd":
                raise MemoryError(os.environ.get("FAKE_OOM", "fake allocation failure"))
            _write(state, epoch)
            _write(step_file, step)
            if os.environ.get("FAKE_DIE_BEFORE_REPORT") == str(epoch):
                os.kill(os.getpid(), signal.SIGKILL)  # checkpointed, never reported
            context.report(epoch, float("nan") if optimizer == "rmsprop" else value + 1 / epoch)
            if epoch < epochs and context.stop_requested():
                raise TrialInterrupted(f"stopped at step {step}", step=step)
        return TaskResult(
            value=value, epochs=epochs, peak_bytes=config["data.batch_size"] * MB,
            resumed_from_epoch=start or None,
            resumed_from_step=resumed_step,
        )


class StubbornFakeTask(FakeTask):
    """The fake task that cannot stop on request (like ``command``): never asks."""

    name = "fake-stubborn"
    STOPS_ON_REQUEST = False

    def run(self, config, context):
        return super().run(config, dataclasses.replace(context, stop_requested=lambda: False))
