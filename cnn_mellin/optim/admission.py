"""Memory admission: a trial's configuration measured against the study's memory limit
before it trains, and out-of-memory errors told apart (the configuration's or a neighbour's).

A configuration over the limit is pruned before training, its figure recorded and given to
the sampler as a constraint. An out-of-memory error below this worker's allocator cap came
from another process that filled the device: the trial is handed back for a retry.
"""

from __future__ import annotations

import gc
import sys

from cnn_mellin.config import Config
from cnn_mellin.optim import gpushare
from cnn_mellin.optim.attrs import ADMISSION_BYTES, ADMISSION_METHOD, MEMORY_CONSTRAINT
from cnn_mellin.optim.feasible import Feasibility
from cnn_mellin.optim.outcome import CONSTRAINT, HandBack, Prune, one_line


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error (host or device)."""
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")  # a task that never imported torch cannot raise its OOM
    if torch is not None and isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def free_device_memory() -> None:
    """Give back what an out-of-memory trial left allocated."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def violation(peak: int | None, limit: int | None) -> tuple[str, float] | None:
    """The memory constraint figure of a peak (None: unknown, over the limit) for the sampler."""
    if limit is None:
        return None
    if peak is None:
        return (MEMORY_CONSTRAINT, 1.0)
    return (MEMORY_CONSTRAINT, peak / limit - 1.0)


def neighbour_oom(err: BaseException, device: str, cap_bytes: int | None) -> HandBack | None:
    """A hand-back if this out-of-memory error came from a device others filled."""
    if cap_bytes is None:
        return None
    import torch

    reserved = torch.cuda.memory_reserved(device)
    if not gpushare.caused_by_neighbour(err, reserved, cap_bytes):
        return None
    return HandBack(f"out of memory on {device} below this worker's cap of "
                    f"{cap_bytes} bytes ({reserved} reserved): another process "
                    f"filled the device; {one_line(err)}")


def admit(feasibility: Feasibility, config: Config, facts: dict, cap_bytes: int | None) -> None:
    """Measure ``config`` into ``facts``; raises :class:`Prune` when it does not fit the
    limit, :class:`HandBack` when a neighbour's memory use kept it from being measured."""
    limit, device = feasibility.limit, feasibility.device
    try:
        figure = feasibility.figure(config)
    except Exception as err:
        if not is_oom(err):
            raise
        back = neighbour_oom(err, device, cap_bytes)
        free_device_memory()
        if back is not None:
            raise back from None
        raise Prune(
            "oom", f"out of memory while measuring admission: {one_line(err)}",
            violation(None, limit),
        ) from None
    if figure is None:
        return
    facts[ADMISSION_BYTES] = int(figure.bytes)
    facts[ADMISSION_METHOD] = figure.method
    if limit is None:
        return
    needed = feasibility.needed(figure)  # on CUDA with the allocator's reserve
    over = violation(needed, limit)
    if needed > limit:
        reserve = f" + {gpushare.ALLOCATOR_RESERVE:.0%} allocator reserve" \
            if needed != figure.bytes else ""
        raise Prune(
            "memory",
            f"needs {figure.bytes} bytes ({figure.method}){reserve} on {device}, "
            f"over the limit of {limit} bytes", over,
        )
    facts[CONSTRAINT] = over
