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
from cnn_mellin.training.step import EpochInterrupted, EpochStats, Stepper, TrainingDiverged

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
    if model_dir is None:
        raise UserError("train needs a model directory (--model-dir)")
    if num_workers < 0:
        raise UserError(f"number of data workers must be >= 0, got {num_workers}")
    run = _Run(
        config, Path(model_dir), _resolve_device(device), train_dir, dev_dir,
        train_utts=train_utts, dev_utts=dev_utts, num_workers=num_workers, progress=progress,
        stop_requested=stop_requested,
    )
    run.resume()
    if epoch_callback is not None:
        for past in run.history:
            epoch_callback(past["epoch"], past["train_loss"], past["dev_error"])
    try:
        while run.epoch < run.num_epochs and not run.stopped:
            if stop_requested is not None and stop_requested():
                # last.pt is this epoch's
                raise TrainingInterrupted(run.epoch + 1, 0, run.schedule.steps)
            stats = run.train_epoch()
            dev_error = run.score()
            run.record_epoch(stats, dev_error)
            run.checkpoint(run.epoch)
            write_metrics(run.model_dir, run.history)
            run.log_epoch(stats, dev_error)
            if epoch_callback is not None:
                epoch_callback(run.epoch, stats.train_loss, dev_error)
            if run.stopped:
                log.info("early stopping after epoch %d (best epoch %d)", run.epoch,
                         run.best["epoch"])
    finally:  # not left to the collector: a traceback may hold the loaders for long
        run.close_loaders()
    run.ensure_model_file()
    return run.result()


