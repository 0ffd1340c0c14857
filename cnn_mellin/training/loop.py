"""The CTC training loop: epochs, robust steps, dev scoring, best model, resume, callbacks.

Every random choice in epoch ``e`` (dropout, augmentation, shuffling) is derived from
``(training.seed, e)``, and each epoch ends with an atomic checkpoint, so a run
restarted after being killed repeats the uninterrupted run exactly (on CPU). A run asked
to stop (``stop_requested``, e.g. SIGTERM before a time limit) also checkpoints between two
optimiser steps of an epoch, with the epoch's position, running sums and RNG states, and
a restart goes on from that step with the same weights as an uninterrupted run. The
per-epoch history in that checkpoint is also written to ``metrics.jsonl``
(:mod:`cnn_mellin.training.metrics`).
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cnn_mellin.config import Config
from cnn_mellin.data.phones import BLANK
from cnn_mellin.decoding import decode_batches
from cnn_mellin.errors import DataConfigError, DataError, UserError
from cnn_mellin.modelfile import MODEL_FILE, write_model_file
from cnn_mellin.scoring import error_counts
from cnn_mellin.training.augment import Augmenter
from cnn_mellin.training.checkpoint import load_resume, rng_states, save_resume, set_rng_states
from cnn_mellin.training.metrics import peak_memory_bytes, write_metrics
from cnn_mellin.training.schedule import LRSchedule, optimizer_from_params
from cnn_mellin.training.step import EpochInterrupted, Stepper, TrainingDiverged

__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a call to :func:`train` achieved (also when it only resumed a finished run)."""

    best_dev_error: float
    final_dev_error: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    skipped_steps_total: int = 0
    resumed_from_epoch: int | None = None
    resumed_from_step: int | None = None
    model_path: Path | None = None
    impossible_utts: list[str] = field(default_factory=list)
    stopped_early: bool = False


class TrainingInterrupted(Exception):
    """Training stopped because a stop was requested, after checkpointing where it was.

    ``epoch`` is the epoch it was in (``batches`` of it done; 0: between epochs) and
    ``step`` the optimiser steps taken in all.
    """

    def __init__(self, epoch: int, batches: int, step: int):
        where = f"epoch {epoch}, batch {batches}" if batches else f"before epoch {epoch}"
        super().__init__(f"training stopped at step {step} ({where})")
        self.epoch, self.batches, self.step = epoch, batches, step


def _cpu_seconds() -> float:
    """CPU time of this process (all threads), user plus system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def _resolve_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"invalid device {device!r}; allowed: cpu, cuda, cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but CUDA is not available here")
    return dev


def _datasets(train_dir, dev_dir, train_utts, dev_utts):
    from cnn_mellin.data.loader import UtteranceDataset

    train_ds = UtteranceDataset(train_dir, utt_ids=train_utts)
    if dev_dir is not None:
        dev_ds = UtteranceDataset(dev_dir, utt_ids=dev_utts)
    elif dev_utts is not None:
        if train_utts is None:
            raise UserError("dev utterances taken from the training data need train_utts too")
        overlap = set(train_utts) & set(dev_utts)
        if overlap:
            raise DataError(
                f"{len(overlap)} utterances are in both the training and dev sets, e.g. "
                f"{sorted(overlap)[0]}"
            )
        dev_ds = UtteranceDataset(train_dir, utt_ids=dev_utts)
    else:
        dev_ds = None
    if dev_ds is not None and dev_ds.info.num_coeffs != train_ds.info.num_coeffs:
        raise DataError(
            f"dev data has {dev_ds.info.num_coeffs} coefficients per frame, training data "
            f"{train_ds.info.num_coeffs}"
        )
    return train_ds, dev_ds


def _drop_impossible(model, dataset, train_dir):
    """Training utterances whose targets are longer than the model's output (reported)."""
    from cnn_mellin.data.loader import UtteranceDataset

    out_lens = model.output_lengths(torch.tensor(dataset.num_frames)).cpu().tolist()
    bad = [
        u for u, n, length in zip(dataset.utt_ids, out_lens, dataset.num_targets, strict=True)
        if n < length
    ]
    if not bad:
        return dataset, []
    if len(bad) == len(dataset.utt_ids):
        raise DataConfigError(
            f"{train_dir}: every utterance has more target phones than the model has output "
            "frames; lower model.window_stride or other downsampling"
        )
    log.warning(
        "%d training utterances have more phones than model outputs and are left out "
        "(CTC cannot align them), e.g. %s", len(bad), ", ".join(bad[:5]),
    )
    dropped = set(bad)
    return UtteranceDataset(train_dir, [u for u in dataset.utt_ids if u not in dropped]), bad


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only on a terminal
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False)


