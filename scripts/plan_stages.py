"""Plan the main job's stages (scripts/staged_search.sh) from this machine's measured speed.

The job gets one wall-clock budget. This script measures how long one training step of
the base configuration takes here, with as many processes stepping at once as the job
runs workers (one thread each, as the workers run), and splits what is left of the
budget between the two stages:

- sm: at least ``--sm-trials`` random trials of ``--sm-epochs`` epochs on a fixed subset
  of the training utterances sized so that the stage takes about ``--sm-share`` of the
  time (trials run ``--workers`` at a time),
- lg: ``--lg-trials`` trials on all the utterances, with as many epochs as the rest of
  the time allows. Once the sm stage is done, ``--lg-after`` plans the lg stage again from
  what its base trial measured (a few synthetic steps misjudge a machine by up to 2x; a
  real trial's epochs do not), for the time then left.

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


def _step_seconds(ini: list[str], coeffs: int, frames: int, batch: int, steps: int,
                  ready=None) -> float:
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
    for step in range(steps + 2):
        if step == 2 and ready is not None:
            ready.wait()  # every process timed at once, none while another still imports
        start = time.perf_counter()
        log_probs, lengths = model(feats, None)
        targets = torch.randint(1, 49, (batch, max(1, log_probs.shape[0] // 4)))
        loss = F.ctc_loss(log_probs, targets, lengths,
                          torch.full((batch,), targets.shape[1], dtype=torch.long))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:  # the first steps warm up
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(ini: list[str], coeffs: int, frames: int, batch: int, workers: int,
            steps: int = 6) -> float:
    """Median seconds of one training step of the base configuration at ``batch`` x
    ``frames``, with ``workers`` processes stepping at once (a first guess: the lg stage is
    planned again from the sm stage's base trial, :func:`replan_lg`)."""
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, ProcessPoolExecutor(workers, mp_context=context) as pool:
        ready = manager.Barrier(workers)
        runs = [pool.submit(_step_seconds, ini, coeffs, frames, batch, steps, ready)
                for _ in range(workers)]
        return statistics.mean(run.result() for run in runs)


def base_epoch_seconds(db_url: str, study_name: str) -> dict[int, float]:
    """Seconds the base trial of ``study_name`` took to reach each epoch (since it started)."""
    from cnn_mellin.optim import internals
    from cnn_mellin.optim.attrs import BASE_EPOCH_SECONDS
    from cnn_mellin.optim.storage import load_study, open_storage

    study = load_study(open_storage(db_url), study_name, db_url)
    known = internals.study_system_attrs(study).get(BASE_EPOCH_SECONDS) or {}
    return {int(epoch): float(seconds) for epoch, seconds in known.items()}


def replan_lg(seconds: dict[int, float], sm_utts: int, train_utts: int, budget_s: float,
              min_epochs: int, max_epochs: int, min_utts: int) -> tuple[int, int, float]:
    """``(epochs, utterances, seconds an epoch)`` of the lg stage from the sm base trial's
    measured ``seconds`` to each epoch on ``sm_utts`` utterances, for ``budget_s`` left.

    An epoch's cost is taken as proportional to the utterances; what a trial spends before
    its first epoch beyond an epoch's cost (imports, model, loader) is added once."""
    epochs = sorted(seconds)
    first, last = epochs[0], epochs[-1]
    if last == first:
        per_epoch = seconds[last] / last
    else:
        per_epoch = (seconds[last] - seconds[first]) / (last - first)
    start_s = max(0.0, seconds[first] - first * per_epoch)
    per_utt = per_epoch / sm_utts
    room = max(0.0, budget_s - start_s)
    lg_epochs = max(min_epochs, min(max_epochs, int(room / (per_utt * train_utts))))
    lg_utts = max(min_utts, min(train_utts, int(room / (lg_epochs * per_utt))))
    return lg_epochs, lg_utts, per_utt * lg_utts


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
    parser.add_argument("--lg-after", nargs=3, metavar=("DB_URL", "SM_STUDY", "SM_UTTS"),
                        help="plan only the lg stage again, from the measured epochs of the "
                        "base trial of SM_STUDY (trained on SM_UTTS utterances)")
    args = parser.parse_args()

    from cnn_mellin.config import Config
    from cnn_mellin.data.store import read_info

    info = read_info(args.data_dir)
    config = Config.from_ini(args.read_ini)
    batch = config["data.batch_size"]
    train_utts = int(len(info) * (1 - args.dev_proportion))
    if args.lg_after:
        db_url, sm_study, sm_utts = args.lg_after
        seconds = base_epoch_seconds(db_url, sm_study)
        if not seconds:
            sys.exit(f"plan_stages: study {sm_study} has no timed base trial")
        lg_epochs, lg_utts, epoch_s = replan_lg(seconds, int(sm_utts), train_utts,
                                                args.budget_s, args.min_lg_epochs,
                                                args.max_lg_epochs, 4 * batch)
        print(f"plan: the sm base trial took {max(seconds.values()):.0f} s to epoch "
              f"{max(seconds)} on {sm_utts} utterances; lg: {args.lg_trials} trials x "
              f"{lg_epochs} epochs of {lg_utts} utterances (~{epoch_s:.0f} s an epoch, "
              f"{args.budget_s:.0f} s left)", file=sys.stderr)
        print(f"lg_epochs={lg_epochs}\nlg_utterances={lg_utts}")
        return
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
