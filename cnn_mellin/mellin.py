"""Discrete Mellin and linear correlation: stateless functions and thin modules.

Parametrisation (pydrobert-mellin; 0-indexed ``i`` over outputs, ``k`` over taps):

- Mellin correlation ``mcorr``::

      out[i] = bias + sum_k weight[k] * input[(i + s)(k + d) / (p + 1) - 1]

  over the taps where the division is exact and the index lies in ``[0, W)``;
  ``H = max((W (p + 1)) // (K + d - 1) - s + 1, 0) + r``.
- Linear correlation ``lcorr``::

      out[i] = bias + sum_k weight[k] * input[s i - p + d k]

  over the taps whose index lies in ``[0, W)``;
  ``H = max((W - 1 - d (K - 1) + p) // s + 1, 0) + r``.

In both, ``r`` appends extra outputs that follow the same formula.

How the Mellin correlation is computed: for a fixed tap ``k`` the outputs that
read the input are ``i = i0 + a m`` and they read rows ``j = j0 + b m`` (with
``g = gcd(k + d, p + 1)``, ``a = (p + 1) / g``, ``b = (k + d) / g``). So the op
is a sum over taps of ordinary correlations: each tap gathers its rows (a
strided slice), runs one call of torch's convolution along frequency and adds
the result into every ``a``-th output row. The tap plan is cached per shape; the
custom backward calls torch's convolution backward per tap and accumulates in
place, and is itself differentiable (double backward works, e.g. for
gradient-inversion attacks). Inputs run in channels-last memory, where torch's
CPU kernels are fastest for the ``1 x Kf`` tap kernels. With a single input
channel (the first layer of a model) convolution kernels are slow, so both
correlations gather all taps and do one matrix product instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LCorr1d",
    "LCorrLCorr",
    "MCorr1d",
    "MCorrLCorr",
    "lcorr1d",
    "lcorr_output_size",
    "lcorrlcorr",
    "mcorr1d",
    "mcorr_output_size",
    "mcorr_tap_density",
    "mcorrlcorr",
]


def mcorr_output_size(width: int, kernel: int, s: int = 1, d: int = 1, p: int = 0,
                      r: int = 0) -> int:
    """Number of outputs of a Mellin correlation over ``width`` inputs."""
    _check_hyper(kernel, s, d, p, r)
    return max((width * (p + 1)) // (kernel + d - 1) - s + 1, 0) + r


def lcorr_output_size(width: int, kernel: int, s: int = 1, d: int = 1, p: int = 0,
                      r: int = 0) -> int:
    """Number of outputs of a linear correlation over ``width`` inputs."""
    _check_hyper(kernel, s, d, p, r)
    return max((width - 1 - d * (kernel - 1) + p) // s + 1, 0) + r


def mcorr_tap_density(kernel: int, d: int = 1, p: int = 0) -> float:
    """Mean number of taps that land on an exact index per Mellin output.

    Tap ``k`` contributes to one output in ``(p + 1) / gcd(k + d, p + 1)``
    (away from the edges); used to scale weight initialisation.
    """
    _check_hyper(kernel, 1, d, p, 0)
    return sum(math.gcd(k + d, p + 1) / (p + 1) for k in range(kernel))


def _check_hyper(kernel: int, s: int, d: int, p: int, r: int) -> None:
    if kernel < 1 or s < 1 or d < 1 or p < 0 or r < 0:
        raise ValueError(
            f"need kernel >= 1, s >= 1, d >= 1, p >= 0, r >= 0; got kernel={kernel}, s={s}, "
            f"d={d}, p={p}, r={r}")


@functools.lru_cache(maxsize=1024)
def _mcorr_plan(width: int, kernel: int, s: int, d: int, p: int,
                r: int) -> tuple[int, tuple[tuple[int, int, int, int, int, int], ...]]:
    """Output size and, per contributing tap, ``(k, i0, a, j0, b, n)``.

    Tap ``k`` adds ``weight[k] * input[j0 + b m]`` to output ``i0 + a m`` for
    ``m`` in ``[0, n)``.
    """
    height = mcorr_output_size(width, kernel, s, d, p, r)
    taps = []
    for k in range(kernel):
        g = math.gcd(k + d, p + 1)
        a, b = (p + 1) // g, (k + d) // g
        # output i = m a - s reads row m b - 1; need i >= 0 and row >= 0
        m0 = max(-(-s // a), 1)
        i0, j0 = m0 * a - s, m0 * b - 1
        if i0 >= height or j0 >= width:
            continue
        n = min((height - 1 - i0) // a + 1, (width - 1 - j0) // b + 1)
        taps.append((k, i0, a, j0, b, n))
    return height, tuple(taps)


def _lcorr_axis(width: int, kernel: int, s: int, d: int, p: int, r: int) -> tuple[int, int]:
    """Output size and the extra right padding beyond a symmetric padding of ``p``."""
    height = lcorr_output_size(width, kernel, s, d, p, r)
    right = max(0, (height - 1) * s + d * (kernel - 1) + 1 - p - width)
    return height, max(0, right - p)


def _patches(x: Tensor, dim: int, kernel: int, s: int, d: int, p: int, height: int) -> Tensor:
    """Zero-pad ``x`` along ``dim`` and unfold it into ``height`` windows of ``kernel`` taps.

    The taps become a new last dimension: ``out[..., i, ..., k] = x[..., s i - p + d k, ...]``.
    """
    right = (height - 1) * s + d * (kernel - 1) + 1 - p - x.shape[dim]
    pad = [0, 0] * (x.dim() - 1 - dim) + [p, right]  # negative right padding crops
    x = F.pad(x, pad)
    x = x.unfold(dim, d * (kernel - 1) + 1, s)
    return x[..., ::d] if d > 1 else x


def _mcorr_rows(width: int, kernel: int, s: int, d: int, p: int, height: int,
                device: torch.device) -> Tensor:
    """Row read by each (output, tap) pair, ``width`` (a zero row) where none is; (H * K,)."""
    i = torch.arange(height, device=device)[:, None]
    k = torch.arange(kernel, device=device)
    num = (i + s) * (k + d)
    row = torch.div(num, p + 1, rounding_mode="floor") - 1
    valid = (num % (p + 1) == 0) & (row >= 0) & (row < width)
    return torch.where(valid, row, width).flatten()


def _single_channel(x: Tensor, w: Tensor, b: Tensor | None, height: int, width: int,
                    hyper_w: tuple[int, int, int, int] | None, hyper_f: tuple[int, ...]) -> Tensor:
    """One input channel: gather the taps and do one matrix product (im2col).

    torch's convolution kernels are slow for a single input channel; this path
    writes its output directly in channels-last memory. ``hyper_w`` is the Mellin
    ``(s, d, p, r)`` along dim 2, or None for a linear correlation there (then
    ``hyper_f`` holds both axes' linear settings as ``(s, d, p)`` pairs).
    """
    n, out_ch = x.shape[0], w.shape[0]
    kw, kf = w.shape[2], w.shape[3]
    x = x[:, 0]  # (N, W, F)
    if hyper_w is None:
        (sw, dw, pw), (sf, df, pf) = hyper_f
        x = _patches(x, 1, kw, sw, dw, pw, height)  # (N, H, F, Kw)
        x = _patches(x, 2, kf, sf, df, pf, width)  # (N, H, G, Kw, Kf)
    else:
        sf, df, pf = hyper_f
        rows = _mcorr_rows(x.shape[1], kw, *hyper_w[:3], height, x.device)
        x = F.pad(x, (0, 0, 0, 1)).index_select(1, rows)  # (N, H * Kw, F)
        x = _patches(x, 2, kf, sf, df, pf, width)  # (N, H * Kw, G, Kf)
        x = x.view(n, height, kw, width, kf).transpose(2, 3)  # (N, H, G, Kw, Kf)
    x = x.reshape(n * height * width, kw * kf)
    out = x @ w.reshape(out_ch, kw * kf).t() if b is None else torch.addmm(
        b, x, w.reshape(out_ch, kw * kf).t())
    return out.view(n, height, width, out_ch).permute(0, 3, 1, 2)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return int(value[0]), int(value[1])


def _check_inputs(input: Tensor, weight: Tensor, bias: Tensor | None, dim: int) -> None:
    if input.dim() != dim + 2 or weight.dim() != dim + 2:
        raise ValueError(
            f"expected input and weight with {dim + 2} dimensions, got input "
            f"{tuple(input.shape)} and weight {tuple(weight.shape)}")
    if input.shape[1] != weight.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} channels but weight expects {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def _empty_result(input: Tensor, weight: Tensor, bias: Tensor | None,
                  shape: tuple[int, ...]) -> Tensor:
    # a zero-size output still belongs to the graph, so backward() through it works
    anchor = input.sum() * 0 + weight.sum() * 0
    if bias is not None:
        anchor = anchor + bias.sum() * 0
    return anchor.expand(shape).clone()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # device type without autocast support
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


class _MellinLinear(torch.autograd.Function):
    """Mellin correlation along dim 2, linear (conv) correlation along dim 3."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, taps, height: int, sf: int,
                df: int, pf: int) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.taps, ctx.conf = taps, (sf, df, pf, b is not None)
        fmt = _memory_format(x)
        out = None
        for k, i0, a, j0, bs, n in taps:
            if a == 1 and i0 == 0 and n == height:  # tap covers every output: no scatter
                y = F.conv2d(_rows(x, j0, bs, n, fmt), w[:, :, k:k + 1],
                             b if out is None else None, (1, sf), (0, pf), (1, df))
                out = y if out is None else out.add_(y)
        if out is None:
            width_out = (x.shape[3] + 2 * pf - df * (w.shape[3] - 1) - 1) // sf + 1
            out = x.new_zeros((x.shape[0], w.shape[0], height, width_out))
            out = out.contiguous(memory_format=fmt)
            if b is not None:
                out += b[:, None, None]
        for k, i0, a, j0, bs, n in taps:
            if not (a == 1 and i0 == 0 and n == height):
                y = F.conv2d(_rows(x, j0, bs, n, fmt), w[:, :, k:k + 1], None, (1, sf),
                             (0, pf), (1, df))
                out[:, :, i0:i0 + a * (n - 1) + 1:a] += y
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        sf, df, pf, has_bias = ctx.conf
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        gx = torch.zeros_like(x) if want_x else None
        gw = torch.zeros_like(w) if want_w else None
        fmt = _memory_format(x)
        if want_x or want_w:
            for k, i0, a, j0, bs, n in ctx.taps:
                g = grad[:, :, i0:i0 + a * (n - 1) + 1:a].contiguous(memory_format=fmt)
                gxk, gwk, _ = torch.ops.aten.convolution_backward(
                    g, _rows(x, j0, bs, n, fmt), w[:, :, k:k + 1], None, [1, sf], [0, pf],
                    [1, df], False, [0, 0], 1, [want_x, want_w, False])
                if want_x:
                    gx[:, :, j0:j0 + bs * (n - 1) + 1:bs] += gxk
                if want_w:
                    gw[:, :, k:k + 1] = gwk
        gb = grad.sum((0, 2, 3)) if (has_bias and want_b) else None
        return gx, gw, gb, None, None, None, None, None


