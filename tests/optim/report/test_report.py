"""``optim report``: index.html, PNGs and trials.csv, drawn in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from optuna.trial import TrialState

from cnn_mellin.optim.attrs import LINEAGE, PRUNE_KIND, PRUNE_REASON, WORKER
from cnn_mellin.optim.budget import fail_and_replace
from cnn_mellin.optim.importance import rank
from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.status import draw_counts
from cnn_mellin.optim.study import read_settings
from tests import chromium
from tests.optim_helpers import ROOT, env, fake_study, load

FIGURES = {"budget", "history", "importance", "parallel", "curves", "memory", "reasons",
           "timeline"}
SEARCH = ["training.learning_rate", "training.optimizer", "data.batch_size",
          "model.window_size"]
FLAT_SEARCH = ["training.learning_rate", "data.batch_size"]  # no optimizer: no NaN, no OOM
DOCS = ROOT / "docs"
# set to write the screenshots committed under docs/
SCREENSHOTS = os.environ.get("CNN_MELLIN_SCREENSHOTS") == "1"


def report_cli(*argv, extra_env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cnn_mellin", "optim", *map(str, argv)],
        capture_output=True, text=True, env=env(**(extra_env or {})), timeout=300,
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished journal study with completed, pruned (pruner, memory, oom, nonfinite)
    and failed trials."""
    tmp = tmp_path_factory.mktemp("searched")
    url = str(tmp / "studies.journal")
    fake_study(url, tmp, name="sm", num_trials=16, whitelist=SEARCH, pruner="median",
               mem_limit_bytes=40_000_000,
               base={"training.num_epochs": 4, "model.window_stride": 1})
    assert run_worker(url, "sm", seed=1, max_trials=14).exit_code == 0
    study = load(url, "sm")
    # whether the median pruner stops a trial depends on the order of values; one for sure:
    trial = study.ask()  # the next WAITING trial of the budget
    for epoch, value in ((1, 6.0), (2, 5.5)):
        trial.report(value, epoch)
    trial.set_user_attr(PRUNE_KIND, "pruner")
    trial.set_user_attr(PRUNE_REASON, "pruned by the median pruner at epoch 2 (value 5.5)")
    study.tell(trial, state=TrialState.PRUNED)
    # a worker that died: failed and retried as the reaper does
    trial = study.ask()
    trial.set_user_attr(WORKER, {"host": "vm", "pid": 123, "device": "cpu"})
    assert fail_and_replace(study, study._storage.get_trial(trial._trial_id), "dead",
                            "worker vm:123 stopped sending heartbeats", max_retries=2)
    assert run_worker(url, "sm", seed=2).exit_code == 0
    return url, tmp


@pytest.fixture(scope="module")
def full_report(searched):
    url, tmp = searched
    out = tmp / "report"
    done = report_cli(url, "report", out)
    assert done.returncode == 0, done.stderr
    return url, out, done


def _figure_json(page: str, ident: str) -> dict:
    """The plotly figure the page draws into the div ``ident``."""
    figures = {json.loads(m.group(2)): m.group(1)
               for m in re.finditer(r"var f=(\{.*?\});Plotly\.newPlot\((\"[^\"]+\")", page)}
    assert ident in figures, f"no figure {ident} in the page"
    return json.loads(figures[ident].replace("<\\/", "</"))


