"""The single-node SLURM of ``scripts/slurm_local.sh`` for the cluster tests.

:func:`slurm_env` skips the test, saying why, when SLURM is not installed or its cluster
does not answer (``bash scripts/setup.sh --test-deps`` installs and starts it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.optim_helpers import ROOT, env

LOCAL_CONF = Path(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/cnn-mellin-slurm")) / "slurm.conf"


def slurm_env(**extra) -> dict:
    """The environment of sbatch & co (this checkout's cnn-mellin in the jobs); skips the
    test when there is no SLURM cluster to submit to."""
    if shutil.which("sbatch") is None:
        pytest.skip("SLURM is not installed (bash scripts/slurm_local.sh start installs it)")
    base = {}
    if "SLURM_CONF" not in os.environ and LOCAL_CONF.exists():
        base["SLURM_CONF"] = str(LOCAL_CONF)
    environ = env(CNN_MELLIN=f"{sys.executable} -m cnn_mellin", **base, **extra)
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=environ, capture_output=True,
                                text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.skip("SLURM's controller does not answer (bash scripts/slurm_local.sh start)")
    if states.returncode != 0 or not re.search(r"idle|mixed|allocated", states.stdout):
        pytest.skip("no SLURM node up (bash scripts/slurm_local.sh start): "
                    + (states.stderr.strip().splitlines() or [states.stdout.strip()])[-1])
    return environ


def sbatch(environ: dict, log_dir: Path, options: list[str], args: list[str]) -> str:
    """Submit ``scripts/cnn_mellin.slrm ARGS`` with sbatch ``options``; returns the job id."""
    log_dir.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=1", "--mem=700M",
         f"--output={log_dir}/%A_%a.out", *options, "scripts/cnn_mellin.slrm", *args],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def queued(environ: dict, job: str) -> list[str]:
    """The job's array tasks (or the job) still in the queue, e.g. ``["12_1", "12_3"]``."""
    out = subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%i"], env=environ,
                         capture_output=True, text=True, timeout=30).stdout
    return out.split()


def wait_gone(environ: dict, job: str, timeout: float = 300) -> dict[str, float]:
    """Wait until nothing of ``job`` is queued; returns when each task was last seen."""
    seen: dict[str, float] = {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        now = time.time()
        tasks = queued(environ, job)
        for task in tasks:
            seen[task] = now
        if not tasks:
            return seen
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=environ, timeout=30)
    raise AssertionError(f"job {job} still queued after {timeout} s")


def job_records(environ: dict, job: str) -> dict[str, dict[str, str]]:
    """The job completion records (what ``sacct -c`` reads) of ``job``, by ``JOB_TASK`` for
    array tasks (``sacct -c`` itself shows array tasks only by their own job ids)."""
    conf = Path(environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    path = re.search(r"^JobCompLoc=(\S+)", conf, re.M)
    assert path, "the SLURM configuration has no JobCompLoc"
    records = {}
    for line in Path(path.group(1)).read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("ArrayJobId") == job:
            records[f"{job}_{fields['ArrayTaskId']}"] = fields
        elif fields.get("JobId") == job:
            records[job] = fields
    return records
