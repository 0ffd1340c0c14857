"""DB_URL parsing, password-free display, opening without writing, reconnects."""

from __future__ import annotations

import threading

import optuna
import pytest

from cnn_mellin.optim.storage import (
    DEFAULT_JOURNAL,
    DatabaseUnreachable,
    OutageTolerantStorage,
    StorageError,
    connection_loss,
    display_url,
    load_study,
    open_storage,
    outage_recoveries,
    parse_url,
)
from tests.optim.tcp_proxy import CuttableProxy
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


def _lost(text="server closed the connection unexpectedly"):
    from sqlalchemy.exc import OperationalError

    return OperationalError("SELECT 1", {}, Exception(text))


class _Flaky:
    """A storage whose ``get_all_studies`` fails with ``errors`` before answering."""

    def __init__(self, errors):
        self.errors = list(errors)
        self.calls = 0

    def get_all_studies(self):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return ["ok"]


def test_outage_tolerant_storage_retries_connection_losses_with_growing_pauses():
    pauses = []
    wrapped = _Flaky([_lost(), _lost(), _lost()])
    storage = OutageTolerantStorage(wrapped, "db", 60, sleep=pauses.append)
    assert storage.get_all_studies() == ["ok"] and wrapped.calls == 4
    assert pauses == sorted(pauses) and pauses[0] < pauses[-1] and len(pauses) == 3
    assert storage.recoveries == 1


def test_outage_tolerant_storage_sees_connection_losses_inside_optuna_errors():
    from optuna.exceptions import StorageInternalError

    try:
        try:
            raise _lost()
        except Exception as err:
            raise StorageInternalError("An exception is raised during the commit.") from err
    except StorageInternalError as wrapped:
        assert "server closed the connection" in str(connection_loss(wrapped))
    assert connection_loss(ValueError("bad value")) is None


@pytest.mark.parametrize("error", [ValueError("bad"), KeyError("no such trial")])
def test_outage_tolerant_storage_passes_other_errors_at_once(error):
    pauses = []
    storage = OutageTolerantStorage(_Flaky([error]), "db", 60, sleep=pauses.append)
    with pytest.raises(type(error)):
        storage.get_all_studies()
    assert pauses == [] and storage.recoveries == 0


def test_outage_longer_than_allowed_is_a_one_line_error_and_later_calls_fail_fast():
    storage = OutageTolerantStorage(_Flaky([_lost()] * 1000), "postgresql://u@h/db", 0.3)
    with pytest.raises(DatabaseUnreachable) as err:
        storage.get_all_studies()
    message = str(err.value)
    assert "unreachable for" in message and "\n" not in message
    assert "server closed the connection unexpectedly" in message
    calls = storage._storage.calls
    with pytest.raises(DatabaseUnreachable, match="unreachable for"):
        storage.get_all_studies()  # e.g. another thread's call, after this one gave up
    assert storage._storage.calls == calls + 1  # no second wait
    # the database comes back before this process gave up for good (e.g. mid-epoch): the
    # outage counts as survived, so heartbeat observers restart their clocks
    storage._storage.errors = []
    assert storage.get_all_studies() == ["ok"] and storage.recoveries == 1
    storage._storage.errors = [_lost()]
    storage._sleep = lambda _: None
    assert storage.get_all_studies() == ["ok"]  # and a later loss is waited out again
    assert storage.recoveries == 2


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_storage_rides_out_a_cut_connection(kind, request):
    url = request.getfixturevalue("pg_db" if kind == "postgresql" else "my_db")[0]
    optuna.create_study(study_name="s", storage=open_storage(url, create=True))
    proxy = CuttableProxy(5432 if kind == "postgresql" else 3306)
    try:
        storage = open_storage(proxy.url(url), max_outage_s=60)
        study = optuna.load_study(study_name="s", storage=storage)
        proxy.cut()
        threading.Timer(2.0, proxy.restore).start()
        study.set_user_attr("written", "after the outage")  # blocks until the link is back
        assert [s.user_attrs for s in storage.get_all_studies()] == [
            {"written": "after the outage"}]
        assert outage_recoveries(storage) == 1
    finally:
        proxy.close()


def test_a_server_going_away_while_the_storage_is_set_up_is_a_one_line_error(monkeypatch):
    # found by bench/scale_faults.py: a worker starting while MariaDB restarted ended with
    # Optuna's StorageInternalError traceback (its setup commit lost the connection)
    def refused(*args, **kwargs):
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except ConnectionRefusedError as cause:
            raise optuna.exceptions.StorageInternalError("An exception is raised during the "
                                                         "commit.") from cause

    from cnn_mellin.optim import storage

    monkeypatch.setattr(storage, "StudyDatabase", refused)  # Optuna's RDBStorage, extended
    with pytest.raises(StorageError, match=r"^cannot connect to sqlite:///.*Connection refused"):
        open_storage("sqlite:///unused.db", create=True)
