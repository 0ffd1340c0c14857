"""``grpc://HOST:PORT``: a client of the storage proxy (:mod:`cnn_mellin.optim.serve`)."""

from __future__ import annotations

import warnings

import optuna

from cnn_mellin.optim.storage.errors import StorageError
from cnn_mellin.optim.storage.urls import StorageSpec

PROXY_READY_S = 10.0  # how long opening grpc://HOST:PORT waits for the proxy to answer


def open_proxy(spec: StorageSpec, ready_s: float = PROXY_READY_S):
    """A client of the storage proxy at ``spec``, once it answers (within ``ready_s``)."""
    try:
        from cnn_mellin.optim.serve import ProxyStorage
    except ImportError as err:
        raise StorageError(f"{spec.display} needs the grpcio and protobuf packages ({err}): "
                           "pip install grpcio protobuf") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = ProxyStorage(host=spec.host, port=spec.port)
    try:
        storage.wait_server_ready(timeout=ready_s)
    except ConnectionError:
        storage.close()
        raise StorageError(
            f"cannot connect to {spec.display}: no storage proxy answered within "
            f"{ready_s:g} s (start one with 'cnn-mellin optim DB_URL serve')"
        ) from None
    return storage
