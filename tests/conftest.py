"""Shared fixtures: run the command line in-process or as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(capsys):
    """Call ``cnn-mellin`` in-process: returns (exit code, stdout, stderr)."""
    from cnn_mellin.cli import main

    def run(*argv: str):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse exits for --help and usage errors
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_cli(*argv: str, cwd: Path | None = None, timeout: float = 600, env=None):
    """Run ``python -m cnn_mellin`` as a separate process; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cnn_mellin", *map(str, argv)],
        capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env,
    )
