"""PNG export of the report's figures: kaleido 1.x driving a Chrome or Chromium on this machine.

kaleido 1.x ships no browser; it finds one on ``PATH`` (Debian's ``chromium`` works) or at
``$BROWSER_PATH``. All figures go through one browser session. MathJax is switched off and
plotly.js is read from the plotly package, so nothing is fetched from the network.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import plotly
import plotly.graph_objects as go

_log = logging.getLogger("cnn_mellin.optim")
SCALE = 2  # device pixels per CSS pixel: sharp on high-density screens and in slides


class PngUnavailable(Exception):
    """No PNG can be written here (kaleido or a browser missing); the message says which."""


def plotly_js() -> Path:
    """The ``plotly.min.js`` bundled with the plotly package."""
    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def write_pngs(jobs: list[tuple[go.Figure, Path, int, int]], timeout: float = 120) -> None:
    """Write each (figure, path, width, height) as a PNG; raises PngUnavailable if it cannot."""
    if not jobs:
        return
    try:
        import kaleido
        from kaleido.errors import BrowserClosedError, BrowserFailedError, ChromeNotFoundError
    except ImportError:
        raise PngUnavailable("kaleido is not installed (pip install 'kaleido>=1')") from None
    for name in ("kaleido", "choreographer"):  # their INFO lines narrate every tab
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    specs = [
        {"fig": fig.to_dict(), "path": str(path),
         "opts": {"format": "png", "width": width, "height": height, "scale": SCALE}}
        for fig, path, width, height in jobs
    ]
    try:
        errors = kaleido.write_fig_from_object_sync(
            specs, kopts={"mathjax": False, "plotlyjs": str(plotly_js()), "timeout": timeout},
        )
    except ChromeNotFoundError:
        if os.environ.get("BROWSER_PATH"):
            raise PngUnavailable(
                f"BROWSER_PATH={os.environ['BROWSER_PATH']} is not a Chrome or Chromium"
            ) from None
        raise PngUnavailable(
            "no Chrome or Chromium found for plotly's PNG export (Debian: apt-get install "
            "chromium; or set BROWSER_PATH)"
        ) from None
    except (BrowserFailedError, BrowserClosedError) as err:
        raise PngUnavailable(f"the browser for plotly's PNG export failed: {err}") from None
    except TimeoutError:
        raise PngUnavailable(f"the browser took over {timeout:g} s for a figure") from None
    if errors:
        raise PngUnavailable(f"the browser could not render a figure: {errors[0]}")
    missing = [path for _, path, _, _ in jobs if not Path(path).is_file()]
    if missing:
        raise PngUnavailable(f"the browser wrote no {missing[0].name}")
