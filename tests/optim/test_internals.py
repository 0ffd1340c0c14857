"""Optuna's private API as cnn_mellin.optim.internals wraps it, on in-memory and SQLite
storages (the same calls on PostgreSQL and MariaDB are in test_serve.py)."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from cnn_mellin.optim import internals

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def sqlite(tmp_path):
    """(study on Optuna's cached SQLite storage, the RDBStorage under the cache)."""
    backend = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'studies.db'}")
    study = optuna.create_study(storage=internals.cached(backend), study_name="s")
    return study, backend


def _mixed(study):
    """One trial in each state but FAIL: numbers 0 COMPLETE, 1 PRUNED, 2 RUNNING, 3-4
    WAITING (3 with fixed parameters and a user attribute)."""
    done = study.ask()
    done.suggest_float("x", 0, 1)
    study.tell(done, 0.5)
    study.tell(study.ask(), state=TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr("owner", "me")
    study.enqueue_trial({"x": 0.25}, user_attrs={"marked": True})
    study.enqueue_trial({})
    return running


@pytest.mark.parametrize("distribution, inside, outside", [
    (FloatDistribution(0, 1), [0.0, 0.5, 1], [1.5, "a", None]),
    (IntDistribution(1, 9, step=2), [1, 3, 9], [2, 11, "x"]),
    (CategoricalDistribution(["a", 3]), ["a", 3], ["b", 4]),
])
def test_contains_is_membership_and_false_for_the_wrong_kind(distribution, inside, outside):
    assert all(internals.contains(distribution, v) for v in inside)
    assert not any(internals.contains(distribution, v) for v in outside)


def test_ids_attributes_and_fixed_parameters_on_the_in_memory_storage():
    study = optuna.create_study()
    assert internals.uncached(internals.storage(study)) is internals.storage(study)
    assert internals.extension(study, "claim_waiting") is None
    study.enqueue_trial({"x": 0.25})
    fixed, drawn = study.ask(), study.ask()
    assert internals.fixed_params(study.trials[0]) == {"x": 0.25}
    assert internals.fixed_params(study.trials[1]) == {}
    assert internals.trial_by_number(study, 1).number == 1
    assert internals.trial_id(drawn) == internals.trial_by_number(study, 1)._trial_id
    assert internals.trial_id(fixed) != internals.trial_id(drawn)
    with pytest.raises(KeyError):
        internals.trial_by_number(study, 7)
    internals.set_study_system_attr(study, "k", {"v": [1]})
    assert internals.study_system_attrs(study) == {"k": {"v": [1]}}
    assert study.user_attrs == {}  # hidden from users


def test_the_cache_wraps_the_database_and_extensions_are_found_under_it(sqlite):
    study, backend = sqlite
    assert internals.uncached(internals.storage(study)) is backend
    assert internals.uncached(backend) is backend

    class Extended(optuna.storages.RDBStorage):
        def light_query(self):
            return "mine"

    extended = optuna.create_study(storage=internals.cached(Extended(backend.url)),
                                   study_name="t")
    assert internals.extension(extended, "light_query")() == "mine"
    assert internals.extension(study, "light_query") is None


@pytest.mark.parametrize("through_cache", [True, False])
def test_trials_in_lists_only_the_states_asked(sqlite, through_cache):
    study, _ = sqlite
    _mixed(study)
    numbers = {state: [t.number for t in internals.trials_in(
        study, [state], through_cache=through_cache)] for state in TrialState}
    assert numbers == {TrialState.COMPLETE: [0], TrialState.PRUNED: [1],
                       TrialState.RUNNING: [2], TrialState.WAITING: [3, 4],
                       TrialState.FAIL: []}


def test_plain_queries_read_what_optuna_reads(sqlite):
    study, backend = sqlite
    running = _mixed(study)
    engine, sid = backend.engine, internals.study_id(study)
    for trial in study.get_trials():
        assert repr(internals.read_trial(engine, trial._trial_id)) == \
            repr(backend.get_trial(trial._trial_id))
    with pytest.raises(KeyError):
        internals.read_trial(engine, 999)
    assert internals.state_counts(engine, sid) == {
        TrialState.COMPLETE: 1, TrialState.PRUNED: 1, TrialState.RUNNING: 1,
        TrialState.WAITING: 2}
    waiting = {t.number: t._trial_id for t in study.trials if t.state == TrialState.WAITING}
    assert sorted(internals.waiting_brief(engine, sid, "marked")) == [
        (waiting[3], 3, True, True), (waiting[4], 4, False, False)]
    [(tid, number, start, owner, beat)] = internals.running_brief(engine, sid, "owner", "beat")
    assert (tid, number, owner, beat) == (running._trial_id, 2, "me", None)
    assert start == backend.get_trial(tid).datetime_start
    assert internals.trial_number_here(backend, tid) == 2
    assert internals.trial_number_here(backend, 999) is None


def test_claim_waiting_takes_a_trial_once(sqlite):
    study, backend = sqlite
    _mixed(study)
    tid = internals.trial_by_number(study, 4)._trial_id
    claimed = internals.claim_waiting(backend, tid, {"worker": "a"})
    assert claimed.state == TrialState.RUNNING and claimed.user_attrs == {"worker": "a"}
    assert claimed.datetime_start is not None
    # the same claim again (its answer lost) is still ours; anyone else's is not
    assert internals.claim_waiting(backend, tid, {"worker": "a"}).number == 4
    assert internals.claim_waiting(backend, tid, {"worker": "b"}) is None
    done = internals.trial_by_number(study, 0)._trial_id
    assert internals.claim_waiting(backend, done, {"worker": "a"}) is None
    with pytest.raises(KeyError):
        internals.claim_waiting(backend, 999, {"worker": "a"})


def test_attributes_are_upserted_and_finished_trials_refused(sqlite):
    study, backend = sqlite
    running = _mixed(study)
    tid = running._trial_id
    internals.set_trial_user_attrs(backend, tid, {"owner": "you", "epoch": 3})
    internals.set_trial_user_attrs(backend, tid, {"beat": 1.5}, system=True)
    trial = backend.get_trial(tid)
    assert trial.user_attrs == {"owner": "you", "epoch": 3}
    assert trial.system_attrs["beat"] == 1.5
    with pytest.raises(UpdateFinishedTrialError):
        internals.set_trial_user_attrs(backend, internals.trial_by_number(study, 0)._trial_id,
                                       {"owner": "late"})
    with pytest.raises(KeyError):
        internals.set_trial_user_attrs(backend, 999, {"owner": "none"})
    sid = internals.study_id(study)
    internals.set_study_system_attr_of(backend.engine, sid, "k", [1])
    internals.set_study_system_attr_of(backend.engine, sid, "k", [2])
    assert internals.study_system_attrs_of(backend.engine, sid) == \
        backend.get_study_system_attrs(sid) == {"k": [2]}
    for call in (lambda: internals.study_system_attrs_of(backend.engine, 999),
                 lambda: internals.set_study_system_attr_of(backend.engine, 999, "k", 1)):
        with pytest.raises(KeyError):
            call()


def test_the_state_index_is_made_once(sqlite):
    from sqlalchemy import inspect

    _, backend = sqlite
    for _ in range(2):
        internals.ensure_state_index(backend.engine)
    names = [ix["name"] for ix in inspect(backend.engine).get_indexes("trials")]
    assert names.count(internals.STATE_INDEX) == 1


def test_trials_round_trip_through_the_proxys_wire_format(sqlite):
    pytest.importorskip("grpc")
    study, _ = sqlite
    _mixed(study)
    trials = study.get_trials()
    back = internals.trials_from_bytes(internals.trials_to_bytes(trials))
    assert [(t.number, t.state, t.params, t.user_attrs) for t in back] == \
        [(t.number, t.state, t.params, t.user_attrs) for t in trials]
