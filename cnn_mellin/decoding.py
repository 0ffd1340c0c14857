"""Greedy CTC decoding: of model outputs, of collated batches, of a data dir by ``model.pt``.

The ``model.pt`` file is :mod:`cnn_mellin.modelfile`'s; the phone error rate is
:mod:`cnn_mellin.scoring`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cnn_mellin.data.phones import BLANK
from cnn_mellin.errors import DataError
from cnn_mellin.modelfile import load_model_file
from cnn_mellin.scoring import phone_error_rate, symbols_39


def greedy_decode(log_probs: torch.Tensor, out_lens: torch.Tensor, blank: int = BLANK):
    """Best path per sequence of ``log_probs`` (T, N, C): repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).t().cpu()  # (N, T)
    lens = out_lens.cpu().tolist()
    hyps = []
    for row, length in zip(best, lens, strict=True):
        path = torch.unique_consecutive(row[:length])
        hyps.append([int(x) for x in path if int(x) != blank])
    return hyps


@torch.no_grad()
def decode_batches(model: torch.nn.Module, batches: Iterable, device) -> dict[str, tuple]:
    """Greedy hypotheses of ``model`` (eval mode, no grad) over collated batches.

    Returns ``{utt_id: (reference ids48, hypothesis ids48)}``.
    """
    was_training = model.training
    model.eval()
    out = {}
    try:
        for batch in batches:
            batch = batch.to(device)
            log_probs, out_lens = model(batch.feats, batch.feat_lens)
            hyps = greedy_decode(log_probs.float(), out_lens)
            targets = batch.targets.cpu()
            for utt, tgt, length, hyp in zip(
                batch.utt_ids, targets, batch.target_lens.cpu().tolist(), hyps, strict=True
            ):
                out[utt] = (tgt[:length].tolist(), hyp)
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class DecodeResult:
    """Phone error rate (39-phone scoring) and per-utterance hypotheses (39-phone symbols)."""

    per: float
    num_utts: int
    hypotheses: dict[str, list[str]]


def decode(model_dir, data_dir, device="cpu", utt_ids=None) -> DecodeResult:
    """Greedy-decode ``data_dir`` (or its ``utt_ids``) with ``model_dir/model.pt``; score PER.

    The hypotheses come in the data dir's order (or that of ``utt_ids``).
    """
    from cnn_mellin.data.loader import UtteranceDataset, make_loader

    loaded = load_model_file(model_dir, device)
    dataset = UtteranceDataset(data_dir, utt_ids=utt_ids)
    info = dataset.info
    if info.num_coeffs != loaded.num_coeffs or info.feature != loaded.feature:
        raise DataError(
            f"{data_dir}: holds {info.feature} features ({info.num_coeffs} coefficients) but the "
            f"model was trained on {loaded.feature} ({loaded.num_coeffs} coefficients)"
        )
    if tuple(info.phones) != loaded.phones:
        raise DataError(f"{data_dir}: its phone inventory differs from the model's")
    loader = make_loader(
        dataset, loaded.config["data.eval_batch_size"], shuffle=False,
        num_buckets=loaded.config["data.num_buckets"],
    )
    pairs = decode_batches(loaded.model, loader, device)
    order = list(utt_ids) if utt_ids is not None else list(info.utt_ids)
    refs = [pairs[u][0] for u in order]
    hyps = [pairs[u][1] for u in order]
    per = phone_error_rate(refs, hyps)
    hypotheses = {
        u: symbols_39(pairs[u][1], loaded.phones, loaded.phone_map_39) for u in order
    }
    return DecodeResult(per, len(order), hypotheses)
