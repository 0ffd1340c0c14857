"""Plan the main job's stages (scripts/staged_search.sh) from this machine's measured speed.

The job gets one wall-clock budget. This script measures how long one training step of
the base configuration takes here, with as many processes stepping at once as the job
runs workers (one thread each, as the workers run), and splits what is left of the
budget between the two stages:

- sm: at least ``--sm-trials`` random trials of ``--sm-epochs`` epochs on a fixed subset
  of the training utterances sized so that the stage takes about ``--sm-share`` of the
  time (trials run ``--workers`` at a time),
- lg: ``--lg-trials`` trials on all the utterances, with as many epochs as the rest of
  the time allows.

Prints shell assignments (``sm_utterances=...``) for the job to ``eval``, and the
measurement on standard error.

    .venv/bin/python scripts/plan_stages.py DATA_DIR --budget-s S --workers 2 \
        --read-ini conf/optim/model-mcorr-sm.ini --read-ini conf/optim/demo.ini
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# what a trial spends besides training steps: loading, dev scoring, checkpoints (measured on
# the main job's trials: 10-20 %)
OVERHEAD = 1.2


def _step_seconds(ini: list[str], coeffs: int, frames: int, batch: int, steps: int) -> float:
    import torch
    import torch.nn.functional as F

    from cnn_mellin.config import Config
    from cnn_mellin.model import AcousticModel
    from cnn_mellin.training import optimizer_from_params

    torch.set_num_threads(1)
    config = Config.from_ini(ini)
    model = AcousticModel(config.group("model"), coeffs)
    optimizer = optimizer_from_params(model.parameters(), config.group("training"))
    feats = torch.randn(batch, frames, coeffs)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        log_probs, lengths = model(feats, None)
        targets = torch.randint(1, 49, (batch, max(1, log_probs.shape[0] // 4)))
        loss = F.ctc_loss(log_probs, targets, lengths,
                          torch.full((batch,), targets.shape[1], dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(ini: list[str], coeffs: int, frames: int, batch: int, workers: int,
            steps: int = 4) -> float:
    """Median seconds of one training step of the base configuration at ``batch`` x
    ``frames``, with ``workers`` processes stepping at once."""
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = [pool.submit(_step_seconds, ini, coeffs, frames, batch, steps)
                for _ in range(workers)]
        return statistics.mean(run.result() for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir")
    parser.add_argument("--budget-s", type=float, required=True,
                        help="seconds left for both stages")
    parser.add_argument("--read-ini", action="append", default=[])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sm-trials", type=int, default=12)
    parser.add_argument("--sm-epochs", type=int, default=6)
    parser.add_argument("--sm-share", type=float, default=0.35)
    parser.add_argument("--lg-trials", type=int, default=2)
    parser.add_argument("--min-lg-epochs", type=int, default=4)
    parser.add_argument("--max-lg-epochs", type=int, default=30)
    parser.add_argument("--dev-proportion", type=float, default=0.1)
    args = parser.parse_args()

    from cnn_mellin.config import Config
    from cnn_mellin.data.store import read_info

    info = read_info(args.data_dir)
    config = Config.from_ini(args.read_ini)
    batch = config["data.batch_size"]
    train_utts = int(len(info) * (1 - args.dev_proportion))
    frames = int(statistics.mean(info.num_frames))
    step_s = measure(args.read_ini, info.num_coeffs, frames, batch, args.workers)
    epoch_s = math.ceil(train_utts / batch) * step_s * OVERHEAD  # the base, all utterances

    sm_s = args.sm_share * args.budget_s
    rounds = math.ceil(args.sm_trials / args.workers)
    sm_trials = rounds * args.workers  # a full last round: no worker waits on another
    per_trial = sm_s / rounds
    sm_utts = int(per_trial / (args.sm_epochs * step_s * OVERHEAD) * batch)
    sm_utts = max(4 * batch, min(train_utts, sm_utts))
    # a machine too slow for the lg stage's least epochs on every utterance trains it on a
    # subset too, so that the job still ends on time
    lg_s = args.budget_s - sm_s
    lg_epochs = max(args.min_lg_epochs, min(args.max_lg_epochs, int(lg_s / epoch_s)))
    lg_utts = min(train_utts, int(lg_s / (lg_epochs * step_s * OVERHEAD) * batch))
    lg_utts = max(4 * batch, lg_utts)
    print(f"plan: a training step of the base takes {step_s:.3f} s here ({args.workers} "
          f"processes at once, batch {batch} x {frames} frames): {epoch_s:.0f} s an epoch of "
          f"{train_utts} utterances; sm: {sm_trials} trials x {args.sm_epochs} epochs of "
          f"{sm_utts} utterances (~{per_trial:.0f} s each), lg: {args.lg_trials} trials x "
          f"{lg_epochs} epochs of {lg_utts} utterances (~{lg_s:.0f} s)", file=sys.stderr)
    print(f"step_s={step_s:.4f}\nsm_trials={sm_trials}\nsm_epochs={args.sm_epochs}\n"
          f"sm_utterances={sm_utts}\nsm_trial_s={per_trial:.0f}\nlg_trials={args.lg_trials}\n"
          f"lg_epochs={lg_epochs}\nlg_utterances={lg_utts}")


if __name__ == "__main__":
    main()
