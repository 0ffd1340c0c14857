"""The storage's errors, and the one-line reason a database or proxy error gives."""

from __future__ import annotations

from cnn_mellin.errors import UserError


class StorageError(UserError):
    """The database cannot be used: bad URL, unreachable server, no studies there."""


class DatabaseUnreachable(StorageError):
    """A worker lost its database for longer than it may wait."""


def short_reason(err: BaseException) -> str:
    """What went wrong in ``err``, on one line of at most 300 characters (without
    SQLAlchemy's SQL and background link, or gRPC's debug dump)."""
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
