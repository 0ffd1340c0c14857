"""Feature extraction of cnn_mellin.data.features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchaudio.compliance import kaldi

from cnn_mellin.data import features
from cnn_mellin.errors import ConfigError, DataError


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _speechlike(n: int, seed: int = 0) -> torch.Tensor:
    """Noise plus a few harmonics, in [-1, 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.05 * rng.standard_normal(n) + sum(
        0.2 / k * np.sin(2 * np.pi * 120 * k * t) for k in range(1, 8))
    return torch.from_numpy(x.astype(np.float32))


def test_feature_configs():
    assert features.FEATURES == ("fbank-81-10ms", "sigbank-41-2ms", "raw")
    dims = {name: features.load_feature_config(name)["num_coeffs"] for name in features.FEATURES}
    assert dims == {"fbank-81-10ms": 81, "sigbank-41-2ms": 41, "raw": 1}
    config = features.load_feature_config("fbank-81-10ms")
    config["num_coeffs"] = 0  # a copy: the cached definition is unchanged
    assert features.load_feature_config("fbank-81-10ms")["num_coeffs"] == 81
    with pytest.raises(ConfigError, match="unknown feature 'mfcc'.*fbank-81-10ms"):
        features.load_feature_config("mfcc")


def test_fbank_equals_torchaudio_kaldi_fbank():
    wave = _speechlike(16000 + 123)
    ours = features.compute_features("fbank-81-10ms", wave)
    reference = kaldi.fbank(wave.unsqueeze(0) * 32768, num_mel_bins=80, frame_length=25.0,
                            frame_shift=10.0, use_energy=True, dither=0.0, energy_floor=0.0,
                            sample_frequency=16000)
    assert ours.dtype == torch.float32 and ours.shape == (99, 81)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("num_samples", [0, 31, 32, 399, 400, 559, 560, 16000, 47999])
def test_frame_counts_follow_the_frame_shift_formula(num_samples):
    wave = _speechlike(num_samples)
    expected = {
        "fbank-81-10ms": 0 if num_samples < 400 else 1 + (num_samples - 400) // 160,
        "sigbank-41-2ms": num_samples // 32,
        "raw": num_samples,
    }
    for name, frames in expected.items():
        assert features.num_frames(name, num_samples) == frames
        out = features.compute_features(name, wave)
        width = features.load_feature_config(name)["num_coeffs"]
        assert out.shape == (frames, width) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_raw_is_the_waveform():
    wave = _speechlike(1000)
    assert torch.equal(features.compute_features("raw", wave)[:, 0], wave)
    assert torch.equal(features.compute_features("raw", wave.numpy())[:, 0], wave)
    with pytest.raises(DataError, match="one-dimensional"):
        features.compute_features("raw", wave.view(10, 100))


@pytest.mark.parametrize("frequency", [300.0, 1000.0, 4000.0])
def test_sigbank_puts_a_tone_in_its_band_with_its_energy(frequency):
    centres, _ = features.gabor_bank(features.load_feature_config("sigbank-41-2ms"))
    t = torch.arange(16000, dtype=torch.float64) / 16000
    amplitude = 0.5
    out = features.compute_features(
        "sigbank-41-2ms", (amplitude * torch.sin(2 * math.pi * frequency * t)).float())
    steady = out[50:-50].mean(0)
    nearest = int(np.argmin(np.abs(centres - frequency)))
    assert int(steady[1:].argmax()) == nearest
    # coefficient 0: log mean power; bands: log squared envelope (amplitude^2 at the centre)
    assert steady[0].item() == pytest.approx(math.log(amplitude ** 2 / 2), abs=1e-3)
    assert math.log(0.5 * amplitude ** 2) < steady[1 + nearest].item() <= math.log(amplitude ** 2)


def test_sigbank_is_local_in_time():
    impulse = torch.zeros(32000)
    impulse[16000 + 16] = 1.0
    out = features.compute_features("sigbank-41-2ms", impulse)
    assert (out.argmax(0) == 500).all()  # frame t is centred on sample 32 t + 16
    wave = _speechlike(100000, seed=1)
    whole = features.compute_features("sigbank-41-2ms", wave)
    half = features.compute_features("sigbank-41-2ms", wave[:50000])
    # frames far from the cut do not depend on what follows: blocks are stitched exactly
    torch.testing.assert_close(whole[:1500], half[:1500], atol=1e-4, rtol=0)