def _rows(x: Tensor, first: int, step: int, count: int, fmt: torch.memory_format) -> Tensor:
    # the convolution kernels would copy a strided view anyway; copying only the rows read
    # keeps the copy small and visible to memory accounting
    return x[:, :, first:first + step * (count - 1) + 1:step].contiguous(memory_format=fmt)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


def mcorrlcorr(input: Tensor, weight: Tensor, bias: Tensor | None = None,
               s: int | Sequence[int] = (1, 1), d: int | Sequence[int] = (1, 1),
               p: int | Sequence[int] = (0, 0), r: int | Sequence[int] = (0, 0)) -> Tensor:
    """Mellin correlation along dim 2, linear correlation along dim 3.

    ``input`` (N, C_in, W, F), ``weight`` (C_out, C_in, Kw, Kf) -> (N, C_out, H, G) with
    ``H = mcorr_output_size(W, Kw, s[0], d[0], p[0], r[0])`` and
    ``G = lcorr_output_size(F, Kf, s[1], d[1], p[1], r[1])``.
    """
    _check_inputs(input, weight, bias, 2)
    (sw, sf), (dw, df), (pw, pf), (rw, rf) = (
        _pair(s, "s"), _pair(d, "d"), _pair(p, "p"), _pair(r, "r"))
    height, taps = _mcorr_plan(input.shape[2], weight.shape[2], sw, dw, pw, rw)
    width, extra = _lcorr_axis(input.shape[3], weight.shape[3], sf, df, pf, rf)
    shape = (input.shape[0], weight.shape[0], height, width)
    if 0 in shape:
        return _empty_result(input, weight, bias, shape)
    if input.shape[1] == 1:
        return _single_channel(input, weight, bias, height, width, (sw, dw, pw, rw), (sf, df, pf))
    cast = _autocast_dtype(input.device.type)
    if cast is not None:
        input, weight = input.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    x = input.contiguous(memory_format=torch.channels_last)
    w = weight.contiguous(memory_format=torch.channels_last)
    if extra:
        x = F.pad(x, (0, extra))
    if cast is None:
        out = _MellinLinear.apply(x, w, bias, taps, height, sf, df, pf)
    else:
        with torch.autocast(input.device.type, enabled=False):
            out = _MellinLinear.apply(x, w, bias, taps, height, sf, df, pf)
    return out if out.shape[3] == width else out[..., :width]


