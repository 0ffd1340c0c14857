"""Each pruner stops a trial whose learning curve is worse, through the real worker loop.

The task reports set curves: the first ``NUM_GOOD`` trials to run (the worker claims
trials in a random order, so by run order, not trial number) report the same good curve,
the ``NUM_BAD`` after them one whose dev error is higher at every epoch, so that a bad
trial always has finished good ones to be compared with.
"""

from __future__ import annotations

import pytest
from optuna.trial import TrialState

from cnn_mellin.config import Config
from cnn_mellin.tasks import TaskResult
from tests.optim_fake import FakeTask
from tests.optim_helpers import load

EPOCHS = 9
GOOD = [0.9, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.18, 0.16]
BAD = [v + 0.08 for v in GOOD]
# in CTC's all-blank phase for three epochs, then better than GOOD: what a large model does
LATE = [1.0, 1.0, 1.0, 0.35, 0.28, 0.22, 0.19, 0.17, 0.15]
# GOOD until its last epoch, which is worse than every GOOD epoch from the third on
LAST_WORSE = GOOD[:-1] + [0.6]
NUM_GOOD = 12
NUM_BAD = 6
RUN_ORDER: list[int] = []  # trial numbers in the order they ran (one in-process worker)


class CurveTask(FakeTask):
    """FakeTask whose first ``NUM_GOOD`` trials to run report ``GOOD``, the others
    ``CurveTask.second`` (``BAD`` unless a test sets another curve)."""

    second = BAD

    def run(self, config, context):
        if context.trial_number not in RUN_ORDER:  # a retry keeps its curve
            RUN_ORDER.append(context.trial_number)
        curve = GOOD if RUN_ORDER.index(context.trial_number) < NUM_GOOD else self.second
        for epoch, value in enumerate(curve, 1):
            context.report(epoch, value)
        return TaskResult(value=min(curve), epochs=len(curve))


def _run_study(tmp_path, pruner: str):
    from cnn_mellin.optim.launch import run_worker
    from cnn_mellin.optim.study import build_settings, init_study

    RUN_ORDER.clear()
    url = str(tmp_path / "studies.journal")
    data = tmp_path / "data"
    data.mkdir()
    settings = build_settings(
        Config({"training.num_epochs": EPOCHS}), data,
        task=f"{__name__}:CurveTask", whitelist=["training.learning_rate"],
        num_trials=NUM_GOOD + NUM_BAD, pruner=pruner,
        checkpoint_dir=tmp_path / "ckpt", heartbeat_interval=1.0,
    )
    init_study(url, "curves", settings)
    assert run_worker(url, "curves", seed=0).exit_code == 0
    trials = load(url, "curves").get_trials()
    assert sorted(RUN_ORDER) == sorted(t.number for t in trials) == list(range(NUM_GOOD + NUM_BAD))
    bad_numbers = set(RUN_ORDER[NUM_GOOD:])
    good = [t for t in trials if t.number not in bad_numbers]
    bad = [t for t in trials if t.number in bad_numbers]
    return good, bad


# both decide from half the epochs (4 of 9) on; hyperband keeps the best third at that rung
@pytest.mark.parametrize(("pruner", "at_least"), [("median", NUM_BAD), ("hyperband", NUM_BAD // 2)])
def test_pruner_stops_a_worse_curve_early_and_keeps_the_good_ones(tmp_path, pruner, at_least):
    good, bad = _run_study(tmp_path, pruner)
    assert all(t.state == TrialState.COMPLETE for t in good)
    stopped = [t for t in bad if t.state == TrialState.PRUNED]
    assert len(stopped) >= at_least, f"the {pruner} pruner let worse trials finish"
    # pruned before the last epoch: the pruner saved compute
    assert any(len(t.intermediate_values) < EPOCHS for t in stopped)
    for t in stopped:
        assert t.intermediate_values == dict(enumerate(BAD[:len(t.intermediate_values)], 1))


def test_without_a_pruner_the_worse_curves_run_to_the_end(tmp_path):
    good, bad = _run_study(tmp_path, "none")
    assert all(t.state == TrialState.COMPLETE for t in good + bad)
    assert all(len(t.intermediate_values) == EPOCHS for t in bad)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_a_model_that_leaves_the_all_blank_phase_late_is_not_pruned(tmp_path, monkeypatch, pruner):
    # a rung before half the epochs (hyperband's old minimum resource of 1) pruned these
    monkeypatch.setattr(CurveTask, "second", LATE)
    good, late = _run_study(tmp_path, pruner)
    assert all(t.state == TrialState.COMPLETE for t in good + late)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_a_trial_is_not_pruned_after_its_last_epoch(tmp_path, monkeypatch, pruner):
    monkeypatch.setattr(CurveTask, "second", LAST_WORSE)
    good, last_worse = _run_study(tmp_path, pruner)
    assert all(t.state == TrialState.COMPLETE for t in good + last_worse)
    assert all(t.intermediate_values[EPOCHS] == 0.6 for t in last_worse)


@pytest.mark.parametrize("pruner", ["median", "hyperband"])
def test_the_base_configuration_is_never_pruned(tmp_path, monkeypatch, pruner):
    import optuna

    # a pruner that would stop every trial at its first epoch stops all but the base
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    good, bad = _run_study(tmp_path, pruner)
    trials = {t.number: t for t in good + bad}
    assert trials[0].params == {"training.learning_rate": 2e-3}  # the base, run first
    assert trials[0].state == TrialState.COMPLETE
    assert len(trials[0].intermediate_values) == EPOCHS
    assert all(t.state == TrialState.PRUNED and len(t.intermediate_values) == 1
               for number, t in trials.items() if number != 0)


class SlowTask(CurveTask):
    """CurveTask whose epochs take 0.15 s each."""

    def run(self, config, context):
        import time

        for epoch, value in enumerate(GOOD, 1):
            time.sleep(0.15)
            context.report(epoch, value)
        return TaskResult(value=min(GOOD), epochs=len(GOOD))


def test_a_trial_over_max_trial_seconds_is_pruned_at_its_next_epoch(tmp_path):
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.attrs import PRUNE_KIND
    from cnn_mellin.optim.launch import run_worker
    from cnn_mellin.optim.study import build_settings, init_study

    url = str(tmp_path / "studies.journal")
    (tmp_path / "data").mkdir()

    def study(name, seconds):
        settings = build_settings(
            Config({"training.num_epochs": EPOCHS}), tmp_path / "data",
            task=f"{__name__}:SlowTask", whitelist=["training.learning_rate"], num_trials=3,
            pruner="none", checkpoint_dir=tmp_path / name, max_trial_seconds=seconds,
        )
        init_study(url, name, settings)
        assert run_worker(url, name).exit_code == 0
        return load(url, name).get_trials()

    base, *drawn = study("limited", 0.5)  # 9 epochs of 0.15 s: over the limit after the 4th
    assert base.state == TrialState.COMPLETE  # the base is the baseline: never cut short
    for t in drawn:
        assert t.state == TrialState.PRUNED and t.user_attrs[PRUNE_KIND] == "timeout"
        assert 3 <= len(t.intermediate_values) <= 5
    assert all(t.state == TrialState.COMPLETE for t in study("ample", 60.0))
    with pytest.raises(ConfigError, match="--max-trial-seconds must be positive"):
        build_settings(Config({"training.num_epochs": EPOCHS}), tmp_path / "data",
                       task=f"{__name__}:SlowTask", checkpoint_dir=tmp_path / "x",
                       max_trial_seconds=0)
