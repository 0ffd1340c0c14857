"""``optim DB_URL serve``: Optuna's gRPC storage proxy in front of a study database.

Hundreds of workers cannot each hold connections to one PostgreSQL or MySQL server (their
``max_connections`` default to 100 and 151). The proxy is one process that holds a few
(one per thread, :data:`DEFAULT_THREADS`) and Optuna's cache of finished trials; workers
reach it as ``grpc://HOST:PORT`` through Optuna's ``GrpcStorageProxy`` (:class:`ProxyStorage`).

It serves Optuna's own proxy service (what ``optuna.storages.run_grpc_proxy_server`` runs,
so Optuna's ``GrpcStorageProxy`` and tools work against it) in a gRPC server of its own,
which adds two things:

- a lost database connection is answered with gRPC UNAVAILABLE, which the workers' outage
  handling retries like a lost SQL connection (Optuna's server answers UNKNOWN, a crash);
- a service of its own, ``cnn_mellin.Storage``: the trials of a study in some states, and
  what :class:`cnn_mellin.optim.storage.StudyDatabase` adds to Optuna's storage (the WAITING
  trials' ids, counts per state, a claim and several attributes in one transaction), all
  answered by the database. Optuna's proxy protocol can only
  list a study's unfinished trials, and a study's unfinished trials are its whole remaining
  budget (WAITING): listing the RUNNING ones for the heartbeat check, or the WAITING ones for
  a claim, would cost that for every worker, every time. Against Optuna's own proxy the
  client falls back to the full listing.

Optuna's RDB heartbeat (``RDBStorage(heartbeat_interval=...)``) does not cross the proxy
(``GrpcStorageProxy`` is no ``BaseHeartbeat``); cnn-mellin does not use it: its heartbeats are
trial system attributes (:mod:`cnn_mellin.optim.heartbeat`), which do.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import grpc
import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, GrpcStorageProxy
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.files import write_text_atomic
from cnn_mellin.optim import internals
from cnn_mellin.optim.defaults import PROXY_PORT, PROXY_THREADS
from cnn_mellin.optim.storage import (
    StorageError,
    connection_loss,
    ensure_database,
    open_storage,
    parse_url,
    short_reason,
)

_log = logging.getLogger("cnn_mellin.optim")

DEFAULT_HOST = "localhost"
DEFAULT_PORT = PROXY_PORT
DEFAULT_THREADS = PROXY_THREADS  # each with at most one database connection
_SERVICE = "cnn_mellin.Storage"
_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class _Backend:
    """What the proxy serves: Optuna's cache over the database, which however knows only the
    trials it has listed or created, and refuses to set a parameter of any other; claims
    come from a query of their own, and the trials of a study created before the proxy
    started are not listed first. Such a parameter goes to the database itself."""

    def __init__(self, cached: BaseStorage):
        self._cached = cached
        self._database = internals.uncached(cached)

    def __getattr__(self, name: str):
        return getattr(self._cached, name)

    def set_trial_param(self, trial_id, param_name, param_value_internal, distribution):
        try:
            self._cached.set_trial_param(trial_id, param_name, param_value_internal,
                                         distribution)
        except KeyError:  # unknown to the cache (or no such trial: the database says so)
            self._database.set_trial_param(trial_id, param_name, param_value_internal,
                                           distribution)


class _DatabaseLost(grpc.ServerInterceptor):
    """Answers a call that lost the database with UNAVAILABLE (the client retries it)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        def behaviour(request, context):
            try:
                return inner(request, context)
            except Exception as err:
                lost = connection_loss(err)
                if lost is None:
                    raise
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"the proxy lost its database: {short_reason(lost)}")

        return grpc.unary_unary_rpc_method_handler(
            behaviour, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _own_service(backend: BaseStorage) -> grpc.GenericRpcHandler:
    """The light queries of :class:`cnn_mellin.optim.storage.StudyDatabase`, and listings
    filtered by state, all answered by the database (not through the cache)."""
    database = internals.uncached(backend)

    def trials_in_states(request: dict, context) -> list[FrozenTrial]:
        states = tuple(TrialState[name] for name in request["states"])
        try:
            return database.get_all_trials(request["study_id"], deepcopy=False, states=states)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no study {request['study_id']}")

    def waiting_brief(request: dict, _context) -> list:
        return database.waiting_brief(request["study_id"], request["user_key"])

    def state_counts(request: dict, _context) -> dict:
        return {state.name: n for state, n in database.state_counts(request["study_id"]).items()}

    def running_brief(request: dict, _context) -> list:
        return [[trial_id, number, start and start.isoformat(), user, system]
                for trial_id, number, start, user, system in database.running_brief(
                    request["study_id"], request["user_key"], request["system_key"])]

    def claim_waiting(request: dict, context) -> list[FrozenTrial]:
        try:
            trial = database.claim_waiting(request["trial_id"], request["user_attrs"])
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no trial {request['trial_id']}")
        return [] if trial is None else [trial]

    def set_trial_user_attrs(request: dict, context) -> dict:
        try:
            database.set_trial_user_attrs(request["trial_id"], request["attrs"])
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no trial {request['trial_id']}")
        except UpdateFinishedTrialError as err:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        return {}

    def method(function, serializer=_to_json):
        return grpc.unary_unary_rpc_method_handler(
            function, request_deserializer=json.loads, response_serializer=serializer)

    return grpc.method_handlers_generic_handler(_SERVICE, {
        "TrialsInStates": method(trials_in_states, internals.trials_to_bytes),
        "WaitingBrief": method(waiting_brief),
        "StateCounts": method(state_counts),
        "RunningBrief": method(running_brief),
        "ClaimWaiting": method(claim_waiting, internals.trials_to_bytes),
        "SetTrialUserAttrs": method(set_trial_user_attrs),
    })


def _to_json(value) -> bytes:
    return json.dumps(value).encode()


class ProxyStorage(GrpcStorageProxy):
    """Optuna's ``GrpcStorageProxy`` with the calls of the proxy's own service (see the
    module doc); against Optuna's own proxy server they fall back to listing all trials."""

    def _setup(self) -> None:
        super()._setup()
        channel = internals.proxy_channel(self)
        self._own = {
            name: channel.unary_unary(f"/{_SERVICE}/{name}", request_serializer=_to_json,
                                      response_deserializer=decode)
            for name, decode in (("TrialsInStates", internals.trials_from_bytes),
                                 ("WaitingBrief", json.loads), ("StateCounts", json.loads),
                                 ("RunningBrief", json.loads),
                                 ("ClaimWaiting", internals.trials_from_bytes),
                                 ("SetTrialUserAttrs", json.loads))
        }
        self._extended = True  # False once the server turned out to be Optuna's own

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_own"]
        return state

    def _ask(self, name: str, request: dict):
        """The answer of the proxy's own service, or None from Optuna's plain proxy."""
        if not self._extended:
            return None
        try:
            return self._own[name](request)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise KeyError(request.get("study_id", request.get("trial_id"))) from err
            if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise UpdateFinishedTrialError(err.details()) from err
            if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        _log.info("the storage proxy is Optuna's own server: listing all trials instead of "
                  "asking the database for some")
        self._extended = False
        return None

    def trials_in_states(
        self, study_id: int, states: Container[TrialState]
    ) -> list[FrozenTrial]:
        """The study's trials in ``states``, filtered by the database behind the proxy."""
        trials = self._ask("TrialsInStates",
                           {"study_id": study_id, "states": [s.name for s in states]})
        if trials is None:
            trials = self.get_all_trials(study_id, deepcopy=False, states=states)
        return trials

    def waiting_brief(self, study_id: int, user_key: str) -> list[tuple[int, int, bool, bool]]:
        """See :meth:`cnn_mellin.optim.storage.StudyDatabase.waiting_brief`."""
        rows = self._ask("WaitingBrief", {"study_id": study_id, "user_key": user_key})
        if rows is None:
            rows = [(internals.trial_id(t), t.number, user_key in t.user_attrs,
                     bool(internals.fixed_params(t)))
                    for t in self.trials_in_states(study_id, (TrialState.WAITING,))]
        return [tuple(row) for row in rows]

    def running_brief(self, study_id: int, user_key: str, system_key: str) -> list[tuple]:
        """See :meth:`cnn_mellin.optim.storage.StudyDatabase.running_brief`."""
        rows = self._ask("RunningBrief", {"study_id": study_id, "user_key": user_key,
                                          "system_key": system_key})
        if rows is None:
            return [(internals.trial_id(t), t.number, t.datetime_start,
                     t.user_attrs.get(user_key), t.system_attrs.get(system_key))
                    for t in self.trials_in_states(study_id, (TrialState.RUNNING,))]
        return [(trial_id, number, start and datetime.fromisoformat(start), user, system)
                for trial_id, number, start, user, system in rows]

    def claim_waiting(self, trial_id: int, user_attrs: dict) -> FrozenTrial | None:
        """See :meth:`cnn_mellin.optim.storage.StudyDatabase.claim_waiting`."""
        trials = self._ask("ClaimWaiting", {"trial_id": trial_id, "user_attrs": user_attrs})
        if trials is None:
            if not self.set_trial_state_values(trial_id, TrialState.RUNNING):
                return None
            for key, value in user_attrs.items():
                self.set_trial_user_attr(trial_id, key, value)
            return self.get_trial(trial_id)
        return trials[0] if trials else None

    def set_trial_user_attrs(self, trial_id: int, attrs: dict) -> None:
        """Several user attributes of a trial, in one transaction."""
        if self._ask("SetTrialUserAttrs", {"trial_id": trial_id, "attrs": attrs}) is None:
            for key, value in attrs.items():
                self.set_trial_user_attr(trial_id, key, value)

    def state_counts(self, study_id: int) -> dict[TrialState, int]:
        """Trials of the study per state."""
        counts = self._ask("StateCounts", {"study_id": study_id})
        if counts is None:
            trials = self.get_all_trials(study_id, deepcopy=False)
            return {state: sum(t.state == state for t in trials) for state in TrialState}
        return {TrialState[name]: n for name, n in counts.items()}


def advertised(host: str, port: int) -> str:
    """The ``grpc://`` URL workers use to reach a proxy listening on ``host``."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.getfqdn()
    return f"grpc://{host}:{port}"


def _write_address(path: Path, url: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, url + "\n")


class Proxy:
    """A running storage proxy: ``url`` is its address, :meth:`stop` ends it."""

    def __init__(self, server: grpc.Server, url: str, storage: BaseStorage):
        self.server = server
        self.url = url
        self.storage = storage

    def stop(self, grace_s: float = 2.0) -> None:
        self.server.stop(grace_s).wait()


def start(
    db_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
    threads: int = DEFAULT_THREADS,
) -> Proxy:
    """Start a proxy for ``db_url`` (creating the database and Optuna's tables if the server
    lacks them) on ``host``:``port`` (0: any free port) in this process's background."""
    spec = parse_url(db_url)
    if spec.kind != "rdb" or db_url.startswith("sqlite"):
        raise StorageError(
            f"serve fronts a PostgreSQL or MySQL/MariaDB database, not {spec.display}")
    if threads < 1:
        raise StorageError(f"--threads must be at least 1, got {threads}")
    if not 0 <= port <= 65535:
        raise StorageError(f"--port must be 0 to 65535, got {port}")
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cnn-mellin-proxy"),
        interceptors=[_DatabaseLost()], options=_OPTIONS,
    )
    try:  # first: a port in use must not leave a database created for nothing
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as err:
        bound = 0
        reason = f": {err}"
    else:
        reason = ""
    if not bound:
        raise StorageError(f"cannot listen on {host}:{port}{reason or ' (in use?)'}")
    created = ensure_database(db_url)
    if created:
        _log.info("created database %s (%s)", created, spec.display)
    storage = open_storage(db_url, create=True, connections=threads)
    internals.add_proxy_service(server, _Backend(storage))
    server.add_generic_rpc_handlers((_own_service(storage),))
    server.start()
    return Proxy(server, advertised(host, bound), storage)


def serve(
    db_url: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
    threads: int = DEFAULT_THREADS, address_file: str | None = None,
    on_ready: Callable[[Proxy], None] | None = None,
) -> int:
    """Run a proxy for ``db_url`` until SIGTERM or SIGINT; returns the exit code.

    ``address_file`` receives its ``grpc://`` URL once it listens (written atomically,
    removed when it stops), for workers to find it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    proxy = start(db_url, host, port, threads)
    stopping = threading.Event()

    def stop(signum, _frame):
        _log.info("%s: stopping the storage proxy", signal.Signals(signum).name)
        stopping.set()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    written = Path(address_file) if address_file else None
    try:
        if written is not None:
            _write_address(written, proxy.url)
        _log.info("storage proxy for %s at %s (%d threads, at most %d database connections)",
                  parse_url(db_url).display, proxy.url, threads, threads)
        if on_ready is not None:
            on_ready(proxy)
        while not stopping.wait(1.0):
            pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if written is not None:
            written.unlink(missing_ok=True)
        proxy.stop()
    return 0
