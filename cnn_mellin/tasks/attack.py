"""The ``attack`` task: gradient inversion against a trained model; the value is the mean MAE.

``optim init DATA_DIR --task attack --victim MODEL_DIR`` fixes the victim and the attacked
utterances (``--utterances`` of at most ``--max-seconds`` that the victim can align, chosen
the same way every time) and searches the ``[attack]`` (and, if asked, ``[defence]``)
parameters. A trial attacks each utterance in turn; the value is the mean MAE in the
victim's normalised feature space (SNR and the victim's PER of the reconstructions are
recorded). The pruner sees the running mean MAE every ``attack.eval_every`` steps, at the
number of optimiser steps spent so far. Each utterance is checkpointed per chunk, and a
finished one is not attacked again by a retry.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnn_mellin.config import Config, Group
from cnn_mellin.errors import ConfigError
from cnn_mellin.files import write_text_atomic
from cnn_mellin.tasks.base import (
    MemoryFigure,
    PruneTrial,
    Task,
    TaskOption,
    TaskResult,
    TrialContext,
)


def _groups() -> tuple[Group, ...]:
    from cnn_mellin.params.attack import GROUPS

    return GROUPS


class AttackTask(Task):
    """Gradient inversion of the study's utterances against the study's victim."""

    name = "attack"
    summary = "gradient inversion against --victim on utterances of DATA_DIR; value: mean MAE"
    OPTIONS = (
        TaskOption("--victim", "the attacked model: a folder with model.pt from 'cnn-mellin "
                   "train'", metavar="MODEL_DIR", required=True),
        TaskOption("--utterances", "utterances attacked in every trial (default %(default)s)",
                   type=int, default=8, metavar="N"),
        TaskOption("--max-seconds", "longest utterance chosen, in seconds (default "
                   "%(default)s)", type=float, default=1.0, metavar="S"),
    )

    @classmethod
    def groups_for(cls, options: Mapping[str, Any]) -> tuple[Group, ...]:
        return _groups()

    @classmethod
    def prepare(cls, options: Mapping[str, Any], config: Config) -> dict:
        from cnn_mellin.attack import select_utterances
        from cnn_mellin.data.store import read_info
        from cnn_mellin.modelfile import MODEL_FILE, load_model_file

        if options.get("data_dir") is None:
            raise ConfigError("--task attack needs DATA_DIR (the utterances to attack)")
        victim_path = Path(os.path.abspath(options["victim"]))
        if victim_path.is_dir():
            victim_path = victim_path / MODEL_FILE
        victim = load_model_file(victim_path)
        data_dir = os.path.abspath(options["data_dir"])
        info = read_info(data_dir)
        utts = select_utterances(victim, info, options["utterances"], options["max_seconds"])
        frames = dict(zip(info.utt_ids, info.num_frames, strict=True))
        return {
            "victim": str(victim_path), "data_dir": data_dir, "utterances": utts,
            "max_frames": max(frames[u] for u in utts), "num_coeffs": victim.num_coeffs,
            "victim_size": victim_path.stat().st_size,
        }

    def groups(self) -> tuple[Group, ...]:
        return _groups()

    def verify(self) -> None:
        from cnn_mellin.errors import DataError

        path = Path(self.info["victim"])
        if not path.is_file() or path.stat().st_size != self.info["victim_size"]:
            raise DataError(f"victim {path} is missing or changed since the study was created")

    def check(self, config: Config) -> None:
        size, overlap = config["attack.grid_size"], config["attack.grid_overlap"]
        if size > 0 and overlap >= size:
            raise ConfigError(
                f"attack.grid_overlap ({overlap}) must be smaller than attack.grid_size ({size})"
            )

    def repair(self, config: Config) -> Config:
        size, overlap = config["attack.grid_size"], config["attack.grid_overlap"]
        if size > 0 and overlap >= size:
            return config.replace({"attack.grid_overlap": size - 1})
        return config

    def peak_memory(self, config: Config, device: str) -> MemoryFigure | None:
        """Estimated: a training step of batch 1 on the longest utterance, twice over (the
        finite differences keep copies of the parameters and gradients), three times with
        ``attack.hvp = exact`` (the gradient's graph is kept and differentiated again)."""
        from cnn_mellin.memory import estimate_peak_bytes
        from cnn_mellin.modelfile import load_model_file

        victim = load_model_file(self.info["victim"])
        step = estimate_peak_bytes(
            victim.config.group("model"), self.num_coeffs, 1, int(self.info["max_frames"]),
            "adam", device="cuda" if device.startswith("cuda") else "cpu",
        )
        times = 3 if config["attack.hvp"] == "exact" else 2
        return MemoryFigure(times * int(step), f"estimated ({times}x one training step, batch 1)")

    def run(self, config: Config, context: TrialContext) -> TaskResult:
        from cnn_mellin.attack import AttackDiverged, attack_one
        from cnn_mellin.modelfile import load_model_file

        victim = load_model_file(self.info["victim"], device="cpu")
        attack, defence = config.group("attack"), config.group("defence")
        context.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        offset = 0

        def reporter(done: list[float], offset: int):
            def on_point(step: int, loss: float, mae: float) -> None:
                context.report(offset + step, (sum(done) + mae) / (len(done) + 1))
            return on_point

        for utt in self.info["utterances"]:
            finished = context.checkpoint_dir / f"{utt}.json"
            maes = [r["mae"] for r in rows]
            if finished.exists():  # attacked by an earlier attempt of this trial
                row = json.loads(finished.read_text())
                for step, _, mae in row.pop("curve"):
                    context.report(offset + step, (sum(maes) + mae) / (len(maes) + 1))
            else:
                try:
                    result, row = attack_one(
                        victim, self.info["data_dir"], utt, attack, defence,
                        checkpoint=context.checkpoint_dir / f"{utt}.pt",
                        on_point=reporter(maes, offset),
                    )
                except AttackDiverged as err:
                    raise PruneTrial(f"diverged on {utt}: {err}", kind="diverged") from None
                write_text_atomic(finished, json.dumps({**row, "curve": result.curve}))
            rows.append(row)
            offset += int(row["steps"])
        count = len(rows)
        return TaskResult(
            value=sum(r["mae"] for r in rows) / count, epochs=offset,
            attrs={
                "snr_db": sum(r["snr_db"] for r in rows) / count,
                "per_reconstruction": sum(r["per_reconstruction"] for r in rows) / count,
                "per_original": sum(r["per_original"] for r in rows) / count,
                "gradient_distance": sum(r["gradient_distance"] for r in rows) / count,
                "bad_steps": sum(r["bad_steps"] for r in rows),
            },
        )
