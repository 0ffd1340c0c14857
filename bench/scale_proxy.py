"""Hundreds of workers on one study: directly on PostgreSQL and MariaDB, and through the proxy.

For each store and each number of workers W: a fresh database (optionally holding
``--history`` finished trials already: a study that has run that many and grew by this
run's budget), a study of W x ``--trials-per-worker`` trials of a sleeping task, then W
simulated workers: the real ``optim run`` loop (``Worker``: claims, heartbeats, reaper,
reconciler, standby, tell), a few processes each running many workers in threads, each
worker with its own storage (connection pool, or gRPC channel) and its own identity (as if
on its own host), the trial a sleep (+-25 %, two epochs reported) of W / ``--rate`` seconds
(every W is offered the same throughput, 2 trials/s by default; ``--trial-s`` fixes it).
Stores: ``postgresql``, ``mariadb`` (the workers connect to the server), ``proxy``
(``optim serve`` in front of PostgreSQL, the workers on ``grpc://``), ``proxy-mariadb``.

Measured per run: trials per second over the run; claim latency (a successful
``SlotClaimer.claim``) p50 / p95 / max, and without each worker's first claim (all
workers start at once); peak connections to the database (sampled every
0.25 s); CPU seconds of the database server, of the proxy and of the simulated workers per
trial; and the budget at the end: exactly W x trials-per-worker (+ history) COMPLETE or
PRUNED, nothing WAITING or RUNNING, no trial number run twice.

By default the servers are private ones this script starts (``--servers private``: a
PostgreSQL cluster and a MariaDB server in a temporary folder, on ports 5433 and 3307,
``max_connections`` 1000), so that hundreds of connections neither hit the shared servers'
limits (100 and 151) nor starve their other users, and their CPU is this benchmark's alone;
``--servers shared`` uses 127.0.0.1:5432 / 3306, and skips direct runs that would need more
connections than the server allows.

    nice -n 10 .venv/bin/python bench/scale_proxy.py [--stores postgresql mariadb proxy]
        [--workers 8 32 128 256] [--history 0 10000] [--rate 2 | --trial-s S]
        [--trials-per-worker 2]
        [--processes 8] [--servers private|shared] [--out FILE.jsonl]

Prints one JSON line per run and a table at the end; exits 1 if a budget was not exact.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cnn_mellin.tasks import Task, TaskResult  # noqa: E402

SEARCH = ["training.learning_rate", "training.optimizer", "data.batch_size",
          "model.window_size", "model.dropout"]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
_RUNS: list[int] = []  # trial numbers run in this process
_RUNS_LOCK = threading.Lock()


class SleepTask(Task):
    """A trial that sleeps ``SCALE_TRIAL_S`` seconds (+-25 %) in two reported epochs."""

    name = "sleep"

    @classmethod
    def prepare(cls, options, config):
        return {"num_coeffs": 41}

    def max_epochs(self, config, searched):
        return 2

    def run(self, config, context):
        with _RUNS_LOCK:
            _RUNS.append(context.trial_number)
        total = float(os.environ.get("SCALE_TRIAL_S", "1")) * random.uniform(0.75, 1.25)
        value = config["training.learning_rate"]
        for epoch in (1, 2):
            time.sleep(total / 2)
            context.report(epoch, value)
        return TaskResult(value=value, epochs=2)


# -- servers ---------------------------------------------------------------------------


class Servers:
    """Where the PostgreSQL and MariaDB servers are, and their admin connections."""

    def __init__(self, mode: str, tmp: Path):
        self.mode = mode
        self.tmp = tmp
        self.pg_port, self.my_port = (5433, 3307) if mode == "private" else (5432, 3306)
        self._stops = []
        self.pg_pid = self.my_pid = None

    def __enter__(self) -> Servers:
        if self.mode == "private":
            try:
                self._start_postgresql()
                self._start_mariadb()
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *_exc) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception as err:  # noqa: BLE001 - best effort on the way out
                print(f"stopping a server: {err}", file=sys.stderr)

    def _start_postgresql(self) -> None:
        data = self.tmp / "pg"
        data.mkdir()
        shutil.chown(data, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*as_pg, PG_BIN / "initdb", "-D", data, "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        options = (f"-p {self.pg_port} -c max_connections=1000 -c shared_buffers=256MB "
                   f"-c listen_addresses=127.0.0.1 -k {data}")
        subprocess.run([*as_pg, PG_BIN / "pg_ctl", "-D", data, "-o", options, "-l",
                        data / "log", "-w", "start"], check=True, capture_output=True)
        self._stops.append(lambda: subprocess.run(
            [*as_pg, PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"],
            capture_output=True))
        self.pg_pid = int((data / "postmaster.pid").read_text().split()[0])

    def _start_mariadb(self) -> None:
        data = self.tmp / "my"
        subprocess.run(["mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={data}",
                        "--auth-root-authentication-method=normal"],
                       check=True, capture_output=True)
        process = subprocess.Popen(
            ["mariadbd", "--no-defaults", "--user=root", f"--datadir={data}",
             f"--port={self.my_port}", "--bind-address=127.0.0.1",
             f"--socket={data}/sock", f"--pid-file={data}/pid", "--max-connections=1000",
             "--innodb-buffer-pool-size=256M", f"--log-error={data}/log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._stops.append(lambda: (process.terminate(), process.wait(60)))
        self.my_pid = process.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                self.admin("mariadb").close()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit(f"MariaDB did not start: {(data / 'log').read_text()}") \
                        from None
                time.sleep(0.5)

    def admin(self, kind: str):
        if kind == "postgresql":
            import psycopg2

            conn = psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="postgres",
                                    dbname="postgres")
            conn.autocommit = True
            return conn
        import pymysql

        return pymysql.connect(host="127.0.0.1", port=self.my_port, user="root", password="",
                               autocommit=True)

    def max_connections(self, kind: str) -> int:
        conn = self.admin(kind)
        with conn.cursor() as cur:
            cur.execute("show max_connections" if kind == "postgresql"
                        else "select @@max_connections")
            value = int(cur.fetchone()[0])
        conn.close()
        return value

    def create(self, kind: str) -> tuple[str, str]:
        """A fresh database: (its URL, its name)."""
        name = f"cm_scale_{uuid.uuid4().hex[:8]}"
        conn = self.admin(kind)
        with conn.cursor() as cur:
            cur.execute(f'create database "{name}"' if kind == "postgresql"
                        else f"create database `{name}`")
        conn.close()
        if kind == "postgresql":
            return f"postgresql+psycopg2://postgres@127.0.0.1:{self.pg_port}/{name}", name
        return f"mysql+pymysql://root@127.0.0.1:{self.my_port}/{name}", name

    def drop(self, kind: str, name: str) -> None:
        conn = self.admin(kind)
        with conn.cursor() as cur:
            cur.execute(f'drop database if exists "{name}" with (force)' if kind == "postgresql"
                        else f"drop database if exists `{name}`")
        conn.close()

    def cpu_seconds(self, kind: str) -> float | None:
        """CPU seconds the private server has spent (with its exited children), or None."""
        from dbwatch import cpu_seconds, tree_cpu_seconds

        if self.mode != "private":
            return None
        return tree_cpu_seconds(self.pg_pid) if kind == "postgresql" else \
            cpu_seconds(self.my_pid)


# -- the study -----------------------------------------------------------------------


def _make_study(url: str, tmp: Path, budget: int, history: int) -> None:
    """A study of ``budget`` WAITING trials, after ``history`` finished ones."""
    import dataclasses

    import optuna

    from cnn_mellin.config import Config
    from cnn_mellin.optim import study as study_module
    from cnn_mellin.optim.storage import open_storage

    settings = study_module.build_settings(
        Config(), tmp, task=f"{Path(__file__).stem}:SleepTask", whitelist=SEARCH,
        num_trials=budget, pruner="none", checkpoint_dir=tmp / "ckpt",
    )
    if not history:
        study_module.init_study(url, "scale", settings)
        return
    storage = open_storage(url, create=True)
    study = optuna.create_study(study_name="scale", storage=storage)
    _insert_history(url, study, settings, history)
    # what init writes, with the history counted in the budget (as a study that grew)
    study_module._write(study, dataclasses.replace(settings, num_trials=budget + history))


def _insert_history(url: str, study, settings, count: int) -> None:
    """``count`` COMPLETE trials with parameters, values, attributes, written in bulk."""
    import optuna
    import sqlalchemy
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models

    from cnn_mellin.optim import space

    rng = random.Random(0)
    dists = space.distributions(settings.searched, settings.build_task().params())
    engine = sqlalchemy.create_engine(url)
    sid = study._study_id
    started = time.time()
    with engine.begin() as conn:
        conn.execute(sqlalchemy.insert(models.TrialModel.__table__), [
            {"number": n, "study_id": sid, "state": optuna.trial.TrialState.COMPLETE,
             "datetime_start": None, "datetime_complete": None} for n in range(count)])
        ids = dict(conn.execute(sqlalchemy.select(
            models.TrialModel.__table__.c.number, models.TrialModel.__table__.c.trial_id)
            .where(models.TrialModel.__table__.c.study_id == sid)).all())
        params, values, user, system, steps = [], [], [], [], []
        for number, trial_id in ids.items():
            for name, dist in dists.items():
                sample = optuna.samplers.RandomSampler(seed=rng.randrange(2**31))
                value = sample.sample_independent(None, None, name, dist)
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": dist.to_internal_repr(value),
                               "distribution_json": distribution_to_json(dist)})
            values.append({"trial_id": trial_id, "objective": 0, "value": rng.random(),
                           "value_type": models.TrialValueModel.TrialValueType.FINITE})
            for key, value in (("worker", {"host": f"old{number % 64}", "pid": number}),
                               ("wall_time_s", 10.0), ("epochs", 2)):
                user.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            system.append({"trial_id": trial_id, "key": "fixed_params", "value_json": "{}"})
            for step in (1, 2):
                steps.append({"trial_id": trial_id, "step": step,
                              "intermediate_value": rng.random(),
                              "intermediate_value_type":
                                  models.TrialIntermediateValueModel.TrialIntermediateValueType
                                  .FINITE})
        for model, rows in ((models.TrialParamModel, params), (models.TrialValueModel, values),
                            (models.TrialUserAttributeModel, user),
                            (models.TrialSystemAttributeModel, system),
                            (models.TrialIntermediateValueModel, steps)):
            conn.execute(sqlalchemy.insert(model.__table__), rows)
    engine.dispose()
    print(f"  {count} finished trials written in {time.time() - started:.1f} s", flush=True)


# -- the simulated workers -------------------------------------------------------------


def _client(url: str, first: int, count: int, barrier, results, trial_s: float) -> None:
    """``count`` workers in threads of this process, numbered from ``first``."""
    import logging

    import optuna

    from cnn_mellin.optim import budget, heartbeat
    from cnn_mellin.optim.worker import Worker

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ["SCALE_TRIAL_S"] = str(trial_s)
    current = heartbeat.WorkerIdentity.current.__func__
    made = itertools.count(first)

    def identity(cls, device=""):  # each simulated worker as if on a host of its own
        real = current(cls, device)
        return heartbeat.WorkerIdentity(f"{real.host}-sim{next(made)}", real.pid, real.start,
                                        real.boot, real.pidns, device)

    heartbeat.WorkerIdentity.current = classmethod(identity)
    claims: list[tuple[float, float, bool, bool]] = []  # (start, s, got one, worker's first)
    first_done: set[int] = set()
    claims_lock = threading.Lock()
    original = budget.SlotClaimer.claim

    def timed(self):
        began = time.perf_counter()
        trial = original(self)
        with claims_lock:
            first = trial is not None and id(self) not in first_done
            if first:
                first_done.add(id(self))
            claims.append((began, time.perf_counter() - began, trial is not None, first))
        return trial

    budget.SlotClaimer.claim = timed
    errors: list[str] = []
    try:
        workers = [Worker(url, "scale", device="cpu", sampler="random") for _ in range(count)]
    except Exception as err:  # noqa: BLE001 - reported, the run is then invalid
        errors.append(f"setup: {type(err).__name__}: {err}")
        workers = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    barrier.wait()
    cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    codes = []

    def run(worker):
        try:
            codes.append(worker.run().exit_code)
        except Exception as err:  # noqa: BLE001 - counted as a failed worker
            errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    from scale_proxy import _RUNS as runs  # the task's module (this one runs as __mp_main__)

    results.put({
        "claims": [(b - t0, s, got, first) for b, s, got, first in claims],
        "runs": list(runs), "codes": codes, "errors": errors[:5],
        "cpu_s": usage.ru_utime + usage.ru_stime - cpu0,
        "max_rss_mb": usage.ru_maxrss / 1024,
    })


def _serve(db_url: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    address = tmp / f"proxy-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_mellin", "optim", db_url, "serve", "--host", "127.0.0.1",
         "--port", "0", "--address-file", str(address)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 120
    while not address.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the proxy did not start: {process.communicate()[1]}")
        time.sleep(0.1)
    return process, address.read_text().strip()


def run_one(servers: Servers, store: str, workers: int, history: int, args) -> dict:
    from dbwatch import ServerWatch, cpu_seconds

    kind = "mariadb" if store.endswith("mariadb") else "postgresql"
    proxied = store.startswith("proxy")
    result = {"store": store, "workers": workers, "history": history,
              "servers": servers.mode}
    if not proxied and workers + 10 > servers.max_connections(kind):
        result["skipped"] = (f"{workers} workers need at least as many connections; the "
                             f"server allows {servers.max_connections(kind)}")
        return result
    budget = workers * args.trials_per_worker
    trial_s = args.trial_s if args.trial_s is not None else workers / args.rate
    result["trial_s"] = trial_s
    tmp = Path(tempfile.mkdtemp(prefix="scale-proxy-"))
    db_url, name = servers.create(kind)
    proxy = None
    try:
        _make_study(db_url, tmp, budget, history)
        url = db_url
        if proxied:
            proxy, url = _serve(db_url, tmp)
        processes = min(args.processes, workers)
        share = [workers // processes + (i < workers % processes) for i in range(processes)]
        context = multiprocessing.get_context("spawn")
        barrier = context.Barrier(processes + 1)
        results = context.Queue()
        firsts = [sum(share[:i]) for i in range(processes)]
        clients = [context.Process(target=_client, args=(url, first, n, barrier, results,
                                                         trial_s))
                   for first, n in zip(firsts, share, strict=True)]
        for client in clients:
            client.start()
        with ServerWatch(kind, name, admin=servers.admin) as watch:
            barrier.wait(timeout=900)
            server0 = servers.cpu_seconds(kind)
            proxy0 = cpu_seconds(proxy.pid) if proxy else None
            t0 = time.perf_counter()
            got = [results.get(timeout=args.timeout) for _ in clients]
            wall = time.perf_counter() - t0
            server1 = servers.cpu_seconds(kind)
            proxy1 = cpu_seconds(proxy.pid) if proxy else None
        for client in clients:
            client.join(timeout=60)
        result.update(_figures(got, wall, budget))
        result["peak_connections"] = watch.peak
        done = result["trials_run"]
        server_s = (server1 - server0) if server0 is not None else watch.cpu_s
        result["db_cpu_ms_per_trial"] = round(1000 * server_s / max(done, 1), 1)
        if proxy:
            result["proxy_cpu_ms_per_trial"] = round(1000 * (proxy1 - proxy0) / max(done, 1), 1)
        result.update(_check(db_url, budget, history, got))
    finally:
        if proxy is not None:
            proxy.send_signal(signal.SIGTERM)
            try:
                proxy.wait(60)
            except subprocess.TimeoutExpired:
                proxy.kill()
        servers.drop(kind, name)
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _figures(got: list[dict], wall: float, budget: int) -> dict:
    claims = [c for g in got for c in g["claims"]]
    taken = sorted(s for _, s, ok, _ in claims if ok)
    later = sorted(s for _, s, ok, first in claims if ok and not first)
    runs = [n for g in got for n in g["runs"]]

    def pct(q, values=taken):
        return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 1) \
            if values else None

    return {
        "wall_s": round(wall, 1), "trials_run": len(runs),
        "trials_per_s": round(len(runs) / wall, 2),
        "claims": len(taken), "claim_ms_p50": pct(0.5), "claim_ms_p95": pct(0.95),
        "claim_ms_max": round(1000 * taken[-1], 1) if taken else None,
        # without each worker's first claim: all of them start at once
        "later_claim_ms_p50": pct(0.5, later), "later_claim_ms_p95": pct(0.95, later),
        "empty_claims": sum(1 for _, _, ok, _ in claims if not ok),
        "workers_cpu_ms_per_trial": round(1000 * sum(g["cpu_s"] for g in got)
                                          / max(len(runs), 1), 1),
        "client_rss_mb": round(max(g["max_rss_mb"] for g in got)),
        "worker_exits": dict(Counter(c for g in got for c in g["codes"])),
        "errors": [e for g in got for e in g["errors"]][:5],
    }


def _check(db_url: str, budget: int, history: int, got: list[dict]) -> dict:
    from optuna.trial import TrialState

    from cnn_mellin.optim.storage import load_study, open_storage

    study = load_study(open_storage(db_url), "scale", db_url)
    counts = Counter(t.state for t in study.get_trials(deepcopy=False))
    runs = Counter(n for g in got for n in g["runs"])
    twice = sorted(n for n, k in runs.items() if k > 1)
    done = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    exact = done == budget + history and not counts[TrialState.WAITING] \
        and not counts[TrialState.RUNNING] and not twice
    return {"complete_pruned": done - history, "fail": counts[TrialState.FAIL],
            "left": counts[TrialState.WAITING] + counts[TrialState.RUNNING],
            "run_twice": twice[:10], "exact_budget": exact}


def _table(results: list[dict]) -> str:
    lines = ["| store | W | history | trial (s) | trials/s | claim p50 / p95 / max (ms) | "
             "later claims p50 / p95 (ms) | peak DB connections | CPU ms per trial: DB / proxy "
             "/ workers | budget |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['store']} | {r['workers']} | {r['history']} | | skipped: "
                         f"{r['skipped']} | | | | | |")
            continue
        proxy = r.get("proxy_cpu_ms_per_trial", "-")
        lines.append(
            f"| {r['store']} | {r['workers']} | {r['history']} | {r['trial_s']:g} | "
            f"{r['trials_per_s']} | "
            f"{r['claim_ms_p50']} / {r['claim_ms_p95']} / {r['claim_ms_max']} | "
            f"{r['later_claim_ms_p50']} / {r['later_claim_ms_p95']} | "
            f"{r['peak_connections']} | {r['db_cpu_ms_per_trial']} / {proxy} / "
            f"{r['workers_cpu_ms_per_trial']} | "
            f"{'exact' if r['exact_budget'] else 'NOT EXACT'} ({r['complete_pruned']}, "
            f"{r['fail']} FAIL) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", nargs="+", default=["postgresql", "mariadb", "proxy"],
                        choices=["postgresql", "mariadb", "proxy", "proxy-mariadb"])
    parser.add_argument("--workers", nargs="+", type=int, default=[8, 32, 128, 256])
    parser.add_argument("--history", nargs="+", type=int, default=[0, 10_000])
    parser.add_argument("--rate", type=float, default=2.0,
                        help="trials per second offered: each trial sleeps W / RATE seconds, "
                        "so that every W asks the store for the same throughput (default 2)")
    parser.add_argument("--trial-s", type=float, default=None,
                        help="a fixed trial length instead of --rate")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--servers", choices=["private", "shared"], default="private")
    parser.add_argument("--timeout", type=float, default=1200,
                        help="seconds a run may take before it is abandoned")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    print(f"{socket.gethostname()}: {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="scale-servers-") as tmp:
        shutil.chown(tmp, "postgres") if args.servers == "private" else None
        os.chmod(tmp, 0o755)
        with Servers(args.servers, Path(tmp)) as servers:
            for history in args.history:
                for workers in args.workers:
                    for store in args.stores:
                        result = run_one(servers, store, workers, history, args)
                        result["load_average"] = round(os.getloadavg()[0], 1)
                        results.append(result)
                        line = json.dumps(result)
                        print(line, flush=True)
                        if args.out:
                            with open(args.out, "a") as out:
                                out.write(line + "\n")
    print(_table(results))
    if any(not r.get("exact_budget", True) for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
