"""Training-time augmentation of padded feature batches (N, T, F) with lengths.

Random shifts, SpecAugment-style time and frequency warps and masks (time masks for
a random share of the utterances), input noise and a constant offset per utterance
and coefficient. Masked cells take the coefficient's mean (zero after the model's own
normalisation); noise and offsets are scaled by each coefficient's std. Everything is
vectorised over the batch; random numbers come from one CPU ``torch.Generator``
so a seed gives the same augmentation on any device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def _randint(gen: torch.Generator, high: torch.Tensor) -> torch.Tensor:
    """Uniform integers in ``[0, high]`` (inclusive), elementwise; ``high`` >= 0 (CPU long)."""
    return (torch.rand(high.shape, generator=gen) * (high + 1).double()).long().clamp_max(high)


def random_shift(feats, lens, proportion: float, gen):
    """Pad each sequence with up to ``proportion * length`` copies of its first frame before
    and of its last frame after it. Returns new (feats, lens)."""
    lens_cpu = lens.cpu()
    cap = (lens_cpu.double() * proportion).floor().long()
    before, after = _randint(gen, cap), _randint(gen, cap)
    new_lens = lens_cpu + before + after
    t = torch.arange(int(new_lens.max()))
    src = (t[None, :] - before[:, None]).clamp(min=0)
    src = torch.minimum(src, (lens_cpu - 1).clamp(min=0)[:, None])
    index = src.to(feats.device)[:, :, None].expand(-1, -1, feats.shape[2])
    out = feats.gather(1, index)
    valid = (t[None, :] < new_lens[:, None]).to(feats.device)
    out = out * valid[:, :, None]
    return out, new_lens.to(lens.device)


def shifted_frames(frames: int, proportion: float) -> int:
    """The longest an utterance of ``frames`` frames gets under :func:`random_shift` with
    ``proportion`` (up to ``floor(proportion * frames)`` frames on each side)."""
    return int(frames) + 2 * math.floor(int(frames) * max(0.0, float(proportion)))


def _warp_positions(size: torch.Tensor, length: int, max_warp: int, gen):
    """Source positions (N, length) of a piecewise-linear warp of each row's ``[0, size)``.

    A centre point ``c`` moves to ``c + d`` with ``|d|`` at most ``max_warp``; both sides
    are stretched linearly so the ends stay put. Positions past ``size`` map to themselves.
    """
    size = size.double()
    # the moved centre stays strictly inside (0, size - 1), so both sides keep some frames
    warp = torch.minimum(torch.full_like(size, max_warp), ((size - 3) / 2).floor()).clamp(min=0)
    centre = warp + 1 + _randint(gen, (size - 2 * warp - 3).clamp(min=0).long()).double()
    shift = _randint(gen, (2 * warp).long()).double() - warp
    moved = centre + shift
    t = torch.arange(length, dtype=torch.float64)[None, :]
    c, m, last = centre[:, None], moved[:, None], (size - 1)[:, None]
    left = t * c / m.clamp(min=1e-9)
    right = c + (t - m) * (last - c) / (last - m).clamp(min=1e-9)
    src = torch.where(t <= m, left, right)
    src = torch.where(t <= last, src, t)
    return src.clamp(min=0, max=length - 1)


def _interpolate(x: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` (N, T, F) at fractional positions ``src`` along ``dim``."""
    src = src.to(x.device, torch.float32)
    lo = src.floor().long()
    hi = (lo + 1).clamp(max=x.shape[dim] - 1)
    frac = src - lo
    if dim == 1:
        shape = (-1, -1, x.shape[2])
        lo, hi, frac = lo[:, :, None], hi[:, :, None], frac[:, :, None]
    else:
        shape = (-1, x.shape[1], -1)
        lo, hi, frac = lo[:, None, :], hi[:, None, :], frac[:, None, :]
    a = x.gather(dim, lo.expand(*shape))
    b = x.gather(dim, hi.expand(*shape))
    return a + (b - a) * frac.to(x.dtype)


