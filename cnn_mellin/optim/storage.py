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

A process keeps few connections to a SQL server: a worker uses at most two at once (its
loop and its heartbeat thread), so its pool keeps one and may open one more
(:data:`POOL_SIZE`, :data:`POOL_OVERFLOW`); a server's ``max_connections`` must exceed about
twice the number of workers, or they go through the proxy, which holds one per thread.

Workers wrap their SQL or proxy storage in :class:`OutageTolerantStorage`: a call that
fails because the connection to the server (or to the proxy, or the proxy's to its
database) was lost is retried until it is back (a database restart does not kill a pool of
workers), for at most ``max_outage_s``.

Passwords are never shown: :func:`display_url` is what messages use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage

from cnn_mellin.errors import UserError
from cnn_mellin.optim import internals

DEFAULT_JOURNAL = Path("exp") / "optim" / "studies.journal"
_RDB_DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite")
_ALLOWED = (
    "postgresql+psycopg2://USER@HOST/DB, mysql+pymysql://USER@HOST/DB "
    "(or mysql+pymysql:///DB?read_default_file=~/.my.cnf), sqlite:///PATH, "
    "grpc://HOST:PORT (a storage proxy: 'optim DB_URL serve'), a journal file path, "
    "or 'default'"
)
# connections a process keeps to a SQL server, and how many more it may open at once:
# a worker's loop and its heartbeat thread each hold one only for the length of a query
POOL_SIZE = 1
POOL_OVERFLOW = 1
PROXY_READY_S = 10.0  # how long opening grpc://HOST:PORT waits for the proxy to answer
_SQLITE_LOCK_TIMEOUT_S = 60
# the longest pause between a worker's retries: short, so that every worker is back within
# seconds of the server (observers wait that much longer after an outage, see heartbeat)
RETRY_PAUSE_MAX_S = 5.0

_log = logging.getLogger("cnn_mellin.optim")


class StorageError(UserError):
    """The database cannot be used: bad URL, unreachable server, no studies there."""


class DatabaseUnreachable(StorageError):
    """A worker lost its database for longer than it may wait."""


@dataclass(frozen=True)
class StorageSpec:
    """A parsed ``DB_URL``: ``kind`` is ``"rdb"``, ``"journal"`` or ``"grpc"`` (a proxy at
    ``host``:``port``)."""

    url: str
    kind: str
    display: str
    path: Path | None = None
    host: str = ""
    port: int = 0


def display_url(db_url: str) -> str:
    """``db_url`` with any password replaced by ``***``."""
    if "://" not in db_url:
        return db_url
    try:
        from sqlalchemy.engine import make_url

        return make_url(db_url).render_as_string(hide_password=True)
    except Exception:  # unparsable: hide everything between "//" and "@"
        scheme, _, rest = db_url.partition("://")
        if "@" in rest:
            rest = "***@" + rest.split("@", 1)[1]
        return f"{scheme}://{rest}"


def parse_url(db_url: str) -> StorageSpec:
    """Check ``db_url`` and say what kind of storage it names; raises StorageError."""
    if not db_url or not db_url.strip():
        raise StorageError(f"empty database URL; allowed: {_ALLOWED}")
    if "://" not in db_url:
        path = DEFAULT_JOURNAL if db_url == "default" else Path(db_url).expanduser()
        if path.is_dir():
            raise StorageError(f"{db_url} is a directory, not a journal file; allowed: {_ALLOWED}")
        return StorageSpec(db_url, "journal", str(path), path)
    if db_url.split("://", 1)[0].lower() == "grpc":
        return _parse_proxy_url(db_url)
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(db_url)
    except (ArgumentError, ValueError):
        raise StorageError(
            f"cannot parse database URL {display_url(db_url)}; allowed: {_ALLOWED}"
        ) from None
    if url.get_backend_name() not in _RDB_DIALECTS:
        raise StorageError(
            f"unsupported database {url.get_backend_name()!r} in {display_url(db_url)}; "
            f"allowed: {_ALLOWED}"
        )
    return StorageSpec(db_url, "rdb", display_url(db_url))


def _parse_proxy_url(db_url: str) -> StorageSpec:
    from urllib.parse import urlsplit

    usage = f"expected grpc://HOST:PORT, got {display_url(db_url)}"
    try:
        parts = urlsplit(db_url)
        port = parts.port
    except ValueError:
        raise StorageError(f"bad port in {display_url(db_url)}; {usage}") from None
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.query \
            or parts.username:
        raise StorageError(usage)
    return StorageSpec(db_url, "grpc", f"grpc://{parts.hostname}:{port}", host=parts.hostname,
                       port=port)


