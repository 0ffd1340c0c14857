"""``cnn-mellin params [REGEX...]``: list parameters with default, range and doc."""

from __future__ import annotations

import sys

from cnn_mellin.cli.task_options import add_task_arguments
from cnn_mellin.config import Config, match_names


def register(commands) -> None:
    parser = commands.add_parser(
        "params",
        help="list tunable parameters with default, search range and doc",
        description="List parameters (name, default, search range, doc). REGEX are matched in "
        "full against names such as model.window_size; default: every tunable parameter. "
        "With --task, the parameters of that trial task (e.g. --task command --space FILE: "
        "a training script's own).",
    )
    parser.add_argument(
        "regex", nargs="*", metavar="REGEX", help="only names matching one of these"
    )
    parser.add_argument(
        "--all", action="store_true", help="include parameters that are not searched"
    )
    add_task_arguments(parser, default=None)
    parser.set_defaults(func=run, needs_device=False)


def describe_search(param) -> str:
    """The search range of a parameter as text (``-`` when it is not tunable)."""
    search = param.search
    if search is None:
        return "-"
    if search.choices is not None:
        return "{" + ", ".join(param.format(c) for c in search.choices) + "}"
    text = f"[{param.format(search.low)}, {param.format(search.high)}]"
    if search.log:
        text += " log"
    if search.step is not None:
        text += f" step {search.step}"
    return text


def run(args, config: Config) -> int:
    params = config.params
    names = list(params)
    if args.regex:
        names = match_names(args.regex, names, "params")
    if not args.all:
        names = [n for n in names if params[n].tunable]
    if not names:
        sys.stderr.write("cnn-mellin: no parameter matches\n")
        return 1
    rows = [
        (n, params[n].format(config[n]), describe_search(params[n]), params[n].doc)
        for n in names
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(3)]
        sys.stdout.write("  ".join(cells) + "  " + row[3] + "\n")
    return 0