def time_warp(feats, lens, max_warp: int, gen):
    """SpecAugment time warp within each sequence's length."""
    src = _warp_positions(lens.cpu(), feats.shape[1], max_warp, gen)
    return _interpolate(feats, src, 1)


def freq_warp(feats, max_warp: int, gen):
    """The same warp along the coefficient axis, one per sequence."""
    n, _, f = feats.shape
    src = _warp_positions(torch.full((n,), f), f, max_warp, gen)
    return _interpolate(feats, src, 2)


def _band_mask(size: torch.Tensor, length: int, count: int, max_width: int, proportion, gen):
    """(N, length) bool: ``count`` random bands per row, widths up to
    ``min(max_width, proportion * size)``, inside ``[0, size)``."""
    size = size.long()
    by_proportion = (size.double() * proportion).floor().long()
    cap = torch.minimum(torch.full_like(size, max_width), by_proportion)
    cap = cap[:, None].expand(-1, count)
    width = _randint(gen, cap)
    start = _randint(gen, (size[:, None] - width).clamp(min=0))
    t = torch.arange(length)[None, :, None]
    inside = (t >= start[:, None, :]) & (t < (start + width)[:, None, :])
    return inside.any(-1)


class Augmenter:
    """Applies the ``training`` group's augmentation to a batch (feats, lens)."""

    def __init__(self, params: Mapping[str, Any], mean=None, std=None):
        self.p = dict(params)
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)

    @property
    def active(self) -> bool:
        p = self.p
        return bool(
            p["random_shift_proportion"] > 0 or p["max_time_warp"] > 0 or p["max_freq_warp"] > 0
            or p["num_time_masks"] > 0 or p["num_freq_masks"] > 0 or p["noise_std"] > 0
            or p["constant_offset_std"] > 0
        )

    def __call__(self, feats: torch.Tensor, lens: torch.Tensor, gen: torch.Generator):
        """Augmented copies of ``feats`` (N, T, F) and ``lens`` (N,)."""
        p = self.p
        n, _, f = feats.shape
        if p["random_shift_proportion"] > 0:
            feats, lens = random_shift(feats, lens, p["random_shift_proportion"], gen)
        if p["max_time_warp"] > 0:
            feats = time_warp(feats, lens, p["max_time_warp"], gen)
        if p["max_freq_warp"] > 0 and f > 1:
            feats = freq_warp(feats, p["max_freq_warp"], gen)
        t = feats.shape[1]
        mask = None
        if p["num_time_masks"] > 0:
            band = _band_mask(
                lens.cpu(), t, p["num_time_masks"], p["max_time_mask"],
                p["time_mask_max_proportion"], gen,
            )
            if p["time_mask_prob"] < 1:
                band = band & (torch.rand(n, generator=gen) < p["time_mask_prob"])[:, None]
            mask = band[:, :, None].expand(-1, -1, f)
        if p["num_freq_masks"] > 0 and f > 1:
            band = _band_mask(
                torch.full((n,), f), f, p["num_freq_masks"], p["max_freq_mask"],
                p["freq_mask_max_proportion"], gen,
            )
            band = band[:, None, :].expand(-1, t, -1)
            mask = band if mask is None else mask | band
        if mask is not None:
            fill = self._mean(f, feats)
            feats = torch.where(mask.to(feats.device), fill, feats)
        if p["noise_std"] > 0:
            noise = torch.randn(feats.shape, generator=gen).to(feats.device, feats.dtype)
            feats = feats + noise * self._scale(p["noise_std"], feats)
        if p["constant_offset_std"] > 0:
            offset = torch.randn((n, 1, f), generator=gen).to(feats.device, feats.dtype)
            feats = feats + offset * self._scale(p["constant_offset_std"], feats)
        return feats, lens

    def _scale(self, std: float, like: torch.Tensor):
        """``std`` in units of each coefficient's std (plain units without statistics)."""
        return std * (self.std.to(like.device, like.dtype) if self.std is not None else 1.0)

    def _mean(self, f: int, like: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return torch.zeros(f, dtype=like.dtype, device=like.device)
        return self.mean.to(like.device, like.dtype)
