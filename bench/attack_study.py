"""Does searching the attack pay? The attack's defaults against a study searched by the service.

On the same utterances of a data dir and the same victim (a ``model.pt`` of
``cnn-mellin train``), with the same ``--iterations`` per chunk (the compute budget):
(1) the ``[attack]`` defaults, (2) an ``attack`` study of ``--trials`` trials (TPE, median
pruner) searching the rest of the attack group on the embedded store, (3) the study's best
settings against each victim-side defence. Prints mean MAE, SNR and
the victim's PER of the reconstructions for each, and the ratio defaults / best (the issue's
goal: at least 2).

    .venv/bin/python bench/attack_study.py MODEL_DIR DATA_DIR [--utterances 8]
        [--max-seconds 1.0] [--trials 16] [--iterations 300] [--out exp/bench/attack]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFENCES = {
    "noise 0.01": {"defence.gradient_noise_std": 0.01},
    "keep 10%": {"defence.gradient_keep_fraction": 0.1},
    "victim dropout": {"defence.victim_dropout": True},
}


def evaluate(victim, data_dir, utts, config) -> dict:
    """Mean MAE, SNR and PERs of ``config`` (an attack Config) over ``utts``."""
    from cnn_mellin.attack import attack_one

    rows = [attack_one(victim, data_dir, utt, config.group("attack"),
                       config.group("defence"))[1] for utt in utts]
    return {key: statistics.fmean(r[key] for r in rows)
            for key in ("mae", "snr_db", "per_reconstruction", "per_original", "seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("--utterances", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=300,
                        help="attack.iterations of every run (the compute budget)")
    parser.add_argument("--out", default="exp/bench/attack")
    args = parser.parse_args()

    import optuna

    from cnn_mellin.attack import select_utterances
    from cnn_mellin.config import Config
    from cnn_mellin.data.store import read_info
    from cnn_mellin.decoding import load_model_file
    from cnn_mellin.optim.best import best_trial, trial_config
    from cnn_mellin.optim.study import build_settings, init_study, read_settings
    from cnn_mellin.optim.worker import run_worker
    from cnn_mellin.params.attack import DEFENCE, GROUP

    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    victim = load_model_file(args.model_dir)
    utts = select_utterances(victim, read_info(args.data_dir), args.utterances,
                             args.max_seconds)
    print(f"victim {args.model_dir}, {len(utts)} utterances of at most {args.max_seconds} s")

    started = time.monotonic()
    defaults = Config({"attack.iterations": args.iterations}, (GROUP, DEFENCE))
    results = {"defaults": evaluate(victim, args.data_dir, utts, defaults)}
    print("defaults:", json.dumps(results["defaults"]), flush=True)

    url = str(out / f"attack-{int(time.time())}.journal")
    settings = build_settings(
        defaults, args.data_dir, task="attack",
        task_options={"victim": args.model_dir, "utterances": args.utterances,
                      "max_seconds": args.max_seconds},
        whitelist=["attack\\.(?!iterations).*"], num_trials=args.trials, pruner="median",
        checkpoint_dir=out / "checkpoints",
    )
    init_study(url, "attack", settings)
    run_worker(url, "attack", sampler="tpe", seed=0)
    study = optuna.load_study(study_name="attack", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(url)))
    best = best_trial(study)
    config = trial_config(read_settings(study), best)
    results["search"] = {"best_mae": best.value, "trials": len(study.trials),
                         "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
                         "best_params": best.params, **{
                             k: best.user_attrs.get(k) for k in
                             ("snr_db", "per_reconstruction", "per_original")}}
    print("search:", json.dumps(results["search"], default=str), flush=True)
    for name, change in DEFENCES.items():
        results[name] = evaluate(victim, args.data_dir, utts, config.replace(change))
        print(f"best vs {name}:", json.dumps(results[name]), flush=True)
    ratio = results["defaults"]["mae"] / best.value
    print(f"mean MAE: defaults {results['defaults']['mae']:.4f}, searched {best.value:.4f}: "
          f"defaults / searched = {ratio:.2f} (goal >= 2); "
          f"{time.monotonic() - started:.0f} s in all")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
