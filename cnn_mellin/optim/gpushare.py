"""Several trials on one GPU: what a worker process may take, and whether K of them fit.

A worker process on a CUDA device holds its CUDA context (outside torch's allocator) and
what its caching allocator reserved: the tensors it allocated plus blocks cached for reuse
(fragmentation). The study's memory limit is what a trial's allocator may reserve: a
configuration is admitted when its peak allocation plus :data:`ALLOCATOR_RESERVE` fits
under it, and each worker process is capped at the limit
(``torch.cuda.set_per_process_memory_fraction``), so one trial cannot take a neighbour's
memory. K workers on a device need K × (limit + :data:`CUDA_CONTEXT_BYTES`).

The two constants are assumptions, not measurements (no GPU was at hand when they were
set; see docs/optim.md).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable

from cnn_mellin.errors import ConfigError

_log = logging.getLogger("cnn_mellin.optim")

CUDA_CONTEXT_BYTES = 512 * 2**20  # the context and kernels a CUDA process loads, unmeasured
ALLOCATOR_RESERVE = 0.10  # cached-but-free blocks on top of the peak allocation, unmeasured

_UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_TRIED = re.compile(r"tried to allocate ([0-9.]+) ?(B|KiB|MiB|GiB|TiB)", re.IGNORECASE)


def with_reserve(peak_bytes: int) -> int:
    """What the allocator reserves for a peak allocation of ``peak_bytes``."""
    return math.ceil(int(peak_bytes) * (1.0 + ALLOCATOR_RESERVE))


def cap_fraction(limit: int, total: int) -> float:
    """The share of a device of ``total`` bytes a process capped at ``limit`` may take."""
    return min(1.0, int(limit) / int(total))


def check_sharing(
    devices: Iterable[str], limit: int | None, total_bytes: Callable[[str], int]
) -> None:
    """ConfigError if the workers on some CUDA device cannot all have ``limit`` bytes.

    ``devices``: one entry per local worker; ``total_bytes(device)``: the device's memory.
    Without a limit every worker may take the whole device: a warning when several share one.
    """
    for device, k in sorted(Counter(d for d in devices if d.startswith("cuda")).items()):
        total = int(total_bytes(device))
        if limit is None:
            if k > 1:
                _log.warning("%d workers share %s and the study has no memory limit: one "
                             "trial can take a neighbour's memory", k, device)
            continue
        need = k * (int(limit) + CUDA_CONTEXT_BYTES)
        if need > total:
            most = total // (int(limit) + CUDA_CONTEXT_BYTES)
            raise ConfigError(
                f"{k} workers on {device} need {need} bytes ({k} x (limit {limit} + CUDA "
                f"context {CUDA_CONTEXT_BYTES})), more than its {total}; at most {most} fit"
            )


def requested_bytes(err: BaseException) -> int | None:
    """The size of the allocation a CUDA out-of-memory error names, if it names one."""
    match = _TRIED.search(str(err))
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[
        next(u for u in _UNITS if u.lower() == match.group(2).lower())])


def caused_by_neighbour(err: BaseException, reserved: int, cap: int | None) -> bool:
    """Whether an out-of-memory error came from a device others filled, not from this
    process reaching its cap: what it held plus what it asked for fits under the cap."""
    if cap is None:
        return False
    requested = requested_bytes(err)
    return requested is not None and int(reserved) + requested <= int(cap)


def apply_cap(device: str, limit: int | None) -> float | None:
    """Cap this process's allocator on ``device`` at ``limit`` bytes; returns the fraction."""
    if limit is None or not device.startswith("cuda"):
        return None
    import torch

    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    fraction = cap_fraction(limit, torch.cuda.get_device_properties(index).total_memory)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


def device_total_bytes(device: str) -> int:
    """The memory of CUDA ``device``."""
    import torch

    index = torch.device(device).index
    return int(torch.cuda.get_device_properties(0 if index is None else index).total_memory)