def mcorr1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, s: int = 1, d: int = 1,
            p: int = 0, r: int = 0) -> Tensor:
    """Mellin correlation: ``input`` (N, C_in, W), ``weight`` (C_out, C_in, K) -> (N, C_out, H)."""
    _check_inputs(input, weight, bias, 1)
    return mcorrlcorr(input.unsqueeze(3), weight.unsqueeze(3), bias, (s, 1), (d, 1), (p, 0),
                      (r, 0)).squeeze(3)


def lcorrlcorr(input: Tensor, weight: Tensor, bias: Tensor | None = None,
               s: int | Sequence[int] = (1, 1), d: int | Sequence[int] = (1, 1),
               p: int | Sequence[int] = (0, 0), r: int | Sequence[int] = (0, 0)) -> Tensor:
    """Linear correlation along dims 2 and 3 in the (s, d, p, r) parametrisation."""
    _check_inputs(input, weight, bias, 2)
    (sw, sf), (dw, df), (pw, pf), (rw, rf) = (
        _pair(s, "s"), _pair(d, "d"), _pair(p, "p"), _pair(r, "r"))
    height, extra_w = _lcorr_axis(input.shape[2], weight.shape[2], sw, dw, pw, rw)
    width, extra_f = _lcorr_axis(input.shape[3], weight.shape[3], sf, df, pf, rf)
    shape = (input.shape[0], weight.shape[0], height, width)
    if 0 in shape:
        return _empty_result(input, weight, bias, shape)
    if input.shape[1] == 1:
        return _single_channel(input, weight, bias, height, width, None,
                               ((sw, dw, pw), (sf, df, pf)))
    x = F.pad(input, (0, extra_f, 0, extra_w)) if extra_w or extra_f else input
    out = F.conv2d(x, weight, bias, (sw, sf), (pw, pf), (dw, df))
    if out.shape[2:] != (height, width):
        out = out[:, :, :height, :width]
    return out


