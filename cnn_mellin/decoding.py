"""Greedy CTC decoding, phone error rate (39-phone scoring) and the ``model.pt`` file.

``model.pt`` is what :func:`decode` needs and nothing more: the model weights,
the configuration as ``.ini`` text, the number of input coefficients, the phone
inventory with its 48→39 map and the normalisation statistics (inside the
model's buffers). It holds tensors, strings, numbers, lists and dicts only, so it
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchaudio.functional

from cnn_mellin.errors import DataError, UserError
from cnn_mellin.files import atomic_path, write_text_atomic

BLANK = 48
MODEL_FILE = "model.pt"
_FORMAT = "cnn-mellin-model-1"


def greedy_decode(log_probs: torch.Tensor, out_lens: torch.Tensor, blank: int = BLANK):
    """Best path per sequence of ``log_probs`` (T, N, C): repeats merged, blanks dropped."""
    best = log_probs.argmax(-1).t().cpu()  # (N, T)
    lens = out_lens.cpu().tolist()
    hyps = []
    for row, length in zip(best, lens, strict=True):
        path = torch.unique_consecutive(row[:length])
        hyps.append([int(x) for x in path if int(x) != blank])
    return hyps


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions all cost 1), torchaudio's."""
    return torchaudio.functional.edit_distance(ref, hyp)


def _merge_repeats(seq: Sequence[int]) -> list[int]:
    return [x for i, x in enumerate(seq) if i == 0 or x != seq[i - 1]]


def fold_and_merge(ids48: Sequence[int]) -> list[int]:
    """48-phone ids folded to 39-phone ids, then repeated phones merged."""
    from cnn_mellin.data.phones import fold_to_39

    return _merge_repeats(fold_to_39(list(ids48)))


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


# ---------------------------------------------------------------- model file


def write_model_file(path, model: torch.nn.Module, config_ini: str, info, extra=None) -> None:
    """Write ``model.pt`` atomically: weights, configuration and data description."""
    payload = {
        "format": _FORMAT,
        "config": config_ini,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "num_coeffs": int(info.num_coeffs),
        "feature": str(info.feature),
        "phones": [str(p) for p in info.phones],
        "phone_map_39": {str(k): str(v) for k, v in dict(info.phone_map_39).items()},
        "extra": dict(extra or {}),
    }
    save_atomic(payload, path)


def save_atomic(obj: Any, path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint_file(path) -> dict:
    """``torch.load`` with ``weights_only=True`` onto the CPU; a UserError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "not ours"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable cnn-mellin checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a cnn-mellin checkpoint")
    return obj


@dataclass(frozen=True)
class LoadedModel:
    """A model read from ``model.pt`` with what it was trained on."""

    model: torch.nn.Module
    config: Any
    num_coeffs: int
    feature: str
    phones: tuple[str, ...]
    phone_map_39: dict[str, str]
    extra: dict


def load_model_file(path, device="cpu") -> LoadedModel:
    """Rebuild the model stored in ``model.pt`` (or a model directory holding one)."""
    from cnn_mellin.config import Config, parse_ini
    from cnn_mellin.model import AcousticModel

    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    obj = load_checkpoint_file(path)
    if obj.get("format") != _FORMAT:
        raise UserError(f"{path}: not a cnn-mellin model file")
    config = Config(parse_ini(obj["config"], str(path)))
    model = AcousticModel(config.group("model"), obj["num_coeffs"], num_classes=BLANK + 1)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path}: weights do not fit the stored configuration: "
                        f"{str(err).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(
        model, config, int(obj["num_coeffs"]), obj["feature"], tuple(obj["phones"]),
        dict(obj["phone_map_39"]), dict(obj.get("extra", {})),
    )


# ---------------------------------------------------------------- decode command


@dataclass(frozen=True)
class DecodeResult:
    """Phone error rate (39-phone scoring) and per-utterance hypotheses (39-phone symbols)."""

    per: float
    num_utts: int
    hypotheses: dict[str, list[str]]


def symbols_39(ids48: Sequence[int], phones: Sequence[str], phone_map_39: Mapping[str, str]):
    """48-phone ids to 39-phone symbols, repeats merged after folding."""
    return _merge_repeats([phone_map_39[phones[i]] for i in ids48])


def decode(model_dir, data_dir, device="cpu", out=None, utt_ids=None) -> DecodeResult:
    """Greedy-decode ``data_dir`` with ``model_dir/model.pt``; score PER; optionally write ``out``.

    ``out`` gets one line per utterance: the id, then its hypothesis in 39-phone symbols.
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
    if out is not None:
        _write_hypotheses(out, hypotheses)
    return DecodeResult(per, len(order), hypotheses)


def _write_hypotheses(out, hypotheses: Mapping[str, list[str]]) -> None:
    text = "".join(" ".join([utt, *phones]) + "\n" for utt, phones in hypotheses.items())
    write_text_atomic(out, text)