def _expand_query_paths(db_url: str) -> str:
    """Expand ``~`` in ``read_default_file`` (pymysql reads the path as given)."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    default_file = url.query.get("read_default_file")
    if isinstance(default_file, str) and default_file.startswith("~"):
        url = url.update_query_dict({"read_default_file": os.path.expanduser(default_file)})
        return url.render_as_string(hide_password=False)
    return db_url


def _engine_kwargs(db_url: str, connections: int | None = None, ping: bool = True) -> dict:
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


def _short_reason(err: BaseException) -> str:
    details = getattr(err, "details", None)
    if callable(details):  # a gRPC error: its str() is a multi-line debug dump
        try:
            return " ".join(str(details() or err.code().name).split())[:300]
        except Exception:  # noqa: BLE001 - not a grpc.RpcError after all
            pass
    orig = getattr(err, "orig", None) or err
    text = " ".join(str(orig).split())
    for cut in (" (Background on this error", " [SQL:"):
        text = text.split(cut)[0]
    return text[:300]


def _has_optuna_tables(db_url: str, display: str) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(db_url, **_engine_kwargs(db_url))
    try:
        with engine.connect() as connection:
            return sqlalchemy.inspect(connection).has_table("studies")
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StorageError(f"cannot connect to {display}: {_short_reason(err)}") from None
    except ImportError as err:
        raise StorageError(f"no database driver for {display}: {err}") from None
    finally:
        engine.dispose()


def _missing_database(err: BaseException) -> bool:
    text = str(getattr(err, "orig", None) or err)
    return ("does not exist" in text and "database" in text) or "Unknown database" in text \
        or "(1049," in text


def ensure_database(db_url: str) -> str | None:
    """Create the PostgreSQL/MySQL database ``db_url`` names if the server has none by that
    name; returns its name if it was created, else None (it exists, or not a server URL).

    The recipe drops its database right before ``init``. Raises StorageError (one line) when
    the server cannot be reached or the user may not create databases.
    """
    spec = parse_url(db_url)
    if spec.kind != "rdb" or db_url.startswith("sqlite"):
        return None
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(_expand_query_paths(db_url))
    name = url.database
    if not name:
        return None
    engine = sqlalchemy.create_engine(url, **_engine_kwargs(db_url))
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as err:
        if not _missing_database(err):
            raise StorageError(f"cannot connect to {spec.display}: {_short_reason(err)}") from None
    except ImportError as err:
        raise StorageError(f"no database driver for {spec.display}: {err}") from None
    finally:
        engine.dispose()
    postgres = url.get_backend_name() == "postgresql"
    server = url.set(database="postgres" if postgres else "")  # "": no database
    quoted = '"' + name.replace('"', '""') + '"' if postgres else \
        "`" + name.replace("`", "``") + "`"
    engine = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {quoted}")
    except sqlalchemy.exc.SQLAlchemyError as err:
        if "already exists" in str(err) or "(1007," in str(err):
            return None  # a concurrent init made it
        raise StorageError(
            f"database {name!r} does not exist on {spec.display} and could not be created: "
            f"{_short_reason(err)}"
        ) from None
    finally:
        engine.dispose()
    return name


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
        return _open_journal(spec, create)
    if spec.kind == "grpc":
        return _open_proxy(spec, max_outage_s)
    url = _expand_query_paths(db_url)
    if not create and not _has_optuna_tables(url, spec.display):
        raise StorageError(f"no Optuna studies in {spec.display} (run 'optim ... init' first)")
    import sqlalchemy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = StudyDatabase(url, engine_kwargs=_engine_kwargs(
                url, connections, ping=max_outage_s is None and connections is None))
            if create:
                internals.ensure_state_index(storage.engine)
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise StorageError(f"cannot connect to {spec.display}: {_short_reason(err)}") from None
    except optuna.exceptions.StorageInternalError as err:  # the server went away mid-setup
        reason = _short_reason(err.__cause__ or err)
        raise StorageError(f"cannot connect to {spec.display}: {reason}") from None
    except (ImportError, ModuleNotFoundError) as err:
        raise StorageError(f"no database driver for {spec.display}: {err}") from None
    except RuntimeError as err:  # Optuna's schema-version check
        raise StorageError(f"{spec.display}: {_short_reason(err)}") from None
    if url.startswith("sqlite"):
        _harden_sqlite(storage.engine)
    if max_outage_s is not None:
        storage = OutageTolerantStorage(storage, spec.display, max_outage_s)
    return internals.cached(storage)


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


def _open_proxy(spec: StorageSpec, max_outage_s: float | None) -> BaseStorage:
    """A client of the storage proxy at ``spec`` (waits up to :data:`PROXY_READY_S` for it)."""
    try:
        from cnn_mellin.optim.serve import ProxyStorage
    except ImportError as err:
        raise StorageError(f"{spec.display} needs the grpcio and protobuf packages ({err}): "
                           "pip install grpcio protobuf") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = ProxyStorage(host=spec.host, port=spec.port)
    try:
        storage.wait_server_ready(timeout=PROXY_READY_S)
    except ConnectionError:
        storage.close()
        raise StorageError(
            f"cannot connect to {spec.display}: no storage proxy answered within "
            f"{PROXY_READY_S:g} s (start one with 'cnn-mellin optim DB_URL serve')"
        ) from None
    if max_outage_s is not None:
        return OutageTolerantStorage(storage, spec.display, max_outage_s)
    return storage


def _open_journal(spec: StorageSpec, create: bool) -> BaseStorage:
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


def _proxy_unavailable(err: BaseException) -> bool:
    """Whether ``err`` is a gRPC call that failed with UNAVAILABLE: the proxy is down or
    restarting, or it lost its database (:mod:`cnn_mellin.optim.serve` says so that way)."""
    code = getattr(err, "code", None)
    if not callable(code) or not type(err).__module__.startswith("grpc"):
        return False
    try:
        return code().name == "UNAVAILABLE"
    except Exception:  # noqa: BLE001 - an error object without a status
        return False


def connection_loss(err: BaseException) -> BaseException | None:
    """The error in ``err``'s chain saying the database could not be reached, or None.

    Lost or refused connections, server restarts, and the lock timeouts and deadlocks
    that roll a transaction back are all ``OperationalError`` in SQLAlchemy (Optuna wraps
    them in ``StorageInternalError``); the failed transaction was rolled back, so the call
    can be made again. Through the storage proxy the same is a gRPC UNAVAILABLE.
    """
    from sqlalchemy import exc

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _proxy_unavailable(err):
            return err
        if isinstance(err, exc.DBAPIError) and (
            err.connection_invalidated or isinstance(err, (exc.OperationalError,
                                                          exc.InterfaceError))
        ):
            return err
        err = err.__cause__ or err.__context__
    return None


class OutageTolerantStorage:
    """A storage (Optuna's ``RDBStorage``) whose calls ride out a lost database connection.

    A call failing with a :func:`connection_loss` is made again after a pause (doubling
    up to a few seconds) until it succeeds or the outage has lasted ``max_outage_s``,
    which raises :class:`DatabaseUnreachable`. ``recoveries`` counts the outages survived: an
    observer that could not look at the database meanwhile must not judge other workers
    by heartbeats it missed (see :class:`cnn_mellin.optim.heartbeat.StaleWatch`).
    Any other error passes through at once.
    """

    def __init__(self, storage: BaseStorage, display: str, max_outage_s: float,
                 sleep=time.sleep):
        self._storage = storage
        self._display = display
        self._max_outage_s = max_outage_s
        self._sleep = sleep
        self._lock = threading.Lock()
        self._gave_up_since: float | None = None  # start of the outage this gave up on
        self.recoveries = 0

    def __getattr__(self, name: str):
        # Optuna's caching layer also calls the private methods of the storage it wraps
        attr = getattr(self._storage, name)
        if name.startswith("__") or not callable(attr):
            return attr

        def call(*args, **kwargs):
            return self._call(attr, args, kwargs)

        return call

    def _call(self, method, args, kwargs):
        began, pause = None, 0.25
        while True:
            try:
                result = method(*args, **kwargs)
            except Exception as err:
                lost = connection_loss(err)
                if lost is None:
                    raise
                now = time.monotonic()
                if began is None:
                    began = now
                    if self._gave_up_since is None:
                        _log.warning("lost the database %s (%s); retrying for up to %g s",
                                     self._display, _short_reason(lost), self._max_outage_s)
                if self._gave_up_since is None and now - began >= self._max_outage_s:
                    self._gave_up_since = began
                if self._gave_up_since is not None:  # another thread may have given up first
                    raise DatabaseUnreachable(
                        f"database {self._display} unreachable for "
                        f"{now - self._gave_up_since:.0f} s ({_short_reason(lost)}); this "
                        "worker stops, its trial is retried by a worker that can reach the "
                        "database"
                    ) from None
                self._sleep(min(pause, self._max_outage_s - (now - began)))
                pause = min(2 * pause, RETRY_PAUSE_MAX_S)
                continue
            if began is not None or self._gave_up_since is not None:
                # back (a call that gave up meanwhile counts too: its thread was blind as well)
                with self._lock:
                    self.recoveries += 1
                    self._gave_up_since = None
                _log.warning("database %s reachable again%s", self._display,
                             f" after {time.monotonic() - began:.1f} s" if began else "")
            return result


def outage_recoveries(storage) -> int:
    """How many database outages ``storage`` rode out (0 for a plain storage)."""
    storage = internals.uncached(storage)
    return storage.recoveries if isinstance(storage, OutageTolerantStorage) else 0
