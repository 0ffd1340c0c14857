"""Byte counts and durations for people: the one formatter of each, used by every report.

``format_bytes`` uses decimal units (kB, MB, GB); ``format_duration`` seconds, minutes or
hours, whichever reads best.
"""

from __future__ import annotations

__all__ = ["format_bytes", "format_duration"]


def format_bytes(n: float) -> str:
    """``n`` bytes for people: 999 bytes, 1.5 kB, 3.1 MB, 2.0 GB (GB above that too)."""
    for unit in ("bytes", "kB", "MB"):
        if n < 1000:
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_duration(seconds: float | None, unknown: str = "?") -> str:
    """``42 s`` (under 2 minutes), ``14 min`` (under 2 hours), ``3.2 h``; ``unknown`` for None."""
    if seconds is None:
        return unknown
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
