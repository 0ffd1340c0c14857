"""Which dtype mixed precision runs in: the one place that decides (training, memory figures).

``training.mixed_precision`` switches autocast on (CUDA only); ``training.amp_dtype``
picks bf16, fp16 or ``auto``. ``auto`` takes bf16 only where the GPU has it natively
(compute capability 8.0 or later, or ROCm): ``torch.cuda.is_bf16_supported()`` also says
yes for GPUs that merely emulate it (a T4, since torch 2.3), where bf16 is slow, so it is
not asked. fp16 needs loss scaling (:func:`needs_loss_scaling`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from cnn_mellin.errors import UserError

__all__ = ["autocast_dtype", "native_bf16", "needs_loss_scaling"]

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bf16 natively (not by emulation)."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def autocast_dtype(training_params: Mapping[str, Any], device) -> torch.dtype | None:
    """The autocast dtype for the ``training`` group (short names) on ``device``.

    None means float32: mixed precision off, or a device other than an available CUDA
    one. Raises UserError if ``amp_dtype = bf16`` is asked of a GPU that cannot run bf16.
    """
    if not training_params["mixed_precision"]:
        return None
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    wanted = training_params["amp_dtype"]
    if wanted == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if wanted == "bf16" and not native_bf16(device):
        with torch.cuda.device(device):
            emulated = torch.cuda.is_bf16_supported(including_emulation=True)
        if not emulated:
            raise UserError(f"training.amp_dtype: {torch.cuda.get_device_name(device)} cannot "
                            "run bf16; use fp16 or auto")
        log.warning("training.amp_dtype: %s only emulates bf16, which is slow; auto would "
                    "choose fp16", torch.cuda.get_device_name(device))
    return _DTYPES[wanted]


def needs_loss_scaling(dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without a loss scaler; bf16 and float32 need none."""
    return dtype == torch.float16
