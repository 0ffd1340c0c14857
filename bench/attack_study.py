"""Does searching the attack pay? The attack's defaults against a study searched by the service.

One command, resumable (re-running skips what is done), sized for about 2 hours of a quiet
2-core CPU box with the defaults below:

    nice -n 10 .venv/bin/python bench/attack_study.py --out exp/bench/attack-study

1. Data and victim (skipped with ``--victim MODEL_DIR --data DATA_DIR``): the default synthetic
   corpus (``prep synth``, 600 training utterances, fbank-81-10ms) and a model trained on it with
   the default configuration (``train``, about 10 minutes); the attacked utterances come from a
   second synthetic corpus of two-word sentences (``prep synth --max-words 2 --utterances 40``:
   22 of its 40 training utterances last at most 1 s).
2. The study, through the service: ``optim init --task attack`` on those utterances
   (``--utterances`` of at most ``--max-seconds``), every searchable ``[attack]`` parameter,
   ``--trials`` searched trials after the base trial (the ``[attack]`` defaults, which the
   service runs first), no pruner (the pruner compares running MAEs at equal step counts, which
   differ in meaning when iterations and restarts are searched); then ``optim run --workers``
   with TPE.
3. The defaults and the study's best (their figures from the study's trials), each against
   every victim-side defence (gradient noise of the gradient's RMS, keeping the 10 % largest
   entries, the victim's dropout), and the defaults given the best's number of steps per
   utterance (is the gain more compute or better settings?); ``--workers`` processes, one
   utterance each at a time.

Prints mean MAE, SNR and the victim's PER of the reconstructions for each, and the ratio
defaults / best (the issue's goal: at least 2); writes ``results.json`` and the study's report
(``optim report``) under ``--out``. The time estimate printed before the study comes from the
measured attack step on the victim.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FEATURE = "fbank-81-10ms"
STUDY = "attack"


def cli(*args, threads: int | None = None) -> None:
    """Run ``cnn-mellin ARGS``; stop the script if it fails."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "cnn_mellin", *map(str, args)]
    print("$ cnn-mellin " + " ".join(map(str, args)), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, env=env)


def prepare(out: Path, corpus_utterances: int) -> tuple[Path, Path]:
    """The victim (trained with the defaults) and the attacked utterances' data dir."""
    data = out / "data"
    train = data / "default" / FEATURE / "train"
    if not (train / "feats.h5").exists():
        cli("prep", "synth", data / "default-corpus", "--utterances", corpus_utterances)
        cli("prep", "timit", data / "default-corpus", data / "default", FEATURE)
    short = data / "short" / FEATURE / "train"
    if not (short / "feats.h5").exists():
        cli("prep", "synth", data / "short-corpus", "--utterances", 40, "--max-words", 2)
        cli("prep", "timit", data / "short-corpus", data / "short", FEATURE)
    victim = out / "victim"
    if not (victim / "model.pt").exists():
        cli("--device", "cpu", "train", train, data / "default" / FEATURE / "dev",
            "--model-dir", victim, "--quiet")
    return victim, short


def _attack_job(job: tuple) -> dict:
    """One utterance attacked in a pool process: (victim, data, utt, values) -> summary row."""
    victim_dir, data_dir, utt, values = job
    import torch

    torch.set_num_threads(1)
    from cnn_mellin.attack import attack_one
    from cnn_mellin.config import Config
    from cnn_mellin.modelfile import load_model_file
    from cnn_mellin.params.attack import GROUPS

    config = Config(values, GROUPS)
    victim = load_model_file(Path(victim_dir))
    return attack_one(victim, data_dir, utt, config.group("attack"), config.group("defence"))[1]


def evaluate(pool, out: Path, name: str, victim, data, utts, values: dict) -> dict:
    """Mean MAE, SNR and PERs of the attack ``values`` over ``utts`` (cached in ``out``)."""
    cache = out / "runs" / f"{name.replace(' ', '-')}.json"
    if cache.exists():
        result = json.loads(cache.read_text())
    else:
        started = time.monotonic()
        rows = list(pool.map(_attack_job, [(str(victim), str(data), u, values) for u in utts]))
        result = {key: statistics.fmean(r[key] for r in rows) for key in (
            "mae", "snr_db", "per_reconstruction", "per_original", "gradient_distance")}
        result.update(values=values, steps=rows[0]["steps"], rows=rows,
                      seconds=round(time.monotonic() - started, 1))
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(cache)
    print(f"{name}: MAE {result['mae']:.4f}, SNR {result['snr_db']:.2f} dB, PER "
          f"{result['per_reconstruction']:.3f} (originals {result['per_original']:.3f}), "
          f"{result['steps']} steps per utterance, {result['seconds']:.0f} s", flush=True)
    return result


def step_seconds(victim: Path, data: Path, utts: list[str]) -> tuple[float, float]:
    """Seconds of one attack step (defaults, one thread) on the longest utterance, and the
    RMS of the victim's shared gradient (median over ``utts``)."""
    import torch

    from cnn_mellin.attack import invert, read_utterance, shared_gradient
    from cnn_mellin.config import Config
    from cnn_mellin.modelfile import load_model_file
    from cnn_mellin.params.attack import GROUPS

    torch.set_num_threads(1)
    model = load_model_file(victim).model.eval()
    rms = []
    for utt in utts:
        feats, targets = read_utterance(data, utt)
        grads = shared_gradient(model, feats, targets, Config({}, GROUPS).group("defence"),
                                torch.Generator())
        flat = torch.cat([g.flatten() for g in grads])
        rms.append(float(flat.pow(2).mean().sqrt()))
    longest = max(utts, key=lambda u: read_utterance(data, u)[0].shape[1])
    feats, targets = read_utterance(data, longest)

    def seconds(steps: int) -> float:
        config = Config({"attack.iterations": steps}, GROUPS)
        started = time.perf_counter()
        invert(model, feats, targets, config.group("attack"), config.group("defence"))
        return time.perf_counter() - started

    seconds(2)  # warm-up: the first call once made the 2-step run the slower (-44 ms a step)
    short = statistics.median(seconds(2) for _ in range(3))
    long = statistics.median(seconds(12) for _ in range(3))
    return max(long - short, 0.0) / 10, statistics.median(rms)


