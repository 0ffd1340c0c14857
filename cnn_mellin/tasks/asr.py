"""The ``asr`` task: train the CTC acoustic model; the trial value is the dev phone error rate.

``init`` gets one data dir; a deterministic share of it (``--dev-proportion``) is held out
as dev data, by speaker when utterance ids carry one (TIMIT's ``SPEAKER_SENTENCE``), else
by utterance. The split is stored in the study. The value is the 39-phone PER of the best
epoch (the epoch whose checkpoint training keeps as ``model.pt``), so a trial is judged by
the model it would hand over; the pruner sees every epoch's dev PER.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, DataError
from cnn_mellin.tasks.base import (
    MemoryFigure,
    PruneTrial,
    Task,
    TaskOption,
    TaskResult,
    TrialContext,
    TrialInterrupted,
)

DEFAULT_DEV_PROPORTION = 0.1


def _speaker(utt_id: str) -> str | None:
    head, sep, _ = utt_id.partition("_")
    return head if sep and head else None


def _order(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def fingerprint(utt_ids: list[str]) -> str:
    """A digest of the utterance ids of a data dir (to notice data that changed)."""
    return hashlib.sha256("\n".join(sorted(utt_ids)).encode()).hexdigest()


def split_dev(utt_ids: list[str], proportion: float) -> tuple[str, list[str]]:
    """Choose the dev part: (``"speaker"`` or ``"utterance"``, the dev speakers or utterances).

    Units (speakers if every id names one and some speaker has several utterances, else
    utterances) are taken in a fixed pseudo-random order until at least ``proportion`` of
    the utterances are dev; at least one unit goes to each side.
    """
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for utt in utt_ids:
        by_speaker[_speaker(utt) or ""].append(utt)
    speakers_ok = "" not in by_speaker and 2 <= len(by_speaker) < len(utt_ids)
    units = by_speaker if speakers_ok else {utt: [utt] for utt in utt_ids}
    if len(units) < 2:
        raise DataError(
            f"cannot split a dev part off {len(utt_ids)} utterance(s); need at least 2"
        )
    target = proportion * len(utt_ids)
    chosen, count = [], 0
    for unit in sorted(units, key=_order):
        if count >= target or len(chosen) == len(units) - 1:
            break
        chosen.append(unit)
        count += len(units[unit])
    if not chosen:
        chosen.append(sorted(units, key=_order)[0])
    return ("speaker" if speakers_ok else "utterance"), sorted(chosen)


class AsrTask(Task):
    """CTC training of the acoustic model on the study's data dir."""

    name = "asr"
    summary = "train the CTC acoustic model on DATA_DIR; value: dev phone error rate"
    STOPS_ON_REQUEST = True  # training checkpoints the optimiser step it is at
    OPTIONS = (
        TaskOption(
            "--dev-proportion", "share of DATA_DIR held out for the dev error, split by "
            "speaker when utterance ids carry one (default %(default)s)",
            type=float, default=DEFAULT_DEV_PROPORTION, metavar="P",
        ),
        TaskOption(
            "--train-utterances", "train on a fixed subset of this many of the training "
            "utterances (a small stage: its trials are cheap; default: all)",
            type=int, default=None, metavar="N",
        ),
    )

    @classmethod
    def prepare(cls, options: Mapping[str, Any], config: Config) -> dict:
        from cnn_mellin.data.store import read_info

        if options.get("data_dir") is None:
            raise ConfigError("--task asr needs DATA_DIR (a folder with feats.h5)")
        data_dir = Path(os.path.abspath(options["data_dir"]))
        dev_proportion = options.get("dev_proportion", DEFAULT_DEV_PROPORTION)
        if not 0.0 < dev_proportion < 1.0:  # NaN fails too
            raise ConfigError(f"--dev-proportion must be in (0, 1), got {dev_proportion}")
        info = read_info(data_dir)
        if len(info) == 0:
            raise DataError(f"data dir {data_dir} holds no utterances")
        by, dev = split_dev(info.utt_ids, dev_proportion)
        subset = options.get("train_utterances")
        if subset is not None and subset < 1:
            raise ConfigError(f"--train-utterances must be at least 1, got {subset}")
        stored = {
            "data_dir": str(data_dir), "feature": info.feature, "num_coeffs": info.num_coeffs,
            "dev_proportion": float(dev_proportion), "split_by": by, "dev": dev,
            "num_utts": len(info),
            "fingerprint": fingerprint(info.utt_ids),
            **({"train_utterances": int(subset)} if subset is not None else {}),
        }
        train, _ = cls(stored).split(info.utt_ids)
        frames = dict(zip(info.utt_ids, info.num_frames, strict=True))
        stored["max_frames"] = max(frames[u] for u in train)
        return stored

    def split(self, utt_ids: list[str]) -> tuple[list[str], list[str]]:
        """(train, dev) utterance ids of the data dir by the stored split."""
        dev_units = set(self.info["dev"])
        if self.info["split_by"] == "speaker":
            is_dev = [_speaker(u) in dev_units for u in utt_ids]
        else:
            is_dev = [u in dev_units for u in utt_ids]
        train = [u for u, d in zip(utt_ids, is_dev, strict=True) if not d]
        dev = [u for u, d in zip(utt_ids, is_dev, strict=True) if d]
        subset = self.info.get("train_utterances")
        if subset is not None and subset < len(train):  # a fixed pseudo-random subset
            chosen = set(sorted(train, key=_order)[:subset])
            train = [u for u in train if u in chosen]
        return train, dev

    def _read(self):
        from cnn_mellin.data.store import read_info

        info = read_info(self.info["data_dir"])
        if fingerprint(info.utt_ids) != self.info["fingerprint"]:
            raise DataError(
                f"data dir {self.info['data_dir']} changed since the study was created "
                "(different utterances); create a new study"
            )
        return info

    def verify(self) -> None:
        self._read()

    def check(self, config: Config) -> None:
        from cnn_mellin.model import check_model_config

        check_model_config(config.group("model"), self.num_coeffs)

    def repair(self, config: Config) -> Config:
        from cnn_mellin.model import repair_model_config

        repaired = repair_model_config(config.group("model"), self.num_coeffs)
        return config.replace(
            {f"model.{k}": v for k, v in repaired.items() if f"model.{k}" in config}
        )

    def max_epochs(self, config: Config, searched: list[str]) -> int | None:
        if "training.num_epochs" in searched:
            return int(self.params()["training.num_epochs"].search.high)
        return int(config["training.num_epochs"])

    def peak_memory(self, config: Config, device: str) -> MemoryFigure:
        """Measured on CUDA, else estimated: the larger of one training step on the longest
        batch a trial can see (the longest training utterance lengthened by random shifts)
        and the dev-scoring forward pass of ``data.eval_batch_size`` such utterances."""
        import torch

        from cnn_mellin.memory import estimate_peak_bytes, measure_peak_bytes
        from cnn_mellin.training.augment import shifted_frames
        from cnn_mellin.training.precision import autocast_dtype

        training = config.group("training")
        longest = int(self.info["max_frames"])
        passes = [(True, config["data.batch_size"],
                   shifted_frames(longest, training["random_shift_proportion"]))]
        eval_batch = config["data.eval_batch_size"]
        if eval_batch > config["data.batch_size"]:  # else the step's forward pass is larger
            passes.append((False, eval_batch, longest))
        cuda = device.startswith("cuda") and torch.cuda.is_available()
        autocast = autocast_dtype(training, device) if cuda else None
        peaks = []
        for train, batch, frames in passes:
            if cuda:
                from cnn_mellin.model import AcousticModel
                from cnn_mellin.training import optimizer_from_params

                model = AcousticModel(config.group("model"), self.num_coeffs)
                peaks.append(measure_peak_bytes(
                    model, batch, frames, self.num_coeffs,
                    lambda params: optimizer_from_params(params, training), device,
                    autocast_dtype=autocast, train=train,
                ))
            else:
                peaks.append(estimate_peak_bytes(
                    config.group("model"), self.num_coeffs, batch, frames,
                    training["optimizer"], device="cuda" if device.startswith("cuda") else "cpu",
                    momentum=training["momentum"], weight_decay=training["weight_decay"],
                    train=train,
                ))
        return MemoryFigure(int(max(peaks)), "measured" if cuda else "estimated")

    def discard(self, checkpoint_dir: Path) -> int:
        """The resume state ``last.pt`` (the largest file: optimiser state too); the trained
        model ``model.pt`` and ``metrics.jsonl`` stay."""
        from cnn_mellin.training.checkpoint import RESUME_FILE

        path = Path(checkpoint_dir) / RESUME_FILE
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def run(self, config: Config, context: TrialContext) -> TaskResult:
        import torch

        from cnn_mellin.training import TrainingDiverged, TrainingInterrupted, train

        info = self._read()
        train_utts, dev_utts = self.split(info.utt_ids)
        cuda = context.device.startswith("cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats(context.device)

        def on_epoch(epoch: int, train_loss: float, dev_error: float) -> None:
            context.report(epoch, dev_error)

        try:
            result = train(
                config, self.info["data_dir"], None, model_dir=context.checkpoint_dir,
                device=context.device, train_utts=train_utts, dev_utts=dev_utts,
                epoch_callback=on_epoch, num_workers=context.num_data_workers,
                stop_requested=context.stop_requested,
            )
        except TrainingDiverged as err:
            raise PruneTrial(f"diverged: {err}", kind="diverged") from None
        except TrainingInterrupted as stop:
            raise TrialInterrupted(str(stop), step=stop.step) from None
        peak = int(torch.cuda.max_memory_allocated(context.device)) if cuda else None
        return TaskResult(
            value=float(result.best_dev_error), epochs=int(result.epochs_run), peak_bytes=peak,
            resumed_from_epoch=result.resumed_from_epoch,
            resumed_from_step=result.resumed_from_step,
            attrs={"best_epoch": result.best_epoch, "model_path": str(result.model_path),
                   "final_dev_error": float(result.final_dev_error),
                   "skipped_steps": result.skipped_steps_total},
        )
