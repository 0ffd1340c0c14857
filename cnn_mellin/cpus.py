"""How many CPU threads a worker may use: its job's allocation, not the node's core count.

On a SLURM node ``os.cpu_count()`` is every core of the machine, shared with other jobs;
a worker that starts that many threads per process oversubscribes the node. The
allocation is, in order: ``SLURM_CPUS_PER_TASK`` (set by ``--cpus-per-task``), the CPU
affinity of this process (cgroups and task binding restrict it), the core count.
"""

from __future__ import annotations

import os
import sys


def allocated_cpus() -> int:
    """CPU threads this process may use."""
    text = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if text.strip().isdigit() and int(text) > 0:
        return int(text)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def use_threads(threads: int) -> None:
    """Make torch (now or when imported later) and child processes use ``threads`` threads.

    An ``OMP_NUM_THREADS`` the user set is left alone.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")  # torch reads OMP_NUM_THREADS when imported
    if torch is not None:
        torch.set_num_threads(threads)