class _Run:
    """One call of :func:`train`: what it set up and how far training has got.

    ``epoch`` counts the epochs done (while one runs, it is that epoch's number).
    ``history``, ``best``, ``early``, ``skipped_total`` and ``stopped`` are the progress
    that ``last.pt`` keeps; ``mid`` is the position inside an epoch that a checkpoint
    written during it resumes at (``mid_rng``: the RNG states there).
    """

    def __init__(
        self, config: Config, model_dir: Path, dev: torch.device, train_dir, dev_dir, *,
        train_utts, dev_utts, num_workers: int, progress: bool,
        stop_requested: Callable[[], bool] | None,
    ) -> None:
        """Set up the datasets, model, loaders, optimiser, schedule and signature."""
        from cnn_mellin.model import AcousticModel

        self.config, self.model_dir, self.dev = config, model_dir, dev
        self.progress, self.stop_requested = progress, stop_requested
        self.tp = config.group("training")
        self.seed = self.tp["seed"]
        train_ds, dev_ds = _datasets(train_dir, dev_dir, train_utts, dev_utts)
        self.info = info = train_ds.info
        torch.manual_seed(self.seed)  # AcousticModel checks the configuration
        self.model = AcousticModel(
            config.group("model"), info.num_coeffs, num_classes=BLANK + 1, mean=info.mean,
            std=info.std,
        )
        # utterances CTC cannot align, for the stepper (which keeps them from then on)
        train_ds, self.impossible = _drop_impossible(self.model, train_ds, train_dir)
        self.model.to(dev)
        self.loader, self.dev_loader = self._loaders(train_ds, dev_ds, num_workers)
        steps_per_epoch = math.ceil(len(self.loader) / self.tp["grad_accumulation"])
        self.optimizer = optimizer_from_params(self.model.parameters(), self.tp)
        self.schedule = LRSchedule(self.tp, steps_per_epoch)
        self.config_ini = config.to_ini(comments=False)
        self.signature = {
            "config": self.config_ini,
            "train_utts": list(train_ds.utt_ids),
            "dev_utts": list(dev_ds.utt_ids) if dev_ds is not None else [],
            "data": [str(info.feature), int(info.num_coeffs)],
        }
        self.num_epochs = self.tp["num_epochs"]
        self.gen = torch.Generator()  # augmentation's, seeded for each epoch
        self.stepper: Stepper  # built by resume()
        # a fresh run's progress, until resume() finds a checkpoint
        self.history: list[dict] = []
        self.best = {"error": math.inf, "epoch": 0}
        self.early = {"best": math.inf, "bad": 0}
        self.skipped_total, self.stopped, self.epoch = 0, False, 0
        self.mid: dict | None = None
        self.mid_rng: dict | None = None
        self.resumed_from: int | None = None
        self.resumed_step: int | None = None
        self.began = self.cpu_began = 0.0  # wall and CPU clock at the epoch's start

    def _loaders(self, train_ds, dev_ds, num_workers: int):
        """The bucketed, shuffled training loader (over ``data.subset`` of it) and the dev
        loader (None without dev data)."""
        from cnn_mellin.data.loader import make_loader

        config = self.config
        subset = config["data.subset"]
        loader = make_loader(
            train_ds, config["data.batch_size"], num_workers=num_workers, shuffle=True,
            seed=self.seed, num_buckets=config["data.num_buckets"],
            subset=subset if subset < 1.0 else None,
        )
        dev_loader = None
        if dev_ds is not None:
            dev_loader = make_loader(
                dev_ds, config["data.eval_batch_size"], num_workers=num_workers, shuffle=False,
                num_buckets=config["data.num_buckets"],
            )
        return loader, dev_loader

    def resume(self) -> None:
        """Create ``model_dir`` and go on from its ``last.pt``, if there is one.

        Restores the weights, optimiser, schedule, RNG states and progress, builds the
        stepper (with the checkpoint's loss scaler), keeps a mid-epoch position for
        :meth:`train_epoch` and cuts ``metrics.jsonl`` to the epochs restored.
        """
        self.model_dir.mkdir(parents=True, exist_ok=True)
        state = load_resume(self.model_dir, self.signature)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            set_rng_states(state["rng"])
            self.history = list(state["history"])
            self.best, self.early = dict(state["best"]), dict(state["early"])
            self.skipped_total = int(state["skipped_total"])
            self.stopped = bool(state["stopped"])
            self.impossible = list(state["impossible"])
            self.epoch = int(state["epoch"])
            mid = state.get("mid_epoch")
            if mid is not None:
                log.info("resuming %s in epoch %d after batch %d (step %d)", self.model_dir,
                         mid["epoch"], mid["batches"], self.schedule.steps)
            else:
                log.info("resuming %s after epoch %d", self.model_dir, self.epoch)
        self.stepper = Stepper(
            self.model, self.optimizer, self.schedule, self.tp, self.dev,
            Augmenter(self.tp, self.info.mean, self.info.std), self.impossible,
        )
        if state is not None:
            self.stepper.scaler.load_state_dict(state["scaler"])
            self.mid, self.mid_rng = state.get("mid_epoch"), state["rng"]
            self.resumed_from, self.resumed_step = self.epoch, self.schedule.steps
        write_metrics(self.model_dir, self.history)  # drops epochs the checkpoint lacks

    def train_epoch(self) -> EpochStats:
        """Train the next epoch (from where a checkpoint written during it left off).

        Its RNGs are seeded from ``(training.seed, epoch)``. A stop requested during it is
        checkpointed at the last optimiser step and raised as :class:`TrainingInterrupted`.
        """
        self.epoch += 1
        epoch = self.epoch
        self.began, self.cpu_began = time.perf_counter(), _cpu_seconds()
        torch.manual_seed(_epoch_seed(self.seed, epoch))
        self.gen.manual_seed(_epoch_seed(self.seed, epoch) + 1)
        mid = self.mid if self.mid is not None and self.mid["epoch"] == epoch else None
        self.mid = None
        start = int(mid["batches"]) if mid else 0
        self.loader.batch_sampler.set_epoch(epoch, start)
        if mid:
            self.began -= mid["seconds"]
            self.cpu_began -= mid["cpu_seconds"]
        try:
            with _progress(len(self.loader), self.progress,
                           f"epoch {epoch}/{self.num_epochs}") as bar:
                stats = self.stepper.run_epoch(
                    self.loader, epoch, self.gen, bar, start=start,
                    partial=mid["partial"] if mid else None, stop=self.stop_requested,
                    started=(lambda: self._restore(mid)) if mid else None,
                )
        except EpochInterrupted as cut:
            raise self.interrupt_in_epoch(cut.batches, cut.partial, cut.gen, cut.rng) from None
        return stats

    def _restore(self, mid: dict) -> None:
        """Put back the RNG states, generator and bad-step run of the mid-epoch checkpoint
        (once the loader's iterator, which draws from the global RNG, exists)."""
        set_rng_states(self.mid_rng)
        self.gen.set_state(mid["gen"])
        self.stepper.bad_run = int(mid["bad_run"])

    def score(self) -> float:
        """The dev error of the epoch just trained (NaN without dev data).

        A data loader failure while a stop is requested stops training instead: every batch
        is trained, so the checkpoint is at the epoch's end and a restart just scores it.
        """
        from cnn_mellin.data.loader import is_loader_failure

        stop = self.stop_requested
        try:
            return _score(self.model, self.dev_loader, self.dev, self.stepper.autocast) \
                if self.dev_loader else math.nan
        except RuntimeError as err:
            if stop is None or not is_loader_failure(err) or not stop():
                raise
            log.warning("stopping: a data loader worker ended meanwhile (%s)", err)
            raise self.interrupt_in_epoch(len(self.loader), self.stepper.last_partial) from None

    def record_epoch(self, stats: EpochStats, dev_error: float) -> None:
        """Account for the epoch just trained and scored: the schedule, the history, the
        best model (``model.pt``) and early stopping, all by the monitored value."""
        monitor = dev_error if self.dev_loader else stats.train_loss
        self.schedule.epoch_end(monitor)
        self.skipped_total += stats.skipped_steps
        self.history.append({
            "epoch": self.epoch, "train_loss": stats.train_loss, "dev_error": dev_error,
            "lr": stats.lr, "grad_norm_mean": stats.grad_norm_mean,
            "grad_norm_max": stats.grad_norm_max, "skipped_steps": stats.skipped_steps,
            "scaler_backoffs": stats.scaler_backoffs,
            "seconds": time.perf_counter() - self.began,
            "cpu_seconds": _cpu_seconds() - self.cpu_began,
            "peak_memory_bytes": peak_memory_bytes(self.dev),
        })
        if math.isfinite(monitor) and monitor < self.best["error"]:
            self.best = {"error": monitor, "epoch": self.epoch}
            write_model_file(
                self.model_dir / MODEL_FILE, self.model, self.config_ini, self.info,
                extra={"epoch": self.epoch, "dev_error": dev_error,
                       "train_loss": stats.train_loss},
            )
        self.stopped = _early_stop(self.tp, self.early, self.epoch, monitor)

    def checkpoint(self, done_epochs: int, mid_epoch: dict | None = None, rng=None) -> None:
        """Write ``last.pt`` after ``done_epochs`` epochs, and ``mid_epoch``'s position in the
        next one if given; ``rng`` (default: the current states) are the RNG states."""
        save_resume(self.model_dir, {
            "signature": self.signature, "epoch": done_epochs,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "scaler": self.stepper.scaler.state_dict(),
            "rng": rng if rng is not None else rng_states(), "history": self.history,
            "best": self.best, "early": self.early, "skipped_total": self.skipped_total,
            "stopped": self.stopped, "impossible": self.stepper.impossible,
            **({"mid_epoch": mid_epoch} if mid_epoch is not None else {}),
        })

    def interrupt_in_epoch(self, batches: int, partial: dict, gen_state=None,
                           rng=None) -> TrainingInterrupted:
        """Checkpoint the epoch in progress after ``batches`` batches (running sums
        ``partial``; generator and RNG states by default the current ones) and return the
        :class:`TrainingInterrupted` to raise."""
        self.checkpoint(self.epoch - 1, {
            "epoch": self.epoch, "batches": batches, "partial": partial,
            "gen": gen_state if gen_state is not None else self.gen.get_state(),
            "bad_run": self.stepper.bad_run, "seconds": time.perf_counter() - self.began,
            "cpu_seconds": _cpu_seconds() - self.cpu_began,
        }, rng=rng)
        log.info("stopped in epoch %d after batch %d (step %d); %s resumes there",
                 self.epoch, batches, self.schedule.steps, self.model_dir / "last.pt")
        return TrainingInterrupted(self.epoch, batches, self.schedule.steps)

    def log_epoch(self, stats: EpochStats, dev_error: float) -> None:
        """Log the epoch just recorded in one line."""
        log.info(
            "epoch %d/%d: train loss %.4f, dev PER %.4f, lr %.3g, %d skipped steps, %.1f s "
            "(%.1f CPU s)%s",
            self.epoch, self.num_epochs, stats.train_loss, dev_error, stats.lr,
            stats.skipped_steps, self.history[-1]["seconds"], self.history[-1]["cpu_seconds"],
            " (best so far)" if self.best["epoch"] == self.epoch else "",
        )

    def close_loaders(self) -> None:
        """Shut the loaders' worker processes down."""
        from cnn_mellin.data.loader import close_loader

        close_loader(self.loader)
        close_loader(self.dev_loader)

    def ensure_model_file(self) -> None:
        """Write ``model.pt`` from the last weights if no epoch gave a finite monitored
        value, so that decoding still works."""
        if not (self.model_dir / MODEL_FILE).exists():
            write_model_file(self.model_dir / MODEL_FILE, self.model, self.config_ini,
                             self.info, extra={"epoch": self.epoch})

    def result(self) -> TrainResult:
        """What the run achieved."""
        best_dev = math.nan
        if self.best["epoch"] and self.dev_loader is not None:
            best_dev = self.history[self.best["epoch"] - 1]["dev_error"]
        return TrainResult(
            best_dev_error=best_dev,
            final_dev_error=self.history[-1]["dev_error"] if self.history else math.nan,
            best_epoch=self.best["epoch"],
            epochs_run=len(self.history),
            history=self.history,
            skipped_steps_total=self.skipped_total,
            resumed_from_epoch=self.resumed_from,
            resumed_from_step=self.resumed_step,
            model_path=self.model_dir / MODEL_FILE,
            impossible_utts=list(self.stepper.impossible),
            stopped_early=self.stopped,
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
