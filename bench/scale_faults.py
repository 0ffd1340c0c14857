"""Scale and faults: W worker processes x N trials of the fake task on each storage.

Per storage (embedded journal, PostgreSQL, MariaDB on 127.0.0.1): ``optim init`` a study of
N trials of ``tests.optim_fake:FakeTask`` (3 epochs of ``--epoch-s`` seconds, a memory limit
that prunes large batches), start W ``optim run`` processes, and

- when a quarter of the budget is done, SIGKILL a quarter of the workers (the ones then
  running a trial) and start as many fresh ones;
- when half is done (database servers only), restart the server for real: PostgreSQL with
  ``pg_ctlcluster --skip-systemctl-redirect 15 main restart``, MariaDB with
  ``mariadb-admin shutdown`` and ``start-stop-daemon``; the server is started again
  whatever happens.

Then check: exactly N trials COMPLETE or PRUNED and none WAITING or RUNNING; no trial number
run by two processes or twice (the fake task logs every run); every trial COMPLETE before the
restart still COMPLETE after it; every killed worker's trial FAIL (``dead``) with a retry
that finished, resumed from its checkpoint when it had one; every surviving worker exit 0.

    .venv/bin/python bench/scale_faults.py [--storage journal postgresql mariadb]
        [--workers 16] [--trials 500] [--epoch-s 0.1]

Prints one JSON line per storage and exits 1 if a check failed. Restarting a server cuts
every other client of it: run this on a machine of your own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres")
MY_ADMIN = dict(host="127.0.0.1", port=3306, user="root", password="")
LIMIT = 48_000_000  # the fake task needs data.batch_size MB: larger batches are pruned
HEARTBEAT_S = 2.0  # a dead local worker is noticed within one interval (its pid is gone)


def _env(run_log: Path, epoch_s: float) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            "FAKE_EPOCH_S": str(epoch_s), "FAKE_RUN_LOG": str(run_log)}


def _cli(*args: str, env: dict) -> list[str]:
    return [sys.executable, "-m", "cnn_mellin", *args]


def _url(kind: str, tmp: Path) -> str:
    name = f"cnnm_scale_{uuid.uuid4().hex[:8]}"
    if kind == "journal":
        return str(tmp / "studies.journal")
    if kind == "postgresql":
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    return f"mysql+pymysql://root@127.0.0.1:3306/{name}"


def _drop(kind: str, url: str) -> None:
    name = url.rsplit("/", 1)[-1]
    if kind == "postgresql":
        import psycopg2

        conn = psycopg2.connect(dbname="postgres", **PG_ADMIN)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'drop database if exists "{name}" with (force)')
        conn.close()
    elif kind == "mariadb":
        import pymysql

        conn = pymysql.connect(autocommit=True, **MY_ADMIN)
        with conn.cursor() as cur:
            cur.execute(f"drop database if exists `{name}`")
        conn.close()


def _reachable(kind: str) -> bool:
    try:
        if kind == "postgresql":
            import psycopg2

            psycopg2.connect(dbname="postgres", connect_timeout=2, **PG_ADMIN).close()
        else:
            import pymysql

            pymysql.connect(connect_timeout=2, **MY_ADMIN).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False


def restart_server(kind: str) -> float:
    """Stop and start the database server; returns the seconds it was away."""
    started = time.monotonic()
    try:
        if kind == "postgresql":
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "stop"],
                           check=True, capture_output=True)
        else:
            subprocess.run(["mariadb-admin", "-u", "root", "shutdown"], check=True,
                           capture_output=True)
            while _reachable(kind):
                time.sleep(0.1)
    finally:
        if kind == "postgresql":
            subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main",
                            "start"], capture_output=True)
        else:
            subprocess.run(["start-stop-daemon", "--start", "--oknodo", "--background",
                            "--exec", "/usr/sbin/mariadbd"], capture_output=True)
        deadline = time.monotonic() + 60
        while not _reachable(kind) and time.monotonic() < deadline:
            time.sleep(0.2)
    return time.monotonic() - started


_STUDIES: dict = {}


def _trials(url: str):
    """The study's trials, through one storage per URL (it rides out the restart)."""
    if url not in _STUDIES:
        import optuna

        from cnn_mellin.optim.storage import load_study, open_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        _STUDIES[url] = load_study(open_storage(url), "scale", url)
    return _STUDIES[url].get_trials(deepcopy=False)


