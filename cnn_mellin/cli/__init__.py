"""The ``cnn-mellin`` command: a thin shell over the library.

Global options build the effective :class:`~cnn_mellin.config.Config`; each
command module adds its parser with ``register(subparsers)`` and handles
``handler(args, config) -> int``. Every mistake a user can make ends here as one
line on stderr and exit code 2 (``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from cnn_mellin import __version__
from cnn_mellin.config import Config
from cnn_mellin.errors import UserError

PROG = "cnn-mellin"
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|mps|xpu(:\d+)?)$")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a single line and exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def device_argument(text: str) -> str:
    """argparse type for ``--device``: cpu, cuda, cuda:N, mps, xpu[:N]."""
    if not _DEVICE.match(text):
        raise argparse.ArgumentTypeError(
            f"invalid device {text!r}; allowed: cpu, cuda, cuda:N, mps, xpu, xpu:N"
        )
    return text


def default_device() -> str:
    """``cuda`` when a CUDA device is usable here, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (global options and every command)."""
    from cnn_mellin.cli import attack, optim, params, prep, train

    parser = _Parser(
        prog=PROG,
        description="Hyperparameter search for CTC acoustic models with linear or Mellin "
        "correlation layers, on shared Optuna studies.",
    )
    parser.add_argument(
        "--read-ini", action="append", default=[], metavar="FILE",
        help="read configuration from an .ini file; repeatable, later files win",
    )
    parser.add_argument(
        "--print-ini", action="store_true",
        help="print the effective configuration as an .ini file and exit",
    )
    parser.add_argument(
        "--device", type=device_argument, default=None,
        help="torch device to compute on (default: cuda if available, else cpu)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (overrides training.seed)"
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="log more and show tracebacks on errors"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in (prep, train, attack, optim, params):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # the command's trial task decides which parameter groups the .ini files hold
        groups = args.config_groups(args) if getattr(args, "config_groups", None) else None
        config = Config.from_ini(args.read_ini, groups=groups)
        if args.seed is not None:
            config = config.replace({"training.seed": args.seed})
        if args.print_ini:
            sys.stdout.write(config.to_ini())
            return 0
        if args.command is None:
            parser.print_usage(sys.stderr)
            sys.stderr.write(f"{PROG}: error: a COMMAND is required (see {PROG} --help)\n")
            return 2
        args.device_given = args.device
        if args.device is None and getattr(args, "needs_device", True):
            args.device = default_device()
        return int(args.func(args, config) or 0)
    except UserError as err:
        if args.verbose:
            raise
        sys.stderr.write(f"{PROG}: error: {err}\n")
        return err.exit_code
    except OSError as err:
        if args.verbose:
            raise
        where = f": {err.filename}" if err.filename else ""
        sys.stderr.write(f"{PROG}: error: {err.strerror or err}{where}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
