"""``optim stage``: the next stage of a search from an earlier one, in one command.

It does what the recipe does in three: ``important`` (the kept parameters, written to
``CONF_DIR/TO.params``), ``best`` (the carried configuration, ``CONF_DIR/TO.ini``), and
``init`` of the new study with ``--read-ini TO.ini --whitelist $(cat TO.params)`` plus the
given init options, so both forms give the same files and the same study. The new study
also records where it came from, in its user attribute ``lineage``:
``{"parent": FROM, "from": "best" | "independent" | "base", "ranked_from": N,
"kept": {name: importance in FROM}, "carried": {name: value}}`` (``ranked_from``: the
completed trials the ranking came from) where
``carried`` holds the values of the parent's searched parameters that the new stage no
longer searches (``status`` and ``report`` show it).

``from_base`` starts the new stage from the parent's *base* configuration instead of its
best trial's: for a parent whose trials are long enough to rank parameters but too short to
pick a configuration (a few epochs on a subset, where a small model that learns fast early
leads one that ends far lower). The new stage's first trial is then that base, its second
the base with the parent's best values of the kept parameters (the ranking's own guess,
when it differs and fits the memory limit), and the sampler's draws follow; the lineage
says ``"from": "base"``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError
from cnn_mellin.files import atomic_path, write_text_atomic
from cnn_mellin.optim import space
from cnn_mellin.optim.attrs import LINEAGE
from cnn_mellin.optim.best import best_text, best_trial
from cnn_mellin.optim.feasible import Feasibility
from cnn_mellin.optim.importance import rank, ranked_trials, select, trust_note
from cnn_mellin.optim.storage import load_study, open_storage
from cnn_mellin.optim.study import (
    InitResult,
    StudySettings,
    check_study_name,
    init_study,
    read_settings,
)

_log = logging.getLogger("cnn_mellin.optim")


@dataclass(frozen=True)
class StageResult:
    """What ``stage`` wrote: the two files and the new study."""

    params_path: Path
    ini_path: Path
    init: InitResult
    lineage: dict[str, Any]


def run_stage(
    db_url: str, from_study: str, to_study: str, *, conf_dir: str | Path,
    build: Callable[[Config, list[str]], StudySettings], read_ini: Sequence[str] = (),
    groups=None, top_k: int | None = None, threshold: float | None = None,
    independent: bool = False, evaluator: str = "fanova", from_base: bool = False,
    device: str = "cpu",
) -> StageResult:
    """Rank ``from_study``'s parameters, write its best configuration, init ``to_study``.

    ``build(config, whitelist)`` validates the init arguments and returns the settings to
    store (``init``'s own :func:`~cnn_mellin.optim.study.build_settings` with the other
    options bound). ``read_ini`` files are read after the carried ``.ini``. ``from_base``:
    see the module doc; ``device`` is where the memory limit is judged for its second trial.
    """
    check_study_name(to_study)
    if to_study == from_study:
        raise ConfigError(f"the new stage needs its own --study-name, not {from_study!r}")
    if top_k is None and threshold is None:
        raise ConfigError("give --top-k K or --threshold X: which parameters to keep")
    if from_base and independent:
        raise ConfigError("--from-base and --independent choose different configurations "
                          "to carry: give one")
    parent = load_study(open_storage(db_url), from_study, db_url)
    settings = read_settings(parent)
    ranked = rank(parent, settings, evaluator)
    task = settings.build_task()
    if from_base:
        ini_text = (f"# study {from_study}: its base configuration\n"
                    + "".join(f"# {line}\n" for line in task.describe(settings.config()))
                    + settings.config().to_ini())
    else:
        ini_text = best_text(parent, settings, task, independent=independent)
    conf_dir = Path(conf_dir)
    params_path, ini_path = conf_dir / f"{to_study}.params", conf_dir / f"{to_study}.ini"
    conf_dir.mkdir(parents=True, exist_ok=True)
    # the .ini is read back as init would read it, and both files are put in place only
    # once the new stage's settings are valid: a refused stage leaves nothing behind (the
    # .ini is renamed into place when the block ends, after the .params file)
    with atomic_path(ini_path) as pending:
        pending.write_text(ini_text)
        config = Config.from_ini([pending, *read_ini], groups=groups)
        # a parameter that cannot matter with the carried configuration (momentum once
        # adam was carried) would be dropped by init: keep the next one in the ranking
        active = _active(settings, config, [name for name, _ in ranked])
        kept = select([(n, v) for n, v in ranked if n in active], top_k, threshold)
        if not kept:
            raise ConfigError(f"--threshold {threshold} keeps no parameter of {from_study} "
                              "that can matter with its best configuration")
        params_text = "".join(f"{name}\n" for name in kept)
        new = build(config, kept)
        if from_base:
            new = dataclasses.replace(new, also_try=_best_values(parent, new, device))
        write_text_atomic(params_path, params_text)
    importance = dict(ranked)
    lineage = {
        "parent": from_study,
        "from": "base" if from_base else "independent" if independent else "best",
        "ranked_from": len(ranked_trials(parent)),  # completed trials (importance.trust_note)
        "kept": {name: importance[name] for name in kept},
        "carried": {name: config[name] for name in settings.searched
                    if name not in new.searched and name in config},
    }
    result = init_study(db_url, to_study, new)
    study = load_study(open_storage(db_url), to_study, db_url)
    if study.user_attrs.get(LINEAGE) != lineage:
        study.set_user_attr(LINEAGE, lineage)
    return StageResult(params_path, ini_path, result, lineage)


def _best_values(parent, new: StudySettings, device: str) -> list[dict[str, Any]]:
    """The parent's best trial's values of the new stage's searched parameters, as a trial
    to try after the base: none when they are the base's, or when that configuration does
    not fit the new stage's memory limit or is invalid (logged)."""
    best = best_trial(parent)
    values = {name: best.params[name] for name in new.searched if name in best.params}
    base = {name: new.base_config.get(name) for name in values}
    if not values or values == base:
        return []
    task = new.build_task()
    verdict = Feasibility(task, task.config(new.base_config), device,
                          new.mem_limit_bytes).judge(values)
    if verdict.rejected is not None:
        _log.warning("not trying the base with trial %d's values of the kept parameters: %s",
                     best.number, verdict.reason)
        return []
    return [values]


