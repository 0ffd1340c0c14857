"""Creating the PostgreSQL or MySQL database a ``DB_URL`` names when the server has none."""

from __future__ import annotations

from cnn_mellin.optim.storage.errors import StorageError, short_reason
from cnn_mellin.optim.storage.rdb import engine_kwargs
from cnn_mellin.optim.storage.urls import expand_query_paths, parse_url


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

    url = make_url(expand_query_paths(db_url))
    name = url.database
    if not name:
        return None
    engine = sqlalchemy.create_engine(url, **engine_kwargs(db_url))
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as err:
        if not _missing_database(err):
            raise StorageError(f"cannot connect to {spec.display}: {short_reason(err)}") from None
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
            f"{short_reason(err)}"
        ) from None
    finally:
        engine.dispose()
    return name
