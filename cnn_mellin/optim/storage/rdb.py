"""SQL databases: the engine's settings, and :class:`StudyDatabase`, Optuna's ``RDBStorage``
with cheaper versions of what workers do most.

A process keeps few connections to a SQL server: a worker uses at most two at once (its
loop and its heartbeat thread), so its pool keeps one and may open one more
(:data:`POOL_SIZE`, :data:`POOL_OVERFLOW`); a server's ``max_connections`` must exceed about
twice the number of workers, or they go through the proxy, which holds one per thread.
SQLite transactions start with ``BEGIN IMMEDIATE`` and wait up to a minute for the file
lock, so several workers do not deadlock or report "database is locked".
"""

from __future__ import annotations

import warnings

import optuna
from optuna.exceptions import UpdateFinishedTrialError

from cnn_mellin.optim import internals
from cnn_mellin.optim.storage.errors import StorageError, short_reason
from cnn_mellin.optim.storage.urls import StorageSpec, expand_query_paths

# connections a process keeps to a SQL server, and how many more it may open at once:
# a worker's loop and its heartbeat thread each hold one only for the length of a query
POOL_SIZE = 1
POOL_OVERFLOW = 1
_SQLITE_LOCK_TIMEOUT_S = 60


def engine_kwargs(db_url: str, connections: int | None = None, ping: bool = True) -> dict:
    """SQLAlchemy engine options; ``connections``: the most the pool may hold (one per
    thread of a proxy), else :data:`POOL_SIZE` kept and :data:`POOL_OVERFLOW` more at once.

    ``ping``: check each connection as it leaves the pool (a round trip per transaction), so
    that one the server dropped is replaced. Workers and the proxy do without: their calls
    are retried on a lost connection (:class:`OutageTolerantStorage`, the proxy's clients),
    which replaces it just as well, at no cost while it lives.
    """
    kwargs: dict = {"pool_pre_ping": ping}
    if db_url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": _SQLITE_LOCK_TIMEOUT_S}
        return kwargs
    kwargs["pool_recycle"] = 1800
    if connections is None:
        kwargs.update(pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW)
    else:
        kwargs.update(pool_size=connections, max_overflow=0)
    return kwargs


def _harden_sqlite(engine) -> None:
    """Serialise SQLite transactions with BEGIN IMMEDIATE so workers queue instead of deadlock."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # the "begin" hook emits BEGIN itself
        dbapi_connection.execute(f"PRAGMA busy_timeout = {_SQLITE_LOCK_TIMEOUT_S * 1000}")

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while Optuna set up the schema lack the hooks


def _has_optuna_tables(db_url: str, display: str) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_url, **engine_kwargs(db_url))
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StorageError(f"cannot connect to {display}: {short_reason(err)}") from None
    except ImportError as err:
        raise StorageError(f"no database driver for {display}: {err}") from None
    finally:
        engine.dispose()


class StudyDatabase(optuna.storages.RDBStorage):
    """Optuna's ``RDBStorage`` with what the workers do most, cheaper: two light queries
    that read no trial but the ones asked for (the same cost with any history), a claim and
    the results' attributes in one transaction each."""

    def waiting_brief(self, study_id: int, user_key: str) -> list[tuple[int, int, bool, bool]]:
        """(trial id, number, has user attribute ``user_key``, has fixed parameters) of the
        study's WAITING trials."""
        return internals.waiting_brief(self.engine, study_id, user_key)

    def state_counts(self, study_id: int) -> dict:
        """Trials of the study per state."""
        return internals.state_counts(self.engine, study_id)

    def running_brief(self, study_id: int, user_key: str, system_key: str) -> list[tuple]:
        """(trial id, number, start, user attribute ``user_key``, system attribute
        ``system_key``) of the study's RUNNING trials: what the dead-worker check reads."""
        return internals.running_brief(self.engine, study_id, user_key, system_key)

    def claim_waiting(self, trial_id: int, user_attrs: dict):
        """WAITING → RUNNING with ``user_attrs``, in one transaction; the trial, or None if
        it was not WAITING (see :func:`cnn_mellin.optim.internals.claim_waiting`)."""
        return internals.claim_waiting(self, trial_id, user_attrs)

    def set_trial_user_attrs(self, trial_id: int, attrs: dict) -> None:
        """Several user attributes of a trial, in one transaction."""
        internals.set_trial_user_attrs(self, trial_id, attrs)

    # Optuna's own, with plain queries: each worker makes them for every trial

    def get_trial(self, trial_id: int):
        return internals.read_trial(self.engine, trial_id)

    def check_trial_is_updatable(self, trial_id: int, trial_state) -> None:
        # Optuna's calls get_trial for its message, inside Optuna's transaction: on another
        # connection (as get_trial now is) that would wait for the transaction itself
        if trial_state.is_finished():
            raise UpdateFinishedTrialError(
                f"Trial#{internals.trial_number_here(self, trial_id)} has already finished "
                "and can not be updated.")

    def set_trial_system_attr(self, trial_id: int, key: str, value) -> None:
        internals.set_trial_user_attrs(self, trial_id, {key: value}, system=True)

    def get_study_system_attrs(self, study_id: int) -> dict:
        return internals.study_system_attrs_of(self.engine, study_id)

    def set_study_system_attr(self, study_id: int, key: str, value) -> None:
        internals.set_study_system_attr_of(self.engine, study_id, key, value)


def open_database(
    spec: StorageSpec, create: bool, connections: int | None = None, ping: bool = True,
    storage_class: type[StudyDatabase] = StudyDatabase,
) -> StudyDatabase:
    """A :class:`StudyDatabase` on the SQL database ``spec`` names (``storage_class``).

    With ``create=False`` it must already hold Optuna's tables (else StorageError, "no
    studies there"); with ``create=True`` they are made if missing. ``connections`` and
    ``ping``: see :func:`engine_kwargs`.
    """
    url = expand_query_paths(spec.url)
    if not create and not _has_optuna_tables(url, spec.display):
        raise StorageError(f"no Optuna studies in {spec.display} (run 'optim ... init' first)")
    import sqlalchemy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = storage_class(url, engine_kwargs=engine_kwargs(url, connections, ping))
            if create:
                internals.ensure_state_index(storage.engine)
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StorageError(f"cannot connect to {spec.display}: {short_reason(err)}") from None
    except optuna.exceptions.StorageInternalError as err:  # the server went away mid-setup
        reason = short_reason(err.__cause__ or err)
        raise StorageError(f"cannot connect to {spec.display}: {reason}") from None
    except (ImportError, ModuleNotFoundError) as err:
        raise StorageError(f"no database driver for {spec.display}: {err}") from None
    except RuntimeError as err:  # Optuna's schema-version check
        raise StorageError(f"{spec.display}: {short_reason(err)}") from None
    if url.startswith("sqlite"):
        _harden_sqlite(storage.engine)
    return storage
