"""optuna-dashboard on our studies (journal file and PostgreSQL), seen in headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cnn_mellin.optim.best import best_trial
from cnn_mellin.optim.launch import run_worker
from tests import chromium
from tests.optim_helpers import ROOT, env, fake_study, load

pytest_plugins = ("tests.optim_fixtures",)  # the database fixtures
DASHBOARD = str(Path(sys.executable).with_name("optuna-dashboard"))
SEARCH = ["training.learning_rate", "data.batch_size", "model.window_size"]
SCREENSHOTS = os.environ.get("CNN_MELLIN_SCREENSHOTS") == "1"  # rewrite docs/*.png


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(storage: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Start optuna-dashboard on a free port of 127.0.0.1; returns (process, base URL)."""
    if not Path(DASHBOARD).exists():
        pytest.fail("optuna-dashboard is not installed (pip install -e '.[dev]')")
    port = _free_port()
    process = subprocess.Popen(
        [DASHBOARD, storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"optuna-dashboard exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/studies", timeout=2) as answer:
                if answer.status == 200:
                    return process, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    process.kill()
    pytest.fail(f"optuna-dashboard did not answer on {base}: {log.read_text()[-2000:]}")


def _wait_text(driver, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = driver.find_element("tag name", "body").text
        if needle in text:
            return text
        time.sleep(0.3)
    raise AssertionError(f"{needle!r} never shown; the page says: {text[:1500]}")


@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_dashboard_shows_the_trials_of_our_study(kind, tmp_path, request):
    if kind == "journal":
        url = str(tmp_path / "studies.journal")
    else:
        url = request.getfixturevalue("pg_db")[0]
    fake_study(url, tmp_path, name="done", num_trials=8, whitelist=SEARCH, pruner="median",
               base={"training.num_epochs": 3, "model.window_stride": 1})
    assert run_worker(url, "done", seed=4).exit_code == 0
    study = load(url, "done")
    numbers = sorted(t.number for t in study.trials)
    best = best_trial(study)
    driver = chromium.start(tmp_path / "profile", width=1400, height=1000)
    process, base = _serve(url, tmp_path / "dashboard.log")
    try:
        driver.get(f"{base}/dashboard/studies/{study._study_id}")
        page = _wait_text(driver, f"Best Trial (number={best.number})")
        assert "done" in page and "History" in page
        if SCREENSHOTS and kind == "journal":
            driver.save_screenshot(str(ROOT / "docs" / "optuna-dashboard.png"))
        driver.get(f"{base}/dashboard/studies/{study._study_id}/trials")
        listing = _wait_text(driver, f"{len(numbers)} Trials")
        shown = {int(line.split()[1]) for line in listing.splitlines()
                 if line.startswith("Trial ") and line.split()[1].isdigit()}
        assert shown == set(numbers)
        # a trial's page lists our user attributes (wall time, epochs, worker, ...)
        assert "wall_time_s" in listing and "epochs" in listing
        errors = chromium.console_errors(driver)
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)
    assert errors == []
