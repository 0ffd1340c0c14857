"""The trial-task interface: what one trial of a study does, behind one small base class.

The optim worker samples a configuration and hands it to a :class:`Task`; it never
knows which task it runs. A task is created from what it stored in the study at
``init`` (its ``info``), checks configurations, estimates their memory, and runs a trial,
reporting per-epoch values through a :class:`TrialContext` so the pruner can stop it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cnn_mellin.config import Config


class PruneTrial(Exception):
    """Raised by a task to prune its trial for a reason worth recording (e.g. divergence).

    ``kind`` is a one-word category recorded next to the reason (``prune_kind``).
    """

    def __init__(self, reason: str, kind: str = "task"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass
class TaskResult:
    """What a finished trial reports: its value and a few facts the study records."""

    value: float
    epochs: int
    peak_bytes: int | None = None
    resumed_from_epoch: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryFigure:
    """Peak memory of a configuration on a device: ``method`` is measured or estimated."""

    bytes: int
    method: str


@dataclass
class TrialContext:
    """What the worker lends a running trial.

    ``report(epoch, value)`` records an intermediate value and raises
    ``optuna.TrialPruned`` when the pruner says stop; ``checkpoint_dir`` belongs to this
    trial (and its retries) and outlives the worker process. A task resuming from that
    directory reports the restored epochs again first (a worker killed between checkpoint
    and report lost them); repeats of an epoch already recorded are ignored.
    """

    device: str
    checkpoint_dir: Path
    num_data_workers: int
    report: Callable[[int, float], None]
    trial_number: int


class Task(abc.ABC):
    """One kind of trial. Subclasses set ``name`` and implement :meth:`prepare` and :meth:`run`.

    ``info`` is the JSON-serialisable mapping :meth:`prepare` returned at ``init``.
    """

    name: ClassVar[str]

    def __init__(self, info: Mapping[str, Any]):
        self.info = dict(info)

    @classmethod
    @abc.abstractmethod
    def prepare(cls, data_dir: Path, config: Config, dev_proportion: float) -> dict[str, Any]:
        """Validate ``data_dir`` for this task and return the info the study stores.

        Raises a UserError (DataError, ConfigError) naming what is wrong.
        """

    @property
    def num_coeffs(self) -> int:
        """Coefficients per input frame (decides which parameters can matter)."""
        return int(self.info.get("num_coeffs", 1))

    def verify(self) -> None:
        """Check before a worker starts that the data stored at init are still usable."""
        return None

    def check(self, config: Config) -> None:
        """Raise ConfigError if ``config`` is not a valid combination for this task."""
        return None

    def repair(self, config: Config) -> Config:
        """The closest valid configuration to ``config`` (used by ``best --independent``)."""
        return config

    def max_epochs(self, config: Config, searched: list[str]) -> int | None:
        """The most epochs a trial can run (the pruner's resource), if the task has epochs."""
        return None

    def peak_memory(self, config: Config, device: str) -> MemoryFigure | None:
        """Peak memory one training step of ``config`` needs on ``device``, if knowable."""
        return None

    @abc.abstractmethod
    def run(self, config: Config, context: TrialContext) -> TaskResult:
        """Run one trial. Raise PruneTrial (or let ``optuna.TrialPruned`` through) to prune."""
