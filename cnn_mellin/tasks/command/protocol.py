"""What passes between a trial and the script: the environment the script is given and
the JSON-lines metrics it appends to ``$CNN_MELLIN_METRICS``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cnn_mellin.tasks.base import PruneTrial, TrialContext


def script_environment(
    context: TrialContext, state: Path, metrics: Path, params_file: Path, data_dir: str | None,
) -> dict[str, str]:
    """The script's environment: this process's, plus the trial's ``CNN_MELLIN_*`` variables
    and the device it may use (``CUDA_VISIBLE_DEVICES``)."""
    env = dict(os.environ)
    env.update({
        "CNN_MELLIN_PARAMS": str(params_file), "CNN_MELLIN_METRICS": str(metrics),
        "CNN_MELLIN_CHECKPOINT_DIR": str(state), "CNN_MELLIN_TRIAL": str(context.trial_number),
    })
    device = context.device
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
        if visible and index.isdigit() and int(index) < len(visible):
            index = visible[int(index)]
        env["CUDA_VISIBLE_DEVICES"] = index
        env["CNN_MELLIN_DEVICE"] = "cuda"
    else:
        env["CNN_MELLIN_DEVICE"] = device
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
    if context.mem_limit_bytes is not None:
        env["CNN_MELLIN_MEM_LIMIT_BYTES"] = str(context.mem_limit_bytes)
    if data_dir:
        env["CNN_MELLIN_DATA_DIR"] = data_dir
    torch = sys.modules.get("torch")  # a worker of a pool shares the cores: so does its script
    if "OMP_NUM_THREADS" not in os.environ and torch is not None:
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    return env


class MetricsReader:
    """Reads the complete lines appended to a metrics file since the last call.

    Each line is a JSON object; one with the ``metric`` key is a value at its ``epoch``
    (or ``step``; else its count among such lines). ``lines`` counts the lines read,
    ``keys`` gathers every key seen, ``values`` every (step, value) so far.
    """

    def __init__(self, path: Path, metric: str):
        self.path = path
        self.metric = metric
        self._offset = 0
        self._partial = b""
        self.lines = 0
        self.values: list[tuple[int, float]] = []
        self.keys: set[str] = set()

    def read(self, final: bool = False) -> list[tuple[int, float]]:
        """New (step, value) pairs; PruneTrial on a line that is not a JSON object."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if final and self._partial.strip():
            chunks.append(self._partial)
            self._partial = b""
        new = []
        for chunk in chunks:
            text = chunk.decode("utf-8", "replace").strip()
            if not text:
                continue
            self.lines += 1
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise PruneTrial(
                    f"metrics line {self.lines} is not a JSON object: {text[:80]}", "metrics"
                )
            self.keys.update(record)
            if self.metric not in record:
                continue
            value = record[self.metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PruneTrial(
                    f"metrics line {self.lines}: {self.metric} is {value!r}, not a number",
                    "metrics",
                )
            step = record.get("epoch", record.get("step"))
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                step = len(self.values) + 1
            self.values.append((step, float(value)))
            new.append((step, float(value)))
        return new