def run_one(kind: str, workers: int, trials: int, epoch_s: float, seed: int) -> dict:
    from optuna.trial import TrialState

    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix=f"scale-{kind}-"))
    url = _url(kind, tmp)
    run_log = tmp / "runs.log"
    env = _env(run_log, epoch_s)
    (tmp / "data").mkdir()
    (tmp / "base.ini").write_text("[training]\nnum_epochs = 3\n")
    subprocess.run(_cli("--read-ini", str(tmp / "base.ini"), "optim", "--study-name", "scale",
                        url, "init", str(tmp / "data"), "--task", "tests.optim_fake:FakeTask",
                        "--whitelist", "training.learning_rate", "data.batch_size",
                        "--num-trials", str(trials), "--mem-limit-bytes", str(LIMIT),
                        "--pruner", "none", "--heartbeat-interval", str(HEARTBEAT_S),
                        "--checkpoint-dir", str(tmp / "ckpt"), env=env),
                   check=True, env=env, capture_output=True, cwd=tmp)
    facts: dict = {"storage": kind, "workers": workers, "trials": trials, "epoch_s": epoch_s}
    procs: list[subprocess.Popen] = []
    killed: list[int] = []  # pids
    complete_before_restart: set[int] = set()

    def start(i: int) -> subprocess.Popen:
        with open(tmp / f"worker-{i}.log", "w") as log:
            return subprocess.Popen(
                _cli("--seed", str(i), "optim", "--study-name", "scale", url, "run", env=env),
                env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=log)

    started = time.monotonic()
    try:
        procs = [start(i) for i in range(workers)]
        phase = "kill"
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            if phase == "done":
                continue
            states = Counter(t.state for t in _trials(url))
            done = states[TrialState.COMPLETE] + states[TrialState.PRUNED]
            if phase == "kill" and done >= trials // 4:
                running = [t for t in _trials(url) if t.state == TrialState.RUNNING]
                pids = {t.user_attrs.get("worker", {}).get("pid") for t in running}
                victims = [p for p in procs if p.poll() is None and p.pid in pids]
                victims = rng.sample(victims, min(len(victims), workers // 4))
                for p in victims:
                    p.send_signal(signal.SIGKILL)
                    killed.append(p.pid)
                if victims:  # else every worker was between trials: look again
                    procs += [start(workers + i) for i in range(len(victims))]
                    facts["killed_at_done"] = done
                    phase = "restart" if kind != "journal" else "done"
            elif phase == "restart" and done >= trials // 2 and all(
                    "cnn_mellin.optim INFO: trial" in (tmp / f"worker-{i}.log").read_text()
                    for i in range(len(procs))):
                # every worker has been through a trial: one starting while the server is
                # away fails fast by design ("cannot connect", exit 2)
                complete_before_restart = {t.number for t in _trials(url)
                                           if t.state == TrialState.COMPLETE}
                facts["restart_at_done"] = done
                facts["server_away_s"] = round(restart_server(kind), 2)
                phase = "done"
        facts["wall_s"] = round(time.monotonic() - started, 1)
        final = _trials(url)
        counts = Counter(t.state.name for t in final)
        facts["states"] = dict(sorted(counts.items()))
        runs = [line.split() for line in
                (run_log.read_text().splitlines() if run_log.exists() else [])]
        per_trial = Counter(int(r[1]) for r in runs)
        by_number = {t.number: t for t in final}
        # what the killed workers were running: their trials that did not finish
        killed_trials = [t.number for t in final if t.user_attrs.get("worker", {}).get("pid")
                         in killed and t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
        retries = {t.user_attrs.get("replaces"): t for t in final if "replaces" in t.user_attrs}
        dead = [t for t in final if t.state == TrialState.FAIL
                and t.user_attrs.get("fail_kind") == "dead"]
        resumed = [t for t in final if t.user_attrs.get("resumed_from_epoch")]
        codes = Counter(p.returncode for p in procs)

        def finished(number: int) -> bool:
            retry = retries.get(number)
            while retry is not None and retry.state == TrialState.FAIL:
                retry = retries.get(retry.number)
            return retry is not None and retry.state in (TrialState.COMPLETE, TrialState.PRUNED)

        facts.update({
            "runs": len(runs), "killed_workers": len(killed),
            "killed_trials": len(killed_trials),
            "dead_fails": len(dead), "resumed": len(resumed),
            "exit_codes": {str(k): v for k, v in sorted(codes.items())},
        })
        checks = {
            "exact budget": counts["COMPLETE"] + counts["PRUNED"] == trials
            and not counts["WAITING"] and not counts["RUNNING"],
            "no trial run twice": all(n == 1 for n in per_trial.values()),
            "every run is a trial that finished or was killed": all(
                by_number[n].state != TrialState.RUNNING for n in per_trial),
            "completed before the restart still complete": all(
                by_number[n].state == TrialState.COMPLETE for n in complete_before_restart),
            "killed trials failed as dead and their retries finished": all(
                by_number[n].state == TrialState.FAIL and finished(n) for n in killed_trials),
            "surviving workers exit 0": codes[0] == len(procs) - len(killed)
            and codes[-9] == len(killed),
        }
        facts["checks"] = {k: bool(v) for k, v in checks.items()}
        facts["ok"] = all(checks.values())
        if not facts["ok"]:
            facts["logs"] = str(tmp)
        return facts
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if kind != "journal":
            try:
                _drop(kind, url)
            except Exception as err:  # noqa: BLE001 - report, keep the other storages going
                print(f"could not drop {url}: {err}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", nargs="+", default=["journal", "postgresql", "mariadb"],
                        choices=["journal", "postgresql", "mariadb"])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--epoch-s", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    ok = True
    for kind in args.storage:
        facts = run_one(kind, args.workers, args.trials, args.epoch_s, args.seed)
        facts.update(host=socket.gethostname(), cpus=os.cpu_count(),
                     python=platform.python_version(),
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        print(json.dumps(facts), flush=True)
        ok = ok and facts["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
