"""``optim serve`` and ``grpc://``: Optuna's storage proxy in front of the live databases,
and the light queries workers make on a database (:class:`StudyDatabase`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from cnn_mellin.optim import internals
from cnn_mellin.optim.attrs import BEAT_KEY
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.storage import (
    OutageTolerantStorage,
    StorageError,
    open_storage,
    outage_recoveries,
    parse_url,
)
from tests.optim_helpers import (
    ROOT,
    env,
    fake_study,
    load,
    pg_terminate,
    start_worker,
    states,
    wait_all,
)

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
pytestmark = pytest.mark.db
grpc = pytest.importorskip("grpc")


@pytest.mark.parametrize("url, message", [
    ("grpc://localhost", "expected grpc://HOST:PORT"),
    ("grpc://:13000", "expected grpc://HOST:PORT"),
    ("grpc://localhost:13000/db", "expected grpc://HOST:PORT"),
    ("grpc://localhost:port", "bad port"),
])
def test_bad_proxy_urls_are_one_line_errors(url, message):
    with pytest.raises(StorageError, match=message):
        parse_url(url)
    spec = parse_url("grpc://node-3.cluster:13000")
    assert (spec.kind, spec.host, spec.port) == ("grpc", "node-3.cluster", 13000)


def test_no_proxy_there_is_a_one_line_error(cli, monkeypatch):
    import socket

    from cnn_mellin.optim import storage

    monkeypatch.setattr(storage, "PROXY_READY_S", 0.5)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = cli("optim", f"grpc://127.0.0.1:{port}", "status")
    assert code == 2 and not out
    assert err.strip().splitlines() == [
        f"cnn-mellin: error: cannot connect to grpc://127.0.0.1:{port}: no storage proxy "
        "answered within 0.5 s (start one with 'cnn-mellin optim DB_URL serve')"]


@pytest.mark.parametrize("url", ["studies.journal", "sqlite:///s.db", "grpc://localhost:1"])
def test_serve_needs_a_postgresql_or_mysql_database(cli, tmp_path, url):
    code, _, err = cli("optim", url.replace("s.db", str(tmp_path / "s.db")), "serve")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "serve fronts a PostgreSQL or MySQL/MariaDB database" in err


def test_serve_on_a_port_in_use_is_a_one_line_error_and_creates_nothing(cli):
    import socket

    from tests.optim_helpers import _pg_admin

    name = f"cm_test_{uuid.uuid4().hex[:12]}"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = cli("optim", f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}",
                           "serve", "--host", "127.0.0.1", "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    conn = _pg_admin()
    with conn.cursor() as cur:
        cur.execute("select count(*) from pg_database where datname = %s", (name,))
        assert cur.fetchone()[0] == 0
    conn.close()


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def database(request, tmp_path):
    """A fresh SQL database URL of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return request.getfixturevalue("pg_db" if request.param == "postgresql" else "my_db")[0]