def _score(model, loader, device, autocast) -> float:
    """Dev error: 39-phone PER of greedy decoding."""
    with autocast():
        pairs = decode_batches(model, loader, device)
    errors, total = error_counts([r for r, _ in pairs.values()], [h for _, h in pairs.values()])
    return errors / total if total else math.nan


def train(
    config: Config, train_dir, dev_dir=None, model_dir=None, device="cpu", *,
    train_utts: Sequence[str] | None = None, dev_utts: Sequence[str] | None = None,
    epoch_callback: Callable[[int, float, float], None] | None = None,
    num_workers: int = 0, progress: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the acoustic model of ``config`` with CTC on ``train_dir``; see the module doc.

    The dev error (39-phone PER, greedy decoding) is measured after every epoch on
    ``dev_dir`` (or ``dev_utts`` of ``train_dir``); without dev data the training loss
    takes its place for model selection, schedules and early stopping, and the dev
    error is reported as NaN. ``model_dir/model.pt`` is the best epoch by that measure;
    ``model_dir/last.pt`` resumes training; ``model_dir/metrics.jsonl`` has one line per
    epoch (the ``history`` entries).

    ``epoch_callback(epoch, train_loss, dev_error)`` runs after each epoch's checkpoint; on
    resume it is first replayed for the epochs restored from the checkpoint, since a process
    killed between writing a checkpoint and the callback would otherwise lose that epoch's
    report. Callers that keep reports across restarts must ignore repeats.

    ``stop_requested()`` is asked after every optimiser step and between epochs; once it
    is true, ``last.pt`` is written for that step and :class:`TrainingInterrupted` raised.
    A data loader worker that dies while it is true (a cancelled job signals every process)
    stops training the same way, at the last optimiser step, instead of failing it. Loader
    workers are shut down before this returns or raises.
    """
    from cnn_mellin.data.loader import close_loader, is_loader_failure, make_loader
    from cnn_mellin.model import AcousticModel, check_model_config

    if model_dir is None:
        raise UserError("train needs a model directory (--model-dir)")
    if num_workers < 0:
        raise UserError(f"number of data workers must be >= 0, got {num_workers}")
    model_dir = Path(model_dir)
    dev = _resolve_device(device)
    tp = config.group("training")
    seed = tp["seed"]

    train_ds, dev_ds = _datasets(train_dir, dev_dir, train_utts, dev_utts)
    info = train_ds.info
    check_model_config(config.group("model"), info.num_coeffs)
    torch.manual_seed(seed)
    model = AcousticModel(
        config.group("model"), info.num_coeffs, num_classes=BLANK + 1, mean=info.mean,
        std=info.std,
    )
    train_ds, impossible = _drop_impossible(model, train_ds, train_dir)
    model.to(dev)

    subset = config["data.subset"]
    loader = make_loader(
        train_ds, config["data.batch_size"], num_workers=num_workers, shuffle=True, seed=seed,
        num_buckets=config["data.num_buckets"], subset=subset if subset < 1.0 else None,
    )
    dev_loader = None
    if dev_ds is not None:
        dev_loader = make_loader(
            dev_ds, config["data.eval_batch_size"], num_workers=num_workers, shuffle=False,
            num_buckets=config["data.num_buckets"],
        )
    steps_per_epoch = math.ceil(len(loader) / tp["grad_accumulation"])
    optimizer = optimizer_from_params(model.parameters(), tp)
    schedule = LRSchedule(tp, steps_per_epoch)
    config_ini = config.to_ini(comments=False)
    signature = {
        "config": config_ini,
        "train_utts": list(train_ds.utt_ids),
        "dev_utts": list(dev_ds.utt_ids) if dev_ds is not None else [],
        "data": [str(info.feature), int(info.num_coeffs)],
    }

    model_dir.mkdir(parents=True, exist_ok=True)
    state = load_resume(model_dir, signature)
    history: list[dict] = []
    best = {"error": math.inf, "epoch": 0}
    early = {"best": math.inf, "bad": 0}
    skipped_total, stopped, epoch = 0, False, 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_states(state["rng"])
        history = list(state["history"])
        best, early = dict(state["best"]), dict(state["early"])
        skipped_total, stopped = int(state["skipped_total"]), bool(state["stopped"])
        impossible = list(state["impossible"])
        epoch = int(state["epoch"])
        mid = state.get("mid_epoch")
        if mid is not None:
            log.info("resuming %s in epoch %d after batch %d (step %d)", model_dir,
                     mid["epoch"], mid["batches"], schedule.steps)
        else:
            log.info("resuming %s after epoch %d", model_dir, epoch)
    stepper = Stepper(model, optimizer, schedule, tp, dev, Augmenter(tp, info.mean, info.std),
                      impossible)
    mid = None
    if state is not None:
        stepper.scaler.load_state_dict(state["scaler"])
        mid = state.get("mid_epoch")
    resumed_from = epoch if state is not None else None
    resumed_step = schedule.steps if state is not None else None
    write_metrics(model_dir, history)  # drops lines of epochs the checkpoint does not hold

    if epoch_callback is not None:
        for past in history:
            epoch_callback(past["epoch"], past["train_loss"], past["dev_error"])

    gen = torch.Generator()
    num_epochs = tp["num_epochs"]
    def checkpoint(done_epochs: int, mid_epoch: dict | None = None, rng=None) -> None:
        save_resume(model_dir, {
            "signature": signature, "epoch": done_epochs, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "scaler": stepper.scaler.state_dict(),
            "rng": rng if rng is not None else rng_states(), "history": history,
            "best": best, "early": early, "skipped_total": skipped_total, "stopped": stopped,
            "impossible": stepper.impossible,
            **({"mid_epoch": mid_epoch} if mid_epoch is not None else {}),
        })

    def stop_in_epoch(batches: int, partial: dict, began: float, cpu_began: float,
                      gen_state=None, rng=None) -> TrainingInterrupted:
        checkpoint(epoch - 1, {
            "epoch": epoch, "batches": batches, "partial": partial,
            "gen": gen_state if gen_state is not None else gen.get_state(),
            "bad_run": stepper.bad_run, "seconds": time.perf_counter() - began,
            "cpu_seconds": _cpu_seconds() - cpu_began,
        }, rng=rng)
        log.info("stopped in epoch %d after batch %d (step %d); %s resumes there",
                 epoch, batches, schedule.steps, model_dir / "last.pt")
        return TrainingInterrupted(epoch, batches, schedule.steps)

    try:
        while epoch < num_epochs and not stopped:
            if stop_requested is not None and stop_requested():
                raise TrainingInterrupted(epoch + 1, 0, schedule.steps)  # last.pt is this epoch's
            epoch += 1
            began, cpu_began = time.perf_counter(), _cpu_seconds()
            torch.manual_seed(_epoch_seed(seed, epoch))
            gen.manual_seed(_epoch_seed(seed, epoch) + 1)
            resume = mid if mid is not None and mid["epoch"] == epoch else None
            mid = None
            start = int(resume["batches"]) if resume else 0
            loader.batch_sampler.set_epoch(epoch, start)

            def restore(resume=resume):
                set_rng_states(state["rng"])
                gen.set_state(resume["gen"])
                stepper.bad_run = int(resume["bad_run"])

            if resume:
                began -= resume["seconds"]
                cpu_began -= resume["cpu_seconds"]
            try:
                with _progress(len(loader), progress, f"epoch {epoch}/{num_epochs}") as bar:
                    stats = stepper.run_epoch(
                        loader, epoch, gen, bar, start=start,
                        partial=resume["partial"] if resume else None, stop=stop_requested,
                        started=restore if resume else None,
                    )
            except EpochInterrupted as cut:
                raise stop_in_epoch(cut.batches, cut.partial, began, cpu_began, cut.gen,
                                    cut.rng) from None
            try:
                dev_error = _score(model, dev_loader, dev, stepper.autocast) if dev_loader \
                    else math.nan
            except RuntimeError as err:  # every batch trained: resume by scoring the epoch
                if stop_requested is None or not is_loader_failure(err) or \
                        not stop_requested():
                    raise
                log.warning("stopping: a data loader worker ended meanwhile (%s)", err)
                raise stop_in_epoch(len(loader), stepper.last_partial, began,
                                    cpu_began) from None
            monitor = dev_error if dev_loader else stats.train_loss
            schedule.epoch_end(monitor)
            skipped_total += stats.skipped_steps
            history.append({
                "epoch": epoch, "train_loss": stats.train_loss, "dev_error": dev_error,
                "lr": stats.lr, "grad_norm_mean": stats.grad_norm_mean,
                "grad_norm_max": stats.grad_norm_max, "skipped_steps": stats.skipped_steps,
                "scaler_backoffs": stats.scaler_backoffs,
                "seconds": time.perf_counter() - began, "cpu_seconds": _cpu_seconds() - cpu_began,
                "peak_memory_bytes": peak_memory_bytes(dev),
            })
            if math.isfinite(monitor) and monitor < best["error"]:
                best = {"error": monitor, "epoch": epoch}
                write_model_file(
                    model_dir / MODEL_FILE, model, config_ini, info,
                    extra={"epoch": epoch, "dev_error": dev_error, "train_loss": stats.train_loss},
                )
            stopped = _early_stop(tp, early, epoch, monitor)
            checkpoint(epoch)
            write_metrics(model_dir, history)
            log.info(
                "epoch %d/%d: train loss %.4f, dev PER %.4f, lr %.3g, %d skipped steps, %.1f s "
                "(%.1f CPU s)%s",
                epoch, num_epochs, stats.train_loss, dev_error, stats.lr, stats.skipped_steps,
                history[-1]["seconds"], history[-1]["cpu_seconds"],
                " (best so far)" if best["epoch"] == epoch else "",
            )
            if epoch_callback is not None:
                epoch_callback(epoch, stats.train_loss, dev_error)
            if stopped:
                log.info("early stopping after epoch %d (best epoch %d)", epoch, best["epoch"])
    finally:  # not left to the collector: a traceback may hold the loaders for long
        close_loader(loader)
        close_loader(dev_loader)

    if not (model_dir / MODEL_FILE).exists():
        # no epoch gave a finite monitored value: keep the last weights so decode still works
        write_model_file(model_dir / MODEL_FILE, model, config_ini, info, extra={"epoch": epoch})
    best_dev = math.nan
    if best["epoch"] and dev_loader is not None:
        best_dev = history[best["epoch"] - 1]["dev_error"]
    return TrainResult(
        best_dev_error=best_dev,
        final_dev_error=history[-1]["dev_error"] if history else math.nan,
        best_epoch=best["epoch"],
        epochs_run=len(history),
        history=history,
        skipped_steps_total=skipped_total,
        resumed_from_epoch=resumed_from,
        resumed_from_step=resumed_step,
        model_path=model_dir / MODEL_FILE,
        impossible_utts=list(stepper.impossible),
        stopped_early=stopped,
    )


def _early_stop(tp, early: dict, epoch: int, value: float) -> bool:
    """Update the early-stopping state with this epoch's value; True to stop."""
    patience = tp["early_stopping_patience"]
    if patience <= 0 or epoch <= tp["early_stopping_burnin"]:
        return False
    if math.isfinite(value) and value < early["best"] - tp["early_stopping_threshold"]:
        early["best"], early["bad"] = value, 0
        return False
    early["bad"] += 1
    return early["bad"] >= patience
