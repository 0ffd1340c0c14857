"""Cost of one attack step against a forward + parameter gradient of the same victim and input.

Run: .venv/bin/python bench/attack_step.py [--threads 1] [--repeats 5] [--steps 4]
         [--frames 100 360] [--hvp forward central exact]
         [--quality [--quality-steps 150] [--quality-utterances 6] [--fd-epsilon 1e-3]]

For each victim (the default model, the default with Mellin correlation, and a GRU victim
with layer normalisation; random weights, which do not change the cost) and each input
length (frames of 81 coefficients; one target phone per 8 frames), the script alternates
``--repeats`` times: ``--steps`` plain passes (forward, fused CTC, gradient of every
parameter: what one training step of the victim costs before the optimiser) and ``--steps``
steps of the attack's own loop (``optimise_chunk``: objective, gradient with respect to the
dummy, Adam step), for each ``--hvp``. It prints the median time of each and the ratio attack
step / plain pass, then the median ratio over the victims per length and ``--hvp`` (the
issue's goal: at most 3).

``--quality`` instead attacks the test victims (the tests' tiny model trained 15 epochs on the
tiny store, with ReLU and with tanh correlation layers; about 10 s each to train) on
``--quality-utterances`` utterances with the same steps for every ``--hvp`` (and
``--fd-epsilon``) and prints the mean MAE and SNR each reaches: the finite differences must be
no worse than the exact double backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

VICTIMS = {
    "default": {},
    "mcorr": {"convolutional_mellin": True},
    "gru+layernorm": {"recurrent_type": "gru", "layer_norm": True},
}


def _attack(hvp: str, steps: int, **extra):
    from cnn_mellin.config import Config
    from cnn_mellin.params.attack import GROUPS

    values = {"attack.hvp": hvp, "attack.iterations": steps, "attack.eval_every": 10**6}
    values.update({f"attack.{k}": v for k, v in extra.items()})
    config = Config(values, GROUPS)
    return config.group("attack"), config.group("defence")


def time_steps(victim: dict, frames: int, hvps: list[str], repeats: int,
               steps: int) -> dict[str, float]:
    """Median seconds of one plain pass ("plain") and one attack step per ``hvp``."""
    from cnn_mellin.attack import Objective, fused_ctc_loss, shared_gradient
    from cnn_mellin.attack.loop import optimise_chunk
    from cnn_mellin.model import AcousticModel

    torch.manual_seed(0)
    model = AcousticModel(victim, 81).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    feats = torch.randn(1, frames, 81)
    targets = torch.randint(0, 48, (frames // 8,))
    _, defence = _attack("forward", steps)
    target_grads = shared_gradient(model, feats, targets, defence, torch.Generator())
    zero = torch.zeros(1, frames, 81)

    def plain() -> None:
        for _ in range(steps):
            dummy = torch.randn(1, frames, 81)
            log_probs, _ = model(dummy)
            torch.autograd.grad(fused_ctc_loss(log_probs[:, 0], targets), params)

    def attack_steps(hvp: str):
        attack, _ = _attack(hvp, steps)
        objective = Objective(model, targets, target_grads, None, attack, model.feat_mean,
                              model.feat_std)
        return lambda: optimise_chunk(objective, attack, zero, 0, frames, lambda *a: None)

    runs = {"plain": plain, **{hvp: attack_steps(hvp) for hvp in hvps}}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_cost(args) -> None:
    ratios: dict[tuple[int, str], list[float]] = {}
    print(f"{'victim':<14} {'frames':>6} {'plain ms':>9} " + " ".join(
        f"{hvp + ' ms':>11} {'ratio':>6}" for hvp in args.hvp))
    for frames in args.frames:
        for name, victim in VICTIMS.items():
            medians = time_steps(victim, frames, args.hvp, args.repeats, args.steps)
            plain = medians["plain"]
            cells = []
            for hvp in args.hvp:
                ratio = medians[hvp] / plain
                ratios.setdefault((frames, hvp), []).append(ratio)
                cells.append(f"{medians[hvp] * 1000:>11.1f} {ratio:>6.2f}")
            print(f"{name:<14} {frames:>6} {plain * 1000:>9.1f} " + " ".join(cells), flush=True)
    for (frames, hvp), values in ratios.items():
        print(f"median over victims, {frames} frames, {hvp}: attack step / plain pass = "
              f"{statistics.median(values):.2f}" + (" (goal <= 3)" if hvp != "exact" else ""))


def bench_quality(args) -> None:
    from cnn_mellin.attack import invert, read_utterance
    from cnn_mellin.data.store import read_info
    from cnn_mellin.modelfile import load_model_file
    from cnn_mellin.training import train
    from tests.training_fixtures import tiny_config, write_store

    runs = [(hvp, epsilon) for hvp in args.hvp
            for epsilon in ([1e-3] if hvp == "exact" else args.fd_epsilon)]
    with tempfile.TemporaryDirectory() as tmp:
        data = write_store(Path(tmp) / "data", 40, seed=0)
        utts = read_info(data).utt_ids[10:10 + args.quality_utterances]
        for nonlinearity in ("relu", "tanh"):
            config = tiny_config(num_epochs=15, learning_rate=0.01).replace(
                {"model.convolutional_nonlinearity": nonlinearity})
            train(config, data, None, model_dir=Path(tmp) / nonlinearity)
            model = load_model_file(Path(tmp) / nonlinearity).model
            for hvp, epsilon in runs:
                attack, defence = _attack(hvp, args.quality_steps, fd_epsilon=epsilon)
                maes, snrs, started = [], [], time.perf_counter()
                for utt in utts:
                    feats, targets = read_utterance(data, utt)
                    result = invert(model, feats, targets, attack, defence)
                    maes.append(result.mae)
                    snrs.append(result.snr_db)
                label = hvp if hvp == "exact" else f"{hvp} {epsilon:g}"
                print(f"tiny {nonlinearity} victim, {label:>13}, {args.quality_steps} steps: "
                      f"mean MAE {statistics.fmean(maes):.4f}, mean SNR "
                      f"{statistics.fmean(snrs):.2f} dB ({time.perf_counter() - started:.0f} s;"
                      " per utterance " + " ".join(f"{m:.3f}" for m in maes) + ")", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="passes per timed run")
    parser.add_argument("--frames", type=int, nargs="+", default=[100, 360])
    parser.add_argument("--hvp", nargs="+", default=["forward", "central"],
                        choices=("forward", "central", "exact"))
    parser.add_argument("--quality", action="store_true",
                        help="compare reconstruction quality on the test victims instead")
    parser.add_argument("--quality-steps", type=int, default=150)
    parser.add_argument("--quality-utterances", type=int, default=6)
    parser.add_argument("--fd-epsilon", type=float, nargs="+", default=[1e-3],
                        help="attack.fd_epsilon values of --quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    (bench_quality if args.quality else bench_cost)(args)


if __name__ == "__main__":
    main()
