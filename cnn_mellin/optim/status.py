"""``optim status``: progress against the budget, the best trial, running trials, failures."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cnn_mellin.optim import budget, internals
from cnn_mellin.optim.attrs import (
    DRAWS_REJECTED_INVALID,
    DRAWS_REJECTED_MEMORY,
    FAIL_KIND,
    FAIL_REASON,
    LINEAGE,
    PRUNE_KIND,
    PRUNE_REASON,
    RETRY_OF,
    WORKER_TIME_PREFIX,
)
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.study import StudySettings, checkpoint_root
from cnn_mellin.units import format_bytes


def study_status(study: optuna.Study, settings: StudySettings) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-serialisable data."""
    trials = study.get_trials(deepcopy=False)
    counts = budget.count(trials, settings.num_trials)
    now = datetime.now()
    completed = [
        t for t in trials
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)
    ]
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    best = min(completed, key=lambda t: (sign * t.value, t.number)) if completed else None
    running = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        ident = t.user_attrs.get(WORKER_ATTR) or {}
        running.append({
            "number": t.number,
            "age_s": round((now - t.datetime_start).total_seconds(), 1)
            if t.datetime_start else None,
            "host": ident.get("host"), "pid": ident.get("pid"), "device": ident.get("device"),
            "epochs_reported": len(t.intermediate_values),
            "retry_of": t.user_attrs.get(RETRY_OF),
        })
    failures = [
        {"number": t.number, "kind": t.user_attrs.get(FAIL_KIND),
         "reason": t.user_attrs.get(FAIL_REASON, "unknown")}
        for t in trials if t.state == TrialState.FAIL
    ]
    pruned = [
        {"number": t.number, "kind": t.user_attrs.get(PRUNE_KIND),
         "reason": t.user_attrs.get(PRUNE_REASON, "unknown")}
        for t in trials if t.state == TrialState.PRUNED
    ]
    return {
        "study": study.study_name,
        "task": settings.task,
        "budget": settings.num_trials,
        "counts": {
            "complete": counts.complete, "pruned": counts.pruned, "running": counts.running,
            "waiting": counts.waiting, "fail": counts.fail, "done": counts.done,
        },
        "best": None if best is None else {
            "number": best.number, "value": best.value, "params": best.params,
        },
        "running": running,
        "failures": failures,
        "pruned": pruned,
        "prune_kinds": dict(sorted(Counter(p["kind"] or "unknown" for p in pruned).items())),
        "lineage": study.user_attrs.get(LINEAGE),
        "checkpoints": checkpoint_usage(checkpoint_root(study, settings)),
        "draws": draw_counts(trials),
        "workers": worker_seconds(study),
    }


def draw_counts(trials) -> dict[str, int]:
    """Draws of parameters over the study: accepted (a trial ran them) and rejected before
    any trial existed, for memory or as invalid configurations."""
    drawn = [t for t in trials if DRAWS_REJECTED_MEMORY in t.user_attrs]
    memory = sum(int(t.user_attrs[DRAWS_REJECTED_MEMORY]) for t in drawn)
    invalid = sum(int(t.user_attrs.get(DRAWS_REJECTED_INVALID, 0)) for t in drawn)
    return {"draws": len(drawn) + memory + invalid, "accepted": len(drawn),
            "rejected_memory": memory, "rejected_invalid": invalid}


def worker_seconds(study: optuna.Study) -> dict[str, Any]:
    """Seconds of the study's worker processes: in all, busy with trials, idle."""
    times = [v for k, v in internals.study_system_attrs(study).items()
             if k.startswith(WORKER_TIME_PREFIX) and isinstance(v, dict)]
    total = sum(float(t.get("seconds", 0)) for t in times)
    busy = sum(float(t.get("busy_s", 0)) for t in times)
    return {"workers": len(times), "seconds": round(total, 1), "busy_s": round(busy, 1),
            "idle_s": round(total - busy, 1),
            "idle_share": round((total - busy) / total, 4) if total else None}


def checkpoint_usage(root: Path) -> dict[str, Any]:
    """The study's checkpoint folder and the bytes its files take (None: not on this machine)."""
    if not root.is_dir():
        return {"path": str(root), "bytes": None}
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass  # deleted meanwhile
    return {"path": str(root), "bytes": total}


def format_status(status: dict[str, Any]) -> str:
    """Human-readable ``status``."""
    c = status["counts"]
    lines = [
        f"study {status['study']} (task {status['task']}): {c['done']}/{status['budget']} done "
        f"({c['complete']} complete, {c['pruned']} pruned), {c['running']} running, "
        f"{c['waiting']} waiting, {c['fail']} failed",
    ]
    from cnn_mellin.optim.stage import lineage_lines

    lines.extend(lineage_lines(status.get("lineage")))
    disk = status.get("checkpoints")
    if disk:
        used = "not on this machine" if disk["bytes"] is None else format_bytes(disk["bytes"])
        lines.append(f"checkpoints: {used} in {disk['path']}")
    draws = status.get("draws")
    if draws and draws["draws"]:
        lines.append(f"draws: {draws['draws']} ({draws['accepted']} ran, "
                     f"{draws['rejected_memory']} rejected over the memory limit, "
                     f"{draws['rejected_invalid']} invalid; rejected draws are not trials)")
    workers = status.get("workers")
    if workers and workers["seconds"]:
        lines.append(f"workers: {workers['workers']}, {workers['seconds']:.0f} worker-seconds, "
                     f"{workers['idle_s']:.0f} idle ({workers['idle_share']:.1%})")
    best = status["best"]
    if best is None:
        lines.append("best: none yet")
    else:
        lines.append(f"best: trial {best['number']}, value {best['value']:.6g}")
        lines.extend(f"  {name} = {value}" for name, value in best["params"].items())
    if status["running"]:
        lines.append("running:")
        for r in status["running"]:
            age = "?" if r["age_s"] is None else f"{r['age_s']:.0f} s"
            where = f"{r['host']}:{r['pid']} {r['device'] or ''}".strip() if r["host"] else "?"
            retry = f", retry of {r['retry_of']}" if r["retry_of"] is not None else ""
            lines.append(f"  trial {r['number']}: {age} on {where}, "
                         f"{r['epochs_reported']} epochs reported{retry}")
    if status["failures"]:
        lines.append("failed:")
        lines.extend(f"  trial {f['number']}: {f['reason']}" for f in status["failures"])
    if status["pruned"]:
        kinds = ", ".join(f"{n} {k}" for k, n in status["prune_kinds"].items())
        lines.append(f"pruned ({kinds}):")
        lines.extend(f"  trial {p['number']}: {p['reason']}" for p in status["pruned"])
    return "\n".join(lines) + "\n"


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, sort_keys=False, default=str) + "\n"
