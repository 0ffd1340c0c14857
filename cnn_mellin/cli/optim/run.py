"""``optim run``: a worker (or ``--workers K``) pulling trials until the budget is done."""

from __future__ import annotations

import sys

from cnn_mellin.cli.optim.common import integer, quiet_optuna


def register_run(actions) -> None:
    """``run``: a worker, or ``--workers K`` of them."""
    from cnn_mellin.optim.defaults import DEFAULT_MAX_OUTAGE_S, SAMPLERS

    run = actions.add_parser(
        "run", help="run a worker (or --workers K) until the study's budget is done",
        description="Pull trials from the study until it has its number of trials in "
        "COMPLETE or PRUNED, counted across all workers. Trials of workers that die are "
        "failed and retried from their last epoch checkpoint. SIGTERM/SIGINT re-enqueue the "
        "running trial before exiting (an asr trial first checkpoints the optimiser step it "
        "is at; its retry resumes there). A worker with nothing left to claim exits unless "
        "it is the one standing by for retries of trials still running. Threads: the job's "
        "CPU allocation (SLURM_CPUS_PER_TASK, CPU affinity).",
    )
    run.add_argument("--sampler", choices=SAMPLERS, default="random",
                     help="how parameters are chosen (default random)")
    run.add_argument("--workers", type=integer, default=1, metavar="K",
                     help="worker processes to start here (default 1); with --device cuda "
                     "and several GPUs they are spread over them")
    run.add_argument("--max-trials", type=integer, default=None, metavar="N",
                     help="stop each worker after N trials (default: until the budget is done)")
    run.add_argument("--max-outage", type=float, default=DEFAULT_MAX_OUTAGE_S, metavar="S",
                     help="how long a worker keeps retrying when it loses the database "
                     "(a server restart) before it stops with an error; its trial is then "
                     f"retried by another worker (default {DEFAULT_MAX_OUTAGE_S:g})")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="keep every trial's resume files (default: a trial that ended "
                     "COMPLETE or PRUNED keeps only what its results point to, e.g. asr's "
                     "model.pt)")
    run.add_argument("--data-dir", default=None, metavar="DIR",
                     help="the study's data folder as this machine sees it (joining from "
                     "another cluster; the data must be the same: it is checked)")
    run.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                     help="where this worker keeps trial checkpoints instead of the folder "
                     "recorded at init (joining from another cluster)")
    run.set_defaults(func=run_run, needs_device=True)


def run_run(args, config) -> int:
    """``run``: pull trials until the budget is done (with a bar on a terminal)."""
    quiet_optuna(args)
    if not sys.stderr.isatty():  # logs and pipes get the log lines only
        return _run(args)
    from cnn_mellin.optim.progress import RunBar

    with RunBar(args.db_url, args.study_name):
        return _run(args)


def _run(args) -> int:
    from cnn_mellin.optim.launch import run_worker, run_workers

    folders = {"keep_checkpoints": args.keep_checkpoints, "data_dir": args.data_dir,
               "checkpoint_dir": args.checkpoint_dir}
    if args.workers != 1:  # run_workers refuses fewer than one
        return run_workers(
            args.workers, args.db_url, args.study_name, device=args.device,
            sampler=args.sampler, seed=args.seed, max_trials=args.max_trials,
            max_outage_s=args.max_outage, verbose=args.verbose, **folders,
        )
    summary = run_worker(
        args.db_url, args.study_name, device=args.device, sampler=args.sampler,
        seed=args.seed, max_trials=args.max_trials, max_outage_s=args.max_outage, **folders,
    )
    return summary.exit_code
