"""DB_URL parsing, password-free display, opening without writing, reconnects."""

from __future__ import annotations

import optuna
import pytest

from cnn_mellin.optim.storage import (
    DEFAULT_JOURNAL,
    StorageError,
    display_url,
    load_study,
    open_storage,
    parse_url,
)
from tests.optim_helpers import my_kill, pg_tables, pg_terminate

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db


def test_display_url_hides_password():
    shown = display_url("postgresql+psycopg2://alice:s3cr3t@db.example/optim")
    assert "s3cr3t" not in shown and "alice" in shown and "db.example/optim" in shown
    assert display_url("exp/studies.journal") == "exp/studies.journal"


def test_parse_url_kinds(tmp_path):
    assert parse_url("default").path == DEFAULT_JOURNAL
    assert parse_url(str(tmp_path / "s.journal")).kind == "journal"
    assert parse_url("sqlite:///x.db").kind == "rdb"
    assert parse_url("mysql+pymysql:///db?read_default_file=~/.my.cnf").kind == "rdb"


@pytest.mark.parametrize("url", ["", "oracle://u@h/db", "postgresql+psycopg2://u:pw@h:notaport/d"])
def test_bad_urls_are_one_line_errors(url):
    with pytest.raises(StorageError) as err:
        parse_url(url)
    message = str(err.value)
    assert "\n" not in message and "pw" not in message.replace("psycopg2", "")


def test_directory_is_not_a_journal(tmp_path):
    with pytest.raises(StorageError, match="directory"):
        parse_url(str(tmp_path))


def test_unreachable_database_no_password():
    with pytest.raises(StorageError) as err:
        open_storage("postgresql+psycopg2://postgres:hunter2@127.0.0.1:1/nowhere")
    assert "cannot connect" in str(err.value)
    assert "hunter2" not in str(err.value) and "\n" not in str(err.value)


def test_missing_journal_is_not_created(tmp_path):
    path = tmp_path / "none.journal"
    with pytest.raises(StorageError, match="no study storage"):
        open_storage(str(path))
    assert not path.exists()


def test_empty_database_is_not_written(pg_db):
    url, name = pg_db
    with pytest.raises(StorageError, match="no Optuna studies"):
        open_storage(url)
    assert pg_tables(name) == []


def test_missing_study_names_the_existing_ones(tmp_path):
    url = str(tmp_path / "s.journal")
    storage = open_storage(url, create=True)
    optuna.create_study(study_name="alpha", storage=storage)
    optuna.create_study(study_name="beta", storage=storage)
    with pytest.raises(StorageError, match="alpha, beta"):
        load_study(storage, "gamma", url)
    with pytest.raises(StorageError, match="several studies"):
        load_study(storage, None, url)


def test_postgresql_reconnects_after_dropped_connections(pg_db):
    url, name = pg_db
    storage = open_storage(url, create=True)
    optuna.create_study(study_name="s", storage=storage)
    assert pg_terminate(name) >= 1
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_mariadb_reconnects_after_dropped_connections(my_db):
    url, name = my_db
    storage = open_storage(url, create=True)
    optuna.create_study(study_name="s", storage=storage)
    assert my_kill(name) >= 1
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]


def test_mysql_read_default_file_with_tilde(my_db, tmp_path, monkeypatch):
    _, name = my_db
    (tmp_path / ".my.cnf").write_text("[client]\nuser=root\nhost=127.0.0.1\nport=3306\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    storage = open_storage(f"mysql+pymysql:///{name}?read_default_file=~/.my.cnf", create=True)
    optuna.create_study(study_name="via-cnf", storage=storage)
    assert [s.study_name for s in storage.get_all_studies()] == ["via-cnf"]
