"""What several ``optim`` actions share: argument types, Optuna's logging, opening the
study, writing a result to a file or standard output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnn_mellin.files import write_text_atomic


def integer(text: str) -> int:
    """argparse type: an integer, with a one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def quiet_optuna(args) -> None:
    """Optuna's own INFO lines ("A new study created ...") only with --verbose."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)


def open_study(args):
    """The study ``--study-name`` names in ``DB_URL`` (or its only one), and its settings."""
    from cnn_mellin.optim.storage import load_study, open_storage
    from cnn_mellin.optim.study import read_settings

    quiet_optuna(args)
    study = load_study(open_storage(args.db_url), args.study_name, args.db_url)
    return study, read_settings(study)


def emit(text: str, out: str) -> None:
    """Write ``text`` to the file ``out`` (atomically), or to standard output for ``-``."""
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
