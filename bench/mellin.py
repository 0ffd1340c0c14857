"""Forward+backward time of mcorrlcorr against torch.nn.Conv2d on the same input.

Run: .venv/bin/python bench/mellin.py [--threads 1] [--repeats 15] [--model]

Input 256 windows x 32 channels x 5 frames x 41 coefficients, 3x3 kernels, 32
output channels. Each configuration is timed against Conv2d in the same run,
interleaved, and the best of ``--repeats`` is kept for each, so the printed
ratio is robust to other load on the machine. ``--model`` also times one
training step (forward, CTC, backward, Adam) of the default acoustic model with
Mellin against linear correlation, on 16 utterances of 4.5-6.5 s of fbank-81.
"""

import argparse
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from cnn_mellin.mellin import MCorrLCorr, mcorr_output_size  # noqa: E402

# name, Mellin (s, d, p, r) along time and linear (s, d, p, r) along frequency, Conv2d padding
CONFIGS = [
    ("default s=d=1 p=r=0", (1, 1, 0, 0), (1, 1, 0, 0), 0),
    ("same size, p=K-1", (1, 1, 2, 0), (1, 1, 1, 1), 1),
    ("model layer, p=1 r=2", (1, 1, 1, 2), (1, 1, 1, 1), 1),
]


def _step(module: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - start


def _model_step(model: torch.nn.Module, optimizer, feats, lens, targets) -> float:
    start = time.perf_counter()
    log_probs, out_lens = model(feats, lens)
    loss = torch.nn.functional.ctc_loss(log_probs, targets, out_lens,
                                        torch.full((len(lens),), targets.shape[1]))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def bench_model(repeats: int) -> None:
    """Time a training step of the default model, Mellin versus linear correlation."""
    from cnn_mellin.model import AcousticModel

    lens = torch.randint(450, 651, (16,))
    feats = torch.randn(16, int(lens.max()), 81)
    targets = torch.randint(1, 49, (16, 60))
    runs = {}
    for mellin in (False, True):
        model = AcousticModel({"convolutional_mellin": mellin}, 81)
        runs[mellin] = (model, torch.optim.Adam(model.parameters(), 1e-3), [])
    for _ in range(repeats + 1):
        for model, optimizer, times in runs.values():
            times.append(_model_step(model, optimizer, feats, lens, targets))
    linear, mellin = (min(runs[m][2][1:]) for m in (False, True))
    audio = float(lens.sum()) / 100
    print(f"\ndefault model, one training step on {audio:.0f} s of audio (16 utterances)")
    print(f"linear {linear * 1e3:.0f} ms, Mellin {mellin * 1e3:.0f} ms, "
          f"ratio {mellin / linear:.2f}; {linear / audio * 1e3:.1f} / {mellin / audio * 1e3:.1f} "
          "ms per second of audio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--model", action="store_true", help="also time the default model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, w, f, k = args.batch, 32, 5, 41, 3
    x = torch.randn(n, c, w, f, requires_grad=True)
    print(f"input {tuple(x.shape)}, kernel {k}x{k}, {c} -> {c} channels, "
          f"threads {args.threads}, best of {args.repeats}")
    print(f"{'configuration':24s} {'out (H, G)':>11s} {'Conv2d ms':>10s} {'mcorrlcorr ms':>14s} "
          f"{'ratio':>6s}")
    for name, hw, hf, pad in CONFIGS:
        conv = torch.nn.Conv2d(c, c, k, padding=pad)
        mcorr = MCorrLCorr(c, c, k, *zip(hw, hf, strict=True))
        for mod in (conv, mcorr):  # warm up caches and kernels
            _step(mod, x)
        t_conv, t_mcorr = float("inf"), float("inf")
        for _ in range(args.repeats):
            t_conv = min(t_conv, _step(conv, x))
            t_mcorr = min(t_mcorr, _step(mcorr, x))
        height = mcorr_output_size(w, k, *hw)
        out = mcorr(x).shape[2:]
        assert out[0] == height
        print(f"{name:24s} {str(tuple(out)):>11s} {t_conv * 1e3:10.2f} {t_mcorr * 1e3:14.2f} "
              f"{t_mcorr / t_conv:6.2f}")
    if args.model:
        bench_model(max(2, args.repeats // 5))


if __name__ == "__main__":
    main()
