"""Every use of Optuna's private API, in one file.

cnn-mellin needs a few things Optuna does not expose publicly: a study's storage and id
(to claim WAITING trials atomically and to keep system attributes), a trial's storage id,
the SQL storage under Optuna's caching wrapper, and a distribution's membership test. An
Optuna upgrade that moves them touches this module only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState


def storage(study: optuna.Study) -> BaseStorage:
    """The storage ``study`` reads and writes through."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The storage's id of ``study``."""
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (unique across studies, unlike its number)."""
    return trial._trial_id


def cached(backend: BaseStorage) -> BaseStorage:
    """``backend`` behind Optuna's cache of finished trials (what ``RDBStorage`` users get)."""
    return optuna.storages._CachedStorage(backend)


def uncached(store: BaseStorage) -> BaseStorage:
    """The storage under Optuna's caching wrapper, or ``store`` itself."""
    if isinstance(store, optuna.storages._CachedStorage):
        return store._backend
    return store


def extension(study: optuna.Study, name: str):
    """The method ``name`` of cnn-mellin's own storages (the SQL database's, or the storage
    proxy client's: light queries Optuna lacks), or None on another storage."""
    store = storage(study)
    for candidate in (store, uncached(store)):
        method = getattr(candidate, name, None)
        if method is not None:
            return method
    return None


def adopt(study: optuna.Study, trial: FrozenTrial) -> None:
    """Make a trial this worker claimed (RUNNING) known to Optuna's cache of the study's
    trials, which must know a trial before its parameters can be set."""
    store = storage(study)
    if isinstance(store, optuna.storages._CachedStorage):
        from optuna.storages._cached_storage import _StudyInfo

        sid = study_id(study)
        with store._lock:
            info = store._studies.setdefault(sid, _StudyInfo())
            store._add_trials_to_cache(sid, [trial])
            info.unfinished_trial_ids.add(trial_id(trial))  # re-read by the cache until it ends


def contains(distribution: BaseDistribution, value: Any) -> bool:
    """Whether ``value`` lies in ``distribution`` (False for values of the wrong kind)."""
    try:
        return bool(distribution._contains(distribution.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's system attributes (cnn-mellin's bookkeeping, hidden from users)."""
    return storage(study).get_study_system_attrs(study_id(study))


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Set one system attribute of ``study``."""
    storage(study).set_study_system_attr(study_id(study), key, value)


def fixed_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters ``enqueue_trial`` fixed for ``trial`` (empty when the sampler draws)."""
    return trial.system_attrs.get("fixed_params") or {}


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """The trial numbered ``number`` in ``study``; KeyError if there is none."""
    store = storage(study)
    return store.get_trial(store.get_trial_id_from_study_id_trial_number(study_id(study), number))


def trials_in(
    study: optuna.Study, states: Sequence[TrialState], *, through_cache: bool = True
) -> list[FrozenTrial]:
    """The study's trials in ``states``, filtered by the storage.

    Optuna's caching wrapper of SQL storages re-reads every unfinished trial on each
    listing; ``through_cache=False`` asks the database directly (filtered in SQL). Trials a
    worker is going to run must come through the cache, which has to know them. The
    storage proxy's client (``grpc://``) needs no such care: it always asks the database
    behind the proxy for just these states.
    """
    store = storage(study)
    filtered = getattr(store, "trials_in_states", None)
    if filtered is not None:
        return filtered(study_id(study), tuple(states))
    store = store if through_cache else uncached(store)
    return store.get_all_trials(study_id(study), deepcopy=False, states=tuple(states))


# -- the gRPC storage proxy (cnn_mellin/optim/serve.py) -------------------------------------


def add_proxy_service(server, backend: BaseStorage) -> None:
    """Add Optuna's storage proxy service over ``backend`` to the gRPC ``server`` (what
    ``optuna.storages.run_grpc_proxy_server`` serves)."""
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(backend), server)


def trials_to_bytes(trials: Sequence[FrozenTrial]) -> bytes:
    """``trials`` in the proxy's wire format (its reply to a listing)."""
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import _to_proto_trial

    return api_pb2.GetTrialsReply(trials=[_to_proto_trial(t) for t in trials]).SerializeToString()


