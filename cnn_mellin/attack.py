"""Gradient inversion against a trained acoustic model (federated-learning privacy).

Threat model: the attacker knows the victim (a ``model.pt`` of ``cnn-mellin train``), one
utterance's length and phone targets, and sees the gradient of that utterance's CTC loss
with respect to every parameter, as the victim shares it (:func:`shared_gradient`, after the
``defence`` group's noise, sparsification or dropout). It optimises a dummy input until the
gradient the dummy induces matches (:func:`invert`). Both sides use one loss,
:func:`ctc_loss`: the training loss (CTC per target phone), written as the CTC forward
recursion in ordinary tensor operations, because matching gradients needs the second
derivative, which PyTorch's fused CTC does not have (it equals it: see the tests).

The dummy lives in the victim's normalised feature space (``z = (x - mean) / std``), where
MAE and SNR are measured. With ``attack.grid_size`` the dummy is optimised one chunk of
frames at a time (optimiser and schedule reset per chunk) while the full gradient is
matched, and a checkpoint is written after each chunk: a restarted attack skips the chunks
already done and ends with the same reconstruction.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnn_mellin.decoding import BLANK, greedy_decode, phone_error_rate, save_atomic

_NEG = -1e30  # "log 0" that keeps the recursion's gradients finite


class AttackDiverged(Exception):
    """More non-finite steps in a chunk than ``attack.max_bad_steps``."""


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CTC loss of one sequence divided by its target length, twice differentiable.

    ``log_probs`` (T, C) of the victim's outputs, ``targets`` (S,) phone ids without blanks.
    Equals ``F.ctc_loss(..., reduction="none") / S`` (the training loss).
    """
    steps = log_probs.shape[0]
    labels = torch.full((2 * len(targets) + 1,), BLANK, dtype=torch.long,
                        device=log_probs.device)
    labels[1::2] = targets
    emit = log_probs[:, labels]  # (T, 2S+1)
    size = labels.numel()
    skip = torch.zeros(size, dtype=torch.bool, device=log_probs.device)
    skip[2:] = (labels[2:] != BLANK) & (labels[2:] != labels[:-2])
    neg = log_probs.new_full((size,), _NEG)
    alpha = torch.cat([emit[0, :2], neg[2:]])  # a path starts with a blank or the first phone
    for t in range(1, steps):
        one = torch.cat([neg[:1], alpha[:-1]])
        two = torch.where(skip, torch.cat([neg[:2], alpha[:-2]]), neg)
        alpha = torch.logsumexp(torch.stack([alpha, one, two]), 0) + emit[t]
    end = torch.logsumexp(alpha[-2:], 0) if size > 1 else alpha[-1]
    return -end / max(len(targets), 1)