def test_report_writes_page_pngs_csv_and_best_ini(full_report):
    url, out, done = full_report
    listed = {Path(line).relative_to(out).as_posix() for line in done.stdout.splitlines()}
    assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"index.html", "plotly.min.js", "trials.csv", "sm/best.ini"} <= listed
    assert {f"sm/{name}.png" for name in FIGURES} <= listed
    for name in FIGURES:
        data = (out / "sm" / f"{name}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert not list(out.parent.glob(".report.*"))  # no temporary folder left
    page = (out / "index.html").read_text()
    assert '<script src="plotly.min.js"></script>' in page
    assert not re.search(r"""src=["']?(https?:)?//""", page)  # nothing from the network
    assert "No parent stage" in page
    study = load(url, "sm")
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(study.trials)
    assert {r["study"] for r in rows} == {"sm"}
    assert {"user_attrs_wall_time_s", "user_attrs_prune_kind", "params_data.batch_size"} \
        <= set(rows[0])
    assert {r["state"] for r in rows} == {"COMPLETE", "PRUNED", "FAIL"}


def test_report_importance_is_the_ranking_of_important(full_report):
    url, out, _ = full_report
    study = load(url, "sm")
    ranked = rank(study, read_settings(study))
    figure = _figure_json((out / "index.html").read_text(), "fig-sm-importance")
    bars = figure["data"][0]
    assert list(reversed(bars["y"])) == [name for name, _ in ranked]
    assert list(reversed(bars["x"])) == pytest.approx([score for _, score in ranked])
    shown = report_cli(url, "important")
    assert shown.stdout.split() == [name for name, _ in ranked]


def test_report_marks_pruned_trials_and_reasons(full_report):
    url, out, _ = full_report
    study = load(url, "sm")
    page = (out / "index.html").read_text()
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.intermediate_values]
    assert pruned
    curves = _figure_json(page, "fig-sm-curves")
    ends = next(trace for trace in curves["data"] if trace["name"] == "pruned here")
    assert sorted(d[0] for d in ends["customdata"]) == sorted(t.number for t in pruned)
    kinds = {t.user_attrs["prune_kind"] for t in study.trials if t.state == TrialState.PRUNED}
    assert {"oom", "pruner"} <= kinds
    assert "memory" not in kinds  # draws over the limit are redrawn, never trials
    reasons = _figure_json(page, "fig-sm-reasons")["data"][0]
    assert set(reasons["y"]) == {f"pruned: {k}" for k in kinds} | {"failed: dead"}
    assert "worker vm:123 stopped sending heartbeats" in page
    draws = draw_counts(study.trials)
    assert draws["rejected_memory"] > 0
    assert f"{draws['rejected_memory']} over the memory limit, " \
        f"{draws['rejected_invalid']} invalid: never trials" in page


def test_report_draws_every_figure_in_chromium(full_report, tmp_path):
    _, out, _ = full_report
    driver = chromium.start(tmp_path / "profile")
    try:
        driver.get((out / "index.html").as_uri())
        drawn = _drawn(driver)
        errors = chromium.console_errors(driver)
        if SCREENSHOTS:  # the top of the page: cards, lineage, best trial, first figures
            driver.set_window_size(1280, 1900)
            driver.save_screenshot(str(DOCS / "report.png"))
    finally:
        driver.quit()
    assert errors == []
    assert {ident.removeprefix("fig-sm-") for ident in drawn} == FIGURES
    empty = {ident: state for ident, state in drawn.items() if not state["ok"]}
    assert not empty, empty


