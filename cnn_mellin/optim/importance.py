"""``optim important``: rank the searched parameters by importance.

fANOVA by default, over COMPLETE trials, with a fixed seed: the same study always
gives the same ranking (Optuna's evaluators are random forests; unseeded, the
ranking changes from call to call). Ties are ordered by name.
"""

from __future__ import annotations

import math
import warnings

import optuna
from optuna.trial import TrialState

from cnn_mellin.errors import ConfigError, UserError
from cnn_mellin.optim.defaults import EVALUATORS
from cnn_mellin.optim.study import StudySettings

SEED = 0
# below this many completed trials a ranking is mostly noise; even at 12, repeated sm
# stages of the main job (20 parameters) agreed by a mean pairwise Spearman of only 0.33
# (docs/benchmarks.md, "How far to trust a ranking"), so this is a floor, not a guarantee
MIN_TRIALS_TO_RANK = 12


def make_evaluator(name: str) -> optuna.importance.BaseImportanceEvaluator:
    """The importance evaluator called ``name`` (seeded where it is random)."""
    if name in ("fanova", "mdi"):
        try:
            import sklearn  # noqa: F401  (Optuna's forests need it)
        except ImportError:
            raise UserError(
                f"the {name} evaluator needs scikit-learn (pip install scikit-learn); "
                "or use --evaluator ped-anova"
            ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "fanova":
            return optuna.importance.FanovaImportanceEvaluator(seed=SEED)
        if name == "mdi":
            return optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=SEED)
        if name == "ped-anova":
            return optuna.importance.PedAnovaImportanceEvaluator()
    raise ConfigError(f"unknown importance evaluator {name!r}; allowed: {', '.join(EVALUATORS)}")


def is_zero_variance(err: BaseException) -> bool:
    """Whether ``err`` is fANOVA's "Encountered zero total variance in all trees"."""
    return isinstance(err, RuntimeError) and "zero total variance" in str(err)


def ranked_trials(study: optuna.Study) -> list:
    """The trials a ranking is computed from: COMPLETE with a finite value."""
    return [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and math.isfinite(t.value)
    ]


def trust_note(count: int) -> str:
    """One line on how far a ranking from ``count`` completed trials can be trusted."""
    note = f"ranked from {count} completed trials"
    if count < MIN_TRIALS_TO_RANK:
        note += (f"; warning: below {MIN_TRIALS_TO_RANK} a ranking is mostly noise "
                 "(run more trials: optim ... grow N)")
    return note


def rank(
    study: optuna.Study, settings: StudySettings, evaluator: str = "fanova"
) -> list[tuple[str, float]]:
    """Searched parameters with their normalised importance, most important first."""
    completed = ranked_trials(study)
    if len(completed) < 2:
        raise UserError(
            f"study {study.study_name!r} has {len(completed)} completed trial(s); importance "
            "needs at least 2"
        )
    names = [n for n in settings.searched if all(n in t.params for t in completed)]
    if not names:
        raise UserError(f"study {study.study_name!r}: no searched parameter in every trial")
    if len({t.value for t in completed}) == 1:
        raise UserError(
            f"study {study.study_name!r}: its {len(completed)} completed trials all have the "
            f"value {completed[0].value:g}, so no parameter can be ranked; run more trials or "
            "longer ones (more epochs)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scores = optuna.importance.get_param_importances(
                study, evaluator=make_evaluator(evaluator), params=names
            )
        except RuntimeError as err:
            if not is_zero_variance(err):
                raise
            raise UserError(
                f"study {study.study_name!r}: the {evaluator} evaluator found no variation of "
                f"the value over the searched parameters in {len(completed)} completed "
                "trials; run more trials"
            ) from None
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def select(
    ranked: list[tuple[str, float]], top_k: int | None = None, threshold: float | None = None
) -> list[str]:
    """The names to keep: the ``top_k`` first, or those with importance >= ``threshold``."""
    if top_k is not None and threshold is not None:
        raise ConfigError("give either --top-k or --threshold, not both")
    if top_k is not None:
        if top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {top_k}")
        return [name for name, _ in ranked[:top_k]]
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {threshold}")
        return [name for name, score in ranked if score >= threshold]
    return [name for name, _ in ranked]


def important_text(
    study: optuna.Study, settings: StudySettings, *, top_k: int | None = None,
    threshold: float | None = None, evaluator: str = "fanova",
) -> str:
    """The ``important`` output: one parameter name per line."""
    names = select(rank(study, settings, evaluator), top_k, threshold)
    return "".join(f"{name}\n" for name in names)
