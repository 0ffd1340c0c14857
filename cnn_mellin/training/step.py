"""Optimiser steps of one epoch: augmentation, CTC loss, accumulation, clipping, mixed
precision, and skipping of steps whose loss or gradient is not finite.

Under fp16 loss scaling a non-finite gradient is usually the scale being too high:
``GradScaler`` skips that update and halves the scale. Such a back-off is counted on
its own, not as a bad step, while the scale is above 1; at a scale of 1 or less the
gradient is non-finite by itself and the step is bad (so a real NaN still ends in
``TrainingDiverged`` rather than halving the scale forever).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cnn_mellin.data.loader import is_loader_failure
from cnn_mellin.data.phones import BLANK
from cnn_mellin.training.checkpoint import rng_states
from cnn_mellin.training.precision import autocast_dtype, needs_loss_scaling

log = logging.getLogger(__name__)


class TrainingDiverged(Exception):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


class EpochInterrupted(Exception):
    """The epoch stopped between two optimiser steps because a stop was requested.

    ``batches`` of the epoch were consumed; ``partial`` holds the epoch's running sums,
    which :meth:`Stepper.run_epoch` takes back to finish the epoch as if never stopped.
    ``rng`` and ``gen`` are the RNG states at that step when the epoch went on past it
    (batches of the next step were drawn when a loader worker died); None: the current ones.
    """

    def __init__(self, batches: int, partial: dict, rng: dict | None = None,
                 gen: torch.Tensor | None = None):
        super().__init__(f"stopped after batch {batches}")
        self.batches = batches
        self.partial = partial
        self.rng = rng
        self.gen = gen


def _until_loader_failure(batches, stop, interrupted):
    """The batches of ``batches``; a loader worker that died while ``stop()`` is true ends
    the epoch as the stop (``interrupted()``'s EpochInterrupted), not as an error."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as err:
            if stop is None or not is_loader_failure(err) or not stop():
                raise
            log.warning("stopping: a data loader worker ended meanwhile (%s)", err)
            raise interrupted() from None
        yield batch


def ctc_feasible(targets: torch.Tensor, target_lens: torch.Tensor, out_lens: torch.Tensor):
    """Bool (N,): CTC can align each target (outputs >= target length + repeated neighbours)."""
    lmax = targets.shape[1]
    pos = torch.arange(1, lmax, device=targets.device)[None, :]
    repeats = ((targets[:, 1:] == targets[:, :-1]) & (pos < target_lens[:, None])).sum(1)
    return out_lens >= target_lens + repeats


def ctc_loss(log_probs, out_lens, targets, target_lens, valid):
    """Mean over ``valid`` (N,) sequences of the CTC loss divided by target length."""
    losses = F.ctc_loss(
        log_probs.float(), targets, out_lens, target_lens, blank=BLANK, reduction="none",
        zero_infinity=True,
    )
    losses = losses / target_lens.clamp(min=1).to(losses.dtype)
    return (losses * valid).sum() / valid.sum().clamp(min=1)


_MIN_BACKOFF_SCALE = 1.0  # at or below this loss scale a non-finite gradient is a bad step


@dataclass
class EpochStats:
    """What one epoch's steps did; gradient norms are before clipping, over applied steps."""

    train_loss: float
    skipped_steps: int
    lr: float
    grad_norm_mean: float = math.nan
    grad_norm_max: float = math.nan
    scaler_backoffs: int = 0


class Stepper:
    """Runs the optimiser steps of an epoch for a model under the ``training`` group.

    Keeps across epochs the loss scaler, the count of consecutive bad steps and the
    utterances CTC could not align (``impossible``).
    """

    def __init__(self, model, optimizer, schedule, params: dict[str, Any], device, augmenter,
                 impossible=()):
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.p, self.device, self.augmenter = params, device, augmenter
        self.amp_dtype = autocast_dtype(params, device)
        if params["mixed_precision"] and self.amp_dtype is None:
            log.info("mixed precision asked for but the device is %s: training in float32",
                     device)
        self.scaler = torch.amp.GradScaler(device.type,
                                           enabled=needs_loss_scaling(self.amp_dtype))
        self.bad_run = 0
        self.impossible = list(impossible)
        self.last_partial: dict = {}  # the running sums at the end of the last epoch

    def autocast(self):
        """Mixed-precision context (a no-op in float32)."""
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loss(self, batch, gen):
        """The batch's loss (None if no sequence in it can be aligned)."""
        feats, lens = batch.feats, batch.feat_lens
        if self.augmenter.active:
            feats, lens = self.augmenter(feats, lens, gen)
        with self.autocast():
            log_probs, out_lens = self.model(feats, lens)
        valid = ctc_feasible(batch.targets, batch.target_lens, out_lens)
        if not bool(valid.all()):
            for utt, ok in zip(batch.utt_ids, valid.tolist(), strict=True):
                if not ok and utt not in self.impossible:
                    self.impossible.append(utt)
                    log.warning("utterance %s: CTC cannot align its targets; skipped", utt)
        if not bool(valid.any()):
            return None
        return ctc_loss(log_probs, out_lens, batch.targets, batch.target_lens,
                        valid.to(torch.float32))

    def _update(self) -> tuple[str, float]:
        """Unscale, clip and apply the accumulated gradient.

        Returns ("applied" | "bad" | "backoff", gradient norm before clipping).
        """
        self.scaler.unscale_(self.optimizer)
        limit = self.p["max_grad_norm"] if self.p["max_grad_norm"] > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit))
        if not self.scaler.is_enabled():
            if not math.isfinite(norm):
                return "bad", norm
            self.optimizer.step()
            return "applied", norm
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
        self.scaler.update()
        if math.isfinite(norm):
            return "applied", norm
        return ("backoff" if scale > _MIN_BACKOFF_SCALE else "bad"), norm

    def run_epoch(
        self, loader, epoch: int, gen: torch.Generator, bar, *, start: int = 0,
        partial: dict | None = None, stop: Callable[[], bool] | None = None,
        started: Callable[[], None] | None = None,
    ) -> EpochStats:
        """One pass over ``loader``; raises TrainingDiverged after too many bad steps.

        ``start``/``partial``: the epoch is resumed after its first ``start`` batches (the
        loader yields from there) with the running sums an :class:`EpochInterrupted` gave.
        ``stop()`` is asked after every optimiser step; True raises EpochInterrupted.
        ``started()`` runs once the loader's iterator exists (which draws from the global
        RNG), so a resumed epoch can restore its RNG states after that draw. A loader worker
        that dies while ``stop()`` is true stops the epoch at its last optimiser step.
        """
        accumulation = self.p["grad_accumulation"]
        self.model.train()
        partial = partial or {}
        loss_sum = float(partial.get("loss_sum", 0.0))
        loss_count, skipped = int(partial.get("loss_count", 0)), int(partial.get("skipped", 0))
        rate = float(partial.get("rate", math.nan))
        norms: list[float] = list(partial.get("norms", []))
        backoffs = int(partial.get("backoffs", 0))
        bad, seen = False, 0
        self.optimizer.zero_grad(set_to_none=True)
        non_blocking = self.device.type == "cuda"

        def sums() -> dict:
            return {"loss_sum": loss_sum, "loss_count": loss_count, "skipped": skipped,
                    "rate": rate, "norms": list(norms), "backoffs": backoffs}

        step_at = None  # the last optimiser step: batches, sums, RNG states when accumulating

        def mark(batches_done: int) -> None:
            nonlocal step_at
            accumulating = accumulation > 1  # later batches of a step draw from the RNGs
            step_at = (batches_done, loss_sum, loss_count, skipped, rate, len(norms), backoffs,
                       rng_states() if accumulating else None,
                       gen.get_state() if accumulating else None)

        def interrupted() -> EpochInterrupted:
            done, *kept, num_norms, kept_backoffs, rng, gen_state = step_at
            at_step = dict(zip(("loss_sum", "loss_count", "skipped", "rate"), kept,
                               strict=True))
            at_step.update(norms=norms[:num_norms], backoffs=kept_backoffs)
            return EpochInterrupted(done, at_step, rng=rng, gen=gen_state)

        batches = iter(loader)
        if started is not None:
            started()
        mark(start)
        for index, batch in enumerate(_until_loader_failure(batches, stop, interrupted), start):
            loss = self._loss(batch.to(self.device, non_blocking=non_blocking), gen)
            if loss is not None:
                value = float(loss.detach())
                if math.isfinite(value):
                    self.scaler.scale(loss / accumulation).backward()
                    loss_sum, loss_count, seen = loss_sum + value, loss_count + 1, seen + 1
                else:
                    bad = True
            bar.update(1)
            if (index + 1) % accumulation and index + 1 < len(loader):
                continue
            rate = self.schedule.apply(self.optimizer)
            outcome = "bad" if bad else "applied"
            if not bad and seen:
                outcome, norm = self._update()
                if outcome == "applied":
                    norms.append(norm)
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
            bad, seen = False, 0
            if outcome == "applied":
                self.bad_run = 0
            elif outcome == "backoff":
                backoffs += 1
                log.debug("epoch %d step %d: fp16 gradient overflow, loss scale now %g", epoch,
                          self.schedule.steps, self.scaler.get_scale())
            else:
                skipped += 1
                self.bad_run += 1
                self.schedule.bad_step()
                log.debug("epoch %d step %d: non-finite loss or gradient, skipped", epoch,
                          self.schedule.steps)
                if self.bad_run >= self.p["max_bad_steps"]:
                    raise TrainingDiverged(
                        f"{self.bad_run} consecutive optimiser steps with a non-finite loss or "
                        f"gradient (epoch {epoch}, learning rate {rate:.3g})"
                    )
            bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.3f}", refresh=False)
            if stop is not None and stop():
                raise EpochInterrupted(index + 1, sums())
            mark(index + 1)
        self.last_partial = sums()
        return EpochStats(
            loss_sum / loss_count if loss_count else math.nan, skipped, rate,
            sum(norms) / len(norms) if norms else math.nan, max(norms, default=math.nan),
            backoffs,
        )
