"""Does the search lose? The main job against its base configuration trained alone for the
same wall time on the same machine.

1. Runs ``scripts/staged_search.sh`` (its corpus, its budget) and times it: wall seconds W,
   the final best dev PER (the lg study's best), and per stage the trials by state, the
   draws rejected before a trial existed and the idle share of the worker-seconds.
2. Trains the sm stage's base configuration alone, as one trial of a study on the same data
   and dev split, with one worker using every CPU, for W seconds (then the worker is
   stopped); its result is the best dev PER of the epochs it finished.

Prints both and appends a row to ``bench/results/main_job_vs_base.csv``. ``--main-exp EXP
--main-wall-s W`` skips step 1 and compares with a main job already run, timed by hand
(``time bash scripts/staged_search.sh`` with ``EXP``): its studies are read from ``EXP``.

    .venv/bin/python bench/main_job_vs_base.py [--budget-minutes 15] [--exp DIR]
        [--main-exp EXP --main-wall-s W]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "cnn_mellin"]
FEATURE = "fbank-81-10ms"
SM = f"demo-model-mcorr-sm-{FEATURE}"
LG = f"demo-model-mcorr-lg-{FEATURE}"


def _status(db: str, study: str) -> dict:
    out = subprocess.run([*CLI, "optim", "--study-name", study, db, "status", "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out)


def main_job(exp: Path, budget_minutes: int, data: Path) -> dict:
    env = {**os.environ, "EXP": str(exp), "DATA": str(data),
           "BUDGET_MINUTES": str(budget_minutes)}
    start = time.monotonic()
    subprocess.run(["bash", "scripts/staged_search.sh"], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    return main_job_result(exp, time.monotonic() - start)


def main_job_result(exp: Path, wall: float) -> dict:
    """The figures of a main job that ran in ``exp`` for ``wall`` seconds."""
    db = str(exp / "optim" / "studies.journal")
    sm, lg = _status(db, SM), _status(db, LG)
    return {"wall_s": round(wall), "final_best": lg["best"]["value"], "sm": sm, "lg": lg}


def base_alone(exp: Path, data: Path, seconds: float) -> dict:
    db = str(exp / "base.journal")
    epochs = exp / "epochs.ini"
    epochs.write_text("[training]\nnum_epochs = 1000\n")
    subprocess.run([*CLI, "--read-ini", "conf/optim/model-mcorr-sm.ini", "--read-ini",
                    "conf/optim/demo.ini", "--read-ini", str(epochs), "--device", "cpu",
                    "optim", "--study-name", "base-alone", db, "init",
                    str(data / FEATURE / "train"), "--whitelist", "model.dropout",
                    "--num-trials", "1", "--pruner", "none", "--checkpoint-dir",
                    str(exp / "base-checkpoints")], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    worker = subprocess.Popen([*CLI, "optim", "--study-name", "base-alone", db, "run"],
                              cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        worker.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(db))
    trial = optuna.load_study(study_name="base-alone", storage=storage).trials[0]
    values = trial.intermediate_values
    return {"epochs": len(values), "best": min(values.values()) if values else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-minutes", type=int, default=15)
    parser.add_argument("--exp", default="exp/bench-main-job")
    parser.add_argument("--data", default="data/synth-short")
    parser.add_argument("--out", default=str(ROOT / "bench/results/main_job_vs_base.csv"))
    parser.add_argument("--main-exp", type=Path, help="a main job's EXP, already run")
    parser.add_argument("--main-wall-s", type=float, help="its wall seconds")
    args = parser.parse_args()
    if (args.main_exp is None) != (args.main_wall_s is None):
        parser.error("--main-exp and --main-wall-s go together")
    exp, data = (ROOT / args.exp).resolve(), (ROOT / args.data).resolve()
    if exp.exists():
        raise SystemExit(f"{exp} exists: give a fresh --exp")
    exp.mkdir(parents=True)
    if args.main_exp is not None:
        job = main_job_result(args.main_exp.resolve(), args.main_wall_s)
    else:
        job = main_job(exp / "main", args.budget_minutes, data)
    base = base_alone(exp, data, job["wall_s"])
    row = {
        "date": datetime.date.today().isoformat(), "budget_min": args.budget_minutes,
        "main_wall_s": job["wall_s"], "main_final_best": round(job["final_best"], 4),
        "sm_complete": job["sm"]["counts"]["complete"],
        "sm_pruned_kinds": json.dumps(job["sm"]["prune_kinds"]),
        "sm_draws_rejected": job["sm"]["draws"]["rejected_memory"]
        + job["sm"]["draws"]["rejected_invalid"],
        "sm_idle_share": job["sm"]["workers"]["idle_share"],
        "lg_idle_share": job["lg"]["workers"]["idle_share"],
        "base_epochs": base["epochs"],
        "base_best": None if base["best"] is None else round(base["best"], 4),
    }
    print(json.dumps(row, indent=1))
    out = Path(args.out)
    new = not out.exists()
    with out.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    main()