def trials_from_bytes(data: bytes) -> list[FrozenTrial]:
    """The trials :func:`trials_to_bytes` wrote."""
    from optuna.storages._grpc.auto_generated import api_pb2
    from optuna.storages._grpc.servicer import _from_proto_trial

    return [_from_proto_trial(t) for t in api_pb2.GetTrialsReply.FromString(data).trials]


def proxy_channel(proxy: BaseStorage):
    """The gRPC channel of a ``GrpcStorageProxy``."""
    return proxy._channel


# -- light queries on Optuna's SQL schema (the database of cnn_mellin/optim/storage/rdb.py) -


def _trial_tables():
    from optuna.storages._rdb import models

    return (models.TrialModel.__table__, models.TrialUserAttributeModel.__table__,
            models.TrialSystemAttributeModel.__table__)


def waiting_brief(engine, study_id: int, user_key: str) -> list[tuple[int, int, bool, bool]]:
    """(trial id, number, has user attribute ``user_key``, has fixed parameters) of the
    study's WAITING trials, in one query that reads no other trial."""
    import json

    from sqlalchemy import and_, select

    trials, user, system = _trial_tables()
    joined = trials.outerjoin(
        user, and_(user.c.trial_id == trials.c.trial_id, user.c.key == user_key)
    ).outerjoin(
        system, and_(system.c.trial_id == trials.c.trial_id, system.c.key == "fixed_params")
    )
    query = select(trials.c.trial_id, trials.c.number, user.c.trial_id, system.c.value_json) \
        .select_from(joined) \
        .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [(trial_id, number, marked is not None, bool(fixed and json.loads(fixed)))
            for trial_id, number, marked, fixed in rows]


def running_brief(engine, study_id: int, user_key: str, system_key: str) -> list[tuple]:
    """(trial id, number, start as local time, user attribute ``user_key``, system attribute
    ``system_key``; None where missing) of the study's RUNNING trials, in one query."""
    import json

    from sqlalchemy import and_, select

    trials, user, system = _trial_tables()
    joined = trials.outerjoin(
        user, and_(user.c.trial_id == trials.c.trial_id, user.c.key == user_key)
    ).outerjoin(
        system, and_(system.c.trial_id == trials.c.trial_id, system.c.key == system_key)
    )
    query = select(trials.c.trial_id, trials.c.number, trials.c.datetime_start,
                   user.c.value_json, system.c.value_json).select_from(joined) \
        .where(trials.c.study_id == study_id, trials.c.state == TrialState.RUNNING)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [(trial_id, number, _local(start), json.loads(u) if u is not None else None,
             json.loads(b) if b is not None else None)
            for trial_id, number, start, u, b in rows]


def running_trial(trial_id: int, number: int, start, user_attrs: dict,
                  system_attrs: dict) -> FrozenTrial:
    """A RUNNING trial as far as :func:`running_brief` read it (no parameters, no values)."""
    return FrozenTrial(
        number=number, state=TrialState.RUNNING, value=None, datetime_start=start,
        datetime_complete=None, params={}, distributions={}, user_attrs=user_attrs,
        system_attrs=system_attrs, intermediate_values={}, trial_id=trial_id,
    )


def _local(moment):
    """A time Optuna stored (naive UTC) as Optuna shows it (naive local time)."""
    return moment and moment.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def state_counts(engine, study_id: int) -> dict[TrialState, int]:
    """How many trials of the study are in each state, counted by the database."""
    from sqlalchemy import func, select

    trials = _trial_tables()[0]
    query = select(trials.c.state, func.count()).where(trials.c.study_id == study_id) \
        .group_by(trials.c.state)
    with engine.connect() as connection:
        return {state: count for state, count in connection.execute(query).all()}


STATE_INDEX = "ix_trials_study_id_state"


def ensure_state_index(engine) -> None:
    """Index Optuna's ``trials`` table by (study, state), so that listing a study's RUNNING
    or WAITING trials reads those, not the study's whole history."""
    from sqlalchemy import Column, Index, Integer, MetaData, String, Table, exc, inspect

    with engine.connect() as connection:
        if any(ix["name"] == STATE_INDEX for ix in inspect(connection).get_indexes("trials")):
            return
    table = Table("trials", MetaData(), Column("study_id", Integer), Column("state", String))
    try:
        Index(STATE_INDEX, table.c.study_id, table.c.state).create(engine)
    except exc.SQLAlchemyError as err:
        if "exists" not in str(err) and "Duplicate key name" not in str(err):
            raise  # else a concurrent init made it


