"""Live confirmation of the search defaults (issue 13): real studies, real workers.

Two arms on the main job's corpus and regime (``scripts/staged_search.sh``'s sm stage:
``conf/optim/model-<type>-sm.ini`` + ``conf/optim/demo.ini``, every ``model.*`` parameter
searched at random, the same memory limit), paired by seed:

- ``defaults``: what ``optim init`` does now: the base configuration is the first trial, and
  the hyperband pruner decides once, at half the epochs;
- ``seed-recipe``: the seed recipe's settings: every trial drawn by the sampler, no pruner.

Both arms prune a trial still running after ``--max-trial-seconds`` (the main job's limit),
which bounds the bench's time and treats both alike.

Both run ``cnn-mellin optim ... init`` and ``optim run --workers W --sampler random --seed S``
as subprocesses. With the same seed, trials 1.. draw the same configurations in both arms
(the sampler is seeded per trial number), so the arms differ in trial 0 and in pruning only.

Compute is measured in worker-seconds from the trials' start and end times: the compute to
reach a target is the worker time spent, by every trial, until the first trial that
completes at or below the target ends. Output: one row per arm, seed and target in
``OUT/live_search.csv``, and per target the paired ratio per seed and the upper medians.

    .venv/bin/python bench/live_search.py --seeds 1 2 --trials 6 --targets 0.3 0.15
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FEATURE = "fbank-81-10ms"


def _cli(*args: str, env: dict | None = None) -> None:
    done = subprocess.run([str(ROOT / ".venv/bin/cnn-mellin"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cnn-mellin {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def ensure_corpus(data: Path, utterances: int) -> Path:
    """The main job's corpus and features under ``data`` (made when missing)."""
    train = data / FEATURE / "train"
    if not (train / "feats.h5").exists():
        _cli("prep", "synth", str(data / "corpus"), "--utterances", str(utterances))
        _cli("prep", "timit", str(data / "corpus"), str(data), FEATURE)
    return train


def drop_first_trial_params(url: str, name: str) -> None:
    """The seed recipe had no base-first trial: let the sampler draw trial 0 as well."""
    import optuna

    study = optuna.load_study(study_name=name, storage=_storage(url))
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    first = min(waiting, key=lambda t: t.number)
    study._storage.set_trial_system_attr(first._trial_id, "fixed_params", {})


def _storage(url: str):
    from cnn_mellin.optim.storage import open_storage

    return open_storage(url)


def run_arm(arm: str, seed: int, args, train: Path, out: Path) -> list[dict]:
    """One study of ``args.trials`` trials; its trials as dicts (number, state, value, times)."""
    import optuna

    name = f"live-{arm}-{args.model_type}-s{seed}"
    url = str(out / "studies.journal")
    reads = ["--read-ini", f"conf/optim/model-{args.model_type}-sm.ini",
             "--read-ini", "conf/optim/demo.ini"]
    for extra in args.read_ini:
        reads += ["--read-ini", extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    exists = Path(url).exists() and name in optuna.get_all_study_names(_storage(url))
    if not exists:
        _cli(*reads, "--device", "cpu", "optim", "--study-name", name, url, "init", str(train),
             "--blacklist", "training.*", "data.*", "model.convolutional_mellin",
             "--num-trials", str(args.trials), "--mem-limit-bytes", str(args.mem_limit),
             "--pruner", "hyperband" if arm == "defaults" else "none",
             "--max-trial-seconds", str(args.max_trial_seconds),
             "--checkpoint-dir", str(out / "checkpoints" / name), env=env)
        if arm == "seed-recipe":
            drop_first_trial_params(url, name)
    _cli("--seed", str(seed), "optim", "--study-name", name, url, "run", "--sampler", "random",
         "--workers", str(args.workers), env=env)
    study = optuna.load_study(study_name=name, storage=_storage(url))
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "start": t.datetime_start, "end": t.datetime_complete,
                     "epochs": len(t.intermediate_values)})
    return rows


def compute_to(rows: list[dict], target: float | None) -> float | None:
    """Worker-seconds spent until the first trial completing at or below ``target`` ended
    (all of the study's when ``target`` is None); None if no trial reached it."""
    ran = [r for r in rows if r["start"] is not None and r["end"] is not None]
    if not ran:
        return None
    if target is None:
        until = max(r["end"] for r in ran)
    else:
        hits = [r["end"] for r in ran if r["state"] == "COMPLETE" and r["value"] <= target]
        if not hits:
            return None
        until = min(hits)
    return sum(max(0.0, (min(r["end"], until) - r["start"]).total_seconds()) for r in ran)


def _median_high(values: list[float | None]) -> float | None:
    """The upper median, None ("never reached") ranking above every number."""
    ordered = sorted(values, key=lambda v: (v is None, v or 0.0))
    return ordered[len(ordered) // 2]


def _cost(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} worker-s"


def _trial_text(row: dict) -> str:
    value = "" if row["value"] is None else f" {row['value']:.3f}"
    return f"{row['number']} {row['state'].lower()}{value} ({row['epochs']} epochs)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--targets", type=float, nargs="+", default=[0.3, 0.15])
    p.add_argument("--model-type", choices=("mcorr", "lcorr"), default="mcorr")
    p.add_argument("--mem-limit", type=int, default=1_000_000_000,
                   help="bytes; scripts/staged_search.sh's default")
    p.add_argument("--utterances", type=int, default=600)
    p.add_argument("--max-trial-seconds", type=float, default=300,
                   help="both arms (scripts/staged_search.sh's sm value): bounds the bench")
    p.add_argument("--read-ini", action="append", default=[], metavar="FILE",
                   help="read after conf/optim/demo.ini (e.g. fewer epochs)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "live")
    p.add_argument("--out", type=Path, default=ROOT / "exp" / "bench" / "live_search")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train = ensure_corpus(args.data, args.utterances)
    results = []
    for seed in args.seeds:
        for arm in ("defaults", "seed-recipe"):
            started = datetime.now()
            rows = run_arm(arm, seed, args, train, args.out)
            best = min((r["value"] for r in rows if r["state"] == "COMPLETE"), default=None)
            total = compute_to(rows, None)
            print(f"{arm} seed {seed}: best {best}, {total:.0f} worker-s, "
                  f"{(datetime.now() - started).total_seconds():.0f} s wall; "
                  + ", ".join(_trial_text(r) for r in rows), flush=True)
            for target in args.targets:
                results.append({"arm": arm, "seed": seed, "target": target, "best": best,
                                "compute_to_target": compute_to(rows, target),
                                "total_compute": total})
    path = args.out / "live_search.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")
    for target in args.targets:
        for seed in args.seeds:
            got = {r["arm"]: r for r in results if r["seed"] == seed and r["target"] == target}
            ours, theirs = (got[a]["compute_to_target"] for a in ("defaults", "seed-recipe"))
            ratio = f"{ours / theirs:.2f}" if ours is not None and theirs is not None else "-"
            print(f"target {target}, seed {seed}: defaults {_cost(ours)}, seed recipe "
                  f"{_cost(theirs)} (best {got['seed-recipe']['best']}); ratio {ratio}")
        medians = {arm: _median_high([r["compute_to_target"] for r in results
                                      if r["arm"] == arm and r["target"] == target])
                   for arm in ("defaults", "seed-recipe")}
        print(f"target {target}, median over seeds (never counts as the most): defaults "
              f"{_cost(medians['defaults'])}, seed recipe {_cost(medians['seed-recipe'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
