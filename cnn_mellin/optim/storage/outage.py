"""Riding out a lost database: :class:`OutageTolerantStorage` retries the calls that failed
because the connection to the server (or to the proxy, or the proxy's to its database) was
lost, until it is back (a database restart does not kill a pool of workers), for at most
``max_outage_s``."""

from __future__ import annotations

import logging
import threading
import time

from optuna.storages import BaseStorage

from cnn_mellin.optim import internals
from cnn_mellin.optim.storage.errors import DatabaseUnreachable, short_reason

# the longest pause between a worker's retries: short, so that every worker is back within
# seconds of the server (observers wait that much longer after an outage, see heartbeat)
RETRY_PAUSE_MAX_S = 5.0

_log = logging.getLogger("cnn_mellin.optim")


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
                                     self._display, short_reason(lost), self._max_outage_s)
                if self._gave_up_since is None and now - began >= self._max_outage_s:
                    self._gave_up_since = began
                if self._gave_up_since is not None:  # another thread may have given up first
                    raise DatabaseUnreachable(
                        f"database {self._display} unreachable for "
                        f"{now - self._gave_up_since:.0f} s ({short_reason(lost)}); this "
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
