"""The trial-task interface: what one trial of a study does, behind one small base class.

The optim worker samples a configuration and hands it to a :class:`Task`; it never
knows which task it runs. A task owns

- its ``optim init`` options (:attr:`Task.OPTIONS`, shown under ``optim init --help``),
- what it stores in the study (:meth:`Task.prepare` returns its ``info``),
- its parameter groups, hence its configurations and search space (:meth:`Task.groups`),
- validation and repair of configurations, memory admission, and the run itself,
  reporting per-epoch values through a :class:`TrialContext` so the pruner can stop it.

A task object is built from the ``info`` it stored (``Task(info)``), by one factory
(:func:`cnn_mellin.tasks.make_task`, which a study's settings call).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cnn_mellin.config import Config, Group, builtin_groups, parameters
from cnn_mellin.errors import ConfigError


class PruneTrial(Exception):
    """Raised by a task to prune its trial for a reason worth recording (e.g. divergence).

    ``kind`` is a one-word category recorded next to the reason (``prune_kind``).
    """

    def __init__(self, reason: str, kind: str = "task"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


class TrialInterrupted(Exception):
    """Raised by a task that stopped because ``context.stop_requested()`` turned true.

    The task has saved what a retry needs to go on from where it stopped (``asr``: a
    checkpoint of the optimiser step it was at); the worker hands the trial back at once.
    ``step``: the optimiser step that checkpoint holds, if the task counts steps (the study
    records it).
    """

    def __init__(self, reason: str, step: int | None = None):
        super().__init__(reason)
        self.step = step


class MemoryExceeded(PruneTrial):
    """Raised by a task whose trial went over the study's memory limit while running.

    The worker records ``peak_bytes`` and tells the sampler (a constraint), as it does for
    configurations refused before they start.
    """

    def __init__(self, reason: str, peak_bytes: int, method: str):
        super().__init__(reason, kind="memory")
        self.peak_bytes = int(peak_bytes)
        self.method = method


@dataclass
class TaskResult:
    """What a finished trial reports: its value and a few facts the study records.

    ``resumed_from_epoch`` / ``resumed_from_step``: where a retry found its checkpoint (None:
    it started afresh, or the task does not count steps); ``attrs``: the task's own facts.
    """

    value: float
    epochs: int
    peak_bytes: int | None = None
    peak_method: str = "measured during training"
    resumed_from_epoch: int | None = None
    resumed_from_step: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MemoryFigure:
    """Peak memory of a configuration on a device: ``method`` is measured or estimated."""

    bytes: int
    method: str


def _ignore(*args: Any) -> None:
    return None


def _never() -> bool:
    return False


@dataclass
class TrialContext:
    """What the worker lends a running trial.

    ``report(epoch, value)`` records an intermediate value and raises
    ``optuna.TrialPruned`` when the pruner says stop; ``checkpoint_dir`` belongs to this
    trial (and its retries) and outlives the worker process. A task resuming from that
    directory reports the restored epochs again first (a worker killed between checkpoint
    and report lost them); repeats of an epoch already recorded are ignored.
    ``record(key, value)`` stores a fact on the trial (a user attribute) however the trial
    ends, pruned included; ``record_peak(bytes, method)`` its peak memory so far.
    ``mem_limit_bytes`` is the study's limit (None: no limit). ``stop_requested()`` turns
    true when the worker was told to stop (SIGTERM: preemption, a time limit): a task whose
    :attr:`Task.STOPS_ON_REQUEST` is set then saves its state and raises
    :class:`TrialInterrupted`.
    """

    device: str
    checkpoint_dir: Path
    num_data_workers: int
    report: Callable[[int, float], None]
    trial_number: int
    mem_limit_bytes: int | None = None
    record: Callable[[str, Any], None] = _ignore
    record_peak: Callable[[int, str], None] = _ignore
    stop_requested: Callable[[], bool] = _never


@dataclass(frozen=True)
class TaskOption:
    """One ``optim init`` option a task adds: ``--flag VALUE`` with its type and default.

    ``dest`` (the key in the options a task's :meth:`Task.prepare` gets) is the flag's
    name with dashes turned into underscores.
    """

    flag: str
    help: str
    type: Callable[[str], Any] = str
    default: Any = None
    metavar: str | None = None
    choices: tuple | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


class Task(abc.ABC):
    """One kind of trial. Subclasses set ``name`` and implement :meth:`prepare` and :meth:`run`.

    ``info`` is the JSON-serialisable mapping :meth:`prepare` returned at ``init``.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    OPTIONS: ClassVar[tuple[TaskOption, ...]] = ()
    # True: run() polls context.stop_requested() often (every few seconds at most), so on
    # SIGTERM the worker lets it save its state; False: the worker interrupts run() at once
    STOPS_ON_REQUEST: ClassVar[bool] = False

    def __init__(self, info: Mapping[str, Any]):
        self.info = dict(info)

    # -- init ------------------------------------------------------------------------------

    @classmethod
    def resolve_options(
        cls, given: Mapping[str, Any], require: bool = True
    ) -> dict[str, Any]:
        """``given`` (keys: :attr:`TaskOption.dest`, plus ``data_dir``) with defaults filled in.

        Raises ConfigError for an option the task does not have or (``require``) a required
        one missing.
        """
        known = {option.dest: option for option in cls.OPTIONS}
        unknown = sorted(set(given) - set(known) - {"data_dir"})
        if unknown:
            flags = ", ".join("--" + key.replace("_", "-") for key in unknown)
            raise ConfigError(f"task {cls.name!r} has no option {flags}")
        options = {"data_dir": given.get("data_dir")}
        for dest, option in known.items():
            value = given.get(dest, option.default)
            if value is None and option.required and require:
                raise ConfigError(f"--task {cls.name} needs {option.flag}")
            options[dest] = value
        return options

    @classmethod
    def groups_for(cls, options: Mapping[str, Any]) -> tuple[Group, ...]:
        """The parameter groups of this task's configurations, given its ``init`` options."""
        return builtin_groups()

    @classmethod
    @abc.abstractmethod
    def prepare(cls, options: Mapping[str, Any], config: Config) -> dict[str, Any]:
        """Validate the ``init`` options (and data) and return the info the study stores.

        ``options`` comes from :meth:`resolve_options`. Raises a UserError (DataError,
        ConfigError) naming what is wrong.
        """

    # -- configurations ----------------------------------------------------------------

    def groups(self) -> tuple[Group, ...]:
        """The parameter groups of this study's configurations."""
        return builtin_groups()

    def config(self, values: Mapping[str, Any] | None = None) -> Config:
        """A configuration of this task: its defaults overridden by ``values``."""
        return Config(values, self.groups())

    def params(self):
        """This task's parameter declarations by full name."""
        return parameters(self.groups())

    @property
    def direction(self) -> str:
        """``minimize`` or ``maximize``: which way the trial value is better."""
        return "minimize"

    @property
    def num_coeffs(self) -> int:
        """Coefficients per input frame (decides which parameters can matter)."""
        return int(self.info.get("num_coeffs", 1))

    def verify(self) -> None:
        """Check before a worker starts that what was stored at init is still usable."""
        return None

    def check(self, config: Config) -> None:
        """Raise ConfigError if ``config`` is not a valid combination for this task."""
        return None

    def repair(self, config: Config) -> Config:
        """The closest valid configuration to ``config`` (used by ``best --independent``)."""
        return config

    def describe(self, config: Config) -> list[str]:
        """Lines ``best`` adds (as comments) above ``config``, e.g. how to reproduce it."""
        return []

    def max_epochs(self, config: Config, searched: list[str]) -> int | None:
        """The most epochs a trial can run (the pruner's resource), if the task has epochs."""
        return None

    def peak_memory(self, config: Config, device: str) -> MemoryFigure | None:
        """Peak memory one training step of ``config`` needs on ``device``, if knowable."""
        return None

    def discard(self, checkpoint_dir: Path) -> int:
        """Delete what only a retry could use, once the trial ended for good (COMPLETE or
        PRUNED); keep what its results point to. Returns the bytes freed."""
        return 0

    @abc.abstractmethod
    def run(self, config: Config, context: TrialContext) -> TaskResult:
        """Run one trial. Raise PruneTrial (or let ``optuna.TrialPruned`` through) to prune."""