@pytest.fixture
def far_east(monkeypatch):
    """This process in another time zone than UTC (Optuna stores naive UTC, shows local)."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_light_queries_match_optuna(database, far_east):
    storage = open_storage(database, create=True)
    db = internals.uncached(storage)
    study = optuna.create_study(storage=storage, study_name="s")
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": 3})
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.suggest_categorical("c", ["a", "b"])
    trial.report(float("nan"), 1)
    trial.report(2.0, 2)
    trial.set_user_attr("u", {"a": [1, 2]})
    study.tell(trial, float("inf"))
    study.enqueue_trial({})
    study.enqueue_trial({"x": 0.25})
    for frozen in study.get_trials():  # plain queries, and Optuna's ORM
        assert repr(db.get_trial(frozen._trial_id)) == \
            repr(optuna.storages.RDBStorage.get_trial(db, frozen._trial_id))
    assert db.get_study_system_attrs(study._study_id) == \
        optuna.storages.RDBStorage.get_study_system_attrs(db, study._study_id)
    db.set_study_system_attr(study._study_id, "k", {"v": [1]})
    db.set_study_system_attr(study._study_id, "k", {"v": [2]})
    assert db.get_study_system_attrs(study._study_id)["k"] == {"v": [2]}
    with pytest.raises(KeyError):
        db.get_study_system_attrs(10**9)
    with pytest.raises(KeyError):
        db.set_study_system_attr(10**9, "k", 1)
    sid = study._study_id
    assert db.waiting_brief(sid, "retry_of") == [(2, 1, False, False), (3, 2, False, True)]
    assert db.state_counts(sid) == {TrialState.COMPLETE: 1, TrialState.WAITING: 2}
    me, other = {WORKER_ATTR: {"pid": 1}}, {WORKER_ATTR: {"pid": 2}}
    claimed = db.claim_waiting(2, me)
    assert claimed.state == TrialState.RUNNING and claimed.user_attrs == me
    assert abs((claimed.datetime_start - datetime.now()).total_seconds()) < 60  # local time
    assert repr(claimed) == repr(optuna.storages.RDBStorage.get_trial(db, 2))
    assert db.claim_waiting(2, me) is not None  # its answer was lost: the same claim again
    assert db.claim_waiting(2, other) is None
    db.set_trial_system_attr(2, BEAT_KEY, 5.0)
    assert db.running_brief(sid, WORKER_ATTR, BEAT_KEY) == [
        (2, 1, claimed.datetime_start, {"pid": 1}, 5.0)]
    db.set_trial_user_attrs(2, {"a": 1, WORKER_ATTR: "x"})
    assert db.get_trial(2).user_attrs == {"a": 1, WORKER_ATTR: "x"}
    db.set_trial_state_values(2, TrialState.FAIL)
    with pytest.raises(UpdateFinishedTrialError):
        db.set_trial_user_attrs(2, {"a": 2})
    with pytest.raises(UpdateFinishedTrialError):
        db.set_trial_system_attr(2, BEAT_KEY, 6.0)
    # Optuna checks a finished trial inside its own transaction: on SQLite, reading it on
    # another connection waited a minute for that transaction ("database is locked")
    began = time.monotonic()
    with pytest.raises(UpdateFinishedTrialError, match="Trial#1 has already finished"):
        db.set_trial_user_attr(2, "a", 2)
    assert time.monotonic() - began < 10
    with pytest.raises(KeyError):
        db.claim_waiting(10**9, me)
    assert db.get_trial(2).user_attrs["a"] == 1


def test_opening_a_new_database_indexes_trials_by_study_and_state(pg_db):
    import sqlalchemy

    url, _ = pg_db
    storage = open_storage(url, create=True)
    engine = internals.uncached(storage).engine
    names = {ix["name"] for ix in sqlalchemy.inspect(engine).get_indexes("trials")}
    assert internals.STATE_INDEX in names
    internals.ensure_state_index(engine)  # again: nothing to do


def test_workers_ride_out_dropped_connections_without_checking_each(pg_db):
    # a worker's pool does not ping each connection: a dropped one fails a call, which is
    # retried on a new connection
    url, name = pg_db
    storage = open_storage(url, create=True, max_outage_s=30)
    assert not internals.uncached(storage)._storage.engine.pool._pre_ping
    optuna.create_study(study_name="s", storage=storage)
    assert pg_terminate(name) >= 1
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    assert outage_recoveries(storage) == 1


@pytest.fixture
def proxy(pg_db):
    """(client storage riding out outages, database name, the proxy) in this process."""
    from cnn_mellin.optim import serve

    url, name = pg_db
    running = serve.start(url, host="127.0.0.1", port=0, threads=2)
    client = open_storage(running.url, max_outage_s=30)
    yield client, name, running
    internals.uncached(client)._storage.close()
    running.stop(0)


def test_the_proxy_answers_a_lost_database_with_unavailable_and_clients_retry(proxy):
    client, name, _ = proxy
    optuna.create_study(study_name="s", storage=client)
    assert pg_terminate(name) >= 1  # the proxy's connections, pinged by nobody
    assert [s.study_name for s in client.get_all_studies()] == ["s"]
    assert outage_recoveries(client) == 1


def test_the_proxy_runs_the_light_queries_and_claims(proxy):
    from cnn_mellin.optim import budget

    client, _, _ = proxy
    study = optuna.create_study(study_name="s", storage=client)
    study.enqueue_trial({}, user_attrs={"retry_of": 0})
    study.enqueue_trial({"x": 1.0})
    sid = study._study_id
    assert client.waiting_brief(sid, "retry_of") == [(1, 0, True, False), (2, 1, False, True)]
    assert budget.state_counts(study) == {TrialState.WAITING: 2}
    trial = budget.claim(study, 2, {WORKER_ATTR: "me"})
    assert (trial.number, trial.state, trial.user_attrs) == (1, TrialState.RUNNING,
                                                             {WORKER_ATTR: "me"})
    assert budget.claim(study, 2, {WORKER_ATTR: "other"}) is None
    assert [t.number for t in internals.trials_in(study, (TrialState.RUNNING,))] == [1]
    [running] = budget.running(study)
    assert (running.number, running.user_attrs, running.system_attrs) == (
        1, {WORKER_ATTR: "me"}, {})
    assert running.datetime_start == trial.datetime_start
    budget.set_user_attrs(study, 2, {"a": 1, "b": [2]})
    study.tell(1, 0.5)  # by number
    with pytest.raises(UpdateFinishedTrialError):
        budget.set_user_attrs(study, 2, {"a": 3})
    assert study.trials[1].user_attrs == {WORKER_ATTR: "me", "a": 1, "b": [2]}


def test_trials_made_behind_the_proxys_back_can_be_claimed_and_sampled(proxy, pg_db):
    # found by bench/scale_proxy.py: a study made directly on the database (or before the
    # proxy started) is unknown to the proxy's cache, which refused its parameters
    from cnn_mellin.optim import budget

    client, _, _ = proxy
    direct = open_storage(pg_db[0])
    optuna.create_study(study_name="s", storage=direct).enqueue_trial({})
    study = optuna.load_study(study_name="s", storage=client,
                              sampler=optuna.samplers.RandomSampler())  # lists no trial
    [slot] = budget.waiting_slots(study)
    claimed = budget.claim(study, slot.trial_id, {WORKER_ATTR: "me"})
    trial = optuna.Trial(study, claimed._trial_id)
    x = trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, x)
    assert load_params(direct, "s") == [{"x": x}]


def load_params(storage, name):
    return [t.params for t in optuna.load_study(study_name=name, storage=storage).trials]


def test_against_optunas_own_proxy_the_client_lists_instead(pg_db):
    from optuna.storages._grpc.server import make_server

    from cnn_mellin.optim import budget

    url, _ = pg_db
    server = make_server(open_storage(url, create=True), "127.0.0.1", 0)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = open_storage(f"grpc://127.0.0.1:{port}", max_outage_s=30)
        study = optuna.create_study(study_name="s", storage=client)
        study.enqueue_trial({"x": 1.0})
        study.enqueue_trial({})
        assert [s.fixed for s in budget.waiting_slots(study)] == [True, False]
        assert budget.state_counts(study)[TrialState.WAITING] == 2
        trial = budget.claim(study, 1, {WORKER_ATTR: "me"})
        assert trial.user_attrs == {WORKER_ATTR: "me"}
        assert budget.claim(study, 1, {WORKER_ATTR: "other"}) is None
        assert [t.number for t in internals.trials_in(study, (TrialState.RUNNING,))] == [0]
        assert [t.user_attrs for t in budget.running(study)] == [{WORKER_ATTR: "me"}]
    finally:
        server.stop(0)


def _serve(url: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """A real ``optim serve`` process on a free port; (process, its grpc:// URL)."""
    address = tmp_path / f"proxy-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "cnn_mellin", "optim", url, "serve", "--host", "127.0.0.1",
         "--port", "0", "--threads", "4", "--address-file", str(address)],
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 120
    while not address.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the proxy did not start: {process.communicate()}")
        time.sleep(0.1)
    return process, address.read_text().strip()


