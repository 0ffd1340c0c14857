"""Trial tasks, chosen by name in one place.

Built-in tasks are listed in :data:`TASKS` (imported lazily, so reading a study does not
import torch). A task from elsewhere is named ``package.module:ClassName``.
"""

from __future__ import annotations

import importlib

from cnn_mellin.errors import ConfigError
from cnn_mellin.tasks.base import MemoryFigure, PruneTrial, Task, TaskResult, TrialContext

TASKS = {
    "asr": "cnn_mellin.tasks.asr:AsrTask",
}
PLANNED = ("attack", "command")


def task_names() -> list[str]:
    """Names of the built-in tasks."""
    return sorted(TASKS)


def get_task(name: str) -> type[Task]:
    """The :class:`Task` class called ``name`` (built-in name or ``module:Class``)."""
    target = TASKS.get(name)
    if target is None and ":" not in name:
        if name in PLANNED:
            raise ConfigError(
                f"task {name!r} is not available in this version; available: "
                + ", ".join(task_names())
            )
        raise ConfigError(f"unknown task {name!r}; available: " + ", ".join(task_names()))
    module_name, _, attr = (target or name).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot load task {name!r}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task {name!r} is not a cnn_mellin.tasks.Task")
    return cls


__all__ = [
    "MemoryFigure", "PLANNED", "PruneTrial", "TASKS", "Task", "TaskResult", "TrialContext",
    "get_task", "task_names",
]
