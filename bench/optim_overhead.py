"""Per-trial overhead of the optim worker loop against plain Optuna ask/tell.

Both run W worker processes on the same kind of storage (a fresh PostgreSQL database on
127.0.0.1 by default) over the same search space, with an objective that does no work,
for N trials in all:

- plain: each process runs ``study.ask()``, suggests the parameters, ``study.tell()``,
  N/W times (no budget control, no heartbeats, no records);
- ours: ``optim init`` with ``--num-trials N``, then W ``Worker`` loops (exact budget,
  claim, identity and heartbeats, admission, per-trial records) with a no-op task.

Timing starts when every process has finished its setup (a barrier) and ends when the
last one is done, so process start-up is excluded; ``init`` is timed separately.

    .venv/bin/python bench/optim_overhead.py [--workers 8] [--trials 1000] [--storage URL]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import optuna  # noqa: E402

from cnn_mellin.config import Config  # noqa: E402
from cnn_mellin.tasks import Task, TaskResult  # noqa: E402

SEARCH = ["training.learning_rate", "training.optimizer", "data.batch_size",
          "model.window_size", "model.dropout"]


class NoopTask(Task):
    """A task whose trial does nothing: what remains is the loop's own overhead."""

    name = "noop"

    @classmethod
    def prepare(cls, options, config):
        return {"num_coeffs": 41}

    def run(self, config, context):
        return TaskResult(value=config["training.learning_rate"], epochs=0)


def _plain(url, name, searched, count, barrier, results):
    from cnn_mellin.optim import space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=url,
                              sampler=optuna.samplers.RandomSampler())
    barrier.wait()
    start = time.perf_counter()
    for _ in range(count):
        trial = study.ask()
        values = space.suggest(trial, searched)
        study.tell(trial, values["training.learning_rate"])
    results.put(time.perf_counter() - start)


def _ours(url, name, barrier, results):
    from cnn_mellin.optim.worker import Worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = Worker(url, name, device="cpu", sampler="random")
    barrier.wait()
    start = time.perf_counter()
    summary = worker.run()
    results.put(time.perf_counter() - start)
    assert summary.exit_code == 0, summary


def _run(target, args_list):
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args_list) + 1)
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, barrier, results))
                 for args in args_list]
    for process in processes:
        process.start()
    barrier.wait()
    start = time.perf_counter()
    for process in processes:
        process.join()
    elapsed = time.perf_counter() - start
    if any(p.exitcode for p in processes):
        raise SystemExit("a benchmark process failed")
    per_process = [results.get() for _ in processes]
    return elapsed, per_process


def _fresh_postgres():
    import psycopg2

    name = f"cm_bench_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'create database "{name}"')

    def drop():
        with conn.cursor() as cur:
            cur.execute("select pg_terminate_backend(pid) from pg_stat_activity "
                        "where datname = %s and pid <> pg_backend_pid()", (name,))
            cur.execute(f'drop database "{name}"')
        conn.close()

    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--storage", default=None,
                        help="storage URL or journal path (default: a fresh PostgreSQL database)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drop = None
    url = args.storage
    if url is None:
        url, drop = _fresh_postgres()
    from cnn_mellin.optim.storage import display_url, open_storage
    from cnn_mellin.optim.study import build_settings, init_study

    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = build_settings(
                Config(), tmp, task=f"{Path(__file__).stem}:NoopTask", whitelist=SEARCH,
                num_trials=args.trials, pruner="none", checkpoint_dir=tmp,
            )
            storage = open_storage(url, create=True)
            optuna.create_study(study_name="plain", storage=storage)
            t0 = time.perf_counter()
            init_study(url, "ours", settings)
            init_s = time.perf_counter() - t0
            share = [args.trials // args.workers + (i < args.trials % args.workers)
                     for i in range(args.workers)]
            plain_s, _ = _run(_plain, [(url, "plain", settings.searched, n) for n in share])
            ours_s, _ = _run(_ours, [(url, "ours") for _ in range(args.workers)])
            study = optuna.load_study(study_name="ours", storage=storage)
            done = sum(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL
                       for t in study.get_trials())
    finally:
        if drop is not None:
            drop()
    plain_ms = 1000 * plain_s / args.trials
    ours_ms = 1000 * ours_s / args.trials
    print(f"storage: {display_url(url)}; {args.workers} workers, {args.trials} trials, "
          f"{len(settings.searched)} parameters, {os.cpu_count()} CPU cores")
    print(f"plain Optuna ask/tell: {plain_s:.2f} s, {plain_ms:.2f} ms per trial")
    print(f"cnn-mellin worker loop: {ours_s:.2f} s, {ours_ms:.2f} ms per trial "
          f"({done} trials in COMPLETE/PRUNED)")
    print(f"cnn-mellin init (creates the {args.trials} budget trials): {init_s:.2f} s")
    print(f"ratio worker loop / plain: {ours_s / plain_s:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
