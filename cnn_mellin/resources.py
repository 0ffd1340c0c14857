"""Locate the configuration files shipped with cnn-mellin (``conf/``)."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def conf_path(*parts: str) -> Path:
    """Path of ``conf/<parts...>`` in an installed package or in the source tree."""
    for root in (_PACKAGE / "_conf", _PACKAGE.parent / "conf"):
        if root.is_dir():
            return root.joinpath(*parts)
    raise FileNotFoundError("cnn-mellin's conf/ folder is missing from this installation")
