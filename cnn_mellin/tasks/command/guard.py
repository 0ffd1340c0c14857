"""The guard process: leads the script's session and ends all of it when told or orphaned.

Run as ``python -m cnn_mellin.tasks.command --guard GRACE_S ARGV...`` (see
:func:`.process.start_guarded`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cnn_mellin.tasks.command.process import group_pids

USAGE = "usage: python -m cnn_mellin.tasks.command --guard GRACE_S ARGV..."


def guard(grace_s: float, argv: list[str]) -> int:
    """Run ``argv`` in this (new) process group; end the group when told or orphaned.

    The worker that started this guard may be killed outright (SIGKILL): then this guard
    is re-parented, notices, and stops the script's whole group, so nothing is left behind.
    """
    if os.getsid(0) != os.getpid():  # not started as a session leader: become one, so that
        try:  # stopping "the group" can never reach the caller's own processes
            os.setsid()
        except PermissionError:
            sys.stderr.write("cnn-mellin: the guard must start a session of its own (run it "
                             "with start_new_session=True)\n")
            return 2
    parent = os.getppid()
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    child = subprocess.Popen(argv)
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping or os.getppid() != parent:
            _stop_others(grace_s, child)
            code = child.wait()
            break
    _stop_others(grace_s, None)  # helpers the script left running
    return code if code >= 0 else 128 - code


def _stop_others(grace_s: float, child) -> None:
    me = os.getpid()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        others = [p for p in group_pids(os.getsid(0)) if p != me]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if not [p for p in group_pids(os.getsid(0)) if p != me]:
                return
            time.sleep(0.05)


def main(argv: list[str]) -> int:
    """The guard's command line (``argv`` without the program name); exits with usage."""
    if len(argv) < 3 or argv[0] != "--guard":
        sys.exit(USAGE)
    return guard(float(argv[1]), argv[2:])
