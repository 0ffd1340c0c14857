"""The embedded store for one machine: Optuna's ``JournalStorage`` on a journal file."""

from __future__ import annotations

from optuna.storages import BaseStorage

from cnn_mellin.optim.storage.errors import StorageError
from cnn_mellin.optim.storage.urls import StorageSpec


def open_journal(spec: StorageSpec, create: bool) -> BaseStorage:
    """The journal file ``spec`` names; with ``create=False`` it must exist."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = spec.path
    assert path is not None
    if not path.exists():
        if not create:
            raise StorageError(f"no study storage at {path} (run 'optim ... init' first)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create {path.parent}: {err.strerror}") from None
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise StorageError(f"cannot open journal {path}: {err.strerror or err}") from None
    except (ValueError, KeyError, TypeError, AssertionError) as err:
        # Optuna replays the file here; records it does not know end in an assertion
        raise StorageError(f"{path} is not an Optuna journal file: "
                           f"{err or 'unknown record'}") from None


def is_journal(storage: BaseStorage) -> bool:
    """Whether ``storage`` is the embedded journal store."""
    from optuna.storages.journal import JournalStorage

    return isinstance(storage, JournalStorage)
