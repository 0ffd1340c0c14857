"""The ``model.pt`` file: its format, its atomic save and its safe load.

``model.pt`` is what :func:`cnn_mellin.decoding.decode` needs and nothing more: the model
weights, the configuration as ``.ini`` text, the number of input coefficients, the phone
inventory with its 48→39 map and the normalisation statistics (inside the model's
buffers). It holds tensors, strings, numbers, lists and dicts only, so it loads with
``torch.load(..., weights_only=True)``; :func:`load_checkpoint_file` loads every torch file
cnn-mellin writes (``last.pt`` and the attack's checkpoints too) that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnn_mellin.data.phones import BLANK
from cnn_mellin.errors import UserError
from cnn_mellin.files import atomic_path

MODEL_FILE = "model.pt"
_FORMAT = "cnn-mellin-model-1"


def write_model_file(path, model: torch.nn.Module, config_ini: str, info, extra=None) -> None:
    """Write ``model.pt`` atomically: weights, configuration and data description."""
    payload = {
        "format": _FORMAT,
        "config": config_ini,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_coeffs": int(info.num_coeffs),
        "feature": str(info.feature),
        "phones": [str(p) for p in info.phones],
        "phone_map_39": {str(k): str(v) for k, v in dict(info.phone_map_39).items()},
        "extra": dict(extra or {}),
    }
    save_atomic(payload, path)


def save_atomic(obj: Any, path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint_file(path) -> dict:
    """``torch.load`` with ``weights_only=True`` onto the CPU; a UserError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not ours"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable cnn-mellin checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a cnn-mellin checkpoint")
    return obj


@dataclass(frozen=True)
class LoadedModel:
    """A model read from ``model.pt`` with what it was trained on."""

    model: torch.nn.Module
    config: Any
    num_coeffs: int
    feature: str
    phones: tuple[str, ...]
    phone_map_39: dict[str, str]
    extra: dict


def load_model_file(path, device="cpu") -> LoadedModel:
    """Rebuild the model stored in ``model.pt`` (or a model directory holding one)."""
    from cnn_mellin.config import Config, parse_ini
    from cnn_mellin.model import AcousticModel

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    obj = load_checkpoint_file(path)
    if obj.get("format") != _FORMAT:
        raise UserError(f"{path}: not a cnn-mellin model file")
    config = Config(parse_ini(obj["config"], str(path)))
    model = AcousticModel(config.group("model"), obj["num_coeffs"], num_classes=BLANK + 1)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the stored configuration: "
                        f"{str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(
        model, config, int(obj["num_coeffs"]), obj["feature"], tuple(obj["phones"]),
        dict(obj["phone_map_39"]), dict(obj.get("extra", {})),
    )
