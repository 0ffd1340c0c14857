"""Tiny learnable feature stores and model settings for the training and decoding tests."""

from __future__ import annotations

import numpy as np

from cnn_mellin.config import Config
from cnn_mellin.data.phones import PHONES48, map_48_to_39
from cnn_mellin.data.store import StoreWriter

NUM_COEFFS = 8
PHONE_IDS = (3, 10, 17, 25, 33)  # a few 48-phone ids; each gets its own feature pattern

TINY_MODEL = {
    "model.window_size": 4, "model.window_stride": 2, "model.convolutional_layers": 1,
    "model.convolutional_initial_channels": 4, "model.recurrent_layers": 1,
    "model.recurrent_size": 16,
}


def write_store(data_dir, num_utts: int, seed: int, prefix: str = "u", long_targets=()):
    """A store whose utterances are runs of 6-9 frames per phone, each phone a noisy
    pattern on its own coefficients. ``long_targets``: ids given far more phones than frames."""
    rng = np.random.default_rng(seed)
    patterns = {p: np.roll(np.eye(NUM_COEFFS)[0] * 3 + np.eye(NUM_COEFFS)[1] * 2, i)
                for i, p in enumerate(PHONE_IDS)}
    with StoreWriter(
        data_dir, "fbank-81-10ms", {"name": "tiny"}, NUM_COEFFS, 10.0, PHONES48, map_48_to_39,
    ) as writer:
        for n in range(num_utts):
            utt = f"{prefix}{n:03d}"
            phones = [int(rng.choice(PHONE_IDS))]
            while len(phones) < rng.integers(3, 6):  # no phone twice in a row
                phones.append(int(rng.choice([p for p in PHONE_IDS if p != phones[-1]])))
            frames = np.concatenate([
                np.tile(patterns[p], (int(rng.integers(6, 10)), 1)) for p in phones
            ])
            frames = frames + rng.normal(0, 0.3, frames.shape) + 5.0
            targets = phones * 10 if utt in long_targets else phones
            writer.add(utt, frames.astype(np.float32), targets)
    return data_dir


def tiny_config(**training) -> Config:
    """The tiny model, augmentation off, with training settings (short names) on top."""
    values = dict(TINY_MODEL)
    values.update({"training.num_freq_masks": 0, "training.max_freq_warp": 0})
    values.update({"data.batch_size": 4, "data.eval_batch_size": 8, "data.num_buckets": 2})
    values.update({f"training.{k}": v for k, v in training.items()})
    return Config(values)
