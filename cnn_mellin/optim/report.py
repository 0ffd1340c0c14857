"""``optim report``: plots of a study as HTML pages plus its trials as CSV.

Plots come from ``optuna.visualization`` (plotly) and are written as HTML that loads a
``plotly.min.js`` written once next to them, so the folder works offline. PNG output
would need kaleido, which is not a dependency of cnn-mellin, so none is written.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.trial import TrialState

from cnn_mellin.errors import UserError
from cnn_mellin.optim.importance import is_zero_variance, make_evaluator
from cnn_mellin.optim.study import StudySettings

_log = logging.getLogger("cnn_mellin.optim")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trials_frame(study: optuna.Study):
    """The study's trials as a pandas DataFrame (params and user attributes as columns)."""
    frame = study.trials_dataframe(
        attrs=("number", "value", "state", "datetime_start", "datetime_complete", "duration",
               "params", "user_attrs")
    )
    return frame


def write_report(
    study: optuna.Study, settings: StudySettings, out_dir: str | os.PathLike
) -> list[Path]:
    """Write ``trials.csv`` and the HTML plots into ``out_dir``; returns the files written.

    The importance plot needs completed trials whose values differ; without, it is left
    out with a warning.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    written = []
    csv_path = out / "trials.csv"
    _atomic(csv_path, lambda tmp: trials_frame(study).to_csv(tmp, index=False))
    written.append(csv_path)
    vis = optuna.visualization
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    names = [n for n in settings.searched if all(n in t.params for t in completed)]
    plots: dict[str, Callable] = {
        "history": lambda: vis.plot_optimization_history(study),
        "timeline": lambda: vis.plot_timeline(study),
    }
    if completed:
        plots["slice"] = lambda: vis.plot_slice(study, params=names)
        plots["parallel_coordinate"] = lambda: vis.plot_parallel_coordinate(study, params=names)
        plots["edf"] = lambda: vis.plot_edf(study)
    if len({t.value for t in completed}) >= 2 and names:
        plots["importance"] = lambda: vis.plot_param_importances(
            study, evaluator=make_evaluator("fanova"), params=names
        )
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = lambda: vis.plot_intermediate_values(study)
    for name, make in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                figure = make()
            except RuntimeError as err:
                if name != "importance" or not is_zero_variance(err):
                    raise
                _log.warning("no importance plot: the values do not vary with the parameters")
                continue
        path = out / f"{name}.html"
        _atomic(path, lambda tmp, f=figure: f.write_html(tmp, include_plotlyjs="directory"))
        written.append(path)
    if any(p.suffix == ".html" for p in written):
        written.append(out / "plotly.min.js")
    return written
