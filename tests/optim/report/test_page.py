"""The report's ``index.html`` (cnn_mellin.optim.report.page) rendered from hand-made study
stories: cards, lineage, best trial, reasons table, figures and notes, several studies."""

from __future__ import annotations

import re
from datetime import datetime

from optuna.trial import TrialState

from cnn_mellin.optim import budget
from cnn_mellin.optim.attrs import EPOCHS, PRUNE_KIND, PRUNE_REASON
from cnn_mellin.optim.report import figures, page
from cnn_mellin.optim.report.story import StudyStory
from tests.optim.report.hand_made import settings, trial

NOW = datetime(2026, 1, 2, 9, 30)


def _pruned(number, reason):
    return trial(number, TrialState.PRUNED, curve={1: 2.0},
                 **{PRUNE_KIND: "pruner", PRUNE_REASON: reason})


def _story(name="sm", slug=None, trials=None, lineage=None, minimize=True) -> StudyStory:
    trials = trials if trials is not None else [
        trial(0, value=0.5, params={"data.batch_size": 8}, curve={1: 0.9, 2: 0.5},
              **{EPOCHS: 2}),
        trial(1, value=0.25, params={"data.batch_size": 16}),
        _pruned(2, "pruned by the median pruner at epoch 1 (value 2)"),
        _pruned(3, "pruned by the median pruner at epoch 4 (value 0.75)"),
    ]
    done = figures.completed(trials)
    best = min(done, key=lambda t: t.value if minimize else -t.value) if done else None
    charts = [figures.history_chart(trials, minimize), figures.importance_chart(None, "few"),
              figures.reasons_chart(trials)]
    return StudyStory(
        name=name, slug=slug or name, settings=settings(num_trials=6), minimize=minimize,
        trials=trials, counts=budget.count(trials, 6), best=best,
        best_ini="[data]\nbatch_size = 16\n" if best else None, lineage=lineage,
        importances=None, importance_note="few", charts=charts,
        draws={"draws": 7, "accepted": 4, "rejected_memory": 2, "rejected_invalid": 1},
        workers={"workers": 1, "seconds": 100.0, "busy_s": 75.0, "idle_s": 25.0,
                 "idle_share": 0.25},
    )


def _render(stories, png=True, stages=None):
    return page.render(stories, stages, storage="studies.journal", png=png, now=NOW)


def test_one_study_page_has_its_cards_best_trial_figures_and_notes():
    html = _render([_story()])
    assert "<title>cnn-mellin report: study sm</title>" in html
    assert "studies.journal · written 2026-01-02 09:30" in html
    assert "<nav>" not in html and 'id="overview"' not in html
    assert '<div class="k">done</div><div class="v">4 / 6 <small>2 complete, 2 pruned</small>' \
        in html
    assert '<div class="v">0.25 <small>trial 1</small>' in html
    assert "2 over the memory limit, 1 invalid: never trials" in html
    assert "25.0%" in html and "of 100 worker-seconds" in html
    assert "No parent stage: this study was not started from another." in html
    assert "Trial 1: value <b>0.25</b>" in html and '<a href="sm/best.ini">best.ini</a>' in html
    assert 'id="fig-sm-history"' in html and 'href="sm/history.png">PNG</a>' in html
    # a chart without a figure is its note, not an empty plot
    assert 'id="fig-sm-importance"' not in html
    assert '<p class="note" data-figure-note="importance">few</p>' in html


def test_without_pngs_there_are_no_png_links():
    html = _render([_story()], png=False)
    assert 'id="fig-sm-history"' in html and ">PNG</a>" not in html


def test_reasons_that_differ_only_in_numbers_share_a_row():
    html = _render([_story()])
    rows = re.findall(r"<tr><td>pruned</td><td>pruner</td><td>(.*?)</td>"
                      r'<td class="num">(\d+)</td><td>(.*?)</td></tr>', html)
    assert rows == [("pruned by the median pruner at epoch N (value N)", "2", "2, 3")]
    same = [_pruned(n, "out of time") for n in range(14)]
    html = _render([_story(trials=same)])
    [(text, count, numbers)] = re.findall(
        r"<tr><td>pruned</td><td>pruner</td><td>(.*?)</td>"
        r'<td class="num">(\d+)</td><td>(.*?)</td></tr>', html)
    assert (text, count) == ("out of time", "14")
    assert numbers == ", ".join(map(str, range(12))) + " …"


def test_a_study_without_a_completed_trial_says_so():
    html = _render([_story(trials=[trial(0, TrialState.RUNNING)])])
    assert '<p class="note">No completed trial yet.</p>' in html
    assert '<div class="k">best value</div><div class="v">–</div>' in html


def test_lineage_links_a_parent_in_the_report_and_lists_what_was_carried():
    lineage = {"parent": "sm", "kept": {"training.learning_rate": 0.61},
               "carried": {"data.batch_size": 16}, "note": "from the sm stage"}
    parent, child = _story("sm"), _story("lg", lineage=lineage)
    html = _render([parent, child], stages=figures.stages_chart([]))
    assert 'Started from study <a href="#study-sm">sm</a>.' in html
    assert "<td><code>training.learning_rate</code></td><td class=\"num\">0.61</td>" in html
    assert "Carried configuration (1 values)" in html
    assert "&quot;note&quot;: &quot;from the sm stage&quot;" in html
    alone = _render([child])
    assert "Started from study <code>sm</code>." in alone  # no parent to link to


def test_several_studies_get_a_nav_an_overview_and_the_stages_figure():
    stories = [_story("sm"), _story("lg", lineage={"parent": "sm"})]
    stages = figures.stages_chart([(s.name, s.trials, s.minimize) for s in stories])
    html = _render(stories, stages=stages)
    assert "<title>cnn-mellin report: studies sm, lg</title>" in html
    assert '<nav><a href="#overview">overview</a><a href="#study-sm">sm</a>' \
           '<a href="#study-lg">lg</a></nav>' in html
    assert '<h2>2 studies</h2>' in html and 'id="fig-stages-stages"' in html
    overview = html[html.index('id="overview"'):html.index('id="study-sm"')]
    assert "<td>sm</td>" in overview  # lg's parent column


def test_text_from_the_study_is_escaped_and_cannot_end_a_script():
    story = _story("a<b>", slug="a_b_", trials=[
        trial(0, value=1.0), _pruned(1, "</script><script>alert(1)</script>")])
    story.charts.append(figures.curves_chart(story.trials))  # the reason is in its hover data
    html = _render([story])
    assert "<h2>Study a&lt;b&gt;</h2>" in html
    assert "</script><script>alert(1)" not in html
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the reasons table
    assert html.count("alert(1)") > 1  # in the figure's hover data too
    assert html.count("<script") == html.count("</script>")  # each closes its own tag only
