"""Creating a study (``optim init``) and reading back what it stores.

A study's user attributes hold everything a worker needs: the full base
configuration, the searched names, the task and what it stored (its ``info``: for
``asr`` the data location and train/dev split), the memory limit, the budget, the
pruner, the heartbeat timing and the software version. ``init`` validates everything
before it writes; re-running it with the same arguments is a no-op and with different
ones an error.
The budget's trials are created at ``init`` as WAITING trials (see
:mod:`cnn_mellin.optim.budget`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from cnn_mellin import __version__
from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim import budget, internals, space
from cnn_mellin.optim.attrs import READY_KEY, UID_KEY
from cnn_mellin.optim.defaults import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_MAX_RETRIES,
    DEFAULT_NUM_TRIALS,
    PRUNERS,
)
from cnn_mellin.optim.storage import (
    display_url,
    ensure_database,
    open_storage,
    parse_url,
    study_names,
)
from cnn_mellin.tasks import Task, get_task, make_task

_log = logging.getLogger("cnn_mellin.optim")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


@dataclass(frozen=True)
class StudySettings:
    """What ``init`` stores in a study (one user attribute per field)."""

    task: str
    base_config: dict[str, Any]
    searched: list[str]
    task_info: dict[str, Any]
    num_trials: int
    mem_limit_bytes: int | None
    pruner: str
    num_data_workers: int
    checkpoint_dir: str
    heartbeat_interval: float
    heartbeat_grace: float
    max_retries: int
    dropped: dict[str, str] = field(default_factory=dict)
    max_trial_seconds: float | None = None
    max_trial_time_ratio: float | None = None
    # searched values of trials enqueued right after the base (a stage started from its
    # parent's base: the parent's best values of the kept parameters)
    also_try: list[dict[str, Any]] = field(default_factory=list)
    version: str = __version__

    # fields a repeated init may differ in without conflict
    _NOT_COMPARED = ("version",)

    def build_task(self) -> Task:
        """The study's task, built from what it stored at ``init`` (the one factory)."""
        return make_task(self.task, self.task_info)

    def config(self) -> Config:
        """The base configuration as a :class:`Config` of the task's parameter groups."""
        return self.build_task().config(self.base_config)

    def to_attrs(self) -> dict[str, Any]:
        """The study user attributes that store these settings."""
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> StudySettings:
        """Settings read back from a study's user attributes."""
        names = [f.name for f in dataclasses.fields(cls)]
        optional = ("dropped", "version", "max_trial_seconds",  # later fields: defaults
                    "max_trial_time_ratio", "also_try")
        missing = [n for n in names if n not in attrs and n not in optional]
        if missing:
            raise UserError(
                "this study was not created by 'cnn-mellin optim init' (missing: "
                + ", ".join(missing) + ")"
            )
        return cls(**{n: attrs[n] for n in names if n in attrs})

    def differences(self, other: StudySettings) -> list[str]:
        """Names of the compared fields that differ, with both values shortened."""
        diffs = []
        for f in dataclasses.fields(self):
            if f.name in self._NOT_COMPARED:
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if _normalise(mine) != _normalise(theirs):
                if f.name == "base_config":
                    keys = sorted(
                        k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                    )
                    diffs.append("base configuration (" + ", ".join(keys[:5]) + ")")
                else:
                    diffs.append(f"{f.name} (stored {_short(mine)}, given {_short(theirs)})")
        return diffs


