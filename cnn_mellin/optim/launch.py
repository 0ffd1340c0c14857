"""Starting ``optim run`` workers: one in this process, or several as child processes.

:func:`run_worker` runs one :class:`~cnn_mellin.optim.worker.Worker` here with its stop
handling (signal handlers that set the flag, the stop watchdog thread). :func:`run_workers`
starts ``--workers N`` of them as spawned children sharing the job's CPUs and GPUs
(:func:`worker_devices`), starts one again when it is killed, and passes SIGTERM on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections import Counter

import optuna

from cnn_mellin.cpus import allocated_cpus, use_threads
from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim import gpushare
from cnn_mellin.optim.defaults import DEFAULT_MAX_OUTAGE_S
from cnn_mellin.optim.pool import PoolLink
from cnn_mellin.optim.stop import WATCH_S, WorkerStopped
from cnn_mellin.optim.storage import load_study, open_storage
from cnn_mellin.optim.study import read_settings
from cnn_mellin.optim.worker import Worker, WorkerSummary, overridden

_log = logging.getLogger("cnn_mellin.optim")


def run_worker(
    db_url: str, study_name: str | None, *, device: str = "cpu", sampler: str = "random",
    seed: int | None = None, max_trials: int | None = None,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S, keep_checkpoints: bool = False,
    data_dir: str | None = None, checkpoint_dir: str | None = None,
    pool: PoolLink | None = None,
) -> WorkerSummary:
    """Run one worker in this process; SIGTERM/SIGINT stop it after re-enqueueing its trial.

    Torch and the task's processes use the CPUs allocated to this process (see
    :mod:`cnn_mellin.cpus`) unless ``OMP_NUM_THREADS`` says otherwise.
    """
    in_main = threading.current_thread() is threading.main_thread()  # else no signals here
    early: list[int] = []  # a stop while the worker is being built: it starts no trial
    previous = {}
    if in_main:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, lambda signum, _frame: early.append(signum))
    try:
        use_threads(allocated_cpus())
        _log.info("worker on %s with %s CPU threads", device, os.environ["OMP_NUM_THREADS"])
        worker = Worker(
            db_url, study_name, device=device, sampler=sampler, seed=seed,
            max_trials=max_trials, max_outage_s=max_outage_s, keep_checkpoints=keep_checkpoints,
            data_dir=data_dir, checkpoint_dir=checkpoint_dir, pool=pool,
        )
        done = threading.Event()
        watchdog = None
        if in_main:
            for signum in previous:
                signal.signal(signum, worker.stop.on_signal)
            for signum in early:
                worker.stop.on_signal(signum)
            watchdog = threading.Thread(target=worker.watch_stop, args=(done,),
                                        name="cnn-mellin-stop", daemon=True)
            watchdog.start()
        try:
            if not worker.stop.requested():
                summary = worker.run()
            worker.stop.check()  # the last trial ended as the stop came
        except WorkerStopped as stop:
            summary = WorkerSummary(Counter(worker.outcomes), exit_code=128 + stop.signum)
            _log.warning("worker stopped by %s%s", stop, "; its trial was re-enqueued"
                         if worker.outcomes["interrupted"] else "")
        finally:
            with worker.recorder.lock:  # the watchdog ended the process already, or never will
                done.set()
            if watchdog is not None:
                watchdog.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    _log.info("worker done: %s", summary)
    return summary


def _child(db_url, study_name, device, sampler, seed, max_trials, max_outage_s, verbose,
           threads, folders, pool) -> None:
    """One child process of :func:`run_workers`: logs set up, then :func:`run_worker`."""
    use_threads(threads)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(processName)s %(levelname)s: %(message)s",
    )
    optuna.logging.set_verbosity(optuna.logging.DEBUG if verbose else optuna.logging.WARNING)
    try:
        summary = run_worker(
            db_url, study_name, device=device, sampler=sampler, seed=seed,
            max_trials=max_trials, max_outage_s=max_outage_s, pool=pool, **folders,
        )
    except UserError as err:
        _log.error("%s", err)
        raise SystemExit(err.exit_code) from None
    raise SystemExit(summary.exit_code)


def worker_devices(device: str, workers: int) -> list[str]:
    """Devices for ``workers`` local workers: plain ``cuda`` is spread over all GPUs."""
    if device == "cuda":
        try:
            import torch

            count = torch.cuda.device_count()
        except ImportError:
            count = 0
        if count > 1:
            return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def run_workers(
    workers: int, db_url: str, study_name: str | None, *, device: str = "cpu",
    sampler: str = "random", seed: int | None = None, max_trials: int | None = None,
    max_outage_s: float = DEFAULT_MAX_OUTAGE_S, verbose: bool = False,
    keep_checkpoints: bool = False, data_dir: str | None = None,
    checkpoint_dir: str | None = None,
) -> int:
    """Run ``workers`` worker processes here; returns the worst exit code."""
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    # fail fast, in this process, on a bad URL, study or folder override, or too many
    # workers for a device's memory
    settings = overridden(read_settings(load_study(open_storage(db_url), study_name, db_url)),
                          data_dir, checkpoint_dir)
    devices = worker_devices(device, workers)
    if device.startswith("cuda"):
        gpushare.check_sharing(devices, settings.mem_limit_bytes, gpushare.device_total_bytes)
    folders = {"keep_checkpoints": keep_checkpoints, "data_dir": data_dir,
               "checkpoint_dir": checkpoint_dir}
    context = multiprocessing.get_context("spawn")
    # workers share the job's CPUs instead of each taking all of the node's cores; those
    # of a worker that left go to the others (pool.py)
    cpus = allocated_cpus()
    threads = max(1, cpus // workers)
    live = context.Value("i", workers)
    pool = PoolLink(os.getpid(), cpus, live, elastic="OMP_NUM_THREADS" not in os.environ)

    def start(i: int, dev: str, name: str):
        process = context.Process(
            target=_child, name=name,
            args=(db_url, study_name, dev, sampler, seed, max_trials, max_outage_s, verbose,
                  threads, folders, pool),
        )
        process.start()
        return process

    processes = [start(i, dev, f"worker-{i}") for i, dev in enumerate(devices)]
    slots = dict(enumerate(processes))  # the process now in each worker slot
    restarts, max_restarts = 0, workers * (settings.max_retries + 1)

    received: list[int] = []

    def note(signum, _frame):  # a flag only; the loop below acts on it
        received.append(signum)

    previous = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        passed = 0
        while True:
            # a worker killed (OOM killer, kill -9) while nobody stops the pool is started
            # again: its trial is retried, and the others may have left (pool.py)
            for i, process in list(slots.items()):
                if (process.exitcode is not None and process.exitcode < 0 and not received
                        and restarts < max_restarts):
                    restarts += 1
                    _log.warning("%s was killed (signal %d): starting a worker in its place",
                                 process.name, -process.exitcode)
                    slots[i] = start(i, devices[i], f"worker-{i}.{restarts}")
                    processes.append(slots[i])
            alive = [p for p in processes if p.is_alive()]
            live.value = max(1, len(alive))
            if not alive:
                break
            # Ctrl-C reaches the children through the process group; SIGTERM (e.g. from
            # SLURM to this process only) is passed on, a second one too
            terms = received.count(signal.SIGTERM)
            if terms > passed:
                passed = terms
                for process in alive:
                    process.terminate()
            alive[0].join(timeout=WATCH_S)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [p.exitcode if p.exitcode >= 0 else 128 - p.exitcode for p in processes]
    return max(codes)

