"""``optim report``: one page telling how a study (or the stages of a search) went.

``OUT_DIR`` gets ``index.html`` (opened from disk, no network: ``plotly.min.js`` is written
beside it), ``trials.csv`` (every trial of every study, one row each, parameters and user
attributes as columns), and per study a folder with each figure as a PNG and ``best.ini``.
The folder is built under a temporary name and renamed into place, so a failed report
leaves no half-written folder; an earlier report in ``OUT_DIR`` is replaced.

Modules: :mod:`.story` (what is said about a study), :mod:`.figures` (the plots),
:mod:`.page` (the HTML), :mod:`.png` (PNG export).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import optuna

from cnn_mellin.errors import UserError
from cnn_mellin.optim.study import StudySettings

_log = logging.getLogger("cnn_mellin.optim")
MARKER = "trials.csv"  # every report (of any cnn-mellin version) has it: safe to replace


def trials_frame(study: optuna.Study):
    """The study's trials as a pandas DataFrame (params and user attributes as columns)."""
    return study.trials_dataframe(
        attrs=("number", "value", "state", "datetime_start", "datetime_complete", "duration",
               "params", "user_attrs")
    )


def _check_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"report folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise UserError(
            f"report folder {out} exists and holds something other than a report (no "
            f"{MARKER}); give a new folder or empty it"
        )


def _swap_in(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``, replacing an earlier report there."""
    if not out.exists():
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / "report")
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _write(
    tmp: Path, studies: Sequence[tuple[optuna.Study, StudySettings]], storage: str, png: bool,
) -> None:
    import pandas as pd

    from cnn_mellin.optim.report import figures, page, story
    from cnn_mellin.optim.report.png import PngUnavailable, plotly_js, write_pngs

    taken: set[str] = set()
    stories = [story.tell(study, settings, story.slug(study.study_name, taken))
               for study, settings in studies]
    stages = None
    if len(stories) > 1:
        stages = figures.stages_chart([(s.name, s.trials, s.minimize) for s in stories])
    frames = []
    for (study, _), told in zip(studies, stories, strict=True):
        frame = trials_frame(study)
        frame.insert(0, "study", told.name)
        frames.append(frame)
        (tmp / told.slug).mkdir()
        if told.best_ini:
            (tmp / told.slug / "best.ini").write_text(told.best_ini)
    pd.concat(frames, ignore_index=True).to_csv(tmp / "trials.csv", index=False)
    shutil.copyfile(plotly_js(), tmp / "plotly.min.js")
    if png:
        jobs = [(c.figure, tmp / s.slug / f"{c.name}.png", figures.WIDTH, c.height)
                for s in stories for c in s.charts if c.figure is not None]
        if stages is not None and stages.figure is not None:
            (tmp / "stages").mkdir()
            jobs.append((stages.figure, tmp / "stages" / "stages.png", figures.WIDTH,
                         stages.height))
        try:
            write_pngs(jobs)
        except PngUnavailable as err:
            _log.warning("no PNGs: %s; the HTML report is complete", err)
            png = False
            for _, path, _, _ in jobs:
                path.unlink(missing_ok=True)
    (tmp / "index.html").write_text(page.render(stories, stages, storage=storage, png=png))


def write_report(
    studies: Sequence[tuple[optuna.Study, StudySettings]], out_dir: str | os.PathLike, *,
    storage: str = "", png: bool = True,
) -> list[Path]:
    """Write the report of ``studies`` (in that order) into ``out_dir``; returns its files.

    ``storage`` names where the studies live (shown in the page; give it without password).
    ``png=False``, or no browser for the export (a warning), writes no PNG.
    """
    if not studies:
        raise UserError("no study to report on")
    out = Path(out_dir)
    _check_target(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as err:
        raise UserError(f"cannot write the report folder {out}: {err.strerror}") from None
    try:
        _write(tmp, studies, storage, png)
        tmp.chmod(0o777 & ~_umask())
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / f for f in files]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
