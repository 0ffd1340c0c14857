"""Edit distance and the 39-phone PER of cnn_mellin.scoring."""

from __future__ import annotations

import random

import pytest

from cnn_mellin.data.phones import BLANK, PHONES48, map_48_to_39
from cnn_mellin.errors import DataError
from cnn_mellin.scoring import edit_distance, fold_and_merge, phone_error_rate, symbols_39


def _levenshtein_reference(a, b):
    # recursive definition with memoisation, independent of the DP in the module
    from functools import cache

    @cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def test_edit_distance_known_cases_and_random_against_recursion():
    assert edit_distance([], []) == 0
    assert edit_distance([1, 2, 3], []) == 3
    assert edit_distance([], [4, 4]) == 2
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([1, 2, 3, 4], [1, 3, 4, 5]) == 2
    rng = random.Random(0)
    for _ in range(50):
        a = [rng.randrange(4) for _ in range(rng.randrange(8))]
        b = [rng.randrange(4) for _ in range(rng.randrange(8))]
        assert edit_distance(a, b) == _levenshtein_reference(tuple(a), tuple(b))
        assert edit_distance(a, b) == edit_distance(b, a)


def test_folding_maps_to_39_and_merges_repeats_after_folding():
    # find two distinct 48-phones that fold onto the same 39-phone
    by39 = {}
    for p in PHONES48:
        by39.setdefault(map_48_to_39[p], []).append(PHONES48.index(p))
    a, b = next(ids for ids in by39.values() if len(ids) > 1)
    other = next(ids[0] for ids in by39.values() if a not in ids)
    assert fold_and_merge([a, b, other]) == fold_and_merge([a, other])
    assert len(fold_and_merge([a, b, other])) == 2
    # a substitution between phones that fold together costs nothing
    assert phone_error_rate([[a, other]], [[b, other]]) == 0.0
    assert symbols_39([a, b, other], PHONES48, map_48_to_39) == [
        map_48_to_39[PHONES48[a]], map_48_to_39[PHONES48[other]]
    ]


def test_phone_error_rate_is_total_edits_over_total_reference_length():
    refs = [[0, 1, 2, 3], [4, 5]]
    hyps = [[0, 1, 3], [4, 5, 6, 7]]
    # fold ids to check against the definition
    expected = sum(
        edit_distance(fold_and_merge(r), fold_and_merge(h)) for r, h in zip(refs, hyps, strict=True)
    ) / sum(len(fold_and_merge(r)) for r in refs)
    assert phone_error_rate(refs, hyps) == pytest.approx(expected)
    assert phone_error_rate(refs, refs) == 0.0
    assert phone_error_rate(refs, [[], []]) == 1.0


def test_phone_error_rate_rejects_empty_references_and_bad_ids():
    with pytest.raises(DataError):
        phone_error_rate([[]], [[1]])
    with pytest.raises(DataError):
        phone_error_rate([[1]], [[BLANK]])
