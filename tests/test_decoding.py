"""Greedy CTC decoding (cnn_mellin.decoding)."""

from __future__ import annotations

import torch

from cnn_mellin.data.phones import BLANK
from cnn_mellin.decoding import greedy_decode


def _one_hot_log_probs(paths, length, classes=BLANK + 1):
    """(T, N, C) log-probabilities whose argmax follows each path (padded with class 0)."""
    lp = torch.full((length, len(paths), classes), -10.0)
    for n, path in enumerate(paths):
        for t in range(length):
            lp[t, n, path[t] if t < len(path) else 0] = 0.0
    return lp.log_softmax(-1)


def test_greedy_merges_repeats_drops_blanks_and_respects_lengths():
    b = BLANK
    paths = [[3, 3, b, 3, 5, 5, b, b, 7], [b, 1, 1, 2, 2]]
    lp = _one_hot_log_probs(paths, 9)
    hyps = greedy_decode(lp, torch.tensor([9, 5]))
    assert hyps == [[3, 3, 5, 7], [1, 2]]
    # frames past a sequence's length (here all class 0) are ignored
    assert greedy_decode(lp, torch.tensor([3, 2])) == [[3], [1]]