def _normalise(value: Any) -> Any:
    """JSON round-trips turn tuples into lists; compare them alike."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class InitResult:
    """The outcome of :func:`init_study`."""

    study_name: str
    created: bool
    settings: StudySettings
    created_database: str | None = None


def default_study_name(
    data_dir: str | os.PathLike | None, read_ini: Sequence[str], task: str
) -> str:
    """The recipe's naming: ``<last --read-ini stem>-<feature>`` (task name if no .ini).

    The feature is the data dir's parent folder for ``.../<feature>/train`` layouts (none
    without a data dir).
    """
    feature = ""
    if data_dir is not None:
        path = Path(os.path.abspath(data_dir))
        feature = path.parent.name if path.name in ("train", "dev", "test") else path.name
    stem = Path(read_ini[-1]).stem if read_ini else task
    if feature and not stem.endswith("-" + feature):
        return f"{stem}-{feature}"
    return stem


def _check_options(
    num_trials: int, mem_limit_bytes: int | None, pruner: str, num_data_workers: int,
    heartbeat_interval: float, heartbeat_grace: float, max_retries: int,
) -> None:
    if num_trials < 1:
        raise ConfigError(f"--num-trials must be at least 1, got {num_trials}")
    if mem_limit_bytes is not None and mem_limit_bytes < 1:
        raise ConfigError(f"--mem-limit-bytes must be a positive integer, got {mem_limit_bytes}")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got {pruner!r}")
    if num_data_workers < 0:
        raise ConfigError(f"--num-data-workers must be 0 or more, got {num_data_workers}")
    if not heartbeat_interval > 0:
        raise ConfigError(f"--heartbeat-interval must be positive, got {heartbeat_interval}")
    if heartbeat_grace < 2 * heartbeat_interval:
        raise ConfigError(
            f"--heartbeat-grace must be at least twice the interval ({2 * heartbeat_interval}),"
            f" got {heartbeat_grace}"
        )
    if max_retries < 0:
        raise ConfigError(f"--max-retries must be 0 or more, got {max_retries}")


def build_settings(
    config: Config, data_dir: str | os.PathLike | None, *, task: str = "asr",
    task_options: Mapping[str, Any] | None = None,
    whitelist: Sequence[str] | None = None, blacklist: Sequence[str] = (),
    num_trials: int = DEFAULT_NUM_TRIALS, mem_limit_bytes: int | None = None,
    pruner: str = "hyperband", num_data_workers: int = 0,
    checkpoint_dir: str | os.PathLike, heartbeat_interval: float = DEFAULT_HEARTBEAT_S,
    heartbeat_grace: float | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
    max_trial_seconds: float | None = None, max_trial_time_ratio: float | None = None,
) -> StudySettings:
    """Validate every ``init`` argument and the data, and build the settings to store.

    ``task_options`` are the task's own options (see :attr:`Task.OPTIONS`; defaults filled
    in); ``data_dir`` is the one positional ``DATA_DIR``, which a task may not need.
    Writes nothing. Warns (logging) about each dropped parameter.
    """
    if heartbeat_grace is None:
        heartbeat_grace = 3 * heartbeat_interval
    _check_options(
        num_trials, mem_limit_bytes, pruner, num_data_workers, heartbeat_interval,
        heartbeat_grace, max_retries,
    )
    if max_trial_seconds is not None and not max_trial_seconds > 0:
        raise ConfigError(f"--max-trial-seconds must be positive, got {max_trial_seconds}")
    if max_trial_time_ratio is not None and not max_trial_time_ratio >= 1:
        raise ConfigError("--max-trial-time-ratio must be at least 1, got "
                          f"{max_trial_time_ratio}")
    if whitelist is not None and blacklist:
        raise ConfigError("give either --whitelist or --blacklist, not both")
    task_cls = get_task(task)
    options = task_cls.resolve_options({**(task_options or {}), "data_dir": data_dir})
    info = task_cls.prepare(options, config)
    task_obj = task_cls(info)
    base = dict(task_obj.config(config))
    selection = space.select(
        base, task_obj.num_coeffs, task_obj.params(), whitelist=whitelist, blacklist=blacklist
    )
    option = "--whitelist" if whitelist is not None else "--blacklist"
    for pattern in selection.unmatched:
        _log.warning("%s %r matches no parameter", option, pattern)
    for name, why in selection.dropped.items():
        _log.warning("not searching %s: %s", name, why)
    return StudySettings(
        task=task, base_config=base, searched=list(selection.names), task_info=info,
        num_trials=num_trials, mem_limit_bytes=mem_limit_bytes, pruner=pruner,
        num_data_workers=num_data_workers,
        checkpoint_dir=str(Path(os.path.abspath(checkpoint_dir))),
        heartbeat_interval=float(heartbeat_interval), heartbeat_grace=float(heartbeat_grace),
        max_retries=max_retries, dropped=dict(selection.dropped),
        max_trial_seconds=None if max_trial_seconds is None else float(max_trial_seconds),
        max_trial_time_ratio=None if max_trial_time_ratio is None
        else float(max_trial_time_ratio),
    )


def check_study_name(name: str) -> str:
    """``name`` if it is a usable study name, else ConfigError."""
    if not _NAME.match(name):
        raise ConfigError(
            f"bad study name {name!r}: use letters, digits, '.', '_', '+', '-' "
            "(at most 128, starting with a letter or digit)"
        )
    return name


def _wait_while_written(study: optuna.Study, stall_s: float) -> None:
    """Wait while another ``init`` is still writing ``study`` (until ready or stalled)."""
    last, since = None, time.monotonic()
    while not is_ready(study):
        progress = (len(study.user_attrs), len(study.get_trials(deepcopy=False)))
        if progress != last:
            last, since = progress, time.monotonic()
        elif time.monotonic() - since >= stall_s:
            return
        time.sleep(min(0.5, stall_s))


def init_study(
    db_url: str, study_name: str, settings: StudySettings, stall_s: float = 10.0
) -> InitResult:
    """Create the study with ``settings``, or check an existing one matches them.

    An existing study with the same settings is left untouched; different settings raise
    ConfigError and write nothing. A study another ``init`` is still writing is waited
    for; one whose init stopped half-way (no progress for ``stall_s``) is completed.
    """
    check_study_name(study_name)
    parse_url(db_url)
    created_database = ensure_database(db_url)
    try:
        storage = open_storage(db_url, create=False)
        exists = study_name in study_names(storage)
    except UserError as err:
        if "no Optuna studies" not in str(err) and "no study storage" not in str(err):
            raise
        exists = False
    if exists:
        study = optuna.load_study(study_name=study_name, storage=storage)
        _wait_while_written(study, stall_s)
        attrs = study.user_attrs
        ready = is_ready(study)
        if attrs:
            given = settings.to_attrs()
            partial = {k: v for k, v in attrs.items() if k in given}
            stored = StudySettings.from_attrs(attrs) if ready else replace(settings, **partial)
            diffs = stored.differences(settings)
            if diffs:
                grow = " or 'optim ... grow N' to add N trials to its budget" if any(
                    d.startswith("num_trials ") for d in diffs) else ""
                raise ConfigError(
                    f"study {study_name!r} in {display_url(db_url)} already exists with other "
                    "settings: " + "; ".join(diffs)
                    + f" (use another --study-name or the same arguments{grow})"
                )
            if ready:
                return InitResult(study_name, False, stored, created_database)
        elif study.trials or ready:
            raise ConfigError(
                f"study {study_name!r} in {display_url(db_url)} was not made by "
                "'cnn-mellin optim init'; use another --study-name"
            )
        _log.warning("completing the interrupted init of study %s", study_name)
    else:
        storage = open_storage(db_url, create=True)
        try:
            study = optuna.create_study(
                study_name=study_name, storage=storage,
                direction=settings.build_task().direction,
            )
        except optuna.exceptions.DuplicatedStudyError:
            return init_study(db_url, study_name, settings, stall_s)  # a concurrent init won
    _write(study, settings)
    return InitResult(study_name, not exists, settings, created_database)


def _write(study: optuna.Study, settings: StudySettings) -> None:
    stored = study.user_attrs
    for key, value in settings.to_attrs().items():
        if key not in stored:
            study.set_user_attr(key, value)
    budget.create_slots(study, settings.num_trials, [base_params(settings), *settings.also_try])
    # checkpoints live under a folder of this study's own: a study deleted and created again
    # under the same name (as the recipe's "drop database" does) never resumes stale ones
    if UID_KEY not in internals.study_system_attrs(study):
        internals.set_study_system_attr(study, UID_KEY, uuid.uuid4().hex[:12])
    internals.set_study_system_attr(study, READY_KEY, True)


def base_params(settings: StudySettings) -> dict[str, Any]:
    """The base configuration's values of the searched parameters that lie in their ranges."""
    distributions = space.distributions(settings.searched, settings.build_task().params())
    return {
        name: settings.base_config[name] for name, dist in distributions.items()
        if settings.base_config.get(name) is not None
        and internals.contains(dist, settings.base_config[name])
    }


def checkpoint_root(study: optuna.Study, settings: StudySettings) -> Path:
    """The folder holding this study's per-trial checkpoint folders."""
    uid = internals.study_system_attrs(study).get(UID_KEY, "")
    return Path(settings.checkpoint_dir) / uid if uid else Path(settings.checkpoint_dir)


def is_ready(study: optuna.Study) -> bool:
    """Whether ``init`` finished writing ``study``."""
    return bool(internals.study_system_attrs(study).get(READY_KEY))


def read_settings(study: optuna.Study) -> StudySettings:
    """The settings a ready study stores; UserError for foreign or half-made studies."""
    if not is_ready(study):
        if not study.user_attrs:
            raise UserError(
                f"study {study.study_name!r} was not created by 'cnn-mellin optim init'"
            )
        raise UserError(
            f"study {study.study_name!r} is incomplete (its init was interrupted); "
            "re-run the same 'optim init'"
        )
    return StudySettings.from_attrs(study.user_attrs)
