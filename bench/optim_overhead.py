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

The two sides alternate in ``--rounds`` rounds (plain first, then ours first, ...), each of
``--trials`` / rounds trials on a study of its own, so that a change in the load of a shared
machine hits both sides alike; the ratio is the two sides' summed times, and each round's
ratio is printed too.

    .venv/bin/python bench/optim_overhead.py [--workers 8] [--trials 1000] [--rounds 4]
        [--storage URL]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import resource
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
    start, cpu = time.perf_counter(), _cpu()
    for _ in range(count):
        trial = study.ask()
        values = space.suggest(trial, searched)
        study.tell(trial, values["training.learning_rate"])
    results.put((time.perf_counter() - start, _cpu() - cpu))


def _ours(url, name, barrier, results):
    from cnn_mellin.optim.worker import Worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    worker = Worker(url, name, device="cpu", sampler="random")
    barrier.wait()
    start, cpu = time.perf_counter(), _cpu()
    summary = worker.run()
    results.put((time.perf_counter() - start, _cpu() - cpu))
    assert summary.exit_code == 0, summary


def _cpu() -> float:
    """CPU seconds of this process so far, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _run(target, args_list, watch):
    """(wall seconds, CPU seconds of the processes, CPU seconds of the database server)."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(args_list) + 1)
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, barrier, results))
                 for args in args_list]
    for process in processes:
        process.start()
    with watch() as server:
        barrier.wait()
        start = time.perf_counter()
        for process in processes:
            process.join()
        elapsed = time.perf_counter() - start
    if any(p.exitcode for p in processes):
        raise SystemExit("a benchmark process failed")
    per_process = [results.get() for _ in processes]
    return elapsed, sum(cpu for _, cpu in per_process), server.cpu_s


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
    parser.add_argument("--rounds", type=int, default=4)
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

    watch = contextlib.nullcontext
    if drop is not None:
        from dbwatch import ServerWatch

        def watch():
            return ServerWatch("postgresql", url.rsplit("/", 1)[1])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            per_round = args.trials // args.rounds
            settings = build_settings(
                Config(), tmp, task=f"{Path(__file__).stem}:NoopTask", whitelist=SEARCH,
                num_trials=per_round, pruner="none", checkpoint_dir=tmp,
            )
            storage = open_storage(url, create=True)
            share = [per_round // args.workers + (i < per_round % args.workers)
                     for i in range(args.workers)]
            totals = {"plain": [0.0, 0.0, 0.0], "ours": [0.0, 0.0, 0.0]}
            init_s, done, ratios = 0.0, 0, []
            for r in range(args.rounds):
                optuna.create_study(study_name=f"plain-{r}", storage=storage)
                t0 = time.perf_counter()
                init_study(url, f"ours-{r}", settings)
                init_s += time.perf_counter() - t0
                sides = {
                    "plain": lambda r=r: _run(_plain, [(url, f"plain-{r}", settings.searched, n)
                                                       for n in share], watch),
                    "ours": lambda r=r: _run(_ours, [(url, f"ours-{r}")
                                                     for _ in range(args.workers)], watch),
                }
                got = {side: sides[side]() for side in
                       (("ours", "plain") if r % 2 else ("plain", "ours"))}
                for side, figures in got.items():
                    totals[side] = [a + b for a, b in zip(totals[side], figures, strict=True)]
                ratios.append(got["ours"][0] / got["plain"][0])
                print(f"round {r + 1}: wall plain {got['plain'][0]:.2f} s, ours "
                      f"{got['ours'][0]:.2f} s, ratio {ratios[-1]:.2f}", flush=True)
                study = optuna.load_study(study_name=f"ours-{r}", storage=storage)
                done += sum(t.state in (optuna.trial.TrialState.COMPLETE,
                                        optuna.trial.TrialState.PRUNED)
                            for t in study.get_trials())
    finally:
        if drop is not None:
            drop()
    trials = per_round * args.rounds
    print(f"storage: {display_url(url)}; {args.workers} workers, {args.rounds} rounds of "
          f"{per_round} trials, {len(settings.searched)} parameters, {os.cpu_count()} CPU cores, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for side, label in (("plain", "plain Optuna ask/tell"), ("ours", "cnn-mellin worker loop")):
        wall, cpu, server = totals[side]
        print(f"{label}: {wall:.2f} s wall, {1000 * wall / trials:.2f} ms per trial; CPU "
              f"{1000 * cpu / trials:.2f} ms per trial in the workers"
              + (f", {1000 * server / trials:.2f} ms in the database server" if server else ""))
    print(f"{done} of {trials} cnn-mellin trials in COMPLETE/PRUNED; its init (creating the "
          f"{per_round} budget trials, {args.rounds} times): {init_s:.2f} s")
    (wall_p, cpu_p, db_p), (wall_o, cpu_o, db_o) = totals["plain"], totals["ours"]
    print(f"ratio worker loop / plain: wall {wall_o / wall_p:.2f} (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}), CPU of workers + database "
          f"{(cpu_o + db_o) / (cpu_p + db_p):.2f}; goal <= 1.1")


if __name__ == "__main__":
    main()
