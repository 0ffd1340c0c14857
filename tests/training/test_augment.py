"""Augmentation of padded batches: masks, warps, shifts, noise."""

from __future__ import annotations

import pytest
import torch

from cnn_mellin.training.augment import Augmenter, freq_warp, random_shift, time_warp

OFF = {
    "random_shift_proportion": 0.0, "max_time_warp": 0, "max_freq_warp": 0,
    "num_time_masks": 0, "max_time_mask": 20, "time_mask_max_proportion": 0.1,
    "num_freq_masks": 0, "max_freq_mask": 10, "freq_mask_max_proportion": 0.2,
    "noise_std": 0.0, "constant_offset_std": 0.0, "time_mask_prob": 1.0,
}


def _batch(lens=(30, 17, 5), f=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    feats = torch.randn(len(lens), int(lens.max()), f, generator=g)
    for i, n in enumerate(lens.tolist()):
        feats[i, n:] = 0
    return feats, lens


def _gen(seed=1):
    return torch.Generator().manual_seed(seed)


def test_nothing_active_by_default_settings():
    assert not Augmenter(OFF).active


def test_time_masks_respect_width_caps_and_lengths():
    feats, lens = _batch(lens=(200, 120, 40), f=4)
    mean = torch.full((4,), 7.0)
    params = {**OFF, "num_time_masks": 1, "max_time_mask": 10000, "time_mask_max_proportion": 0.1}
    aug = Augmenter(params, mean=mean, std=torch.ones(4))
    saw_mask = False
    for seed in range(40):
        out, out_lens = aug(feats, lens, _gen(seed))
        assert torch.equal(out_lens, lens)
        masked = (out == 7.0).all(-1)  # whole frames set to the mean
        for i, n in enumerate(lens.tolist()):
            width = int(masked[i].sum())
            assert width <= int(0.1 * n)  # proportion cap, since max_time_mask is huge
            assert not masked[i, n:].any()  # never in the padding
            if width:
                idx = masked[i].nonzero().flatten()
                assert idx.max() - idx.min() + 1 == width  # one contiguous band
                saw_mask = True
        unchanged = ~masked
        assert torch.equal(out[unchanged], feats[unchanged])
    assert saw_mask
    # the absolute cap wins when it is smaller
    params["max_time_mask"] = 3
    aug = Augmenter(params, mean=mean)
    for seed in range(20):
        out, _ = aug(feats, lens, _gen(seed))
        assert ((out == 7.0).all(-1).sum(1) <= 3).all()


def test_freq_masks_are_bands_of_coefficients_over_all_frames():
    feats, lens = _batch(f=40)
    params = {**OFF, "num_freq_masks": 2, "max_freq_mask": 5, "freq_mask_max_proportion": 1.0}
    aug = Augmenter(params, mean=torch.zeros(40))
    hit = False
    for seed in range(20):
        out, _ = aug(feats, lens, _gen(seed))
        cols = (out[0, :30] == 0).all(0)  # coefficients zeroed over the whole utterance
        assert int(cols.sum()) <= 10
        hit |= bool(cols.any())
        assert torch.equal(out[:, :, ~cols][0, :30], feats[:, :, ~cols][0, :30])
    assert hit


def test_time_warp_keeps_ends_and_length_and_is_identity_without_room():
    t = torch.arange(50, dtype=torch.float32)
    feats = t[None, :, None].repeat(2, 1, 3)  # value equals frame index: a ramp
    lens = torch.tensor([50, 30])
    feats[1, 30:] = 0
    for seed in range(20):
        out = time_warp(feats, lens, 5, _gen(seed))
        assert out.shape == feats.shape
        for i, n in enumerate(lens.tolist()):
            ramp = out[i, :n, 0]
            assert ramp[0] == 0 and ramp[-1] == pytest.approx(n - 1)
            assert (ramp[1:] - ramp[:-1] >= -1e-5).all()  # a warp of a ramp stays monotone
            assert (ramp - t[:n]).abs().max() <= 5 + 1e-4  # moved by at most the warp
        assert torch.equal(out[1, 30:], feats[1, 30:])
    short = torch.ones(1, 2, 3)
    assert torch.equal(time_warp(short, torch.tensor([2]), 5, _gen()), short)


def test_freq_warp_keeps_edge_coefficients():
    feats = torch.arange(20, dtype=torch.float32)[None, None, :].repeat(2, 4, 1)
    out = freq_warp(feats, 3, _gen())
    assert torch.equal(out[..., 0], feats[..., 0]) and torch.allclose(out[..., -1], feats[..., -1])
    changed = any(not torch.equal(freq_warp(feats, 3, _gen(s)), feats) for s in range(10))
    assert changed


def test_random_shift_pads_with_edge_frames():
    feats, lens = _batch(lens=(40, 10))
    for seed in range(10):
        out, new = random_shift(feats, lens, 0.25, _gen(seed))
        for i, n in enumerate(lens.tolist()):
            extra = int(new[i]) - n
            assert 0 <= extra <= 2 * int(0.25 * n)
            # find where the original sequence starts
            starts = [s for s in range(extra + 1) if torch.equal(out[i, s:s + n], feats[i, :n])]
            assert starts, "original frames must appear unchanged, shifted"
            s = starts[0]
            assert (out[i, :s] == feats[i, 0]).all()
            assert (out[i, s + n:int(new[i])] == feats[i, n - 1]).all()
            assert (out[i, int(new[i]):] == 0).all()


def test_noise_is_scaled_per_coefficient_and_reproducible():
    feats = torch.zeros(4, 500, 3)
    lens = torch.full((4,), 500)
    std = torch.tensor([1.0, 2.0, 0.5])
    aug = Augmenter({**OFF, "noise_std": 0.5}, mean=torch.zeros(3), std=std)
    out, _ = aug(feats, lens, _gen(3))
    measured = out.reshape(-1, 3).std(0)
    assert torch.allclose(measured, 0.5 * std, rtol=0.1)
    again, _ = aug(feats, lens, _gen(3))
    assert torch.equal(out, again)
