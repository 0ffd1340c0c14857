"""Every use of Optuna's private API, in one file.

cnn-mellin needs a few things Optuna does not expose publicly: a study's storage and id
(to claim WAITING trials atomically and to keep system attributes), a trial's storage id,
the SQL storage under Optuna's caching wrapper, and a distribution's membership test. An
Optuna upgrade that moves them touches this module only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState


def storage(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes through."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of ``study``."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (unique across studies, unlike its number)."""
    return trial._trial_id


def cached(backend: BaseStorage) -> BaseStorage:
    """``backend`` behind Optuna's cache of finished trials (what ``RDBStorage`` users get)."""
    return optuna.storages._CachedStorage(backend)


def uncached(store: BaseStorage) -> BaseStorage:
    """The storage under Optuna's caching wrapper, or ``store`` itself."""
    if isinstance(store, optuna.storages._CachedStorage):
        return store._backend
    return store


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` lies in ``distribution`` (False for values of the wrong kind)."""
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (cnn-mellin's bookkeeping, hidden from users)."""
    return storage(study).get_study_system_attrs(study_id(study))


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set one system attribute of ``study``."""
    storage(study).set_study_system_attr(study_id(study), key, value)


def fixed_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters ``enqueue_trial`` fixed for ``trial`` (empty when the sampler draws)."""
    return trial.system_attrs.get("fixed_params") or {}


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial numbered ``number`` in ``study``; KeyError if there is none."""
    store = storage(study)
    return store.get_trial(store.get_trial_id_from_study_id_trial_number(study_id(study), number))


def trials_in(
    study: optuna.Study, states: Sequence[TrialState], *, through_cache: bool = True
) -> list[FrozenTrial]:
    """The study's trials in ``states``, filtered by the storage.

    Optuna's caching wrapper of SQL storages re-reads every unfinished trial on each
    listing; ``through_cache=False`` asks the database directly (filtered in SQL). Trials a
    worker is going to run must come through the cache, which has to know them.
    """
    store = storage(study) if through_cache else uncached(storage(study))
    return store.get_all_trials(study_id(study), deepcopy=False, states=tuple(states))