def estimate(step: float, args) -> float:
    """Seconds the study and the evaluations should take at ``step`` seconds a step."""
    from cnn_mellin.params.attack import GROUP

    iterations, restarts = GROUP["iterations"].search, GROUP["restarts"].search
    mean_iterations = (iterations.high - iterations.low) / math.log(
        iterations.high / iterations.low)
    mean_steps = mean_iterations * (restarts.low + restarts.high) / 2
    default_steps = GROUP["iterations"].default
    per_step = step * args.utterances / args.workers
    study = per_step * (default_steps + args.trials * mean_steps)
    # defaults and best against three defences, and the defaults at the best's steps
    evaluations = per_step * (3 * default_steps + 4 * mean_steps)
    return study + evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="exp/bench/attack-study", type=Path)
    parser.add_argument("--victim", type=Path, help="a trained model dir (skips step 1)")
    parser.add_argument("--data", type=Path, help="the attacked utterances' data dir")
    parser.add_argument("--corpus-utterances", type=int, default=600,
                        help="training utterances of the victim's corpus (default 600)")
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=16, help="searched trials (default 16)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if (args.victim is None) != (args.data is None):
        parser.error("--victim and --data go together")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    if args.victim is None:
        victim, data = prepare(out, args.corpus_utterances)
    else:
        victim, data = args.victim.resolve(), args.data.resolve()
    from cnn_mellin.attack import select_utterances
    from cnn_mellin.data.store import read_info
    from cnn_mellin.modelfile import load_model_file

    utts = select_utterances(load_model_file(victim), read_info(data), args.utterances,
                             args.max_seconds)
    step, rms = step_seconds(victim, data, utts)
    noise = float(f"{rms:.0e}")
    print(f"victim {victim}: {len(utts)} utterances of at most {args.max_seconds:g} s; one "
          f"attack step {step * 1000:.0f} ms; gradient RMS {rms:.2e}; study and evaluations "
          f"estimated at {estimate(step, args) / 60:.0f} min with {args.workers} workers",
          flush=True)

    journal = out / "study.journal"
    cli("optim", "--study-name", STUDY, journal, "init", data, "--task", "attack",
        "--victim", victim, "--utterances", args.utterances, "--max-seconds", args.max_seconds,
        "--whitelist", r"attack\..*", "--num-trials", args.trials + 1, "--pruner", "none",
        "--checkpoint-dir", out / "checkpoints")
    cli("--seed", 0, "optim", "--study-name", STUDY, journal, "run", "--sampler", "tpe",
        "--workers", args.workers)
    cli("optim", "--study-name", STUDY, journal, "report", out / "report")

    import optuna

    from cnn_mellin.optim.best import best_trial, trial_config
    from cnn_mellin.optim.storage import open_storage
    from cnn_mellin.optim.study import read_settings

    study = optuna.load_study(study_name=STUDY, storage=open_storage(str(journal)))
    settings = read_settings(study)
    trials = sorted((t for t in study.trials if t.value is not None), key=lambda t: t.number)
    base, best = trials[0], best_trial(study)
    best_values = {k: v for k, v in trial_config(settings, best).items()
                   if k.startswith("attack.")}
    results = {"search": {
        "trials": [{"number": t.number, "value": t.value, "params": t.params,
                    "steps": t.user_attrs.get("epochs"), **{
                        k: t.user_attrs.get(k) for k in ("snr_db", "per_reconstruction")}}
                   for t in trials],
        "best": best.number, "best_params": best.params}}
    print(f"study: {len(trials)} trials; base (the defaults) MAE {base.value:.4f}, best "
          f"(trial {best.number}) MAE {best.value:.4f}: {best.params}", flush=True)

    def from_study(trial) -> dict:
        attrs = trial.user_attrs
        return {"mae": trial.value, **{k: attrs.get(k) for k in (
            "snr_db", "per_reconstruction", "per_original", "gradient_distance")},
            "steps": attrs.get("epochs", 0) // len(utts), "seconds": 0.0}

    results["defaults"], results["best"] = from_study(base), from_study(best)
    defences = {"noise": {"defence.gradient_noise_std": noise},
                "keep 10%": {"defence.gradient_keep_fraction": 0.1},
                "victim dropout": {"defence.victim_dropout": True}}
    best_steps = int(best_values["attack.iterations"]) * int(best_values["attack.restarts"])
    runs = {"defaults at the best's steps": {"attack.iterations": best_steps}}
    for name, change in defences.items():
        runs[f"defaults, {name}"] = change
        runs[f"best, {name}"] = {**best_values, **change}
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for name, values in runs.items():
            results[name] = evaluate(pool, out, name, victim, data, utts, values)
    ratio = results["defaults"]["mae"] / results["best"]["mae"]
    results.update(ratio=ratio, noise_std=noise, step_seconds=step,
                   seconds=round(time.monotonic() - started))
    print(f"mean MAE: defaults {results['defaults']['mae']:.4f}, searched "
          f"{results['best']['mae']:.4f}: defaults / searched = {ratio:.2f} (goal >= 2); "
          f"{time.monotonic() - started:.0f} s in all", flush=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    tmp.replace(out / "results.json")


if __name__ == "__main__":
    main()
