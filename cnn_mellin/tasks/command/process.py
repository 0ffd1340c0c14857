"""The script's process group: starting it under the guard, measuring its memory, stopping it.

The script runs in a session of its own, led by the guard (:mod:`.guard`), so "the group"
is every process of that session, found through ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

GUARD_MODULE = "cnn_mellin.tasks.command"  # run with ``python -m``; see __main__.py


def start_guarded(
    line: str, grace_s: float, cwd: str, env: Mapping[str, str], log: Path,
) -> subprocess.Popen:
    """Start ``/bin/sh -c line`` under the guard in a new session, output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", GUARD_MODULE, "--guard", str(grace_s), "/bin/sh", "-c", line],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )


def _sessions() -> dict[int, tuple[int, int]]:
    """pid -> (session id, resident pages) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(entry)] = (int(fields[3]), int(fields[21]))
    return found


def group_pids(leader: int) -> list[int]:
    """The processes of the session ``leader`` started (the guard and the script's tree)."""
    return sorted(pid for pid, (sid, _) in _sessions().items() if sid == leader)


def _resident_bytes(leader: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(
        rss * page for pid, (sid, rss) in _sessions().items() if sid == leader and pid != leader
    )


def _gpu_bytes(pids: set[int]) -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return None


def group_memory(leader: int, device: str) -> tuple[int, str]:
    """Bytes the script's tree uses now and how they were measured (GPU memory through NVML
    on a CUDA device when ``pynvml`` is installed, else resident memory), guard excluded."""
    if device.startswith("cuda"):
        gpu = _gpu_bytes(set(group_pids(leader)))
        if gpu is not None:
            return gpu, "GPU memory of the process tree (NVML)"
    return _resident_bytes(leader), "resident memory of the process tree"


def stop_group(leader: int, grace_s: float, reap=None) -> None:
    """SIGTERM the process group of ``leader``, SIGKILL whatever is left after ``grace_s``.

    ``reap`` (e.g. ``Popen.poll``) is called while waiting so that an exited leader does
    not linger as a zombie that keeps the group alive.
    """
    def alive() -> bool:
        if reap is not None:
            reap()
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return bool(group_pids(leader))

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not alive():
                return
            time.sleep(0.05)
