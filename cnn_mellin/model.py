"""The CTC acoustic model and the checks on its configuration.

An utterance (T frames x F coefficients) is normalised per coefficient, optionally
smoothed along time with a Gaussian (``input_smoothing_width``) and dropped out
(``input_dropout``), cut into windows of ``window_size`` frames every
``window_stride`` frames (zeros past the utterance's end), and each window runs
through a stack of correlation layers (linear along frequency; Mellin or linear
along the window's time axis). The window's time axis is summed out, a recurrent
stack runs over the windows (each layer's input optionally layer-normalised,
``layer_norm``) and a linear layer gives CTC log-probabilities: one output per
window, so an utterance of ``L`` frames gives ``ceil(L / window_stride)`` outputs.

Padding never changes a sequence's outputs: frames past a sequence's length are
zeroed before windowing (the smoothing weights only frames inside the sequence and
renormalises by their total weight), only windows inside the sequence go through the
correlation stack, recurrent layers run forward over the padded batch (outputs
past the length are ignored) and backward over a per-sequence reversal (so the
backward direction starts at the sequence's own last window).

Each layer keeps its input size up to the scheduled shrink factors: output
size ``ceil(size / factor)``, reached with the ``p`` and ``r`` of the correlation
(as :mod:`cnn_mellin.mellin` defines them). Along a linear axis that is the usual
"same" padding with stride ``factor``. Along a Mellin axis the middle tap
``c = (K - 1) // 2`` reads at scale ``factor`` (``p = c``,
``d = (factor - 1)(c + 1) + 1``), the other taps at scales
``factor + (k - c) / (c + 1)``; ``r`` appends the outputs past the last one whose
every tap is in range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cnn_mellin.errors import ConfigError, DataError
from cnn_mellin.mellin import (
    LCorrLCorr,
    MCorrLCorr,
    lcorr_output_size,
    mcorr_output_size,
)
from cnn_mellin.params.model import GROUP

__all__ = [
    "AcousticModel",
    "LayerPlan",
    "check_model_config",
    "model_values",
    "plan_layers",
    "repair_model_config",
    "window_geometry",
]

_NONLINEARITIES = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
_RNNS = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


@dataclass(frozen=True)
class LayerPlan:
    """One correlation layer: channels, kernel and per-axis (time, freq) settings and sizes."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    s: tuple[int, int]
    d: tuple[int, int]
    p: tuple[int, int]
    r: tuple[int, int]
    in_size: tuple[int, int]
    out_size: tuple[int, int]


def model_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """The model group's values: defaults overridden by ``params``, each checked.

    Keys are short names (``window_size``); ``model.`` prefixes are accepted too.
    """
    values = {p.name: p.default for p in GROUP.params}
    for key, value in params.items():
        name = key[len("model."):] if key.startswith("model.") else key
        if name not in GROUP:
            raise ConfigError(f"unknown model parameter {key!r}; allowed: "
                              + ", ".join(p.name for p in GROUP.params))
        try:
            values[name] = GROUP[name].check(value)
        except ValueError as err:
            raise ConfigError(f"model.{name}: {err}") from None
    return values


def window_geometry(params: Mapping[str, Any], num_coeffs: int) -> tuple[int, int]:
    """``(window size, window stride)`` in frames: the raw pair for one coefficient."""
    values = model_values(params)
    if num_coeffs == 1:
        return values["raw_window_size"], values["raw_window_stride"]
    return values["window_size"], values["window_stride"]


