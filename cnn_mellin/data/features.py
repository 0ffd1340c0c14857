"""Acoustic features of 16 kHz speech: ``fbank-81-10ms``, ``sigbank-41-2ms`` and ``raw``.

Each feature is defined by ``conf/feats/<name>.json``. ``fbank`` is torchaudio's
Kaldi-compatible filterbank; ``sigbank`` is ours: a bank of complex Gabor filters (Gaussian
frequency responses centred on a Mel scale, neighbours crossing at ``crossing_db``) whose complex
envelopes are computed in the frequency domain at ``envelope_rate``, squared, integrated with a
short Hann window and logged every ``frame_shift_ms``; ``raw`` is the waveform itself.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from cnn_mellin.errors import ConfigError, DataError

FEATURES: tuple[str, ...] = ("fbank-81-10ms", "sigbank-41-2ms", "raw")
SAMPLE_RATE = 16000
_REQUIRED = ("name", "kind", "sample_rate", "num_coeffs", "frame_shift_ms")


def _conf_file(name: str) -> Path:
    try:
        from cnn_mellin.resources import conf_path
    except ImportError:  # resources.py not written yet: the source tree
        return Path(__file__).resolve().parents[2] / "conf" / "feats" / f"{name}.json"
    return conf_path("feats", f"{name}.json")


def check_feature(name: str) -> str:
    """``name`` if it is a known feature, else ConfigError listing the allowed names."""
    if name not in FEATURES:
        raise ConfigError(f"unknown feature {name!r}; allowed: {', '.join(FEATURES)}")
    return name


@functools.cache
def _load(name: str) -> str:
    path = _conf_file(check_feature(name))
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read feature definition {path}: {err}") from None
    missing = [key for key in _REQUIRED if key not in config]
    if missing or config["name"] != name or config["sample_rate"] != SAMPLE_RATE:
        raise ConfigError(
            f"feature definition {path} is invalid: needs keys {', '.join(_REQUIRED)}, "
            f"name {name!r} and sample_rate {SAMPLE_RATE}"
        )
    return json.dumps(config, sort_keys=True)


def load_feature_config(name: str) -> dict:
    """The definition of feature ``name`` (a fresh dict read from conf/feats/<name>.json)."""
    return json.loads(_load(name))


def num_frames(name: str, num_samples: int) -> int:
    """Frames that ``name`` gives for ``num_samples`` samples (the frame-shift formula).

    fbank (Kaldi, snip_edges): ``1 + (n - 400) // 160`` for ``n >= 400``, else 0;
    sigbank: ``n // 32`` (one frame per 2 ms, centred on each 2 ms step); raw: ``n``.
    """
    config = load_feature_config(name)
    if config["kind"] == "raw":
        return int(num_samples)
    shift = round(config["sample_rate"] * config["frame_shift_ms"] / 1000)
    if config["kind"] == "fbank":
        length = round(config["sample_rate"] * config["frame_length_ms"] / 1000)
        return 0 if num_samples < length else 1 + (num_samples - length) // shift
    return int(num_samples) // shift


def compute_features(name: str, waveform) -> torch.Tensor:
    """Features ``(T, F)`` float32 of a mono 16 kHz waveform ``(samples,)`` in [-1, 1)."""
    config = load_feature_config(name)
    wave = torch.as_tensor(np.asarray(waveform) if not torch.is_tensor(waveform) else waveform)
    if wave.dim() != 1:
        raise DataError(f"waveform must be one-dimensional, got shape {tuple(wave.shape)}")
    wave = wave.to(torch.float32)
    frames = num_frames(name, wave.numel())
    if config["kind"] == "raw":
        return wave.reshape(-1, 1).clone()
    if frames == 0:
        return torch.zeros(0, config["num_coeffs"], dtype=torch.float32)
    if config["kind"] == "fbank":
        from torchaudio.compliance import kaldi

        feats = kaldi.fbank(wave.unsqueeze(0) * config["input_scale"], **config["kaldi"])
    else:
        feats = _sigbank(wave, _load(name))
    return feats.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------- sigbank
def _mel(hz):
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def _hz(mel):
    return 700.0 * np.expm1(np.asarray(mel, dtype=np.float64) / 1127.0)


def gabor_bank(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """Centre frequencies and Gaussian standard deviations (Hz) of the sigbank filters.

    Centres are equally spaced in Mel between ``low_hz`` and ``high_hz`` (exclusive); each
    filter's width makes its response meet its neighbours' at ``crossing_db``.
    """
    count = config["num_filters"]
    lo, hi = _mel(config["low_hz"]), _mel(config["high_hz"])
    step = (hi - lo) / (count + 1)
    centres_mel = lo + step * np.arange(1, count + 1)
    centres = _hz(centres_mel)
    spacing = (_hz(centres_mel + step) - _hz(centres_mel - step)) / 2
    # power response exp(-(f - fc)^2 / sigma^2) equals the crossing level half a spacing away
    level = 10 ** (config["crossing_db"] / 10)
    sigmas = spacing / (2 * math.sqrt(-math.log(level)))
    return centres, sigmas


_BLOCK_FFT = 16384  # samples per FFT block (overlap-save); blocks overlap by 2 * margin
_BLOCKS_AT_ONCE = 4


@functools.lru_cache(maxsize=4)
def _sigbank_plan(config_json: str):
    """Gather indices and gains that turn one block's spectrum into every filter's envelope."""
    config = json.loads(config_json)
    rate = config["sample_rate"]
    decim = rate // config["envelope_rate"]
    centres, sigmas = gabor_bank(config)
    # a margin of 6 time-domain standard deviations of the narrowest filter, in whole envelope
    # samples, keeps circular wrap-around out of each block's kept centre
    margin = decim * math.ceil(6 * rate / (2 * math.pi * sigmas.min()) / decim)
    band = _BLOCK_FFT // decim  # envelope samples per block = spectrum bins kept per filter
    offsets = np.arange(band) - band // 2
    bins = np.rint(centres * _BLOCK_FFT / rate).astype(np.int64)[:, None] + offsets
    freqs = bins * rate / _BLOCK_FFT
    gains = np.exp(-0.5 * ((freqs - centres[:, None]) / sigmas[:, None]) ** 2)
    # baseband order for the inverse FFT (offset 0 first); 2 / decim restores the amplitude.
    # Bins wrap modulo the FFT length: the response of a discrete-time Gabor filter is periodic,
    # and cutting it at 0 Hz or Nyquist would make its impulse response ring.
    order = np.argsort(np.mod(offsets, band), kind="stable")
    gains = torch.from_numpy((gains[:, order] * (2.0 / decim)).astype(np.float32))
    bins = torch.from_numpy(np.mod(bins[:, order], _BLOCK_FFT))
    taps = round(config["envelope_rate"] * config["integration_ms"] / 1000)
    window = torch.hann_window(taps + 2, periodic=False, dtype=torch.float32)[1:-1]
    return bins, gains, window / window.sum(), margin


def _sigbank(wave: torch.Tensor, config_json: str) -> torch.Tensor:
    config = json.loads(config_json)
    rate = config["sample_rate"]
    hop = round(rate * config["frame_shift_ms"] / 1000)
    decim = rate // config["envelope_rate"]
    env_hop = hop // decim
    frames = wave.numel() // hop
    bins, gains, window, margin = _sigbank_plan(config_json)
    # frame t integrates the envelope around sample hop * t + hop / 2; the envelope is needed
    # from ``front`` samples before the start of the waveform
    front = (window.numel() // 2 - env_hop // 2) * decim
    needed = (env_hop * (frames - 1) + window.numel()) * decim
    step = _BLOCK_FFT - 2 * margin
    blocks = -(-needed // step)
    x = torch.nn.functional.pad(
        wave, (front + margin, blocks * step + margin - front - wave.numel())
    )
    keep = slice(margin // decim, (margin + step) // decim)
    pieces = []
    # a few blocks at a time: fixed-size buffers keep the allocator from fragmenting
    for group in x.unfold(0, _BLOCK_FFT, step).split(_BLOCKS_AT_ONCE):
        spectra = torch.fft.fft(group, dim=1)  # (blocks, bins)
        envelope = torch.fft.ifft(spectra[:, bins] * gains, dim=2)  # (blocks, filters, band)
        pieces.append((envelope.real ** 2 + envelope.imag ** 2)[:, :, keep])
    power = torch.cat(pieces).permute(1, 0, 2).reshape(bins.shape[0], -1)[:, : needed // decim]
    # (strided windows times weights rather than conv1d: oneDNN would cache a kernel per length)
    bank = power.unfold(1, window.numel(), env_hop)[:, :frames] @ window  # (filters, frames)
    floor = config["log_floor"]
    out = [torch.log(bank.T.clamp_min(floor))]
    if config["use_energy"]:
        energy_window = torch.hann_window(2 * hop + 2, periodic=False)[1:-1]
        energy_window = energy_window / energy_window.sum()
        squared = torch.nn.functional.pad(wave * wave, (hop // 2, 2 * hop))
        energy = squared.unfold(0, 2 * hop, hop)[:frames] @ energy_window
        out.insert(0, torch.log(energy.clamp_min(floor)).unsqueeze(1))
    return torch.cat(out, dim=1)
