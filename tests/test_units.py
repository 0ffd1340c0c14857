"""The one byte and duration formatter (cnn_mellin.units)."""

from __future__ import annotations

from cnn_mellin.units import format_bytes, format_duration


def test_format_bytes_uses_decimal_units_with_one_decimal():
    assert format_bytes(0) == "0 bytes" and format_bytes(999) == "999 bytes"
    assert format_bytes(1500) == "1.5 kB" and format_bytes(3_052_200) == "3.1 MB"
    assert format_bytes(2 * 10**9) == "2.0 GB" and format_bytes(5 * 10**12) == "5000.0 GB"


def test_format_duration_switches_unit_at_two_minutes_and_two_hours():
    assert format_duration(42) == "42 s" and format_duration(119) == "119 s"
    assert format_duration(145) == "2 min" and format_duration(7199) == "120 min"
    assert format_duration(7200) == "2.0 h" and format_duration(11_520) == "3.2 h"
    assert format_duration(None) == "?" and format_duration(None, unknown="–") == "–"
