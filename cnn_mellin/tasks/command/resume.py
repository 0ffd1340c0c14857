"""A trial's folders across attempts, and what earlier attempts of it reported.

A trial's ``checkpoint_dir`` holds ``checkpoint/`` (the script's own state, the same for
every attempt, so a script that saves there resumes after a killed worker) and one
``attempt-<trial number>/`` per attempt (its params, metrics and output).
"""

from __future__ import annotations

from pathlib import Path

from cnn_mellin.tasks.base import PruneTrial
from cnn_mellin.tasks.command.protocol import MetricsReader


def trial_folders(checkpoint_dir: Path, trial_number: int) -> tuple[Path, Path]:
    """The (state, attempt) folders of this attempt, created."""
    attempt = checkpoint_dir / f"attempt-{trial_number}"
    state = checkpoint_dir / "checkpoint"
    state.mkdir(parents=True, exist_ok=True)
    attempt.mkdir(parents=True, exist_ok=True)
    return state, attempt


def earlier_values(checkpoint_dir: Path, trial_number: int, metric: str) -> dict[int, float]:
    """step -> value of ``metric`` as the earlier attempts' metrics files hold them (a later
    attempt's value wins); a broken line ends only that attempt's file."""
    values: dict[int, float] = {}
    attempts = sorted(
        (int(d.name.split("-", 1)[1]), d) for d in checkpoint_dir.glob("attempt-*")
        if d.name.split("-", 1)[1].isdigit() and d.name != f"attempt-{trial_number}"
    )
    for _, folder in attempts:
        reader = MetricsReader(folder / "metrics.jsonl", metric)
        try:
            reader.read(final=True)
        except PruneTrial:  # that attempt's own problem; keep what it reported before
            pass
        values.update(reader.values)
    return values
