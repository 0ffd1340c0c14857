"""The per-run metrics file ``metrics.jsonl``: one JSON object per epoch, in epoch order.

Each line is one entry of the trainer's history (see :data:`FIELDS`); values that are
not finite (no dev data, no applied step) are written as ``null``. The file is
rewritten whole and atomically from the history the resume checkpoint holds, after
every checkpoint and when a run starts or resumes, so a killed and resumed run never
repeats or loses a line. ``pandas.read_json(path, lines=True)`` reads it.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from cnn_mellin.files import write_text_atomic

__all__ = ["FIELDS", "METRICS_FILE", "peak_memory_bytes", "write_metrics"]

METRICS_FILE = "metrics.jsonl"

FIELDS = {
    "epoch": "1-based epoch number",
    "train_loss": "mean CTC loss per target phone over the epoch's batches",
    "dev_error": "dev 39-phone error rate (PER) after the epoch; null without dev data",
    "lr": "learning rate of the epoch's last optimiser step",
    "grad_norm_mean": "mean L2 norm of the applied steps' gradients, before clipping",
    "grad_norm_max": "largest of those norms",
    "skipped_steps": "steps skipped for a non-finite loss or gradient",
    "scaler_backoffs": "fp16 loss-scale back-offs (skipped updates that are not bad steps)",
    "seconds": "wall seconds of the epoch, dev scoring included",
    "cpu_seconds": "CPU seconds of this process (all threads) in the epoch",
    "peak_memory_bytes": "peak memory of the training process so far: allocated CUDA "
                         "memory on a GPU, resident set size on the CPU",
}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: ``torch.cuda.max_memory_allocated`` on CUDA, else peak RSS.

    The CUDA figure counts since the last ``reset_peak_memory_stats`` (a caller's; the
    trainer never resets it).
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB else


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(model_dir, history: Iterable[Mapping[str, Any]]) -> None:
    """Write ``model_dir/metrics.jsonl`` from ``history`` atomically."""
    lines = [
        json.dumps({k: _json_value(v) for k, v in entry.items()}, allow_nan=False)
        for entry in history
    ]
    write_text_atomic(Path(model_dir) / METRICS_FILE, "".join(line + "\n" for line in lines))

