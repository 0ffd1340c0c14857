"""Memory estimate against measurement: seconds per estimate and error, on configurations
drawn over the model and training spaces (both correlation types).

For each configuration: the estimate (``cnn_mellin.memory.estimate_peak_bytes``, meta
tensors) and the CPU measurement of one real training step (``measure_peak_bytes``: the
profiler's allocation events), side by side in one run. Prints one row per configuration,
then the median estimate time (CPU seconds of this process) and the error's spread.
Configurations whose estimate exceeds ``--max-bytes`` are skipped (their real step would
take minutes here), so the table covers the part of the space a CPU can measure.

    .venv/bin/python bench/memory_estimate.py [--configs 32] [--seed 0] [--max-bytes 1.5e9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from functools import partial

import torch

from cnn_mellin.config import parameters
from cnn_mellin.errors import ConfigError
from cnn_mellin.memory import estimate_peak_bytes, measure_peak_bytes
from cnn_mellin.model import AcousticModel, check_model_config
from cnn_mellin.optim import space
from cnn_mellin.optim.feasible import uniform_draw
from cnn_mellin.training.schedule import make_optimizer

NUM_COEFFS = 81  # fbank-81-10ms, the main job's features


def _draw(rng: random.Random) -> tuple[dict, str, float, float, int, int]:
    params = parameters()
    names = [n for n, p in params.items() if n.startswith("model.") and p.tunable]
    dists = space.distributions(names, params)
    model = {n.split(".", 1)[1]: uniform_draw(d, rng) for n, d in dists.items()}
    optimizer = rng.choice(["adam", "adamw", "sgd", "rmsprop"])
    momentum = rng.choice([0.0, 0.9])
    weight_decay = rng.choice([0.0, 1e-4])
    return model, optimizer, momentum, weight_decay, rng.choice([4, 8, 16]), \
        rng.choice([200, 400])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bytes", type=float, default=1.5e9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    estimate_peak_bytes({}, NUM_COEFFS, 2, 50, "adam", device="cpu")  # imports, first calls
    rows, seconds, ratios = [], [], []
    print("| # | corr | conv | rnn | batch x frames | optimizer | measured MiB | estimated MiB "
          "| est/meas | estimate s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    while len(rows) < args.configs:
        model, optimizer, momentum, decay, batch, frames = _draw(rng)
        try:
            check_model_config(model, NUM_COEFFS)
        except ConfigError:
            continue
        start = time.process_time()
        estimated = estimate_peak_bytes(model, NUM_COEFFS, batch, frames, optimizer,
                                        device="cpu", momentum=momentum, weight_decay=decay)
        took = time.process_time() - start
        if estimated > args.max_bytes:
            continue
        torch.manual_seed(0)
        measured = measure_peak_bytes(
            AcousticModel(model, NUM_COEFFS), batch, frames, NUM_COEFFS,
            partial(make_optimizer, name=optimizer, learning_rate=1e-3, momentum=momentum,
                    weight_decay=decay), "cpu")
        ratio = estimated / measured
        rows.append(model)
        seconds.append(took)
        ratios.append(ratio)
        rnn = "none" if model["recurrent_layers"] == 0 else (
            f"{model['recurrent_layers']}x{model['recurrent_size']} {model['recurrent_type']}"
            + (" bi" if model["recurrent_bidirectional"] else ""))
        conv = "none" if model["convolutional_layers"] == 0 else (
            f"{model['convolutional_layers']}x{model['convolutional_initial_channels']}")
        print(f"| {len(rows)} | {'mcorr' if model['convolutional_mellin'] else 'lcorr'} "
              f"| {conv} | {rnn} | {batch} x {frames} | {optimizer} | {measured / 2**20:.1f} "
              f"| {estimated / 2**20:.1f} | {ratio:.3f} | {took:.3f} |", flush=True)
    errors = sorted(abs(r - 1) for r in ratios)
    print(f"\nmedian estimate {statistics.median(seconds):.3f} CPU s (max {max(seconds):.3f}); "
          f"|est/meas - 1|: median {statistics.median(errors):.3f}, "
          f"max {errors[-1]:.3f}; within 5 %: {sum(e <= 0.05 for e in errors)} of "
          f"{len(errors)}")


if __name__ == "__main__":
    main()
