"""What an attack leaves behind, and the utterances it runs on: the attacked utterances of a
data dir, the victim's decoding of a reconstruction, the reconstruction's files and a PNG."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cnn_mellin.attack.loop import AttackResult, invert
from cnn_mellin.decoding import greedy_decode
from cnn_mellin.files import atomic_path, write_bytes_atomic, write_text_atomic
from cnn_mellin.scoring import phone_error_rate


def decode_per(model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor) -> float:
    """The 39-phone PER of the victim's greedy decoding of ``feats`` (1, T, F raw)."""
    with torch.no_grad():
        log_probs, lens = model(feats)
    hyp = greedy_decode(log_probs, lens)[0]
    return phone_error_rate([targets.tolist()], [hyp])


# -- a picture: original above, reconstruction below ----------------------------------------

_COLOURS = torch.tensor([  # a dark-blue → teal → yellow ramp (viridis-like)
    [68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37],
], dtype=torch.float32)


def _colour(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    scaled = ((values - low) / max(high - low, 1e-12)).clamp(0, 1) * (len(_COLOURS) - 1)
    index = scaled.floor().long().clamp(max=len(_COLOURS) - 2)
    frac = (scaled - index)[..., None]
    return _COLOURS[index] * (1 - frac) + _COLOURS[index + 1] * frac


def spectrogram_png(original: torch.Tensor, reconstruction: torch.Tensor, path: Path) -> None:
    """Write a PNG: ``original`` above ``reconstruction`` (each T × F, frequency upwards)."""
    low = float(torch.quantile(original.flatten(), 0.01))
    high = float(torch.quantile(original.flatten(), 0.99))
    gap = torch.full((2, original.shape[0], 3), 255.0)
    image = torch.cat([
        _colour(original.T.flip(0), low, high), gap,
        _colour(reconstruction.T.flip(0), low, high),
    ], 0)
    wide = max(1, math.ceil(400 / original.shape[0]))  # at least 400 pixels wide
    tall = max(1, math.ceil(100 / original.shape[1]))  # each picture at least 100 high
    image = image.repeat_interleave(tall, 0).repeat_interleave(wide, 1).round().byte()
    height, width = image.shape[:2]
    raw = b"".join(b"\x00" + bytes(row.flatten().tolist()) for row in image)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
           + chunk(b"IEND", b""))
    write_bytes_atomic(path, png)


# -- utterances of a data dir -----------------------------------------------------------------


def _seconds(info, frames: int) -> float:
    return frames / 16000 if info.frame_shift_ms is None else frames * info.frame_shift_ms / 1000


def check_victim_data(victim, info) -> None:
    """DataError unless the data dir holds the features the victim was trained on."""
    from cnn_mellin.errors import DataError

    if info.feature != victim.feature or info.num_coeffs != victim.num_coeffs:
        raise DataError(
            f"{info.path}: holds {info.feature} features ({info.num_coeffs} coefficients) but the "
            f"victim was trained on {victim.feature} ({victim.num_coeffs})"
        )


def select_utterances(victim, info, count: int, max_seconds: float) -> list[str]:
    """``count`` utterances of at most ``max_seconds`` that the victim can align, in a fixed
    pseudo-random order (the same data give the same choice); DataError if none."""
    import hashlib

    from cnn_mellin.errors import ConfigError, DataError

    if count < 1:
        raise ConfigError(f"--utterances must be at least 1, got {count}")
    if not max_seconds > 0:
        raise ConfigError(f"--max-seconds must be positive, got {max_seconds}")
    check_victim_data(victim, info)
    model = victim.model
    fitting = []
    for utt, frames, phones in zip(info.utt_ids, info.num_frames, info.num_targets, strict=True):
        outputs = int(model.output_lengths(torch.tensor([frames]))[0])
        if _seconds(info, frames) <= max_seconds and phones >= 1 and outputs >= 2 * phones:
            fitting.append(utt)
    if not fitting:
        raise DataError(
            f"{info.path}: no utterance of at most {max_seconds:g} s that the victim can align "
            "(its outputs must be at least twice the phones); raise --max-seconds"
        )
    fitting.sort(key=lambda u: hashlib.sha256(u.encode()).hexdigest())
    return sorted(fitting[:count])


def read_utterance(data_dir, utt_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(feats (1, T, F) raw, targets (S,)) of one utterance of a feature store."""
    from cnn_mellin.data.store import StoreReader, store_path

    reader = StoreReader(store_path(data_dir))
    try:
        feats, targets = reader.read(utt_id)
    finally:
        reader.close()
    return torch.from_numpy(feats)[None].float(), torch.from_numpy(targets).long()


def attack_one(victim, data_dir, utt_id: str, attack: Mapping[str, Any],
               defence: Mapping[str, Any], *, checkpoint: Path | None = None,
               on_point=None) -> tuple[AttackResult, dict[str, Any]]:
    """Invert one utterance of ``data_dir``; returns the result and its summary row."""
    feats, targets = read_utterance(data_dir, utt_id)
    result = invert(victim.model, feats, targets, attack, defence, checkpoint=checkpoint,
                    on_point=on_point)
    model = victim.model
    recon = result.z * model.feat_std + model.feat_mean
    row = {
        "utterance": utt_id, "frames": int(feats.shape[1]), "phones": int(len(targets)),
        "mae": result.mae, "snr_db": result.snr_db,
        "per_reconstruction": decode_per(model, recon, targets),
        "per_original": decode_per(model, feats, targets),
        "gradient_distance": result.distance, "restart": result.restart,
        "bad_steps": result.bad_steps, "steps": result.steps,
        "seconds": round(result.seconds, 3),
    }
    return result, row


def write_outputs(out_dir: Path, utt_id: str, victim, data_dir, result: AttackResult,
                  row: Mapping[str, Any]) -> None:
    """The reconstruction (safetensors), its curves (CSV) and a PNG beside the original."""
    import csv
    import io

    from safetensors.torch import save_file

    feats, targets = read_utterance(data_dir, utt_id)
    model = victim.model
    recon = (result.z * model.feat_std + model.feat_mean)[0].contiguous()
    with atomic_path(out_dir / f"{utt_id}.safetensors") as tmp:
        save_file({
            "reconstruction": recon, "reconstruction_normalised": result.z[0].contiguous(),
            "original": feats[0].contiguous(), "targets": targets.contiguous(),
        }, str(tmp), metadata={k: str(v) for k, v in row.items()})
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "loss", "mae"])
    writer.writerows(result.curve)
    write_text_atomic(out_dir / f"{utt_id}.curves.csv", text.getvalue())
    normalised = ((feats - model.feat_mean) / model.feat_std)[0]
    spectrogram_png(normalised, result.z[0], out_dir / f"{utt_id}.png")
