"""scripts/plan_stages.py: the lg stage planned again from the sm base trial's epochs."""

from __future__ import annotations

import importlib.util

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("plan_stages", ROOT / "scripts" / "plan_stages.py")
plan_stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan_stages)


def test_lg_epochs_fill_the_time_left_at_the_measured_cost_per_utterance():
    # 10 s before the first epoch's work, then 20 s an epoch of 100 utterances: 0.2 s an
    # utterance-epoch, 200 s an epoch of 1000; 2010 s left holds 10 such epochs
    seconds = {1: 30.0, 2: 50.0, 3: 70.0, 6: 130.0}
    epochs, utts, epoch_s = plan_stages.replan_lg(seconds, 100, 1000, 2010.0, 4, 30, 64)
    assert (epochs, utts) == (10, 1000)
    assert epoch_s == pytest.approx(200.0)


def test_a_machine_too_slow_for_the_least_epochs_trains_the_lg_stage_on_a_subset():
    seconds = {1: 20.0, 6: 120.0}  # 20 s an epoch of 100 utterances, nothing before
    epochs, utts, _ = plan_stages.replan_lg(seconds, 100, 1000, 400.0, 4, 30, 64)
    assert epochs == 4 and utts == 500  # 4 epochs x 500 utterances x 0.2 s = 400 s


def test_the_lg_epochs_are_capped_and_one_timed_epoch_is_enough():
    epochs, utts, _ = plan_stages.replan_lg({1: 1.0}, 100, 100, 1e6, 4, 30, 64)
    assert (epochs, utts) == (30, 100)
