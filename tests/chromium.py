"""Headless Chromium for the browser tests: Debian's ``chromium`` and ``chromedriver`` via selenium.

``scripts/setup.sh --test-deps`` installs both; where Chromium cannot run, the tests that
need it skip, saying why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]


def start(profile: Path, width: int = 1280, height: int = 900):
    """A selenium Chrome driver on a fresh profile in ``profile``; skips if Chromium cannot run."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium cannot run here: no chromium or chromedriver on PATH "
                    "(bash scripts/setup.sh --test-deps installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except WebDriverException as err:
        pytest.skip(f"Chromium cannot run here: {str(err.msg or err).splitlines()[0]}")


def console_errors(driver) -> list[str]:
    """Console messages of level SEVERE since the last call."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry.get("level") == "SEVERE"]
