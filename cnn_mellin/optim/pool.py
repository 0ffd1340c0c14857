"""A local pool of workers (``optim run --workers N``): what its workers know of each other.

The pool's parent process watches its workers and starts one again when one is killed while
the study still has work. So a worker of the pool that finds nothing left to claim while
only its siblings' trials run does not stand by for their retries (the standby of
:mod:`cnn_mellin.optim.standby` exists for workers that nobody watches): it leaves, and the
CPU threads it had go to the siblings still training, whose torch thread count follows the
number of live workers (each epoch). At the end of a stage the last trials then run on
every core instead of one worker training while the others wait.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial

from cnn_mellin.optim.attrs import WORKER
from cnn_mellin.optim.heartbeat import WorkerIdentity

_log = logging.getLogger("cnn_mellin.optim")


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` on this machine (from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            text = handle.read()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return int(fields[1]) if len(fields) > 1 else None


@dataclass
class PoolLink:
    """A pool worker's link to its pool: the parent's pid, the pool's CPU threads in all, and
    ``live`` (a shared integer the parent keeps at the number of live workers)."""

    parent: int
    cpus: int
    live: Any  # multiprocessing.Value("i")
    elastic: bool = True  # False when the user fixed OMP_NUM_THREADS

    def holds_all(self, running: list[FrozenTrial], me: WorkerIdentity) -> bool:
        """Whether every trial of ``running`` (at least one) runs in a worker of this pool."""
        if not running:
            return False
        for trial in running:
            holder = WorkerIdentity.from_attr(trial.user_attrs.get(WORKER))
            if holder is None or not holder.same_machine(me) or holder.same_process(me):
                return False
            if parent_pid(holder.pid) != self.parent or not holder.alive():
                return False
        return True

    def threads(self) -> int:
        """CPU threads one live worker of the pool may use now."""
        return max(1, self.cpus // max(1, self.live.value))

    def share_cpus(self) -> None:
        """Set torch's thread count to this worker's share of the pool's CPUs."""
        if not self.elastic:
            return
        import torch

        threads = self.threads()
        if threads != torch.get_num_threads():
            _log.info("now %d CPU threads (%d live workers in the pool)", threads,
                      self.live.value)
            torch.set_num_threads(threads)
