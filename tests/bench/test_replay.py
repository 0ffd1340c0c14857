"""The replay simulator (bench/replay.py): exact accounting on hand-made tables."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from tests.conftest import ROOT


def _load_replay():
    spec = importlib.util.spec_from_file_location("replay", ROOT / "bench" / "replay.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["replay"] = module
    spec.loader.exec_module(module)
    return module


replay = _load_replay()
Curve, Spec, Table, simulate = replay.Curve, replay.Spec, replay.Table, replay.simulate

DISTS = {"x": FloatDistribution(0.0, 1.0), "c": CategoricalDistribution(("a", "b"))}


def _curve(i, per, seconds, status="done", x=None, c="a", kind="model"):
    return Curve(i, kind, status, {"x": i / 10 if x is None else x, "c": c}, tuple(per),
                 tuple(seconds))


def _table(*curves, epochs=3):
    return Table({c.id: c for c in curves}, dict(DISTS), epochs)


def _sim(table, spec, seed=0, first=(), **kw):
    """Simulate over the whole table; ``first`` are run first, in order (seed_base)."""
    return simulate(table, spec, seed, names=list(DISTS), pool=table.pool(["model"]),
                    base_ids=list(first), **kw)


GOOD = _curve(0, (0.9, 0.5, 0.3), (10.0, 20.0, 30.0))
BAD = _curve(1, (1.0, 0.95, 0.9), (4.0, 5.0, 6.0))
FAST = _curve(2, (0.8, 0.4, 0.2), (1.0, 1.0, 1.0))
MEMORY = _curve(3, (), (), status="memory")
DIVERGED = _curve(4, (0.99,), (7.0,), status="diverged")


def test_one_worker_runs_every_configuration_back_to_back_at_its_recorded_cost():
    table = _table(GOOD, BAD, FAST, MEMORY, DIVERGED)
    run = _sim(table, Spec(workers=1), seed=3)
    assert sorted(r.config_id for r in run.trials) == [0, 1, 2, 3, 4]  # each once
    cost = {0: 60.0, 1: 15.0, 2: 3.0, 3: 0.0, 4: 7.0}
    clock = 0.0
    for record in sorted(run.trials, key=lambda r: r.number):
        assert record.start == clock
        assert record.end - record.start == cost[record.config_id]
        clock = record.end
    assert run.compute == sum(cost.values()) == 85.0
    outcome = {r.config_id: (r.state, r.epochs, r.value) for r in run.trials}
    assert outcome[0] == ("complete", 3, 0.3)
    assert outcome[2] == ("complete", 3, 0.2)
    assert outcome[3] == ("pruned", 0, None)  # over the memory cap: no epoch, no cost
    assert outcome[4] == ("pruned", 1, None)  # diverged after its one epoch


def test_asynchronous_workers_share_the_clock():
    table = _table(GOOD, BAD, FAST, MEMORY)
    run = _sim(table, Spec(workers=2, seed_base=True), first=[0, 1, 2, 3])
    by_config = {r.config_id: r for r in run.trials}
    # GOOD on one worker (0-60 s); BAD on the other (0-15 s), then FAST (15-18 s), then the
    # memory-capped one at 18 s, costing nothing
    assert (by_config[0].start, by_config[0].end) == (0.0, 60.0)
    assert (by_config[1].start, by_config[1].end) == (0.0, 15.0)
    assert (by_config[2].start, by_config[2].end) == (15.0, 18.0)
    assert (by_config[3].start, by_config[3].end) == (18.0, 18.0)
    assert by_config[0].worker != by_config[1].worker == by_config[2].worker
    assert run.compute == 78.0
    assert run.compute_at(10.0) == 20.0  # both workers busy for 10 s
    assert run.compute_at(30.0) == 30.0 + 15.0 + 3.0
    # best so far: BAD's 0.9 at 15 s (30 worker-s), FAST's 0.2 at 18 s (18 + 15 + 3
    # worker-s); GOOD's 0.3 at 60 s is no improvement
    assert run.progress() == [(30.0, 15.0, 0.9), (36.0, 18.0, 0.2)]
    assert run.to_target(0.25) == (36.0, 18.0)
    assert run.to_target(0.1) == (math.inf, math.inf)
    assert (run.best_at(29.9), run.best_at(35.9), run.best_at(36.0)) == (1.0, 0.9, 0.2)


def test_a_pruned_trial_costs_the_seconds_of_the_epochs_it_ran():
    table = _table(FAST, GOOD, BAD)
    spec = Spec(workers=1, pruner="median", startup=1, warmup=0, seed_base=True)
    run = _sim(table, spec, first=[2, 0, 1])
    by_config = {r.config_id: r for r in run.trials}
    assert by_config[2].state == "complete"
    # GOOD reports 0.9 at epoch 1 against FAST's 0.8: the median pruner stops it after 10 s
    assert (by_config[0].state, by_config[0].epochs) == ("pruned", 1)
    assert by_config[0].end - by_config[0].start == 10.0
    assert (by_config[1].state, by_config[1].epochs) == ("pruned", 1)
    assert by_config[1].end - by_config[1].start == 4.0
    assert run.compute == 3.0 + 10.0 + 4.0


def test_fewer_epochs_per_trial_cost_and_score_only_those_epochs():
    table = _table(GOOD, FAST)
    run = _sim(table, Spec(workers=1, epochs=2, seed_base=True), first=[0, 2])
    by_config = {r.config_id: r for r in run.trials}
    assert (by_config[0].value, by_config[0].end - by_config[0].start) == (0.5, 30.0)
    assert (by_config[2].value, by_config[2].end - by_config[2].start) == (0.4, 2.0)


def test_early_stopped_training_completes_and_divergence_is_pruned():
    stopped = _curve(5, (0.9, 0.6), (2.0, 2.0))  # "done" after 2 of 3 epochs
    table = _table(stopped, DIVERGED)
    run = _sim(table, Spec(workers=1, seed_base=True), first=[5, 4])
    by_config = {r.config_id: r for r in run.trials}
    assert (by_config[5].state, by_config[5].value, by_config[5].epochs) == ("complete", 0.6, 2)
    assert (by_config[4].state, by_config[4].epochs) == ("pruned", 1)
    assert run.compute == 11.0


def test_compute_budget_stops_new_trials_but_lets_running_ones_finish():
    table = _table(GOOD, BAD, FAST)
    run = _sim(table, Spec(workers=1, seed_base=True), first=[1, 0, 2], stop_compute=20.0)
    assert [r.config_id for r in run.trials] == [1, 0]  # 15 s < 20: one more starts
    assert run.compute == 75.0


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_samplers_run_each_configuration_at_most_once_with_its_own_values(sampler):
    curves = [_curve(i, (1.0 - i / 20, 0.9 - i / 20), (1.0, 1.0), x=i / 12,
                     c="ab"[i % 2]) for i in range(12)]
    table = _table(*curves, epochs=2)
    run = _sim(table, Spec(sampler=sampler, workers=3), seed=5)
    assert sorted(r.config_id for r in run.trials) == list(range(12))
    assert run.compute == 24.0
    assert min(r.value for r in run.trials) == pytest.approx(0.9 - 11 / 20)


def test_nearest_configuration_is_the_closest_unused_one():
    dists = dict(DISTS)
    a, b = {"x": 0.1, "c": "a"}, {"x": 0.15, "c": "b"}
    assert replay.distance(dists, a, a) == 0.0
    assert replay.distance(dists, a, b) == pytest.approx(0.05 ** 2 + 1.0)


def test_staged_search_carries_on_from_the_sm_stage_without_repeating_configurations():
    curves = [_curve(i, (1.0 - i / 30, 0.9 - i / 30), (1.0, 2.0), x=i / 15,
                     c="ab"[i % 2]) for i in range(15)]
    table = _table(*curves, epochs=2)
    run = _sim(table, Spec(workers=2, staged=True, sm_trials=6, top_k=1), seed=2)
    stages = [r.stage for r in sorted(run.trials, key=lambda r: (r.start, r.number))]
    assert stages.count("sm") == 6 and stages.count("lg") == 9
    sm_end = max(r.end for r in run.trials if r.stage == "sm")
    assert all(r.start >= sm_end for r in run.trials if r.stage == "lg")  # the barrier
    assert sorted(r.config_id for r in run.trials) == list(range(15))
    assert run.compute == 45.0


def test_load_table_fills_base_values_and_extends_timed_out_curves(tmp_path):
    prefix = tmp_path / "t"
    (tmp_path / "t.meta.json").write_text(json.dumps({
        "settings": {"epochs": 4, "batch_size": 4},
        "sessions": [{"space": {
            "model.a": json.dumps({"name": "FloatDistribution",
                                   "attributes": {"low": 0.0, "high": 1.0, "log": False,
                                                  "step": None}}),
        }}]}))
    (tmp_path / "t.csv").write_text(
        "config_id,epoch,dev_per,train_loss,epoch_seconds,seconds,epoch_cpu_seconds,"
        "cpu_seconds\n"
        "0,1,1,5,10,10,9,9\n0,2,0.5,4,20,30,9,18\n"
        "1,1,0.9,5,3,3,3,3\n1,2,0.8,5,3,6,3,6\n1,3,0.7,5,3,9,3,9\n1,4,0.6,5,3,12,3,12\n")
    (tmp_path / "t.configs.csv").write_text(
        "config_id,kind,mellin,status,reason,params\n"
        "0,model,1,timeout,slow,\"{\"\"model.a\"\": 0.25}\"\n"
        "1,base,0,done,,{}\n"
        "2,model,0,memory,big,\"{\"\"model.a\"\": 0.75}\"\n")
    table = replay.load_table(prefix, base=lambda mellin: {"model.a": 0.5, "other": 1},
                              cost="epoch_seconds")
    cpu = replay.load_table(prefix, base=lambda mellin: {"model.a": 0.5, "other": 1})
    assert cpu.curves[0].seconds == (9.0, 9.0, 9.0, 9.0)
    assert table.epochs == 4
    assert table.curves[0].per == (1.0, 0.5, 0.5, 0.5)
    assert table.curves[0].seconds == (10.0, 20.0, 15.0, 15.0)
    assert table.curves[0].params == {"model.a": 0.25, "model.convolutional_mellin": True}
    assert table.curves[1].params["model.a"] == 0.5
    assert table.curves[2].per == () and table.pool(["model"]) == [0, 2]
