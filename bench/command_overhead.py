"""Wall time of a ``command`` trial against running the same script directly.

The script does a fixed amount of CPU work per epoch (about ``--epoch-s`` seconds here) and
reports one metrics line per epoch, as a user's training script would. Each round runs it
once directly (``subprocess.run``, the environment a trial gets) and once as the single
trial of a fresh ``command`` study through the real worker loop (the guard process, the
metrics polling, memory sampling, the study's writes); the ratio is the trial's wall time
(claim to tell, ``wall_time_s``) over the direct run's. Rounds alternate so that a busy
machine slows both alike. Goal: at most 1.05 for a 10-second script.

    .venv/bin/python bench/command_overhead.py [--epochs 10] [--epoch-s 1.0] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCRIPT = r'''
import json, os, sys
epochs, work = int(sys.argv[1]), int(sys.argv[2])
out = open(os.environ["CNN_MELLIN_METRICS"], "a")
for epoch in range(1, epochs + 1):
    total = 0
    for i in range(work):
        total += i * i % 7
    out.write(json.dumps({"epoch": epoch, "dev_per": 1.0 / epoch, "work": total}) + "\n")
    out.flush()
'''

# epochs and work are fixed; the search has one parameter the script ignores
SPACE = """
[epochs]
type = int
default = 10

[work]
type = int
default = 1

[seed]
type = int
default = 0
search = 0 1000
"""


def calibrate(epoch_s: float) -> int:
    """Loop iterations that take about ``epoch_s`` seconds of one core here."""
    n, took = 200_000, 0.0
    while took < 0.2:
        n *= 2
        started = time.perf_counter()
        total = 0
        for i in range(n):
            total += i * i % 7
        took = time.perf_counter() - started
    return int(n * epoch_s / took)


def direct(script: Path, epochs: int, work: int, tmp: Path) -> float:
    env = {**os.environ, "CNN_MELLIN_METRICS": str(tmp / "direct.jsonl")}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(script), str(epochs), str(work)], env=env, check=True)
    return time.perf_counter() - started


def as_trial(script: Path, space: Path, epochs: int, work: int, tmp: Path, round_: int) -> float:
    from cnn_mellin.config import Config
    from cnn_mellin.optim.launch import run_worker
    from cnn_mellin.optim.study import build_settings, init_study
    from cnn_mellin.tasks.command.spec import read_space

    url = str(tmp / f"round{round_}.journal")
    group = read_space(space)[1]
    settings = build_settings(
        Config({"script.epochs": epochs, "script.work": work}, (group,)), None,
        task="command", task_options={
            "command": f"{sys.executable} {script} {{epochs}} {{work}} {{seed}}",
            "space": str(space),
            "cwd": str(tmp),
        }, num_trials=1, pruner="none", checkpoint_dir=tmp / f"ckpt{round_}",
    )
    init_study(url, "overhead", settings)
    summary = run_worker(url, "overhead")
    assert summary.outcomes["complete"] == 1, summary
    import optuna

    trial = optuna.load_study(study_name="overhead", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(url))).trials[0]
    return float(trial.user_attrs["wall_time_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-s", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import logging

    import optuna

    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = calibrate(args.epoch_s)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        script, space = tmp / "script.py", tmp / "space.ini"
        script.write_text(SCRIPT)
        space.write_text(SPACE)
        ratios = []
        for round_ in range(args.rounds):
            plain = direct(script, args.epochs, work, tmp)
            trial = as_trial(script, space, args.epochs, work, tmp, round_)
            ratios.append(trial / plain)
            print(json.dumps({"round": round_, "direct_s": round(plain, 3),
                              "trial_s": round(trial, 3), "ratio": round(trial / plain, 4)}))
    print(f"command trial / direct run: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} rounds "
          "(goal <= 1.05)")


if __name__ == "__main__":
    main()
