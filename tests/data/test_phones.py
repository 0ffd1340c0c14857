"""Phone sets and maps of cnn_mellin.data.phones."""

from __future__ import annotations

import pytest

from cnn_mellin.data import phones
from cnn_mellin.errors import DataError


def test_phone_sets_have_timit_sizes():
    assert len(phones.PHONES61) == 61
    assert len(phones.PHONES48) == 48
    assert len(phones.PHONES39) == 39
    assert list(phones.PHONES48) == sorted(phones.PHONES48)
    assert phones.BLANK == 48
    assert "q" in phones.PHONES61 and "q" not in phones.map_61_to_48


def test_maps_are_consistent():
    assert set(phones.map_61_to_48.values()) == set(phones.PHONES48)
    assert set(phones.map_48_to_39) == set(phones.PHONES48)
    assert phones.map_61_to_48["ax-h"] == "ax" and phones.map_48_to_39["ax"] == "ah"
    assert phones.map_61_to_48["pcl"] == "cl" and phones.map_48_to_39["cl"] == "sil"


def test_fold_to_39_maps_ids_through_symbols():
    ids48 = [phones.PHONES48.index(p) for p in ("ao", "aa", "zh", "sh", "cl", "vcl")]
    folded = [phones.PHONES39[i] for i in phones.fold_to_39(ids48)]
    assert folded == ["aa", "aa", "sh", "sh", "sil", "sil"]
    with pytest.raises(DataError, match="out of range"):
        phones.fold_to_39([48])


def test_targets_from_61_drops_q_and_rejects_unknown_labels():
    ids = phones.targets_from_61(["h#", "q", "bcl", "b", "ix"])
    assert [phones.PHONES48[i] for i in ids] == ["sil", "vcl", "b", "ix"]
    with pytest.raises(DataError, match="unknown phone label 'xx' in a.PHN"):
        phones.targets_from_61(["h#", "xx"], where="a.PHN")


def test_speaker_lists():
    dev, core = phones.speaker_list("dev"), phones.speaker_list("core_test")
    assert len(dev) == len(set(dev)) == 50
    assert len(core) == len(set(core)) == 24
    assert not set(dev) & set(core)
    assert all(s == s.lower() and len(s) == 5 for s in dev + core)
