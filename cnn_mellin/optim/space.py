"""The search space: declared :class:`~cnn_mellin.config.Param` ranges → Optuna distributions.

:func:`select` picks the searched parameters (``--whitelist`` / ``--blacklist`` regexes,
matched in full against ``group.name``) and drops those that cannot matter given the
base configuration; :func:`suggest` samples them for one trial.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from cnn_mellin.config import Param, compile_patterns, parameters
from cnn_mellin.errors import ConfigError

_RANDOM_PROBES = 256


@dataclass(frozen=True)
class Selection:
    """The searched names (declaration order) and the dropped ones with the reason why."""

    names: tuple[str, ...]
    dropped: dict[str, str]
    unmatched: tuple[str, ...]


def distribution(param: Param) -> BaseDistribution:
    """The Optuna distribution of a tunable parameter."""
    search = param.search
    if search is None:
        raise ValueError(f"{param.name} has no search range")
    if search.choices is not None:
        return CategoricalDistribution(search.choices)
    if param.type is bool:
        return CategoricalDistribution((False, True))
    if param.type is int:
        return IntDistribution(
            int(search.low), int(search.high), log=search.log, step=int(search.step or 1)
        )
    if param.type is float:
        return FloatDistribution(
            float(search.low), float(search.high), log=search.log,
            step=None if search.step is None else float(search.step),
        )
    raise ValueError(f"{param.name}: cannot search a {param.type.__name__} parameter by range")


def _probe_values(param: Param) -> list[Any]:
    """A few values spanning a parameter's search range (for the can-it-matter probe)."""
    search = param.search
    assert search is not None
    if search.choices is not None:
        return list(search.choices)
    if param.type is bool:
        return [False, True]
    low, high = search.low, search.high
    mid = (low + high) / 2
    if param.type is int:
        return sorted({int(low), int(round(mid)), int(high)})
    return [float(low), float(mid), float(high)]


def _can_matter(
    candidates: Sequence[str], params: Mapping[str, Param], base: Mapping[str, Any],
    num_coeffs: int,
) -> set[str]:
    """The candidates active in the base configuration or in some probed variation of it.

    Activity can depend on other searched parameters (a mask width matters once the
    number of masks is searched), so the probe varies each candidate alone over its
    range and also draws seeded random combinations of all of them.
    """
    probes = {name: _probe_values(params[name]) for name in candidates}
    configs: list[Mapping[str, Any]] = [base]
    for name in candidates:
        configs.extend({**base, name: value} for value in probes[name])
    rng = random.Random(0)
    for _ in range(_RANDOM_PROBES):
        configs.append({**base, **{name: rng.choice(probes[name]) for name in candidates}})
    active: set[str] = set()
    for name in candidates:
        rule = params[name].active
        if rule is None or any(rule(values, num_coeffs) for values in configs):
            active.add(name)
    return active


def select(
    base: Mapping[str, Any], num_coeffs: int, params: Mapping[str, Param] | None = None, *,
    whitelist: Sequence[str] | None = None, blacklist: Sequence[str] = (),
) -> Selection:
    """Choose the searched parameters among ``params`` (default: the built-in ones).

    Raises ConfigError if nothing is left to search.
    """
    params = parameters() if params is None else params
    tunable = [name for name, param in params.items() if param.tunable]
    dropped: dict[str, str] = {}
    if whitelist is not None:
        patterns = compile_patterns(whitelist, "--whitelist")
        unmatched = tuple(
            p.pattern for p in patterns if not any(p.fullmatch(name) for name in params)
        )
        chosen = [name for name in params if any(p.fullmatch(name) for p in patterns)]
        for name in chosen:
            if not params[name].tunable:
                dropped[name] = "it has no search range"
        candidates = [name for name in chosen if params[name].tunable]
    else:
        patterns = compile_patterns(blacklist, "--blacklist")
        unmatched = tuple(
            p.pattern for p in patterns if not any(p.fullmatch(name) for name in params)
        )
        candidates = [name for name in tunable if not any(p.fullmatch(name) for p in patterns)]
    active = _can_matter(candidates, params, base, num_coeffs)
    for name in candidates:
        if name not in active:
            dropped[name] = "it cannot matter given the base configuration and the data"
    names = tuple(name for name in candidates if name in active)
    if not names:
        if whitelist is not None:
            raise ConfigError(
                "--whitelist leaves no parameter to search ("
                + ("it matches no parameter" if not dropped else
                   "every match was dropped: " + ", ".join(sorted(dropped)))
                + "); see 'cnn-mellin params'"
            )
        raise ConfigError("no parameter left to search after --blacklist")
    return Selection(names, dropped, unmatched)


def distributions(
    names: Iterable[str], params: Mapping[str, Param] | None = None
) -> dict[str, BaseDistribution]:
    """Distributions of the named parameters (of ``params``, default: the built-in ones)."""
    params = parameters() if params is None else params
    return {name: distribution(params[name]) for name in names}


def suggest(
    trial, names: Iterable[str], params: Mapping[str, Param] | None = None
) -> dict[str, Any]:
    """Sample every searched parameter for ``trial`` (an ``optuna.Trial``), in order."""
    values: dict[str, Any] = {}
    for name, dist in distributions(names, params).items():
        if isinstance(dist, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, list(dist.choices))
        elif isinstance(dist, IntDistribution):
            values[name] = trial.suggest_int(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
        else:
            values[name] = trial.suggest_float(
                name, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return values