def _loss(model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs, _ = model(feats)
    return ctc_loss(log_probs[:, 0].float(), targets)


def _parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def shared_gradient(
    model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor,
    defence: Mapping[str, Any], generator: torch.Generator,
) -> list[torch.Tensor]:
    """The gradient the victim shares for one utterance, after its defences.

    ``feats`` (1, T, F) raw features; ``defence`` the ``defence`` group (short names).
    """
    was_training = model.training
    model.train(bool(defence["victim_dropout"]))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            grads = torch.autograd.grad(_loss(model, feats, targets), _parameters(model))
    finally:
        model.train(was_training)
    grads = [g.detach() for g in grads]
    keep = float(defence["gradient_keep_fraction"])
    if keep < 1.0:
        grads = _apply(grads, _top_mask(grads, keep))
    std = float(defence["gradient_noise_std"])
    if std > 0:
        grads = [g + std * torch.randn(g.shape, generator=generator).to(g) for g in grads]
    return grads


def _top_mask(grads: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Masks of the ``fraction`` largest-magnitude entries over all gradients together."""
    flat = torch.cat([g.abs().flatten() for g in grads])
    count = max(1, int(math.ceil(fraction * flat.numel())))
    threshold = torch.topk(flat, count, sorted=False).values.min()
    return [g.abs() >= threshold for g in grads]


def _apply(grads, masks):
    return [g * m for g, m in zip(grads, masks, strict=True)]


def gradient_distance(
    grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor], kind: str,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``l2`` (sum of squares), ``l1`` or ``cosine`` (1 - cosine similarity) distance."""
    if masks is not None:
        grads, target = _apply(grads, masks), _apply(target, masks)
    if kind == "l2":
        return sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
    if kind == "l1":
        return sum((g - t).abs().sum() for g, t in zip(grads, target, strict=True))
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    norm_g = torch.sqrt(sum((g ** 2).sum() for g in grads) + 1e-20)
    norm_t = torch.sqrt(sum((t ** 2).sum() for t in target) + 1e-20)
    return 1.0 - dot / (norm_g * norm_t)


def regulariser(z: torch.Tensor, kind: str) -> torch.Tensor:
    """``tv`` (mean absolute change between frames) or ``l2`` (mean square) of the dummy."""
    if kind == "tv":
        return (z[:, 1:] - z[:, :-1]).abs().mean() if z.shape[1] > 1 else z.new_zeros(())
    if kind == "l2":
        return (z ** 2).mean()
    return z.new_zeros(())


def initial_dummy(shape, kind: str, mean: torch.Tensor, std: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
    """The starting dummy in normalised space."""
    if kind == "uniform":
        return torch.rand(shape, generator=generator) * 2 - 1
    if kind == "gaussian":
        return torch.randn(shape, generator=generator)
    if kind == "zeros":  # raw features of zero
        return (-mean / std).expand(shape).clone()
    return torch.zeros(shape)  # the dataset mean


def chunks(num_frames: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: the whole utterance when ``size`` is 0."""
    if size <= 0 or size >= num_frames:
        return [(0, num_frames)]
    step = max(1, size - min(overlap, size - 1))
    spans, start = [], 0
    while True:
        end = min(start + size, num_frames)
        spans.append((start, end))
        if end == num_frames:
            return spans
        start += step


def mae(z: torch.Tensor, truth: torch.Tensor) -> float:
    return float((z - truth).abs().mean())


def snr_db(z: torch.Tensor, truth: torch.Tensor) -> float:
    """10 log10(power of the truth / power of the error), in normalised space."""
    error = float(((z - truth) ** 2).sum())
    signal = float((truth ** 2).sum())
    return math.inf if error == 0 else 10 * math.log10(max(signal, 1e-30) / error)


@dataclass
class AttackResult:
    """A reconstruction and how it went; ``curve`` rows: (step, loss, mae)."""

    z: torch.Tensor
    mae: float
    snr_db: float
    bad_steps: int
    steps: int
    seconds: float
    curve: list[tuple[int, float, float]] = field(default_factory=list)
    resumed_chunks: int = 0


def _optimizer(name: str, params, lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=10)


def _schedule(name: str, optimizer, iterations: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=iterations)
    if name == "step":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, [iterations // 2, 3 * iterations // 4], gamma=0.1
        )
    return None


class _Objective:
    """Optimises one chunk of the dummy so that its gradient matches the shared one."""

    def __init__(self, model, params, targets, target_grads, masks, attack, mean, std):
        self.model, self.params, self.targets = model, params, targets
        self.target_grads, self.masks, self.attack = target_grads, masks, attack
        self.mean, self.std = mean, std

    def loss(self, dummy: torch.Tensor) -> torch.Tensor:
        """Gradient distance (plus the regulariser) of the dummy (normalised space)."""
        attack = self.attack
        loss_ctc = _loss(self.model, dummy * self.std + self.mean, self.targets)
        grads = torch.autograd.grad(loss_ctc, self.params, create_graph=True)
        total = gradient_distance(grads, self.target_grads, attack["distance"], self.masks)
        if attack["regulariser"] != "none":
            weight = float(attack["regulariser_weight"])
            total = total + weight * regulariser(dummy, attack["regulariser"])
        return total

    def optimise(self, z: torch.Tensor, start: int, end: int, record) -> tuple[torch.Tensor, int]:
        """The optimised frames ``start:end`` of ``z`` and the number of non-finite steps.

        Stops early once more steps than ``max_bad_steps`` were non-finite (skipped).
        ``record(it, dummy, loss)`` is called every ``eval_every`` steps and at the end.
        """
        attack = self.attack
        iterations, every = int(attack["iterations"]), int(attack["eval_every"])
        lbfgs = attack["optimizer"] == "lbfgs"
        part = z[:, start:end].clone().requires_grad_(True)
        optimizer = _optimizer(attack["optimizer"], [part], float(attack["learning_rate"]))
        schedule = _schedule(attack["lr_schedule"], optimizer, iterations)
        last, bad = [math.nan], 0

        def closure():
            optimizer.zero_grad()
            total = self.loss(torch.cat([z[:, :start], part, z[:, end:]], 1))
            total.backward()
            finite = bool(torch.isfinite(total)) and bool(torch.isfinite(part.grad).all())
            if not finite:
                part.grad.zero_()
            elif attack["normalise_steps"] and not lbfgs:
                part.grad.div_(part.grad.norm().clamp_min(1e-12))
            last[0] = float(total.detach()) if finite else math.nan
            return total.detach()

        for it in range(1, iterations + 1):
            if lbfgs:
                optimizer.step(closure)
            else:
                closure()
                if math.isfinite(last[0]):
                    optimizer.step()
            if not math.isfinite(last[0]):
                bad += 1
                with torch.no_grad():  # L-BFGS may have stepped into NaNs: undo them
                    part.nan_to_num_(0.0, 0.0, 0.0)
                if bad > int(attack["max_bad_steps"]):
                    break
            if schedule is not None:
                schedule.step()
            if it % every == 0 or it == iterations:
                with torch.no_grad():
                    record(it, torch.cat([z[:, :start], part, z[:, end:]], 1), last[0])
        return part.detach(), bad


def invert(
    model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor,
    attack: Mapping[str, Any], defence: Mapping[str, Any], *,
    checkpoint: Path | None = None, on_point: Callable[[int, float, float], None] | None = None,
) -> AttackResult:
    """Reconstruct ``feats`` (1, T, F raw) from the gradient its ``targets`` (S,) induce.

    ``attack``/``defence``: the groups' values (short names). ``on_point(step, loss, mae)``
    is called every ``eval_every`` steps (step counts over all chunks) and again for the
    restored points of a resumed run. ``checkpoint`` (a file) is written after each chunk.
    """
    started = time.monotonic()
    model.eval()
    params = _parameters(model)
    generator = torch.Generator().manual_seed(int(attack["seed"]))
    target_grads = shared_gradient(model, feats, targets, defence, generator)
    masks = None
    if float(attack["top_fraction"]) < 1.0:
        masks = _top_mask(target_grads, float(attack["top_fraction"]))
    mean, std = model.feat_mean.detach(), model.feat_std.detach()
    truth = ((feats - mean) / std).detach()
    z = initial_dummy(truth.shape, attack["init"], mean, std, generator)
    spans = chunks(truth.shape[1], int(attack["grid_size"]), int(attack["grid_overlap"]))
    iterations = int(attack["iterations"])
    state = {"done": 0, "curve": [], "bad": 0, "z": z}
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if on_point is not None:
            for step, loss, err in state["curve"]:
                on_point(int(step), float(loss), float(err))
    resumed = int(state["done"])
    z, curve, bad_total = state["z"].clone(), [tuple(c) for c in state["curve"]], int(state["bad"])
    objective = _Objective(model, params, targets, target_grads, masks, attack, mean, std)

    def record(step: int, dummy: torch.Tensor, loss: float) -> None:
        point = (step, loss, mae(dummy, truth))
        curve.append(point)
        if on_point is not None:
            on_point(*point)

    for index in range(resumed, len(spans)):
        start, end = spans[index]
        part, bad = objective.optimise(
            z, start, end, lambda it, dummy, loss, base=index * iterations:
            record(base + it, dummy, loss),
        )
        if bad > int(attack["max_bad_steps"]):
            raise AttackDiverged(f"{bad} non-finite steps in chunk {index + 1} of {len(spans)}")
        bad_total += bad
        z = torch.cat([z[:, :start], part, z[:, end:]], 1)
        if checkpoint is not None:
            save_atomic({"done": index + 1, "curve": curve, "bad": bad_total, "z": z}, checkpoint)
    return AttackResult(
        z=z, mae=mae(z, truth), snr_db=snr_db(z, truth), bad_steps=bad_total,
        steps=len(spans) * iterations, seconds=time.monotonic() - started, curve=curve,
        resumed_chunks=resumed,
    )


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


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
    tmp = out_dir / f".{utt_id}.safetensors.tmp"
    save_file({
        "reconstruction": recon, "reconstruction_normalised": result.z[0].contiguous(),
        "original": feats[0].contiguous(), "targets": targets.contiguous(),
    }, str(tmp), metadata={k: str(v) for k, v in row.items()})
    tmp.replace(out_dir / f"{utt_id}.safetensors")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["step", "loss", "mae"])
    writer.writerows(result.curve)
    curves = out_dir / f".{utt_id}.curves.csv.tmp"
    curves.write_text(text.getvalue())
    curves.replace(out_dir / f"{utt_id}.curves.csv")
    normalised = ((feats - model.feat_mean) / model.feat_std)[0]
    spectrogram_png(normalised, result.z[0], out_dir / f"{utt_id}.png")
