"""What the report says about one study: counts, best trial, lineage, importances, figures."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.errors import UserError
from cnn_mellin.optim import budget
from cnn_mellin.optim.attrs import LINEAGE
from cnn_mellin.optim.importance import rank
from cnn_mellin.optim.report import figures
from cnn_mellin.optim.status import draw_counts, worker_seconds
from cnn_mellin.optim.study import StudySettings

_log = logging.getLogger("cnn_mellin.optim")


@dataclass
class StudyStory:
    """Everything the report shows about one study."""

    name: str
    slug: str  # its folder in the report (PNGs, best.ini)
    settings: StudySettings
    minimize: bool
    trials: list[FrozenTrial]
    counts: budget.Counts
    best: FrozenTrial | None
    best_ini: str | None
    lineage: dict[str, Any] | None
    importances: list[tuple[str, float]] | None
    importance_note: str | None
    charts: list[figures.Chart]
    draws: dict[str, int]  # status.draw_counts: accepted and rejected draws
    workers: dict[str, Any]  # status.worker_seconds: worker-seconds busy and idle


def slug(name: str, taken: set[str]) -> str:
    """A folder name for study ``name``, unique among ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"
    candidate, n = base, 2
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    taken.add(candidate)
    return candidate


def _best_ini(settings: StudySettings, trial: FrozenTrial) -> str | None:
    from cnn_mellin.optim.best import trial_config

    try:
        return trial_config(settings, trial).to_ini(comments=False)
    except (UserError, ImportError) as err:  # a task module gone since the study ran
        _log.warning("best trial %d: no configuration shown: %s", trial.number, err)
        return None


def _importances(
    study: optuna.Study, settings: StudySettings
) -> tuple[list[tuple[str, float]] | None, str | None]:
    try:
        return rank(study, settings), None
    except UserError as err:
        _log.warning("no importance plot for study %s: %s", study.study_name, err)
        return None, str(err)


def tell(study: optuna.Study, settings: StudySettings, folder: str) -> StudyStory:
    """Read ``study`` once and build its part of the report."""
    trials = study.get_trials(deepcopy=False)
    minimize = study.direction != StudyDirection.MAXIMIZE
    done = figures.completed(trials)
    sign = 1 if minimize else -1
    best = min(done, key=lambda t: (sign * t.value, t.number)) if done else None
    lineage = study.user_attrs.get(LINEAGE)
    importances, why_none = _importances(study, settings)
    charts = [
        figures.budget_chart(trials, settings),
        figures.history_chart(trials, minimize),
        figures.importance_chart(importances, why_none),
        figures.parallel_chart(trials, settings.searched, minimize),
        figures.curves_chart(trials),
        figures.memory_chart(trials, settings.mem_limit_bytes),
        figures.reasons_chart(trials),
        figures.timeline_chart(trials),
    ]
    return StudyStory(
        name=study.study_name, slug=folder, settings=settings, minimize=minimize,
        trials=list(trials), counts=budget.count(trials, settings.num_trials), best=best,
        best_ini=_best_ini(settings, best) if best else None,
        lineage=lineage if isinstance(lineage, dict) else None,
        importances=importances, importance_note=why_none, charts=charts,
        draws=draw_counts(trials), workers=worker_seconds(study),
    )


def ended(story: StudyStory) -> list[FrozenTrial]:
    """The study's pruned and failed trials, by number."""
    return sorted((t for t in story.trials if t.state in (TrialState.PRUNED, TrialState.FAIL)),
                  key=lambda t: t.number)
