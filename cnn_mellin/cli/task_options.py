"""``--task NAME`` and each task's own options, for the commands that create or describe a study.

Every built-in task's :attr:`~cnn_mellin.tasks.Task.OPTIONS` are added in an argument
group of their own (so ``optim init --help`` shows them under the task's name); an option
of another task than the one chosen is an error. The chosen task also decides the
parameter groups that ``--read-ini`` files are read against (a ``command`` study's
parameters are the user's own).
"""

from __future__ import annotations

import argparse
from typing import Any

from cnn_mellin.errors import ConfigError

_PREFIX = "task_option_"  # argparse dests, apart from the commands' own (--command!)


def _typed(option):
    def convert(text: str):
        try:
            return option.type(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(
                f"{option.flag}: invalid value {text!r}"
            ) from None
    convert.__name__ = getattr(option.type, "__name__", "value")
    return convert


def add_task_arguments(parser: argparse.ArgumentParser, default: str | None = "asr") -> None:
    """Add ``--task`` and the options of every built-in task to ``parser``."""
    from cnn_mellin.tasks import PLANNED, get_task, task_names

    planned = f" (planned: {', '.join(PLANNED)})" if PLANNED else ""
    parser.add_argument(
        "--task", default=default, metavar="TASK",
        help=f"what a trial does: {', '.join(task_names())}{planned}, or module:Class"
        + (f" (default {default})" if default else ""),
    )
    seen: dict[str, str] = {}
    for name in task_names():
        cls = get_task(name)
        fresh = [o for o in cls.OPTIONS if o.flag not in seen]
        if not fresh:
            continue
        group = parser.add_argument_group(
            f"--task {name} options", cls.summary or None
        )
        for option in fresh:
            seen[option.flag] = name
            group.add_argument(
                option.flag, dest=_PREFIX + option.dest, type=_typed(option), default=None,
                metavar=option.metavar, choices=option.choices,
                help=option.help.replace("%(default)s", str(option.default))
                + (" (required)" if option.required else ""),
            )
    parser.set_defaults(config_groups=config_groups)


def task_options(
    args: argparse.Namespace, require: bool = True
) -> tuple[type, dict[str, Any]]:
    """The chosen task's class and its options from ``args`` (defaults filled in).

    ConfigError for an option that belongs to another task, or (``require``) for a missing
    required one.
    """
    from cnn_mellin.tasks import get_task, task_names

    cls = get_task(args.task)
    own = {option.dest for option in cls.OPTIONS}
    for name in task_names():
        for option in get_task(name).OPTIONS:
            if option.dest not in own and getattr(args, _PREFIX + option.dest, None) is not None:
                raise ConfigError(
                    f"{option.flag} is an option of --task {name}, not of --task {args.task}"
                )
    given = {
        dest: getattr(args, _PREFIX + dest) for dest in own
        if getattr(args, _PREFIX + dest, None) is not None
    }
    given["data_dir"] = getattr(args, "data_dir", None)
    return cls, cls.resolve_options(given, require)


def config_groups(args: argparse.Namespace):
    """The parameter groups ``--read-ini`` files are read against: the chosen task's."""
    if args.task is None:
        return None
    cls, options = task_options(args, require=False)
    return cls.groups_for(options)