def _upsert_attrs(connection, table, owner: str, owner_id: int, attrs: dict[str, Any]) -> None:
    """Insert or replace ``attrs`` in an attribute table (``owner``: its ``trial_id`` or
    ``study_id`` column), as Optuna's ``_set_trial_attr_without_commit`` does."""
    import json

    from sqlalchemy import delete, insert

    if not attrs:
        return
    rows = [{owner: owner_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    dialect = connection.dialect.name
    if dialect in ("mysql", "mariadb"):
        from sqlalchemy.dialects import mysql

        stmt = mysql.insert(table).values(rows)
        connection.execute(stmt.on_duplicate_key_update(value_json=stmt.inserted.value_json))
    elif dialect in ("postgresql", "sqlite"):
        from sqlalchemy.dialects import postgresql, sqlite

        stmt = (postgresql if dialect == "postgresql" else sqlite).insert(table).values(rows)
        connection.execute(stmt.on_conflict_do_update(
            index_elements=[table.c[owner], table.c.key],
            set_={"value_json": stmt.excluded.value_json}))
    else:
        connection.execute(delete(table).where(table.c[owner] == owner_id,
                                               table.c.key.in_(list(attrs))))
        connection.execute(insert(table), rows)


def _upsert_user_attrs(connection, trial_id: int, attrs: dict[str, Any]) -> None:
    _upsert_attrs(connection, _trial_tables()[1], "trial_id", trial_id, attrs)


def read_trial(engine, trial_id: int) -> FrozenTrial:
    """``RDBStorage.get_trial`` with plain queries instead of Optuna's ORM (the same trial,
    a fraction of the cost); KeyError if there is none."""
    with engine.connect() as connection:
        return _read_trial(connection, trial_id)


def trial_number_here(database, trial_id: int) -> int | None:
    """A trial's number, read in the transaction this thread has open on ``database`` (Optuna
    checks a trial inside its own transactions: reading on another connection would wait
    for the first, with SQLite's lock held or the pool spent)."""
    from optuna.storages._rdb import models

    session = database.scoped_session()
    inside = session.in_transaction()
    try:
        return session.query(models.TrialModel.number) \
            .filter(models.TrialModel.trial_id == trial_id).scalar()
    finally:
        if not inside:
            session.close()


def study_system_attrs_of(engine, study_id: int) -> dict[str, Any]:
    """``RDBStorage.get_study_system_attrs`` with a plain query; KeyError if no such study."""
    import json

    from optuna.storages._rdb import models
    from sqlalchemy import select

    table, studies = models.StudySystemAttributeModel.__table__, models.StudyModel.__table__
    with engine.connect() as connection:
        rows = connection.execute(select(table.c.key, table.c.value_json)
                                  .where(table.c.study_id == study_id)).all()
        if not rows and connection.execute(
                select(studies.c.study_id).where(studies.c.study_id == study_id)).first() is None:
            raise KeyError(f"no study with id {study_id}")
    return {key: json.loads(value) for key, value in rows}


def set_study_system_attr_of(engine, study_id: int, key: str, value: Any) -> None:
    """``RDBStorage.set_study_system_attr`` as one upsert; KeyError if no such study."""
    from optuna.storages._rdb import models
    from sqlalchemy import select

    studies = models.StudyModel.__table__
    with engine.begin() as connection:
        if connection.execute(select(studies.c.study_id)
                              .where(studies.c.study_id == study_id)).first() is None:
            raise KeyError(f"no study with id {study_id}")
        _upsert_attrs(connection, models.StudySystemAttributeModel.__table__, "study_id",
                      study_id, {key: value})


def _read_trial(connection, trial_id: int) -> FrozenTrial:
    """One trial, read with plain queries (what ``RDBStorage.get_trial`` builds)."""
    import json

    from optuna import distributions
    from optuna.storages._rdb import models
    from sqlalchemy import select

    def rows(model, *columns):
        table = model.__table__
        return connection.execute(
            select(*(table.c[c] for c in columns)).where(table.c.trial_id == trial_id)).all()

    found = rows(models.TrialModel, "number", "state", "datetime_start", "datetime_complete")
    if not found:
        raise KeyError(f"no trial with id {trial_id}")
    [(number, state, start, complete)] = found

    params = sorted(rows(models.TrialParamModel, "param_id", "param_name", "param_value",
                         "distribution_json"))
    dists = {name: distributions.json_to_distribution(dist) for _, name, _, dist in params}
    values = sorted(rows(models.TrialValueModel, "objective", "value", "value_type"))
    return FrozenTrial(
        number=number, state=state, value=None,
        values=[models.TrialValueModel.stored_repr_to_value(v, kind) for _, v, kind in values]
        or None,
        datetime_start=_local(start), datetime_complete=_local(complete),
        params={name: dists[name].to_external_repr(value) for _, name, value, _ in params},
        distributions=dists,
        user_attrs={k: json.loads(v) for k, v in
                    rows(models.TrialUserAttributeModel, "key", "value_json")},
        system_attrs={k: json.loads(v) for k, v in
                      rows(models.TrialSystemAttributeModel, "key", "value_json")},
        intermediate_values={
            step: models.TrialIntermediateValueModel.stored_repr_to_intermediate_value(v, kind)
            for step, v, kind in rows(models.TrialIntermediateValueModel, "step",
                                      "intermediate_value", "intermediate_value_type")},
        trial_id=trial_id,
    )


def claim_waiting(database, trial_id: int, user_attrs: dict[str, Any]) -> FrozenTrial | None:
    """Move a WAITING trial to RUNNING and give it ``user_attrs``, in one transaction of the
    ``RDBStorage`` ``database``; the trial as it is then, or None if it was not WAITING.

    What ``set_trial_state_values`` (WAITING → RUNNING, atomic: the row's update waits for
    any other), ``set_trial_user_attr`` and ``get_trial`` do, in one transaction of plain
    statements instead of three of Optuna's ORM.
    """
    from datetime import datetime

    from sqlalchemy import select, update

    trials = _trial_tables()[0]
    with database.engine.begin() as connection:
        moved = connection.execute(
            update(trials).where(trials.c.trial_id == trial_id,
                                 trials.c.state == TrialState.WAITING)
            .values(state=TrialState.RUNNING,  # naive UTC, as Optuna stores it
                    datetime_start=datetime.now(UTC).replace(tzinfo=None))).rowcount
        if moved:
            _upsert_user_attrs(connection, trial_id, user_attrs)
            return _read_trial(connection, trial_id)
        # taken by another worker (the common miss: read no more than needed), or the same
        # claim again, whose commit went through and whose answer was lost: still ours
        state = connection.execute(select(trials.c.state)
                                   .where(trials.c.trial_id == trial_id)).scalar_one_or_none()
        if state is None:
            raise KeyError(f"no trial with id {trial_id}")
        if state != TrialState.RUNNING or not user_attrs:
            return None
        trial = _read_trial(connection, trial_id)
    mine = all(trial.user_attrs.get(k) == v for k, v in user_attrs.items())
    return trial if mine else None


def set_trial_user_attrs(database, trial_id: int, attrs: dict[str, Any],
                         system: bool = False) -> None:
    """``set_trial_user_attr`` (``system``: ``set_trial_system_attr``) of each of ``attrs``,
    in one transaction of ``database``: UpdateFinishedTrialError if the trial has finished,
    KeyError if there is none."""
    from optuna.exceptions import UpdateFinishedTrialError
    from sqlalchemy import select

    trials, user, system_table = _trial_tables()
    with database.engine.begin() as connection:
        found = connection.execute(
            select(trials.c.number, trials.c.state).where(trials.c.trial_id == trial_id)
            .with_for_update()).one_or_none()
        if found is None:
            raise KeyError(f"no trial with id {trial_id}")
        if found.state.is_finished():
            raise UpdateFinishedTrialError(
                f"Trial#{found.number} has already finished and can not be updated.")
        _upsert_attrs(connection, system_table if system else user, "trial_id", trial_id, attrs)