def lcorr1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, s: int = 1, d: int = 1,
            p: int = 0, r: int = 0) -> Tensor:
    """Linear correlation: ``input`` (N, C_in, W), ``weight`` (C_out, C_in, K) -> (N, C_out, H)."""
    _check_inputs(input, weight, bias, 1)
    height, extra = _lcorr_axis(input.shape[2], weight.shape[2], s, d, p, r)
    shape = (input.shape[0], weight.shape[0], height)
    if 0 in shape:
        return _empty_result(input, weight, bias, shape)
    x = F.pad(input, (0, extra)) if extra else input
    out = F.conv1d(x, weight, bias, s, p, d)
    return out if out.shape[2] == height else out[..., :height]


class _Correlation(torch.nn.Module):
    """Holds weight and bias; subclasses pick the op and the effective fan-in."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 s: tuple[int, ...], d: tuple[int, ...], p: tuple[int, ...], r: tuple[int, ...],
                 bias: bool, device=None, dtype=None):
        super().__init__()
        for k, s_, d_, p_, r_ in zip(kernel_size, s, d, p, r, strict=True):
            _check_hyper(k, s_, d_, p_, r_)
        if in_channels < 1 or out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.s, self.d, self.p, self.r = kernel_size, s, d, p, r
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(
            torch.empty((out_channels, in_channels, *kernel_size), **factory))
        self.bias = torch.nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def fan_in(self) -> float:
        """Expected number of input values that reach one output."""
        return self.in_channels * math.prod(self.kernel_size)

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(fan_in), with the fan-in the op actually has."""
        bound = 1.0 / math.sqrt(self.fan_in())
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"s={self.s}, d={self.d}, p={self.p}, r={self.r}, bias={self.bias is not None}")


