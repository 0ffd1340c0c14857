"""TIMIT phone sets: the 61 labels of ``.PHN`` files, 48 training phones, 39 scoring phones.

The tables come from ``timit/phones.61-48-39.map`` (package data). ``q`` (glottal stop)
has no 48-phone counterpart and is dropped from targets, as is customary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from importlib import resources

from cnn_mellin.errors import DataError


def _read_lines(name: str) -> list[str]:
    text = resources.files("cnn_mellin.data").joinpath("timit", name).read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_map() -> tuple[tuple[str, ...], dict[str, str], dict[str, str]]:
    phones61, to48, to39 = [], {}, {}
    for line in _read_lines("phones.61-48-39.map"):
        fields = line.split()
        phones61.append(fields[0])
        if len(fields) == 3:
            to48[fields[0]] = fields[1]
            to39[fields[1]] = fields[2]
    return tuple(sorted(phones61)), to48, to39


PHONES61, map_61_to_48, map_48_to_39 = _read_map()
PHONES48: tuple[str, ...] = tuple(sorted(set(map_61_to_48.values())))
PHONES39: tuple[str, ...] = tuple(sorted(set(map_48_to_39.values())))
BLANK = len(PHONES48)  # CTC blank id: models have len(PHONES48) + 1 outputs

_ID48 = {p: i for i, p in enumerate(PHONES48)}
_ID39 = {p: i for i, p in enumerate(PHONES39)}
_FOLD = tuple(_ID39[map_48_to_39[p]] for p in PHONES48)


def fold_to_39(ids48: Sequence[int]) -> list[int]:
    """Map 48-phone ids (indices into PHONES48) to ids into PHONES39."""
    try:
        return [_FOLD[int(i)] for i in ids48]
    except IndexError:
        bad = [int(i) for i in ids48 if not 0 <= int(i) < len(PHONES48)]
        raise DataError(
            f"phone id {bad[0]} out of range; allowed: 0..{len(PHONES48) - 1}"
        ) from None


def targets_from_61(labels: Iterable[str], where: str = "") -> list[int]:
    """48-phone ids for a sequence of 61-phone labels, dropping ``q``.

    Raises DataError naming ``where`` (e.g. a file) for a label outside the 61-phone set.
    """
    ids = []
    for label in labels:
        if label in map_61_to_48:
            ids.append(_ID48[map_61_to_48[label]])
        elif label not in PHONES61:
            place = f" in {where}" if where else ""
            raise DataError(
                f"unknown phone label {label!r}{place}; allowed: the 61 TIMIT phones "
                f"({' '.join(PHONES61)})"
            )
    return ids


def speaker_list(name: str) -> tuple[str, ...]:
    """Speaker ids (lower case) of ``dev`` (dev_spk.list) or ``core_test`` (core_test_spk.list)."""
    if name not in ("dev", "core_test"):
        raise ValueError(f"no speaker list {name!r}")
    return tuple(s.lower() for s in _read_lines(f"{name}_spk.list"))
