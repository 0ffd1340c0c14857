"""Trial tasks, chosen by name in one place.

Built-in tasks are listed in :data:`TASKS` (each module imports torch only when a trial
runs, so reading a study stays light). A task from elsewhere is named
``package.module:ClassName``; it gets no ``init`` options of its own on the command line.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from cnn_mellin.errors import ConfigError
from cnn_mellin.tasks.base import (
    MemoryExceeded,
    MemoryFigure,
    PruneTrial,
    Task,
    TaskOption,
    TaskResult,
    TrialContext,
)

TASKS = {
    "asr": "cnn_mellin.tasks.asr:AsrTask",
    "attack": "cnn_mellin.tasks.attack:AttackTask",
    "command": "cnn_mellin.tasks.command:CommandTask",
}
PLANNED: tuple[str, ...] = ()


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


def make_task(name: str, info: Mapping[str, Any]) -> Task:
    """The task ``name`` built from the ``info`` its ``prepare`` stored in a study."""
    return get_task(name)(info)


__all__ = [
    "MemoryExceeded", "MemoryFigure", "PLANNED", "PruneTrial", "TASKS", "Task", "TaskOption",
    "TaskResult", "TrialContext", "get_task", "make_task", "task_names",
]
