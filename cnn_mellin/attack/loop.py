"""The attack's loop: a dummy input optimised, chunk by chunk and restart by restart, until
the gradient it induces matches the one the victim shared (:func:`invert`).

Threat model: the attacker knows the victim (a ``model.pt`` of ``cnn-mellin train``), one
utterance's length and phone targets, and sees the gradient of that utterance's CTC loss
with respect to every parameter, as the victim shares it (after the ``defence`` group's
noise, sparsification or dropout). The objective and its gradient are
:mod:`cnn_mellin.attack.objective`'s.

The dummy lives in the victim's normalised feature space (``z = (x - mean) / std``), where
MAE and SNR are measured. With ``attack.grid_size`` the dummy is optimised one chunk of
frames at a time (optimiser and schedule reset per chunk) while the full gradient is
matched. With ``attack.restarts`` the whole attack runs again from other starts, and the
restart whose final gradient distance is smallest wins (the attacker never sees the truth).
A checkpoint is written after each chunk: a restarted attack skips the chunks already done
and ends with the same reconstruction.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnn_mellin.attack.objective import Objective, shared_gradient, top_mask
from cnn_mellin.modelfile import save_atomic


class AttackDiverged(Exception):
    """More non-finite steps in a chunk than ``attack.max_bad_steps``."""


def initial_dummy(shape, kind: str, mean: torch.Tensor, std: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """The starting dummy in normalised space."""
    if kind == "uniform":
        return torch.rand(shape, generator=generator) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator)
    if kind == "zeros":  # raw features of zero
        return (-mean / std).expand(shape).clone()
    return torch.zeros(shape)  # the dataset mean


def chunks(num_frames: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: the whole utterance when ``size`` is 0."""
    if size <= 0 or size >= num_frames:
        return [(0, num_frames)]
    step = max(1, size - min(overlap, size - 1))
    spans, start = [], 0
    while True:
        end = min(start + size, num_frames)
        spans.append((start, end))
        if end == num_frames:
            return spans
        start += step


def mae(z: torch.Tensor, truth: torch.Tensor) -> float:
    return float((z - truth).abs().mean())


def snr_db(z: torch.Tensor, truth: torch.Tensor) -> float:
    """10 log10(power of the truth / power of the error), in normalised space."""
    error = float(((z - truth) ** 2).sum())
    signal = float((truth ** 2).sum())
    return math.inf if error == 0 else 10 * math.log10(max(signal, 1e-30) / error)


def start_dummy(shape, attack: Mapping[str, Any], mean: torch.Tensor, std: torch.Tensor,
                restart: int) -> torch.Tensor:
    """The starting dummy of restart ``restart`` (0-based): ``attack.init``, drawn from a
    generator of its own (so a resumed attack draws the same); restarts after the first of
    the fixed starts (``zeros``, ``mean``) add Gaussian noise of standard deviation 1."""
    generator = torch.Generator().manual_seed(int(attack["seed"]) + 7919 * (restart + 1))
    z = initial_dummy(shape, attack["init"], mean, std, generator)
    if restart > 0 and attack["init"] in ("zeros", "mean"):
        z = z + torch.randn(shape, generator=generator)
    return z


@dataclass
class AttackResult:
    """A reconstruction and how it went; ``curve`` rows: (step, loss, mae) over all restarts
    and chunks; ``distances``: each restart's final gradient distance; ``restart``: the
    winner's index."""

    z: torch.Tensor
    mae: float
    snr_db: float
    bad_steps: int
    steps: int
    seconds: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    resumed_chunks: int = 0
    distances: list[float] = field(default_factory=list)
    restart: int = 0

    @property
    def distance(self) -> float:
        """The winner's final gradient distance."""
        return self.distances[self.restart]


def _optimizer(name: str, params, lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=10)


