"""``optim best``: the best configuration of a study as ``.ini`` text.

Either the best trial's full configuration (base + its parameters), or with
``independent=True`` each searched parameter's value with the best median value
over completed trials, judged one parameter at a time and then repaired by the task
into a valid combination that fits the study's memory limit (the task's ``peak_memory``
on the device the best trial ran on). "Best" follows the study's direction (lowest error, or the
highest value of a metric a ``command`` study maximises).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim import space
from cnn_mellin.optim.attrs import WORKER
from cnn_mellin.optim.study import StudySettings
from cnn_mellin.tasks import Task

MAX_GROUPS = 8  # at most this many distinct values: compare values themselves
NUM_BINS = 5  # otherwise: compare this many equal-count ranges of values


def _completed(study: optuna.Study) -> list[FrozenTrial]:
    trials = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]
    if not trials:
        raise UserError(f"study {study.study_name!r} has no completed trial yet")
    return trials


def sign(study: optuna.Study) -> int:
    """+1 when lower values are better in ``study``, -1 when higher ones are."""
    return -1 if study.direction == StudyDirection.MAXIMIZE else 1


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The completed trial with the best value (lowest number on ties)."""
    s = sign(study)
    return min(_completed(study), key=lambda t: (s * t.value, t.number))


def trial_config(settings: StudySettings, trial: FrozenTrial) -> Config:
    """The full configuration a trial ran with."""
    return settings.config().replace(trial.params)


def lowest_median_value(pairs: list[tuple[Any, float]], categorical: bool) -> Any:
    """The parameter value whose trials have the lowest median error.

    ``pairs`` are (value, error); negate the values of a study that maximises.
    Few distinct values (or categorical ones) are compared
    directly; many are split into equal-count ranges, and the winning range gives its
    median value (an observed one).
    """
    distinct = {value for value, _ in pairs}
    groups: dict[int, list[tuple[Any, float]]] = defaultdict(list)
    if categorical or len(distinct) <= MAX_GROUPS:
        order = {value: i for i, value in enumerate(
            sorted(distinct, key=lambda v: (str(type(v)), v)))}
        for value, error in pairs:
            groups[order[value]].append((value, error))
    else:
        ordered = sorted(pairs, key=lambda pair: pair[0])
        for i, pair in enumerate(ordered):
            groups[i * NUM_BINS // len(ordered)].append(pair)
    key = min(
        groups,
        key=lambda g: (statistics.median(e for _, e in groups[g]), -len(groups[g]), g),
    )
    values = sorted(value for value, _ in groups[key])
    return values[(len(values) - 1) // 2]


def independent_config(study: optuna.Study, settings: StudySettings, task: Task) -> Config:
    """Each searched parameter's lowest-median-error value, repaired into a valid config
    under the study's memory limit."""
    trials = _completed(study)
    dists = space.distributions(settings.searched, task.params())
    s = sign(study)
    chosen: dict[str, Any] = {}
    for name in settings.searched:
        pairs = [(t.params[name], s * t.value) for t in trials if name in t.params]
        if pairs:
            categorical = isinstance(dists[name], CategoricalDistribution)
            chosen[name] = lowest_median_value(pairs, categorical)
    config = task.repair(settings.config().replace(chosen))
    task.check(config)
    best = best_trial(study)
    return fit_memory(config, settings, task, best.params, trial_device(best))


def trial_device(trial: FrozenTrial) -> str:
    """The device ``trial`` ran on (``cpu`` if not recorded)."""
    worker = trial.user_attrs.get(WORKER)
    return str(worker.get("device", "cpu")) if isinstance(worker, dict) else "cpu"


def fit_memory(
    config: Config, settings: StudySettings, task: Task, fallback: dict[str, Any], device: str
) -> Config:
    """``config`` brought under the study's memory limit by taking back, one at a time, the
    parameter values of ``fallback`` (the best trial's, which ran under it) that save the
    most; ``config`` itself if it fits, or if the task cannot tell its memory."""
    limit = settings.mem_limit_bytes

    def need(candidate: Config) -> int | None:
        figure = task.peak_memory(candidate, device)
        return None if figure is None else int(figure.bytes)

    left = {k: v for k, v in fallback.items() if k in config and config[k] != v}
    current = need(config) if limit is not None else None
    while current is not None and current > limit and left:
        options = []
        for name in sorted(left):
            candidate = task.repair(config.replace({name: left[name]}))
            try:
                task.check(candidate)
            except ConfigError:
                continue
            options.append((need(candidate), name, candidate))
        if not options:
            break
        current, name, config = min(options, key=lambda o: (o[0] is None, o[0] or 0, o[1]))
        del left[name]
    return config


def best_text(
    study: optuna.Study, settings: StudySettings, task: Task, independent: bool = False
) -> str:
    """The ``best`` output: a full ``.ini`` (readable with ``--read-ini``)."""
    if independent:
        config = independent_config(study, settings, task)
        header = (
            f"# study {study.study_name}: each searched parameter's value with the best "
            "median value, repaired into a valid combination\n"
        )
    else:
        trial = best_trial(study)
        config = trial_config(settings, trial)
        header = f"# study {study.study_name}: best trial {trial.number}, value {trial.value!r}\n"
    header += "".join(f"# {line}\n" for line in task.describe(config))
    return header + config.to_ini()
