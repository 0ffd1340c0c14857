"""How far to trust a ranking: importance of repeated sm stages against the trial count.

Runs the main job's sm stage (``scripts/staged_search.sh``: the model space, the memory
limit, a subset of the short-sentence corpus) as real studies with real workers, once per
seed, then ranks each seed's first ``n`` completed trials (by number) with the service's own
seeded fANOVA, for several ``n``. Prints, per ``n``: the mean pairwise Spearman correlation
of the seeds' importance vectors, and how often two seeds' top 3 hold the same parameters.

With ``--pooled`` the groups compared are not the seeds but disjoint runs of ``n`` drawn
trials taken from all seeds' trials together (each seed's base trial left out). A random
sampler's draws are independent and identically distributed, so such a group is a sm stage
of ``n`` random trials as much as a seed's first ``n`` are, and a pool of P trials gives
P // n groups to compare instead of one per seed: what a larger ``n`` needs.

    .venv/bin/python bench/importance_stability.py DATA_DIR [--seeds 5] [--trials 16] \
        [--utterances 200] [--epochs 6] [--pooled] \
        [--out bench/results/importance_stability.csv]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cnn_mellin"]


def _spearman(a: dict[str, float], b: dict[str, float]) -> float:
    names = sorted(a)
    ranks = []
    for scores in (a, b):
        order = sorted(names, key=lambda n: -scores[n])
        ranks.append({n: order.index(n) for n in names})
    ra, rb = [ranks[0][n] for n in names], [ranks[1][n] for n in names]
    return statistics.correlation(ra, rb) if len(names) > 1 else 1.0


def _run_stage(db: str, name: str, data: str, seed: int, args, conf: Path) -> None:
    init = [*CLI, "--read-ini", str(ROOT / "conf/optim/model-mcorr-sm.ini"), "--read-ini",
            str(ROOT / "conf/optim/demo.ini"), "--read-ini", str(conf), "--device", "cpu",
            "optim", "--study-name", name, db, "init", data,
            "--train-utterances", str(args.utterances), "--blacklist", "training.*", "data.*",
            "model.convolutional_mellin", "--num-trials", str(args.trials), "--pruner", "none",
            "--mem-limit-bytes", str(args.mem_limit)]
    subprocess.run(init, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    subprocess.run([*CLI, "--seed", str(seed), "optim", "--study-name", name, db, "run",
                    "--sampler", "random", "--workers", str(args.workers)],
                   check=True, cwd=ROOT, stderr=subprocess.DEVNULL)


def _importance(trials, searched: list[str]) -> dict[str, float]:
    from cnn_mellin.optim.importance import make_evaluator

    study = optuna.create_study()
    study.add_trials(trials)
    names = [n for n in searched if all(n in t.params for t in trials)]
    return dict(optuna.importance.get_param_importances(
        study, evaluator=make_evaluator("fanova"), params=names))


def _groups(by_seed: dict, n: int, pooled: bool) -> dict:
    """Groups of ``n`` completed trials to rank: each seed's first ``n``, or disjoint runs
    of ``n`` drawn (not enqueued) trials from all seeds together."""
    if not pooled:
        return {seed: (trials[:n], searched) for seed, (trials, searched) in by_seed.items()
                if len(trials) >= n}
    from cnn_mellin.optim.internals import fixed_params

    searched = next(iter(by_seed.values()))[1]
    drawn = [t for seed in sorted(by_seed) for t in by_seed[seed][0] if not fixed_params(t)]
    return {i: (drawn[i * n:(i + 1) * n], searched) for i in range(len(drawn) // n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--mem-limit", type=int, default=300_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--counts", type=int, nargs="+", default=[4, 6, 8, 10, 12, 14, 16])
    parser.add_argument("--pooled", action="store_true",
                        help="compare disjoint groups of n drawn trials from all seeds")
    parser.add_argument("--db", default=None, help="journal file (default: a temporary one; "
                        "give one to resume or re-rank)")
    parser.add_argument("--out", default=str(ROOT / "bench/results/importance_stability.csv"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from cnn_mellin.optim.storage import load_study, open_storage
    from cnn_mellin.optim.study import read_settings

    work = Path(tempfile.mkdtemp(prefix="importance-"))
    db = args.db or str(work / "studies.journal")
    conf = work / "epochs.ini"
    conf.write_text(f"[training]\nnum_epochs = {args.epochs}\n")
    by_seed = {}
    for seed in range(1, args.seeds + 1):
        name = f"sm-seed{seed}"
        storage = open_storage(db) if Path(db).exists() else None
        done = storage is not None and name in [s.study_name for s in
                                                optuna.get_all_study_summaries(storage)]
        if not done:
            _run_stage(db, name, args.data_dir, seed, args, conf)
        study = load_study(open_storage(db), name, db)
        by_seed[seed] = (sorted((t for t in study.get_trials(states=(TrialState.COMPLETE,))),
                                key=lambda t: t.number), read_settings(study).searched)
        print(f"seed {seed}: {len(by_seed[seed][0])} completed trials", file=sys.stderr)
    rows = []
    for n in args.counts:
        vectors = {}
        for group, (trials, searched) in _groups(by_seed, n, args.pooled).items():
            vectors[group] = _importance(trials, searched)
        pairs = list(itertools.combinations(sorted(vectors), 2))
        if not pairs:
            continue
        common = [sorted(set(vectors[a]) & set(vectors[b])) for a, b in pairs]
        rho = [_spearman({k: vectors[a][k] for k in names}, {k: vectors[b][k] for k in names})
               for (a, b), names in zip(pairs, common, strict=True)]
        top3 = [set(sorted(vectors[a], key=lambda k: -vectors[a][k])[:3]) ==
                set(sorted(vectors[b], key=lambda k: -vectors[b][k])[:3]) for a, b in pairs]
        overlap = [len(set(sorted(vectors[a], key=lambda k: -vectors[a][k])[:3]) &
                       set(sorted(vectors[b], key=lambda k: -vectors[b][k])[:3])) / 3
                   for a, b in pairs]
        rows.append({"completed_trials": n, "groups": len(vectors),
                     "grouping": "pooled" if args.pooled else "seeds",
                     "mean_spearman": round(statistics.mean(rho), 3),
                     "top3_same": round(statistics.mean(top3), 3),
                     "top3_overlap": round(statistics.mean(overlap), 3)})
        print(rows[-1])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(args.out + ".tmp", args.out)
    print(f"studies in {db}; table in {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
