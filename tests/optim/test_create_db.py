"""``init`` creates the MySQL/PostgreSQL database when the server has none of that name."""

from __future__ import annotations

import uuid

import pytest

from cnn_mellin.optim.storage import display_url
from tests.optim_helpers import FAKE_TASK, _my_admin, _pg_admin, load, states

pytestmark = pytest.mark.db


@pytest.fixture
def pg_name():
    name = f"cm_new_{uuid.uuid4().hex[:12]}"
    yield name
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute("select pg_terminate_backend(pid) from pg_stat_activity where datname = %s",
                    (name,))
        cur.execute(f'drop database if exists "{name}"')
    conn.close()


@pytest.fixture
def my_name():
    name = f"cm_new_{uuid.uuid4().hex[:12]}"
    yield name
    conn = _my_admin()
    with conn.cursor() as cur:
        cur.execute(f"drop database if exists `{name}`")
    conn.close()


def _init(cli, url, tmp_path, *extra):
    (tmp_path / "data").mkdir(exist_ok=True)
    return cli("--read-ini", tmp_path / "base.ini", "optim", "--study-name", "s", url, "init",
               tmp_path / "data", "--task", FAKE_TASK, "--whitelist", "training.learning_rate",
               "--num-trials", "2", "--checkpoint-dir", tmp_path / "ckpt", *extra)


@pytest.fixture(autouse=True)
def _ini(tmp_path):
    (tmp_path / "base.ini").write_text("[training]\nnum_epochs = 1\n")


def test_postgresql_database_is_created_once(cli, pg_name, tmp_path):
    url = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{pg_name}"
    code, out, err = _init(cli, url, tmp_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"created database {pg_name} ({url})"
    assert sum(line.startswith("created database") for line in lines) == 1
    assert states(load(url, "s")) == {"WAITING": 2}
    code, out, _ = _init(cli, url, tmp_path)
    assert code == 0 and "created database" not in out


def test_recipe_drop_database_then_init_through_my_cnf(cli, my_name, tmp_path):
    cnf = tmp_path / ".my.cnf"
    cnf.write_text("[client]\nuser=root\npassword=\nhost=127.0.0.1\nport=3306\n")
    url = f"mysql+pymysql:///{my_name}?read_default_file={cnf}"
    conn = _my_admin()
    with conn.cursor() as cur:  # the recipe's two mysql calls
        cur.execute(f"create database if not exists `{my_name}`")
        cur.execute(f"drop database `{my_name}`")
    conn.close()
    code, out, err = _init(cli, url, tmp_path)
    assert code == 0, err
    assert out.splitlines()[0] == f"created database {my_name} ({display_url(url)})"
    assert states(load(url, "s")) == {"WAITING": 2}


def test_postgresql_user_without_createdb_is_a_one_line_error(cli, pg_name, tmp_path):
    role = f"cm_role_{uuid.uuid4().hex[:8]}"
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute(f'create role "{role}" login nocreatedb')
    try:
        url = f"postgresql+psycopg2://{role}:secret@127.0.0.1:5432/{pg_name}"
        code, out, err = _init(cli, url, tmp_path)
        assert code == 2 and err.count("\n") == 1 and not out, err
        assert f"database '{pg_name}' does not exist" in err and "could not be created" in err
        assert "permission denied" in err and "secret" not in err
    finally:
        with conn.cursor() as cur:
            cur.execute(f'drop role "{role}"')
        conn.close()


def test_mysql_user_without_create_privilege_is_a_one_line_error(cli, my_name, tmp_path):
    user = f"cm_user_{uuid.uuid4().hex[:8]}"
    conn = _my_admin()
    with conn.cursor() as cur:
        cur.execute(f"create user '{user}'@'%' identified by 'pw'")
    try:
        url = f"mysql+pymysql://{user}:pw@127.0.0.1:3306/{my_name}"
        code, out, err = _init(cli, url, tmp_path)
        assert code == 2 and err.count("\n") == 1 and not out, err
        # MySQL does not tell a user without privileges whether the database exists
        assert "Access denied" in err and my_name in err and ":pw@" not in err
    finally:
        with conn.cursor() as cur:
            cur.execute(f"drop user '{user}'@'%'")
        conn.close()
