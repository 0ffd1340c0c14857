"""The studies in a storage, and loading one by name with a one-line error."""

from __future__ import annotations

import optuna
from optuna.storages import BaseStorage

from cnn_mellin.optim.storage.errors import StorageError
from cnn_mellin.optim.storage.urls import display_url


def study_names(storage: BaseStorage) -> list[str]:
    """Names of the studies in ``storage``, sorted."""
    return sorted(s.study_name for s in storage.get_all_studies())


def load_study(storage: BaseStorage, study_name: str | None, db_url: str, **kwargs):
    """``optuna.load_study`` with a one-line error naming the studies that do exist.

    ``study_name=None`` picks the only study in the storage (an error if there are several).
    """
    names = study_names(storage)
    if study_name is None:
        if len(names) == 1:
            study_name = names[0]
        elif not names:
            raise StorageError(f"no studies in {display_url(db_url)}")
        else:
            raise StorageError(
                f"{display_url(db_url)} holds several studies ({', '.join(names)}); "
                "pass --study-name"
            )
    if study_name not in names:
        there = ", ".join(names) if names else "none"
        raise StorageError(
            f"no study named {study_name!r} in {display_url(db_url)} (studies there: {there})"
        )
    return optuna.load_study(study_name=study_name, storage=storage, **kwargs)
