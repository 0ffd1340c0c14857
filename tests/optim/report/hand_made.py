"""Hand-made trials and settings for the report's figure and page tests (no storage)."""

from __future__ import annotations

from datetime import datetime, timedelta

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.optim.study import StudySettings

T0 = datetime(2026, 1, 1, 12, 0, 0)
DISTRIBUTIONS = {
    "training.learning_rate": FloatDistribution(1e-5, 1.0, log=True),
    "training.optimizer": CategoricalDistribution(["adam", "sgd"]),
    "data.batch_size": IntDistribution(2, 64),
}


def trial(number: int, state: TrialState = TrialState.COMPLETE, value: float | None = None,
          params: dict | None = None, curve: dict[int, float] | None = None,
          start_s: float = 0, seconds: float | None = 10, **user_attrs) -> FrozenTrial:
    """Trial ``number``, started ``start_s`` after :data:`T0` and ended ``seconds`` later
    (None: still running)."""
    params = params or {}
    start = T0 + timedelta(seconds=start_s)
    ends = state not in (TrialState.RUNNING, TrialState.WAITING)
    return FrozenTrial(
        number=number, state=state, value=value if state == TrialState.COMPLETE else None,
        datetime_start=None if state == TrialState.WAITING else start,
        datetime_complete=start + timedelta(seconds=seconds) if ends and seconds else None,
        params=params, distributions={k: DISTRIBUTIONS[k] for k in params},
        user_attrs=user_attrs, system_attrs={}, intermediate_values=curve or {},
        trial_id=number + 100,
    )


def settings(num_trials: int = 6, mem_limit_bytes: int | None = None, **more) -> StudySettings:
    """Settings of a study of the fake task that searches :data:`DISTRIBUTIONS`."""
    return StudySettings(
        task="tests.optim_fake:FakeTask", base_config={}, searched=list(DISTRIBUTIONS),
        task_info={}, num_trials=num_trials, mem_limit_bytes=mem_limit_bytes,
        pruner="median", num_data_workers=0, checkpoint_dir="ckpt", heartbeat_interval=5.0,
        heartbeat_grace=30.0, max_retries=2, **more,
    )