def _same_lcorr(size: int, kernel: int, factor: int) -> tuple[int, int, int, int, int]:
    p = (kernel - 1) // 2
    target = -(-size // factor)
    base = lcorr_output_size(size, kernel, factor, 1, p, 0)
    return factor, 1, p, target - base, target


def _same_mcorr(size: int, kernel: int, factor: int) -> tuple[int, int, int, int, int]:
    c = (kernel - 1) // 2
    d = (factor - 1) * (c + 1) + 1
    target = -(-size // factor)
    base = mcorr_output_size(size, kernel, 1, d, c, 0)
    return 1, d, c, target - base, target


def plan_layers(params: Mapping[str, Any], num_coeffs: int) -> list[LayerPlan]:
    """The correlation stack for ``params`` on data with ``num_coeffs`` coefficients."""
    if num_coeffs < 1:
        raise DataError(f"features need at least one coefficient per frame, got {num_coeffs}")
    values = model_values(params)
    time_size = window_geometry(values, num_coeffs)[0]
    freq_size = num_coeffs
    kt = values["convolutional_kernel_time"]
    kf = values["convolutional_kernel_freq"] if num_coeffs > 1 else 1
    sched = values["convolutional_factor_sched"]
    time_axis = _same_mcorr if values["convolutional_mellin"] else _same_lcorr
    layers, channels = [], 1
    for index in range(1, values["convolutional_layers"] + 1):
        scheduled = index % sched == 0
        tf = values["convolutional_time_factor"] if scheduled else 1
        ff = values["convolutional_freq_factor"] if scheduled and num_coeffs > 1 else 1
        if index == 1:
            out_channels = values["convolutional_initial_channels"]
        else:
            out_channels = channels * (values["convolutional_channel_factor"] if scheduled else 1)
        st, dt, pt, rt, time_out = time_axis(time_size, kt, tf)
        sf, df, pf, rf, freq_out = _same_lcorr(freq_size, kf, ff)
        layers.append(LayerPlan(channels, out_channels, (kt, kf), (st, sf), (dt, df), (pt, pf),
                                (rt, rf), (time_size, freq_size), (time_out, freq_out)))
        channels, time_size, freq_size = out_channels, time_out, freq_out
    return layers


def check_model_config(params: Mapping[str, Any], num_coeffs: int) -> None:
    """Raise ConfigError if ``params`` cannot make a model for ``num_coeffs`` coefficients."""
    values = model_values(params)
    size, stride = window_geometry(values, num_coeffs)
    if stride > size:
        prefix = "model.raw_" if num_coeffs == 1 else "model."
        raise ConfigError(
            f"{prefix}window_stride ({stride}) exceeds {prefix}window_size ({size}): frames "
            f"between windows would never be seen; use a stride of at most the window size")
    for number, layer in enumerate(plan_layers(values, num_coeffs), 1):
        if min(layer.out_size) < 1:  # the size rules above keep every axis >= 1
            raise ConfigError(f"model: correlation layer {number} has output size "
                              f"{layer.out_size}; reduce the kernels or shrink factors")


def repair_model_config(params: Mapping[str, Any], num_coeffs: int) -> dict[str, Any]:
    """The closest valid values to ``params`` (full group, short names).

    The only invalid combination the size rules allow is a window stride larger
    than the window; the stride is lowered to the window size.
    """
    values = model_values(params)
    if num_coeffs == 1:
        values["raw_window_stride"] = min(values["raw_window_stride"], values["raw_window_size"])
    else:
        values["window_stride"] = min(values["window_stride"], values["window_size"])
    check_model_config(values, num_coeffs)
    return values


class AcousticModel(torch.nn.Module):
    """Windows -> correlation stack -> sum over window -> recurrent stack -> CTC log-probs.

    ``mean`` and ``std`` (per coefficient, e.g. from the training data) normalise
    the input; they are buffers, so saved with the weights.
    """

    def __init__(self, params: Mapping[str, Any], num_coeffs: int, num_classes: int = 49,
                 mean=None, std=None):
        super().__init__()
        check_model_config(params, num_coeffs)
        values = model_values(params)
        self.hparams = values
        self.num_coeffs, self.num_classes = num_coeffs, num_classes
        self.window_size, self.window_stride = window_geometry(values, num_coeffs)
        self.register_buffer("feat_mean", _coefficients(mean, 0.0, num_coeffs, "mean"))
        self.register_buffer("feat_std", _coefficients(std, 1.0, num_coeffs, "std").clamp_min(1e-5))
        width = values["input_smoothing_width"]
        # derived from the configuration, so not saved with the weights
        self.register_buffer("smoothing", _gaussian(width) if width > 0 else None,
                             persistent=False)
        self.input_dropout = torch.nn.Dropout(values["input_dropout"])

        plans = plan_layers(values, num_coeffs)
        layer_type = MCorrLCorr if values["convolutional_mellin"] else LCorrLCorr
        self.convs = torch.nn.ModuleList(
            layer_type(pl.in_channels, pl.out_channels, pl.kernel, pl.s, pl.d, pl.p, pl.r)
            for pl in plans)
        self._nonlinearity = _NONLINEARITIES[values["convolutional_nonlinearity"]]
        dropout = values["dropout"]
        self.conv_dropout = (torch.nn.Dropout2d if values["convolutional_dropout_2d"]
                             else torch.nn.Dropout)(dropout)
        features = plans[-1].out_channels * plans[-1].out_size[1] if plans else num_coeffs

        rnn, size = _RNNS[values["recurrent_type"]], values["recurrent_size"]
        layers, bidirectional = values["recurrent_layers"], values["recurrent_bidirectional"]
        self.forward_rnns = torch.nn.ModuleList()
        self.backward_rnns = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for _ in range(layers):
            if values["layer_norm"]:
                self.norms.append(torch.nn.LayerNorm(features))
            self.forward_rnns.append(rnn(features, size))
            if bidirectional:
                self.backward_rnns.append(rnn(features, size))
            features = size * (2 if bidirectional else 1)
        self.dropout = torch.nn.Dropout(dropout)
        self.output = torch.nn.Linear(features, num_classes)
        self._init_recurrent()

    def _init_recurrent(self) -> None:
        # LSTM forget gates start open (bias 1), which speeds up early CTC training
        for module in [*self.forward_rnns, *self.backward_rnns]:
            if isinstance(module, torch.nn.LSTM):
                hidden = module.hidden_size
                with torch.no_grad():
                    module.bias_ih_l0[hidden:2 * hidden].fill_(1.0)
                    module.bias_hh_l0[hidden:2 * hidden].zero_()

    def output_lengths(self, feat_lens: Tensor) -> Tensor:
        """Number of outputs (windows) per sequence: ``ceil(len / window_stride)``."""
        return torch.div(feat_lens + self.window_stride - 1, self.window_stride,
                         rounding_mode="floor")

    def forward(self, feats: Tensor, feat_lens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``feats`` (N, T, F), ``feat_lens`` (N,) -> log-probs (T', N, C), out_lens (N,).

        ``feat_lens=None`` means every sequence fills all T frames.
        """
        if feats.dim() != 3 or feats.shape[2] != self.num_coeffs:
            raise ValueError(f"expected feats of shape (N, T, {self.num_coeffs}), "
                             f"got {tuple(feats.shape)}")
        n_batch, n_frames, _ = feats.shape
        n_out = -(-n_frames // self.window_stride)
        x = (feats - self.feat_mean) / self.feat_std
        if feat_lens is None:
            out_lens = torch.full((n_batch,), n_out, dtype=torch.long, device=feats.device)
            where = padding = None
        else:
            feat_lens = feat_lens.to(device=feats.device, dtype=torch.long)
            out_lens = self.output_lengths(feat_lens)
            frames = torch.arange(n_frames, device=feats.device)
            padding = (frames >= feat_lens[:, None])[..., None]  # (N, T, 1)
            x = x.masked_fill(padding, 0.0)
            windows = torch.arange(n_out, device=feats.device)
            where = (windows < out_lens[:, None]).nonzero(as_tuple=True)  # (batch, window)
        if self.smoothing is not None:
            x = self._smooth(x, padding)
        if self.input_dropout.p > 0:
            x = self.input_dropout(x)

        x = self._windows(x, n_out)  # (N, T', size, F) view
        x = x.flatten(0, 1) if where is None else x[where]
        x = x.unsqueeze(1).contiguous(memory_format=torch.channels_last)
        for conv in self.convs:
            # channels-last keeps torch's CPU convolutions on their fast path; a layer with
            # one input channel returns the default layout, so convert its output
            x = conv(x).contiguous(memory_format=torch.channels_last)
            x = self.conv_dropout(self._nonlinearity(x))
        x = x.sum(2).flatten(1)  # (windows, C * F')

        if where is None:
            x = x.view(n_batch, n_out, -1).transpose(0, 1)
        else:
            x = x.new_zeros(n_out, n_batch, x.shape[1]).index_put((where[1], where[0]), x)
        x = self._recurrent(x, out_lens, where is None)
        return self.output(self.dropout(x)).log_softmax(-1), out_lens

    def _smooth(self, x: Tensor, padding: Tensor | None) -> Tensor:
        """Gaussian smoothing along time of the frames inside each sequence, (N, T, F)."""
        n_batch, n_frames, n_coeffs = x.shape
        kernel = self.smoothing.to(x.dtype)
        half = (kernel.numel() - 1) // 2
        inside = (x.new_ones(n_batch, n_frames, 1) if padding is None
                  else (~padding).to(x.dtype))
        smoothed = F.conv1d(x.transpose(1, 2), kernel.expand(n_coeffs, 1, -1), padding=half,
                            groups=n_coeffs)
        # each frame's total weight inside its sequence: the edges are not pulled to zero
        weight = F.conv1d(inside.transpose(1, 2), kernel.view(1, 1, -1), padding=half)
        x = (smoothed / weight.clamp_min(1e-6)).transpose(1, 2)
        return x if padding is None else x.masked_fill(padding, 0.0)

    def _windows(self, x: Tensor, n_out: int) -> Tensor:
        size, stride = self.window_size, self.window_stride
        left = (size - stride) // 2
        right = (n_out - 1) * stride + size - x.shape[1] - left
        x = F.pad(x, (0, 0, left, right))
        return x.unfold(1, size, stride).transpose(2, 3)

    def _layer_input(self, x: Tensor, number: int) -> Tensor:
        """The input of recurrent layer ``number``: layer-normalised, then (past the first
        layer) dropped out."""
        if self.norms:
            x = self.norms[number](x)
        return self.dropout(x) if number else x

    def _recurrent(self, x: Tensor, out_lens: Tensor, full: bool) -> Tensor:
        if not self.backward_rnns:
            for number, rnn in enumerate(self.forward_rnns):
                x = rnn(self._layer_input(x, number))[0]
            return x
        if full:
            def reverse(y):
                return y.flip(0)
        else:
            steps = torch.arange(x.shape[0], device=x.device)[:, None]
            index = torch.where(steps < out_lens, out_lens - 1 - steps, steps)  # (T', N)

            def reverse(y):
                return y.gather(0, index[..., None].expand_as(y))
        pairs = zip(self.forward_rnns, self.backward_rnns, strict=True)
        for number, (fwd, bwd) in enumerate(pairs):
            x = self._layer_input(x, number)
            x = torch.cat([fwd(x)[0], reverse(bwd(reverse(x))[0])], 2)
        return x


def _gaussian(width: float) -> Tensor:
    """Taps of a Gaussian of standard deviation ``width`` out to 3 widths, summing to 1."""
    half = max(1, math.ceil(3 * width))
    taps = torch.exp(-0.5 * (torch.arange(-half, half + 1, dtype=torch.float32) / width) ** 2)
    return taps / taps.sum()


def _coefficients(values, fill: float, num_coeffs: int, name: str) -> Tensor:
    if values is None:
        return torch.full((num_coeffs,), fill)
    tensor = torch.as_tensor(values, dtype=torch.float32).flatten()
    if tensor.numel() != num_coeffs or not torch.isfinite(tensor).all():
        raise DataError(f"feature {name} must hold {num_coeffs} finite values, "
                        f"got {tensor.numel()}")
    return tensor.clone()