def _drawn(driver) -> dict[str, dict]:
    """Per plot div: how many traces plotly drew and whether each left marks on the page."""
    driver.set_script_timeout(30)
    return driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const look = () => {
          const out = {};
          for (const gd of document.querySelectorAll('.plot')) {
            const traces = gd._fullData ? gd._fullData.length : 0;
            const marks = gd.querySelectorAll(
              '.scatterlayer .trace path, .scatterlayer .point, .barlayer .point, '
              + '.boxlayer .trace path, .parcoords .axis, .parcoords-lines').length;
            const box = gd.getBoundingClientRect();
            out[gd.id] = {traces, marks, ok: traces > 0 && marks > 0 && box.height > 100};
          }
          return out;
        };
        // plotly draws asynchronously; give it until every plot has marks (or 20 s)
        const start = Date.now();
        const poll = () => {
          const out = look();
          if (Object.values(out).every(s => s.ok) || Date.now() - start > 20000) done(out);
          else setTimeout(poll, 200);
        };
        poll();
    """)


@pytest.fixture
def edge_studies(tmp_path, monkeypatch):
    """Studies with no completed trial, with one value only, and without epochs but with a
    lineage: (url, names)."""
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, name="empty", num_trials=3)
    monkeypatch.setenv("FAKE_VALUE", "1.0")
    fake_study(url, tmp_path, name="flat", num_trials=3, whitelist=FLAT_SEARCH,
               base={"training.num_epochs": 2})
    assert run_worker(url, "flat", seed=2).outcomes == {"complete": 3}
    fake_study(url, tmp_path, name="child", num_trials=2, whitelist=FLAT_SEARCH)
    child = load(url, "child")
    for value in (0.5, 0.25):  # completed without reporting epochs
        child.tell(child.ask(), value)
    child.set_user_attr(LINEAGE, {
        "parent": "flat",
        "kept": {"training.learning_rate": 0.61, "training.optimizer": 0.39},
        "carried": {"data.batch_size": 16, "model.window_size": 9},
    })
    return url, ["flat", "child", "empty"]


def test_report_of_several_edge_case_studies_renders(edge_studies, tmp_path):
    url, names = edge_studies
    out = tmp_path / "stages"
    done = report_cli(url, "report", out, "--studies", *names, "--no-png")
    assert done.returncode == 0, done.stderr
    assert "no importance plot for study flat" in done.stderr
    assert not list(out.rglob("*.png"))
    page = (out / "index.html").read_text()
    assert ">PNG</a>" not in page
    for name in names:
        assert f'id="study-{name}"' in page
    assert "all have the value 1" in page  # why flat has no importance plot
    assert 'Started from study <a href="#study-flat">flat</a>' in page
    assert "training.learning_rate" in page and "0.61" in page and "model.window_size" in page
    assert page.count("No parent stage") == 2
    assert "No trial reported intermediate (per-epoch) values." in page  # empty, child
    with open(out / "trials.csv", newline="") as f:
        studies = [row["study"] for row in csv.DictReader(f)]
    assert studies == ["flat"] * 3 + ["child"] * 2 + ["empty"] * 3

    driver = chromium.start(tmp_path / "profile")
    try:
        driver.get((out / "index.html").as_uri())
        drawn = _drawn(driver)
        errors = chromium.console_errors(driver)
    finally:
        driver.quit()
    assert errors == []
    assert "fig-stages-stages" in drawn and "fig-empty-budget" in drawn
    assert "fig-empty-history" not in drawn  # a note instead of an empty plot
    assert all(state["ok"] for state in drawn.values()), drawn


def test_report_replaces_an_earlier_report_but_nothing_else(edge_studies, tmp_path):
    url, _ = edge_studies
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = report_cli(url, "--study-name", "flat", "report", out, "--no-png")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not a report" in refused.stderr or "other than a report" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    first = report_cli(url, "--study-name", "flat", "report", out, "--no-png")
    assert first.returncode == 0, first.stderr
    (out / "stale.txt").write_text("from an earlier report")
    again = report_cli(url, "--study-name", "child", "report", out, "--no-png")
    assert again.returncode == 0, again.stderr
    assert not (out / "stale.txt").exists() and (out / "child" / "best.ini").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("argv, message", [
    (["--study-name", "flat", "{url}", "report", "{out}", "--studies", "child"], "not both"),
    (["{url}", "report", "{out}", "--studies", "flat", "flat"], "more than once"),
    (["{url}", "report", "{out}", "--studies", "flat", "nosuch"], "nosuch"),
])
def test_report_bad_study_choice_is_a_one_line_error(edge_studies, tmp_path, argv, message):
    url, _ = edge_studies
    out = tmp_path / "out"
    done = report_cli(*[a.format(url=url, out=out) for a in argv])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_report_without_a_browser_warns_and_writes_the_page(edge_studies, tmp_path):
    url, _ = edge_studies
    out = tmp_path / "out"
    # kaleido looks at $BROWSER_PATH first, then PATH and the usual places
    done = report_cli("--study-name", "flat", url, "report", out,
                      extra_env={"BROWSER_PATH": tmp_path / "no-chromium"})
    assert done.returncode == 0, done.stderr
    assert "no PNGs" in done.stderr and "no-chromium" in done.stderr, done.stderr
    assert (out / "index.html").is_file() and not list(out.rglob("*.png"))
    assert ">PNG</a>" not in (out / "index.html").read_text()