def _wait_for_progress(url, name, min_epoch, timeout=120):
    from cnn_mellin.optim.storage import load_study

    study = load_study(open_storage(url), name, url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if WORKER_ATTR in trial.user_attrs and \
                    max(trial.intermediate_values, default=0) >= min_epoch:
                return trial
        time.sleep(0.2)
    raise AssertionError("no trial got far enough")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_workers_through_the_proxy_keep_the_budget_when_one_is_killed(kind, request, tmp_path):
    url, _ = request.getfixturevalue("pg_db" if kind == "postgresql" else "my_db")
    server, proxy_url = _serve(url, tmp_path)
    try:
        fake_study(proxy_url, tmp_path, name="kill", num_trials=4,
                   whitelist=["training.learning_rate"], base={"training.num_epochs": 5})
        workers = [start_worker(proxy_url, "kill", FAKE_EPOCH_S=0.4) for _ in range(2)]
        try:
            victim = _wait_for_progress(proxy_url, "kill", 2)
        except AssertionError:
            wait_all(workers, timeout=1)
            raise
        pid = victim.user_attrs[WORKER_ATTR]["pid"]
        os.kill(pid, signal.SIGKILL)
        results = wait_all(workers)
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=60)
    assert server.returncode == 0, log
    by_pid = {p.pid: code for p, (code, _) in zip(workers, results, strict=True)}
    assert by_pid.pop(pid) == -signal.SIGKILL and list(by_pid.values()) == [0], results
    study = load(url, "kill")  # the database itself, behind the proxy
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4 and counts["FAIL"] == 1
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert failed.number == victim.number and failed.user_attrs["fail_kind"] == "dead"
    [retry] = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert retry.user_attrs["resumed_from_epoch"] >= 2
    assert sorted(retry.intermediate_values) == [1, 2, 3, 4, 5]
    assert "storage proxy for" in log and "at grpc://127.0.0.1:" in log


def test_the_clients_retry_wrapper_is_used_for_the_proxy(proxy):
    client, _, running = proxy
    assert isinstance(client, OutageTolerantStorage)
    assert running.url.startswith("grpc://127.0.0.1:")