def _active(settings: StudySettings, config: Config, names: list[str]) -> set[str]:
    """The ``names`` that can matter in ``config`` (as init decides), warning about the rest."""
    task = settings.build_task()
    base = dict(task.config({k: v for k, v in config.items() if k in task.params()}))
    active = set()
    for name in names:
        try:
            selection = space.select(base, task.num_coeffs, task.params(), whitelist=[name])
        except ConfigError:
            selection = None
        if selection is not None and name in selection.names:
            active.add(name)
        else:
            _log.warning("not keeping %s: it cannot matter with the carried configuration", name)
    return active


def lineage_lines(lineage: Any) -> list[str]:
    """``status`` lines for a study's ``lineage`` attribute (none without one)."""
    if not isinstance(lineage, dict) or "parent" not in lineage:
        return []
    kept = lineage.get("kept") or {}
    if isinstance(kept, dict):
        shown = ", ".join(f"{n} ({v:.3g})" if isinstance(v, (int, float)) else n
                          for n, v in kept.items())
    else:
        shown = ", ".join(str(k[0] if isinstance(k, (list, tuple)) else k) for k in kept)
    carried = lineage.get("carried") or {}
    origin = " from its base configuration" if lineage.get("from") == "base" else ""
    lines = [f"stage of {lineage['parent']}{origin}: searching {shown or 'nothing kept'}"]
    if isinstance(lineage.get("ranked_from"), int):
        lines.append(f"  {trust_note(lineage['ranked_from'])}")
    if isinstance(carried, dict) and carried:
        lines.append("  carried: " + ", ".join(f"{n} = {v}" for n, v in carried.items()))
    return lines
