"""``DB_URL``: which kind of storage it names, and how it is shown (never with its password)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnn_mellin.optim.storage.errors import StorageError

DEFAULT_JOURNAL = Path("exp") / "optim" / "studies.journal"
_RDB_DIALECTS = ("postgresql", "mysql", "mariadb", "sqlite")
_ALLOWED = (
    "postgresql+psycopg2://USER@HOST/DB, mysql+pymysql://USER@HOST/DB "
    "(or mysql+pymysql:///DB?read_default_file=~/.my.cnf), sqlite:///PATH, "
    "grpc://HOST:PORT (a storage proxy: 'optim DB_URL serve'), a journal file path, "
    "or 'default'"
)


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


def expand_query_paths(db_url: str) -> str:
    """Expand ``~`` in ``read_default_file`` (pymysql reads the path as given)."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    default_file = url.query.get("read_default_file")
    if isinstance(default_file, str) and default_file.startswith("~"):
        url = url.update_query_dict({"read_default_file": os.path.expanduser(default_file)})
        return url.render_as_string(hide_password=False)
    return db_url