class MCorr1d(_Correlation):
    """Mellin correlation module; see :func:`mcorr1d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, s: int = 1,
                 d: int = 1, p: int = 0, r: int = 0, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, (kernel_size,), (s,), (d,), (p,), (r,),
                         bias, device, dtype)

    def fan_in(self) -> float:
        return self.in_channels * mcorr_tap_density(self.kernel_size[0], self.d[0], self.p[0])

    def forward(self, input: Tensor) -> Tensor:
        return mcorr1d(input, self.weight, self.bias, self.s[0], self.d[0], self.p[0], self.r[0])


class LCorr1d(_Correlation):
    """Linear correlation module; see :func:`lcorr1d`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, s: int = 1,
                 d: int = 1, p: int = 0, r: int = 0, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, (kernel_size,), (s,), (d,), (p,), (r,),
                         bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        return lcorr1d(input, self.weight, self.bias, self.s[0], self.d[0], self.p[0], self.r[0])


class _Correlation2d(_Correlation):
    """A correlation over the last two dims, each with its own (kernel, s, d, p, r)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 s: int | Sequence[int] = 1, d: int | Sequence[int] = 1,
                 p: int | Sequence[int] = 0, r: int | Sequence[int] = 0, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, _pair(kernel_size, "kernel_size"),
                         _pair(s, "s"), _pair(d, "d"), _pair(p, "p"), _pair(r, "r"), bias,
                         device, dtype)


class MCorrLCorr(_Correlation2d):
    """Mellin correlation along dim 2, linear along dim 3; see :func:`mcorrlcorr`."""

    def fan_in(self) -> float:
        density = mcorr_tap_density(self.kernel_size[0], self.d[0], self.p[0])
        return self.in_channels * density * self.kernel_size[1]

    def forward(self, input: Tensor) -> Tensor:
        return mcorrlcorr(input, self.weight, self.bias, self.s, self.d, self.p, self.r)


class LCorrLCorr(_Correlation2d):
    """Linear correlation along dims 2 and 3; see :func:`lcorrlcorr`."""

    def forward(self, input: Tensor) -> Tensor:
        return lcorrlcorr(input, self.weight, self.bias, self.s, self.d, self.p, self.r)