def _schedule(name: str, optimizer, iterations: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [iterations // 2, 3 * iterations // 4], gamma=0.1
        )
    return None


def optimise_chunk(objective: Objective, attack: Mapping[str, Any], z: torch.Tensor,
                   start: int, end: int, record) -> tuple[torch.Tensor, int]:
    """The optimised frames ``start:end`` of ``z`` and the number of non-finite steps.

    Stops early once more steps than ``max_bad_steps`` were non-finite (skipped).
    ``record(it, dummy, loss)`` is called every ``eval_every`` steps and at the end.
    """
    iterations, every = int(attack["iterations"]), int(attack["eval_every"])
    lbfgs = attack["optimizer"] == "lbfgs"
    part = z[:, start:end].clone().requires_grad_(True)
    optimizer = _optimizer(attack["optimizer"], [part], float(attack["learning_rate"]))
    schedule = _schedule(attack["lr_schedule"], optimizer, iterations)
    last, bad = [math.nan], 0

    def closure():
        optimizer.zero_grad()
        total, grad = objective.loss_and_grad(z, start, end, part)
        finite = bool(torch.isfinite(total)) and bool(torch.isfinite(grad).all())
        if not finite:
            grad.zero_()
        elif attack["normalise_steps"] and not lbfgs:
            grad.div_(grad.norm().clamp_min(1e-12))
        part.grad = grad
        last[0] = float(total) if finite else math.nan
        return total

    for it in range(1, iterations + 1):
        if lbfgs:
            optimizer.step(closure)
        else:
            closure()
            if math.isfinite(last[0]):
                optimizer.step()
        if not math.isfinite(last[0]):
            bad += 1
            with torch.no_grad():  # L-BFGS may have stepped into NaNs: undo them
                part.nan_to_num_(0.0, 0.0, 0.0)
            if bad > int(attack["max_bad_steps"]):
                break
        if schedule is not None:
            schedule.step()
        if it % every == 0 or it == iterations:
            with torch.no_grad():
                record(it, torch.cat([z[:, :start], part, z[:, end:]], 1), last[0])
    return part.detach(), bad


def invert(
    model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor,
    attack: Mapping[str, Any], defence: Mapping[str, Any], *,
    checkpoint: Path | None = None, on_point: Callable[[int, float, float], None] | None = None,
) -> AttackResult:
    """Reconstruct ``feats`` (1, T, F raw) from the gradient its ``targets`` (S,) induce.

    ``attack``/``defence``: the groups' values (short names). ``on_point(step, loss, mae)``
    is called every ``eval_every`` steps (step counts over all restarts and chunks) and again
    for the restored points of a resumed run. ``checkpoint`` (a file) is written after each
    chunk.
    """
    started = time.monotonic()
    model.eval()
    generator = torch.Generator().manual_seed(int(attack["seed"]))
    target_grads = shared_gradient(model, feats, targets, defence, generator)
    masks = None
    if float(attack["top_fraction"]) < 1.0:
        masks = top_mask(target_grads, float(attack["top_fraction"]))
    mean, std = model.feat_mean.detach(), model.feat_std.detach()
    truth = ((feats - mean) / std).detach()
    spans = chunks(truth.shape[1], int(attack["grid_size"]), int(attack["grid_overlap"]))
    iterations, restarts = int(attack["iterations"]), int(attack["restarts"])
    state = {"restart": 0, "done": 0, "z": None, "curve": [], "bad": 0, "distances": [],
             "best": None}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if on_point is not None:
            for step, loss, err in state["curve"]:
                on_point(int(step), float(loss), float(err))
    resumed = int(state["restart"]) * len(spans) + int(state["done"])
    curve = [tuple(c) for c in state["curve"]]
    objective = Objective(model, targets, target_grads, masks, attack, mean, std)

    def record(step: int, dummy: torch.Tensor, loss: float) -> None:
        point = (step, loss, mae(dummy, truth))
        curve.append(point)
        if on_point is not None:
            on_point(*point)

    def save(**changes) -> None:
        state.update(changes, curve=curve)
        if checkpoint is not None:
            save_atomic(state, checkpoint)

    for restart in range(int(state["restart"]), restarts):
        z = state["z"]
        if z is None:
            z = start_dummy(truth.shape, attack, mean, std, restart)
        for index in range(int(state["done"]), len(spans)):
            start, end = spans[index]
            base = (restart * len(spans) + index) * iterations
            part, bad = optimise_chunk(
                objective, attack, z, start, end,
                lambda it, dummy, loss, base=base: record(base + it, dummy, loss),
            )
            if bad > int(attack["max_bad_steps"]):
                raise AttackDiverged(
                    f"{bad} non-finite steps in chunk {index + 1} of {len(spans)}"
                    + (f", restart {restart + 1} of {restarts}" if restarts > 1 else ""))
            z = torch.cat([z[:, :start], part, z[:, end:]], 1)
            save(done=index + 1, z=z, bad=int(state["bad"]) + bad)
        distance = objective.distance(z)
        distances = [*state["distances"], distance if math.isfinite(distance) else math.inf]
        best = state["best"]
        if best is None or distances[-1] < distances[int(best["restart"])]:
            best = {"restart": restart, "z": z}
        save(restart=restart + 1, done=0, z=None, distances=distances, best=best)
    z = state["best"]["z"]
    return AttackResult(
        z=z, mae=mae(z, truth), snr_db=snr_db(z, truth), bad_steps=int(state["bad"]),
        steps=restarts * len(spans) * iterations, seconds=time.monotonic() - started,
        curve=curve, resumed_chunks=resumed, distances=list(state["distances"]),
        restart=int(state["best"]["restart"]),
    )
