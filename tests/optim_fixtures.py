"""Database fixtures of the optim tests (loaded with ``pytest_plugins``).

Each creates a uniquely named database on the local PostgreSQL / MariaDB server and
drops it afterwards; they skip (with the reason) only when the server cannot be reached.
"""

from __future__ import annotations

import uuid

import pytest

from tests.optim_helpers import _my_admin, _pg_admin, my_kill, pg_terminate


@pytest.fixture
def pg_db():
    """(url, database name) of a fresh PostgreSQL database."""
    conn = _pg_admin()
    name = f"cm_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f'create database "{name}"')
    yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}", name
    pg_terminate(name)
    with conn.cursor() as cur:
        cur.execute(f'drop database if exists "{name}"')
    conn.close()


@pytest.fixture
def my_db():
    """(url, database name) of a fresh MariaDB database."""
    conn = _my_admin()
    name = f"cm_test_{uuid.uuid4().hex[:12]}"
    with conn.cursor() as cur:
        cur.execute(f"create database `{name}`")
    yield f"mysql+pymysql://root@127.0.0.1:3306/{name}", name
    my_kill(name)
    with conn.cursor() as cur:
        cur.execute(f"drop database if exists `{name}`")
    conn.close()


STORAGES = ["journal", "sqlite", "postgresql", "mariadb"]


@pytest.fixture(params=STORAGES)
def any_url(request, tmp_path):
    """A fresh study storage URL of each kind."""
    kind = request.param
    if kind == "journal":
        return str(tmp_path / "studies.journal")
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    if kind == "postgresql":
        return request.getfixturevalue("pg_db")[0]
    return request.getfixturevalue("my_db")[0]
