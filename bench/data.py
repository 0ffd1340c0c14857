"""Benchmark of the data pipeline: synthesis, feature extraction, prep and loading.

    .venv/bin/python bench/data.py [--utterances N] [--corpus TIMIT_DIR] [--workers K]

Builds a synthetic corpus (or reads ``--corpus``), then reports

- feature extraction as a real-time factor per core (compute seconds per audio second, one
  thread), with each feature's cost relative to torchaudio's Kaldi fbank measured in this run;
- ``prep timit`` wall time with ``--workers`` processes;
- loader throughput (utterances/s over a second epoch, 0 and ``--workers`` worker processes)
  against the training step of the default model on the same batches (forward, CTC loss,
  backward, Adam step, one thread): a ratio above 1 means the loader keeps up with training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import soundfile
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnn_mellin.data.features import FEATURES, compute_features  # noqa: E402
from cnn_mellin.data.loader import UtteranceDataset, make_loader  # noqa: E402
from cnn_mellin.data.phones import BLANK  # noqa: E402
from cnn_mellin.data.synth import prepare_synth  # noqa: E402
from cnn_mellin.data.timit import find_utterances, prepare_timit  # noqa: E402


def feature_speed(wavs: list[Path]) -> dict[str, float]:
    """Real-time factor per core of each feature over ``wavs``."""
    audio = [torch.from_numpy(soundfile.read(str(w), dtype="float32")[0]) for w in wavs]
    seconds = sum(a.numel() for a in audio) / 16000
    rtf = {}
    for name in FEATURES:
        compute_features(name, audio[0])  # warm-up: caches, plans
        start = time.perf_counter()
        for wave in audio:
            compute_features(name, wave)
        rtf[name] = (time.perf_counter() - start) / seconds
    return rtf


def _epoch_throughput(loader) -> tuple[float, list]:
    """Utterances/s of the second epoch (workers started, file cache warm) and its batches."""
    for epoch in (0, 1):
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        batches = list(loader)
        elapsed = time.perf_counter() - start
    return sum(len(b.utt_ids) for b in batches) / elapsed, batches


def train_throughput(dataset: UtteranceDataset, batches: list, count: int) -> float:
    """Utterances/s of the default model's training step on ``count`` of ``batches``."""
    from cnn_mellin.config import Config
    from cnn_mellin.model import AcousticModel

    info = dataset.info
    torch.manual_seed(0)
    model = AcousticModel(Config().group("model"), info.num_coeffs, num_classes=BLANK + 1,
                          mean=info.mean, std=info.std)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    chosen = sorted(batches, key=lambda b: int(b.feat_lens.max()))
    chosen = [chosen[len(chosen) * (2 * i + 1) // (2 * count)] for i in range(count)]
    utts, elapsed = 0, 0.0
    for number, batch in enumerate([chosen[0], *chosen]):  # the first run warms up
        start = time.perf_counter()
        log_probs, out_lens = model(batch.feats, batch.feat_lens)
        loss = torch.nn.functional.ctc_loss(log_probs, batch.targets, out_lens,
                                            batch.target_lens, blank=BLANK, zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if number:
            elapsed += time.perf_counter() - start
            utts += len(batch.utt_ids)
    return utts / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--utterances", type=int, default=60,
                        help="training utterances of the synthetic corpus (default 60)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="use this TIMIT-layout corpus instead of synthesising one")
    parser.add_argument("--workers", type=int, default=2, help="prep and loader processes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--train-batches", type=int, default=3,
                        help="batches timed for the training step (median-length ones)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        corpus = args.corpus
        if corpus is None:
            corpus = Path(tmp) / "synth"
            start = time.perf_counter()
            summary = prepare_synth(corpus, utterances=args.utterances, num_workers=args.workers)
            took = time.perf_counter() - start
            audio = sum(soundfile.info(str(w)).duration for w in corpus.glob("*/*/*/*.WAV"))
            print(f"synth: {summary}")
            print(f"synth: {took:.1f} s wall for {audio / 60:.1f} min of audio with "
                  f"{args.workers} workers (real-time factor per core "
                  f"{took * args.workers / audio:.4f})")

        train = [u.wav for u in find_utterances(corpus) if u.split == "train"]
        rtf = feature_speed(train)
        reference = rtf["fbank-81-10ms"]
        print("\nfeature extraction, one thread (real-time factor per core; x torchaudio fbank)")
        for name, value in rtf.items():
            print(f"  {name:15s} RTF {value:.5f}  ({1 / value:7.0f}x real time)  "
                  f"{value / reference:6.2f}x fbank")

        out = Path(tmp) / "data"
        start = time.perf_counter()
        prep = prepare_timit(corpus, out, list(FEATURES), num_workers=args.workers)
        took = time.perf_counter() - start
        audio = sum(prep.seconds.values())
        print(f"\nprep timit (all three features, {args.workers} workers): {took:.1f} s wall "
              f"for {audio / 60:.1f} min of audio (real-time factor per core "
              f"{took * args.workers / audio:.4f})")

        print(f"\nloading the train split, batch {args.batch_size} "
              "(utterances/s; loader / training step of the default model on the same batches)")
        for name in FEATURES:
            dataset = UtteranceDataset(out / name / "train")
            rates = {}
            for workers in (0, args.workers):
                loader = make_loader(dataset, args.batch_size, num_workers=workers, seed=0)
                rates[workers], batches = _epoch_throughput(loader)
            step = train_throughput(dataset, batches, args.train_batches)
            print(f"  {name:15s} loader {rates[0]:7.1f} utt/s (0 workers), "
                  f"{rates[args.workers]:7.1f} utt/s ({args.workers} workers); "
                  f"training step {step:6.2f} utt/s; loader/training "
                  f"{rates[0] / step:7.1f}x (0 workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
