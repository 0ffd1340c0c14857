"""What the report says about one study (cnn_mellin.optim.report.story), read from an
in-memory study of hand-made trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.attrs import LINEAGE
from cnn_mellin.optim.report import story
from tests.optim.report.hand_made import settings, trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_slugs_are_folder_names_unique_in_one_report():
    taken: set[str] = set()
    names = ["sm", "sm", "a b/c", "...", "sm", "ok-1.x"]
    assert [story.slug(n, taken) for n in names] == \
        ["sm", "sm-2", "a_b_c", "study", "sm-3", "ok-1.x"]
    assert taken == {"sm", "sm-2", "a_b_c", "study", "sm-3", "ok-1.x"}


def _study(direction, values, lineage=None):
    study = optuna.create_study(direction=direction, study_name="sm")
    trials = [trial(n, value=v, params={"data.batch_size": 8 + n}) for n, v in enumerate(values)]
    trials += [trial(len(values), TrialState.PRUNED), trial(len(values) + 1, TrialState.FAIL),
               trial(len(values) + 2, TrialState.RUNNING)]
    study.add_trials(trials)
    if lineage is not None:
        study.set_user_attr(LINEAGE, lineage)
    return study


@pytest.mark.parametrize("direction, best", [("minimize", 1), ("maximize", 2)])
def test_the_best_trial_follows_the_direction_and_ties_go_to_the_first(direction, best):
    told = story.tell(_study(direction, [0.5, 0.25, 0.75, 0.25]), settings(), "sm")
    assert told.minimize == (direction == "minimize")
    assert told.best.number == best
    assert f"batch_size = {8 + best}" in told.best_ini
    assert (told.counts.complete, told.counts.pruned, told.counts.fail,
            told.counts.running) == (4, 1, 1, 1)


def test_every_figure_is_told_in_order_and_a_failed_ranking_is_a_note():
    told = story.tell(_study("minimize", [0.5, 0.5], lineage="not a dict"), settings(), "x")
    assert [c.name for c in told.charts] == ["budget", "history", "importance", "parallel",
                                             "curves", "memory", "reasons", "timeline"]
    assert told.slug == "x" and told.lineage is None
    assert told.importances is None and "all have the value 0.5" in told.importance_note
    assert told.charts[2].note == told.importance_note
    assert [t.number for t in story.ended(told)] == [2, 3]


def test_a_study_without_completed_trials_has_no_best():
    told = story.tell(_study("minimize", [], lineage={"parent": "a"}), settings(), "sm")
    assert told.best is None and told.best_ini is None
    assert told.lineage == {"parent": "a"}
    assert "0 completed trial(s)" in told.importance_note
