"""Helpers for the optim tests: database access, fake-task studies, worker processes.

The database fixtures are in :mod:`tests.optim_fixtures`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnn_mellin.config import Config

ROOT = Path(__file__).resolve().parent.parent
PG = dict(host="127.0.0.1", port=5432, user="postgres")
MY = dict(host="127.0.0.1", port=3306, user="root", password="")
FAKE_TASK = "tests.optim_fake:FakeTask"
FAKE_SEARCH = [
    "training.learning_rate", "training.optimizer", "data.batch_size", "model.window_.*",
]
FAKE_BASE = {"training.num_epochs": 3}


def _pg_admin():
    import psycopg2

    try:
        conn = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable on 127.0.0.1:5432: {err}".splitlines()[0])
    conn.autocommit = True
    return conn


def _my_admin():
    import pymysql

    try:
        return pymysql.connect(connect_timeout=3, autocommit=True, **MY)
    except pymysql.err.OperationalError as err:
        pytest.skip(f"MariaDB not reachable on 127.0.0.1:3306: {err}")


def pg_tables(name: str) -> list[str]:
    """Tables in the public schema of PostgreSQL database ``name``."""
    import psycopg2

    with psycopg2.connect(dbname=name, **PG) as conn, conn.cursor() as cur:
        cur.execute("select tablename from pg_tables where schemaname = 'public'")
        return sorted(r[0] for r in cur.fetchall())


def pg_terminate(name: str) -> int:
    """Kill every connection to PostgreSQL database ``name``; returns how many."""
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity "
            "where datname = %s and pid <> pg_backend_pid()", (name,)
        )
        killed = len(cur.fetchall())
    conn.close()
    return killed


def my_kill(name: str) -> int:
    """Kill every connection to MariaDB database ``name``; returns how many."""
    conn = _my_admin()
    killed = 0
    with conn.cursor() as cur:
        cur.execute("select id from information_schema.processlist where db = %s", (name,))
        for (pid,) in cur.fetchall():
            if pid != conn.thread_id():
                cur.execute(f"kill {int(pid)}")
                killed += 1
    conn.close()
    return killed


def fake_study(
    url: str, tmp_path: Path, name: str = "fake", num_trials: int = 6, *,
    whitelist=None, mem_limit_bytes=None, pruner="none", base=None, **options,
):
    """Create a fake-task study in ``url``; returns its settings."""
    from cnn_mellin.optim.study import build_settings, init_study

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    settings = build_settings(
        Config({**FAKE_BASE, **(base or {})}), data, task=FAKE_TASK,
        whitelist=FAKE_SEARCH if whitelist is None else whitelist, num_trials=num_trials,
        mem_limit_bytes=mem_limit_bytes, pruner=pruner,
        checkpoint_dir=tmp_path / "ckpt" / name, **{"heartbeat_interval": 1.0, **options},
    )
    init_study(url, name, settings)
    return settings


def env(**extra) -> dict:
    """The environment of a test subprocess: this checkout importable, one thread per process
    (several workers share the two cores of a small machine)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
            **{k: str(v) for k, v in extra.items()}}


def start_worker(
    url: str, study: str, *args: str, seed: int | None = None, **env_extra
) -> subprocess.Popen:
    """A real ``cnn-mellin optim ... run`` process (stderr captured)."""
    seeded = [] if seed is None else ["--seed", str(seed)]
    return subprocess.Popen(
        [sys.executable, "-m", "cnn_mellin", "--device", "cpu", *seeded, "optim",
         "--study-name", study, url, "run", *args],
        cwd=ROOT, env=env(**env_extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


def wait_all(processes, timeout: float = 300) -> list[tuple[int, str]]:
    """Wait for the processes; returns (exit code, stderr) of each, killing laggards."""
    deadline = time.monotonic() + timeout
    results = []
    for process in processes:
        try:
            _, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            _, err = process.communicate()
            err += "\n[killed by the test: timeout]"
        results.append((process.returncode, err))
    return results


def load(url: str, name: str):
    from cnn_mellin.optim.storage import load_study, open_storage

    return load_study(open_storage(url), name, url)


def states(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts
