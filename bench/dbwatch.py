"""What a database server spends on one benchmark: connections and CPU seconds.

:class:`ServerWatch` samples, every ``every_s`` seconds in a thread, the connections to one
database (PostgreSQL ``pg_stat_activity``, MariaDB ``information_schema.processlist``) and
the CPU time the server spent for them: on PostgreSQL the backends serving that database
(one process per connection, read from ``/proc``; a backend that lives less than a sample
is missed), on MariaDB the whole ``mariadbd`` process (one process for every client: other
users of the server count too). Used by ``bench/optim_overhead.py`` and
``bench/scale_proxy.py``; needs the server on this machine.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PG_ADMIN = dict(host="127.0.0.1", port=5432, user="postgres")
MY_ADMIN = dict(host="127.0.0.1", port=3306, user="root", password="")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid``, its live children and the children it has reaped
    (a PostgreSQL server: the postmaster and every backend, past ones included)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(f) for f in fields[11:15]) / _TICK
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                child = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(child[1]) == pid:
                total += (int(child[11]) + int(child[12])) / _TICK
    return total


def _mariadbd_pid() -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("mariadbd", "mysqld"):
                    return int(entry.name)
            except OSError:
                continue
    return None


class ServerWatch:
    """Peak connections to database ``name`` and the server's CPU seconds for it."""

    def __init__(self, kind: str, name: str, every_s: float = 0.25, admin=None):
        self.kind = kind  # "postgresql" or "mariadb"
        self._admin = admin  # kind -> an autocommit admin connection (default: the local server)
        self.name = name
        self.every_s = every_s
        self.peak = 0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._conn = None

    def __enter__(self) -> ServerWatch:
        if self._admin is not None:
            self._conn = self._admin(self.kind)
            self._server = _mariadbd_pid()
            self._thread.start()
            return self
        if self.kind == "postgresql":
            import psycopg2

            self._conn = psycopg2.connect(dbname="postgres", **PG_ADMIN)
            self._conn.autocommit = True
        else:
            import pymysql

            self._conn = pymysql.connect(autocommit=True, **MY_ADMIN)
            pid = _mariadbd_pid()
            self._server = pid
            if pid is not None:
                self._first[pid] = self._last[pid] = cpu_seconds(pid) or 0.0
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._conn.close()

    def _sample(self) -> None:
        with self._conn.cursor() as cur:
            if self.kind == "postgresql":
                cur.execute("select pid from pg_stat_activity where datname = %s", (self.name,))
            else:
                cur.execute("select id from information_schema.processlist where db = %s",
                            (self.name,))
            rows = cur.fetchall()
        self.peak = max(self.peak, len(rows))
        pids = [r[0] for r in rows] if self.kind == "postgresql" else [self._server]
        for pid in pids:
            if pid is None:
                continue
            seconds = cpu_seconds(pid)
            if seconds is not None:
                self._first.setdefault(pid, seconds)
                self._last[pid] = seconds

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sample()
            except Exception:  # noqa: BLE001 - a failed sample (server restarting) is skipped
                time.sleep(self.every_s)

    @property
    def cpu_s(self) -> float:
        """CPU seconds the server spent for the database while watched."""
        return sum(self._last[pid] - self._first[pid] for pid in self._last)
