"""Training throughput: frames per second, and the real loader against pre-loaded tensors.

    .venv/bin/python bench/train.py [--data-dir DIR] [--batches N] [--workers K] [--threads T]

Runs the trainer's own step (forward, CTC loss, backward, clipping, optimiser step) on
the default configuration. Each of N batches is stepped twice, interleaved so that
load from other processes hits both alike (alternating which goes first): once from
tensors already in memory, once drawn from the real loader (HDF5 read + collate inside
the timed region). Prints the frames per second of each and the ratio loader /
pre-loaded (goal <= 1.1).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cnn_mellin.config import Config  # noqa: E402
from cnn_mellin.data.loader import UtteranceDataset, make_loader  # noqa: E402
from cnn_mellin.data.phones import BLANK  # noqa: E402
from cnn_mellin.model import AcousticModel  # noqa: E402
from cnn_mellin.training.schedule import optimizer_from_params  # noqa: E402
from cnn_mellin.training.step import ctc_feasible, ctc_loss  # noqa: E402

DEFAULT_DATA = "data/synth-default/timit/fbank-81-10ms/train"


def _step(model, optimizer, batch, max_norm):
    log_probs, out_lens = model(batch.feats, batch.feat_lens)
    valid = ctc_feasible(batch.targets, batch.target_lens, out_lens).float()
    loss = ctc_loss(log_probs, out_lens, batch.targets, batch.target_lens, valid)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=DEFAULT_DATA)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--read-ini", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = Config.from_ini(args.read_ini)
    dataset = UtteranceDataset(args.data_dir)
    info = dataset.info
    torch.manual_seed(0)
    model = AcousticModel(config.group("model"), info.num_coeffs, BLANK + 1, mean=info.mean,
                          std=info.std)
    optimizer = optimizer_from_params(model.parameters(), config.group("training"))
    max_norm = config["training.max_grad_norm"] or float("inf")

    def loader():
        lo = make_loader(dataset, config["data.batch_size"], num_workers=args.workers,
                         num_buckets=config["data.num_buckets"], seed=0)
        lo.batch_sampler.set_epoch(1)
        return lo

    n = min(args.batches, len(loader()))
    began = time.perf_counter()
    preloaded = []
    for batch in loader():
        preloaded.append(batch)
        if len(preloaded) == n:
            break
    load_seconds = time.perf_counter() - began
    _step(model, optimizer, preloaded[0], max_norm)  # warm-up: allocator, kernels

    times_pre, times_loader, frames = [], [], []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    live = iter(loader())

    def from_memory(batch):
        began = time.perf_counter()
        _step(model, optimizer, batch, max_norm)
        times_pre.append(time.perf_counter() - began)

    def from_loader(batch):
        began = time.perf_counter()
        fresh = next(live)
        _step(model, optimizer, fresh, max_norm)
        times_loader.append(time.perf_counter() - began)
        assert fresh.utt_ids == batch.utt_ids

    for i, batch in enumerate(preloaded):
        # alternate which goes first, so neither always runs on a warmer cache
        order = (from_memory, from_loader) if i % 2 == 0 else (from_loader, from_memory)
        for run in order:
            run(batch)
        frames.append(int(batch.feat_lens.sum()))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    wall = sum(times_pre) + sum(times_loader)

    total_frames = sum(frames)
    fps_pre = total_frames / sum(times_pre)
    fps_loader = total_frames / sum(times_loader)
    epoch_frames = sum(dataset.num_frames)
    print(f"data: {args.data_dir} ({len(dataset)} utterances, {epoch_frames} frames)")
    print(f"batches: {n} of batch size {config['data.batch_size']}, {total_frames} frames; "
          f"loader workers {args.workers}; torch threads {torch.get_num_threads()}")
    print(f"reading {n} batches alone: {load_seconds:.2f} s "
          f"({n * config['data.batch_size'] / load_seconds:.0f} utterances/s)")
    print(f"pre-loaded tensors: {sum(times_pre) / n:.3f} s/step, {fps_pre:.0f} frames/s")
    print(f"real loader:        {sum(times_loader) / n:.3f} s/step, {fps_loader:.0f} frames/s")
    ratios = sorted(a / b for a, b in zip(times_loader, times_pre, strict=True))
    print(f"ratio loader / pre-loaded step time: {sum(times_loader) / sum(times_pre):.3f} "
          f"(total), {ratios[len(ratios) // 2]:.3f} (median per batch) (goal <= 1.1)")
    print(f"estimated training epoch: {epoch_frames / fps_loader:.0f} s "
          f"({epoch_frames / fps_loader / 60:.1f} min); process CPU / wall while timed: "
          f"{cpu / wall:.2f}")


if __name__ == "__main__":
    main()
