"""``DB_URL`` → Optuna storage: shared SQL databases or the embedded journal file.

Accepted URLs:

- ``postgresql+psycopg2://...``, ``mysql+pymysql://...`` (``?read_default_file=~/.my.cnf``
  works), ``mariadb+pymysql://...``, ``sqlite:///PATH``: Optuna's ``RDBStorage`` with a
  liveness check on every connection checkout (dropped or idle-killed connections are
  replaced instead of failing the next query). SQLite transactions start with
  ``BEGIN IMMEDIATE`` and wait up to a minute for the file lock, so several workers do
  not deadlock or report "database is locked".
- A file path (anything without ``://``), or the literal ``default`` meaning
  :data:`DEFAULT_JOURNAL`: Optuna's ``JournalStorage`` on a ``JournalFileBackend``, the
  embedded store for one machine. The same path works as ``optuna ... --storage PATH``.
- ``grpc://HOST:PORT``: Optuna's ``GrpcStorageProxy`` talking to a storage proxy
  (``cnn-mellin optim DB_URL serve``, :mod:`cnn_mellin.optim.serve`) that holds the
  connections to a PostgreSQL or MySQL database for hundreds of workers.

Workers wrap their SQL or proxy storage in :class:`OutageTolerantStorage`, which rides out
a lost connection for at most ``max_outage_s``. Passwords are never shown:
:func:`display_url` is what messages use.

One module per job, as Optuna's own ``storages``: :mod:`.urls` (parsing and showing a
``DB_URL``), :mod:`.create` (creating a missing database), :mod:`.rdb` (SQL databases,
:class:`StudyDatabase`), :mod:`.proxy` (the proxy's client), :mod:`.journal` (the journal
file), :mod:`.studies` (the studies in a storage), :mod:`.outage` (riding out outages) and
:mod:`.errors`; :func:`open_storage`, here, picks between them.
"""

from __future__ import annotations

from optuna.storages import BaseStorage

from cnn_mellin.optim import internals
from cnn_mellin.optim.storage.create import ensure_database
from cnn_mellin.optim.storage.errors import DatabaseUnreachable, StorageError, short_reason
from cnn_mellin.optim.storage.journal import is_journal, open_journal
from cnn_mellin.optim.storage.outage import (
    RETRY_PAUSE_MAX_S,
    OutageTolerantStorage,
    connection_loss,
    outage_recoveries,
)
from cnn_mellin.optim.storage.proxy import PROXY_READY_S, open_proxy
from cnn_mellin.optim.storage.rdb import POOL_OVERFLOW, POOL_SIZE, StudyDatabase, open_database
from cnn_mellin.optim.storage.studies import load_study, study_names
from cnn_mellin.optim.storage.urls import DEFAULT_JOURNAL, StorageSpec, display_url, parse_url

__all__ = [
    "DEFAULT_JOURNAL", "POOL_OVERFLOW", "POOL_SIZE", "PROXY_READY_S", "RETRY_PAUSE_MAX_S",
    "DatabaseUnreachable", "OutageTolerantStorage", "StorageError", "StorageSpec",
    "StudyDatabase", "connection_loss", "display_url", "ensure_database", "is_journal",
    "load_study", "open_storage", "outage_recoveries", "parse_url", "short_reason",
    "study_names",
]


def open_storage(
    db_url: str, create: bool = False, max_outage_s: float | None = None,
    connections: int | None = None,
) -> BaseStorage:
    """Open the storage ``db_url`` names.

    With ``create=False`` nothing is written: a journal file must exist and a database
    must already hold Optuna's tables (else StorageError, "no studies there"). With
    ``max_outage_s``, calls to a SQL database or a proxy ride out lost connections for that
    long (:class:`OutageTolerantStorage`). ``connections`` caps a SQL engine's pool (the
    proxy's, one per thread, whose clients retry what a lost connection failed); by default
    a process keeps one connection.
    """
    spec = parse_url(db_url)
    if spec.kind == "journal":
        return open_journal(spec, create)
    # PROXY_READY_S and StudyDatabase are read here, not in their modules, so that
    # patching them on this package takes effect
    if spec.kind == "grpc":
        storage = open_proxy(spec, PROXY_READY_S)
        if max_outage_s is not None:
            return OutageTolerantStorage(storage, spec.display, max_outage_s)
        return storage
    storage = open_database(spec, create, connections,
                            ping=max_outage_s is None and connections is None,
                            storage_class=StudyDatabase)
    if max_outage_s is not None:
        storage = OutageTolerantStorage(storage, spec.display, max_outage_s)
    return internals.cached(storage)
