"""The report's figures (cnn_mellin.optim.report.figures) on hand-made trials: what each
plots, and the note it gives instead of an empty plot."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.attrs import (
    ADMISSION_BYTES,
    FAIL_KIND,
    FAIL_REASON,
    PEAK_BYTES,
    PEAK_METHOD,
    PRUNE_KIND,
    PRUNE_REASON,
    WORKER,
)
from cnn_mellin.optim.report import figures
from tests.optim.report.hand_made import T0, settings, trial

C, P, R, W, F = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING,
                 TrialState.FAIL)
MEASURED = "measured during training"


def _pruned(number, kind="pruner", reason="pruned at epoch 2", curve=None, **more):
    curve = {1: 3.0, 2: 2.5} if curve is None else curve
    return trial(number, P, curve=curve, **{PRUNE_KIND: kind, PRUNE_REASON: reason}, **more)


def _failed(number, kind="dead", reason="worker vm:1 stopped sending heartbeats", **more):
    return trial(number, F, **{FAIL_KIND: kind, FAIL_REASON: reason}, **more)


def _trace(chart, name):
    return next(t for t in chart.figure.data if t.name == name)


def test_completed_keeps_complete_trials_with_a_finite_value():
    trials = [trial(0, value=1.0), trial(1, value=math.inf), trial(2, value=math.nan),
              _pruned(3), trial(4, R)]
    assert [t.number for t in figures.completed(trials)] == [0]


def test_worker_labels_and_reasons():
    assert figures.worker_label(trial(0, value=1, **{WORKER: {
        "host": "vm", "pid": 7, "device": "cuda:1"}})) == "vm pid 7 (cuda:1)"
    assert figures.worker_label(trial(0, value=1, **{WORKER: {"host": "vm"}})) == "vm pid ?"
    assert figures.worker_label(trial(0, value=1)) == "unknown worker"
    assert figures.worker_label(trial(0, value=1, **{WORKER: "vm"})) == "unknown worker"
    assert figures.reason_of(_pruned(0, "oom", "out of memory")) == ("oom", "out of memory")
    assert figures.reason_of(_failed(0)) == ("dead", "worker vm:1 stopped sending heartbeats")
    assert figures.reason_of(trial(0, F)) == ("unknown", "no reason recorded")


def test_budget_counts_done_trials_against_the_budget_and_failures_beside_it():
    trials = [trial(0, value=1), trial(1, value=2), _pruned(2), trial(3, R), trial(4, W),
              _failed(5), _failed(6)]
    chart = figures.budget_chart(trials, settings(num_trials=5))
    assert chart.title == "Budget: 3 of 5 trials done" and chart.note is None
    bars = {t.name: t.x[0] for t in chart.figure.data}
    assert bars == {"complete 2": 2, "pruned 1": 1, "running 1": 1, "waiting 1": 1,
                    "failed 2": 2}


@pytest.mark.parametrize("minimize, best", [(True, [3.0, 1.0, 1.0]), (False, [3.0, 3.0, 4.0])])
def test_history_shows_the_best_so_far_in_order_of_completion(minimize, best):
    trials = [trial(0, value=3.0, seconds=5), trial(1, value=4.0, seconds=30),
              trial(2, value=1.0, seconds=20), _pruned(3, curve={1: 9.0, 4: 8.0}),
              trial(4, R)]
    chart = figures.history_chart(trials, minimize)
    assert list(_trace(chart, "complete").customdata) == [0, 2, 1]
    assert list(_trace(chart, "best so far").y) == best
    assert list(_trace(chart, "pruned").y) == [8.0]  # its last reported value


def test_history_without_a_finished_trial_is_a_note():
    chart = figures.history_chart([trial(0, R), _pruned(1, curve={}), _failed(2)], True)
    assert chart.figure is None and chart.note == "No trial has finished with a value yet."


def test_importance_bars_put_the_most_important_on_top():
    chart = figures.importance_chart([("a", 0.7), ("b", 0.2), ("c", 0.1)], None)
    bar = chart.figure.data[0]
    assert list(bar.y) == ["c", "b", "a"] and list(bar.x) == [0.1, 0.2, 0.7]
    none = figures.importance_chart(None, "all have the value 1")
    assert none.figure is None and none.note == "all have the value 1"


def test_parallel_axes_log_wide_ranges_and_index_categories():
    trials = [
        trial(0, value=1.0, params={"training.learning_rate": 1e-4, "training.optimizer": "sgd",
                                    "data.batch_size": 8}),
        trial(1, value=2.0, params={"training.learning_rate": 1e-1, "training.optimizer": "adam",
                                    "data.batch_size": 16}),
        trial(2, value=1.5, params={"training.learning_rate": 1e-2, "training.optimizer": "adam"}),
    ]
    chart = figures.parallel_chart(trials[:2], list(trials[0].params), minimize=True)
    dims = {d.label: d for d in chart.figure.data[0].dimensions}
    assert list(dims) == ["log10 learning_rate", "optimizer", "batch_size", "value"]
    assert list(dims["log10 learning_rate"].values) == pytest.approx([-4, -1])
    assert list(dims["optimizer"].ticktext) == ["adam", "sgd"]
    assert list(dims["optimizer"].values) == [1, 0]
    assert list(dims["batch_size"].values) == [8, 16]  # a narrow range stays linear
    # a parameter some completed trial lacks is left out
    chart = figures.parallel_chart(trials, list(trials[0].params), minimize=True)
    assert "batch_size" not in [d.label for d in chart.figure.data[0].dimensions]
    assert figures.parallel_chart([trial(0, R)], ["data.batch_size"], True).note == \
        "No completed trial yet."


def test_curves_end_pruned_trials_with_a_cross_and_a_reason():
    trials = [trial(0, value=1.0, curve={1: 3.0, 2: 2.0, 3: 1.0}),
              _pruned(1, reason="pruned by the median pruner", curve={1: 4.0, 2: 3.5}),
              trial(2, value=2.0)]
    chart = figures.curves_chart(trials)
    assert len([t for t in chart.figure.data if t.name == "complete"]) == 1  # trial 2: no curve
    ends = _trace(chart, "pruned here")
    assert list(ends.x) == [2] and list(ends.y) == [3.5]
    assert [list(d) for d in ends.customdata] == [[1, "pruned by the median pruner"]]
    assert figures.curves_chart([trial(0, value=1.0)]).note == \
        "No trial reported intermediate (per-epoch) values."


def test_memory_is_drawn_in_mib_or_gib_with_trials_without_a_value_below():
    mib = 2 ** 20
    small = [trial(0, value=1.0, **{ADMISSION_BYTES: 300 * mib, PEAK_BYTES: 200 * mib,
                                    PEAK_METHOD: MEASURED}),
             _pruned(1, "oom", "out of memory", **{ADMISSION_BYTES: 500 * mib})]
    chart = figures.memory_chart(small, mem_limit=400 * mib)
    assert list(_trace(chart, "admitted (estimate)").x) == [300]
    assert list(_trace(chart, "measured peak").x) == [200]
    below = [t for t in chart.figure.data if list(t.y) == ["pruned: oom"]]
    assert len(below) == 1 and list(below[0].x) == [500]
    assert chart.figure.layout.xaxis2.title.text == "memory (MiB)"
    big = figures.memory_chart([trial(0, value=1.0, **{ADMISSION_BYTES: 8 * 2 ** 30})], None)
    assert list(_trace(big, "admitted (estimate)").x) == [8]
    assert big.figure.layout.xaxis.title.text == "memory (GiB)"
    assert figures.memory_chart([trial(0, value=1.0)], 400 * mib).note == \
        "No trial recorded an admission estimate or a measured peak."


def test_reasons_are_counted_by_state_and_kind():
    trials = [_pruned(0, "oom"), _pruned(1, "oom", "another reason"), _pruned(2),
              _failed(3), trial(4, value=1.0)]
    bar = figures.reasons_chart(trials).figure.data[0]
    assert dict(zip(bar.y, bar.x, strict=True)) == {
        "pruned: oom": 2, "pruned: pruner": 1, "failed: dead": 1}
    assert figures.reasons_chart([trial(0, value=1.0)]).note == "No trial was pruned or failed."


def test_timeline_has_a_row_per_worker_and_running_trials_reach_now():
    vm = {WORKER: {"host": "vm", "pid": 1}}
    trials = [trial(0, value=1.0, seconds=30, **vm), trial(1, R, start_s=40, **vm),
              trial(2, value=1.0, seconds=5, **{WORKER: {"host": "gpu", "pid": 2}}),
              trial(3, W)]
    chart = figures.timeline_chart(trials, now=T0 + timedelta(seconds=100))
    running = _trace(chart, "running")
    assert list(running.x) == [60_000] and list(running.y) == ["vm pid 1"]
    assert sorted(_trace(chart, "complete").y) == ["gpu pid 2", "vm pid 1"]
    assert figures.timeline_chart([trial(0, W)]).note == "No trial has started yet."


def test_stages_mark_each_studys_best():
    stages = [("sm", [trial(0, value=3.0), trial(1, value=2.0)], True),
              ("empty", [trial(0, R)], True),
              ("lg", [trial(0, value=0.5), trial(1, value=0.9)], False)]
    best = _trace(figures.stages_chart(stages), "best")
    assert list(best.x) == ["sm", "lg"] and list(best.y) == [2.0, 0.9]
    assert figures.stages_chart([("empty", [], True)]).note == \
        "No study has a completed trial yet."
