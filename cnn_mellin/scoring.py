"""The phone error rate with 39-phone scoring: 48-phone ids folded to 39, repeats merged."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torchaudio.functional

from cnn_mellin.errors import DataError


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1), torchaudio's."""
    return torchaudio.functional.edit_distance(ref, hyp)


def _merge_repeats(seq: Sequence[int]) -> list[int]:
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def fold_and_merge(ids48: Sequence[int]) -> list[int]:
    """48-phone ids folded to 39-phone ids, then repeated phones merged."""
    from cnn_mellin.data.phones import fold_to_39

    return _merge_repeats(fold_to_39(list(ids48)))


def symbols_39(ids48: Sequence[int], phones: Sequence[str], phone_map_39: Mapping[str, str]):
    """48-phone ids to 39-phone symbols, repeats merged after folding."""
    return _merge_repeats([phone_map_39[phones[i]] for i in ids48])


def error_counts(refs48: Iterable[Sequence[int]], hyps48: Iterable[Sequence[int]]):
    """(edit operations, reference phones) summed over utterances, 39-phone scoring."""
    errors = total = 0
    for ref, hyp in zip(refs48, hyps48, strict=True):
        ref39, hyp39 = fold_and_merge(ref), fold_and_merge(hyp)
        errors += edit_distance(ref39, hyp39)
        total += len(ref39)
    return errors, total


def phone_error_rate(refs48: Iterable[Sequence[int]], hyps48: Iterable[Sequence[int]]) -> float:
    """Edit distance over reference length, both folded to 39 phones with repeats merged."""
    errors, total = error_counts(refs48, hyps48)
    if total == 0:
        raise DataError("cannot score: the reference transcriptions hold no phones")
    return errors / total
