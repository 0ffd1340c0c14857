"""The per-epoch resume checkpoint ``last.pt``: everything needed to continue exactly.

It holds the model, optimiser, schedule and scaler states, every RNG state, the
epoch, the history and the trainer's bookkeeping, plus a *signature* (the
configuration as ``.ini`` text and the utterances trained and scored on) that a
restart must match. Only tensors, strings, numbers, lists and dicts are stored,
so it loads with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnn_mellin.config import Config, parse_ini
from cnn_mellin.errors import UserError
from cnn_mellin.modelfile import load_checkpoint_file, save_atomic

RESUME_FILE = "last.pt"
_FORMAT = "cnn-mellin-resume-1"


def rng_states() -> dict:
    """Every global RNG state as tensors / plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
        "python": [int(version), list(internal), gauss],
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])


def save_resume(model_dir, state: dict[str, Any]) -> None:
    """Write ``model_dir/last.pt`` atomically."""
    save_atomic({"format": _FORMAT, **state}, Path(model_dir) / RESUME_FILE)


def load_resume(model_dir, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The resume state in ``model_dir`` (None if there is none).

    Raises UserError if it was made with another configuration or other data.
    """
    path = Path(model_dir) / RESUME_FILE
    if not path.exists():
        return None
    state = load_checkpoint_file(path)
    if state.get("format") != _FORMAT:
        raise UserError(f"{path}: not a cnn-mellin resume checkpoint")
    check_signature(path, state["signature"], signature)
    return state


def _values(ini: str, source: str) -> dict[str, Any]:
    # parameters declared after the checkpoint was written take their defaults there
    return dict(Config(parse_ini(ini, source)))


def check_signature(path, stored: dict, current: dict) -> None:
    """UserError naming what differs between a checkpoint's signature and this run's.

    A parameter missing from the checkpoint's configuration (declared since) counts as
    set to its default, so such checkpoints resume as long as it keeps that value.
    """
    old, new = _values(stored["config"], str(path)), _values(current["config"], "<run>")
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:5])
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise UserError(
            f"{path.parent}: holds a checkpoint made with a different configuration: "
            f"{shown}{more}; use another --model-dir or the same configuration"
        )
    for key, what in (("train_utts", "training"), ("dev_utts", "dev"), ("data", "feature")):
        if stored.get(key) != current.get(key):
            raise UserError(
                f"{path.parent}: holds a checkpoint made with different {what} data; "
                "use another --model-dir or the same data"
            )
