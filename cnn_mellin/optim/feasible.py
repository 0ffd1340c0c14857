"""Feasible draws: a trial's parameters are valid and fit the memory limit before it runs.

A draw is *rejected* when its configuration is not valid (the task's check) or its
estimated peak memory exceeds the study's limit. Rejected draws never become trials:
:class:`FeasibleSampler` wraps the study's sampler and draws again, inside the sampling of
one trial, until a draw is feasible. So no slot of the budget is spent on them, nothing
is trained, and importance and the samplers see only trials that ran. Each trial records
how many draws were rejected before it (``draws_rejected_memory``,
``draws_rejected_invalid``); ``status`` and ``report`` add them up per study.

Random draws stay uniform over the feasible region (rejection sampling). A model-based
sampler's own proposal comes first; once it is rejected the sampler's independent draws
follow (TPE's Parzen estimators, GP's random fallback), so model-based samplers propose
where good trials are and never spend a trial to learn where memory ends, the figure
being known before training. Rejected draws are not trials, so nothing tells TPE where
memory ends: when the good trials sit at the limit, its estimators can keep proposing just
past it. After :data:`MODEL_DRAWS` rejected proposals the rest of the trial's draws are
uniform over the space (seeded like the sampler), which the feasible share measured at
``init`` says will fit. Trained trials still carry their ``memory`` constraint
(peak / limit - 1), which TPE and GP read natively (Optuna's ``Trial.set_constraint``).
Draws come from the sampler's seeded generator: the same seed gives the same sequence.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError
from cnn_mellin.optim import gpushare
from cnn_mellin.tasks import Task
from cnn_mellin.tasks.base import MemoryFigure

MAX_DRAWS = 1000  # per trial; a space where none of these fits is refused at init
MODEL_DRAWS = 250  # of them from the wrapped sampler; the rest uniform


@dataclass(frozen=True)
class Verdict:
    """Whether a draw can run: ``rejected`` is None, ``"memory"`` or ``"invalid"``."""

    rejected: str | None
    reason: str = ""
    figure: MemoryFigure | None = None
    needed: int | None = None  # bytes counted against the limit (CUDA: with the reserve)


class NoFeasibleDraw(ConfigError):
    """No feasible configuration in :data:`MAX_DRAWS` draws."""


class Feasibility:
    """Judges configurations of one study: valid for the task, and under the memory limit.

    Figures are cached per configuration (a retry, the base, a repeated draw cost nothing).
    """

    def __init__(self, task: Task, base: Config, device: str, limit: int | None):
        self.task, self.base, self.device, self.limit = task, base, device, limit
        self._figures: dict[tuple, MemoryFigure | None] = {}

    def config(self, params: Mapping[str, Any]) -> Config:
        """The base configuration with ``params``; ConfigError if not a valid one."""
        config = self.base.replace(params)
        self.task.check(config)
        return config

    def figure(self, config: Config) -> MemoryFigure | None:
        """The task's peak-memory figure of ``config`` on this device (cached)."""
        key = tuple(sorted((k, repr(v)) for k, v in dict(config).items()))
        if key not in self._figures:
            self._figures[key] = self.task.peak_memory(config, self.device)
        return self._figures[key]

    def needed(self, figure: MemoryFigure) -> int:
        """Bytes that count against the limit: on CUDA the allocator reserves more."""
        if self.device.startswith("cuda"):
            return gpushare.with_reserve(figure.bytes)
        return int(figure.bytes)

    def judge(self, params: Mapping[str, Any]) -> Verdict:
        """The verdict on the base configuration with ``params``."""
        try:
            config = self.config(params)
        except ConfigError as err:
            return Verdict("invalid", f"invalid configuration: {err}")
        figure = self.figure(config)
        if figure is None:
            return Verdict(None)
        needed = self.needed(figure)
        if self.limit is not None and needed > self.limit:
            return Verdict("memory", f"needs {needed} bytes ({figure.method}) on {self.device}, "
                           f"over the limit of {self.limit} bytes", figure, needed)
        return Verdict(None, figure=figure, needed=needed)


class FeasibleSampler(BaseSampler):
    """Wraps ``inner``: each trial's searched parameters are drawn until ``judge`` accepts.

    ``space`` holds every searched parameter's distribution (a static space: each trial
    suggests all of them). After a trial's parameters are drawn, :attr:`rejected` counts
    that trial's rejected draws by kind and :attr:`verdict` is the accepted draw's.
    """

    def __init__(self, inner: BaseSampler, space: Mapping[str, BaseDistribution],
                 judge: Callable[[Mapping[str, Any]], Verdict], max_draws: int = MAX_DRAWS,
                 model_draws: int = MODEL_DRAWS, seed: int | None = None):
        self.inner = inner
        self._space = dict(space)
        self._judge = judge
        self.max_draws = max_draws
        self.model_draws = model_draws
        self._rng = random.Random(seed)
        self.rejected: Counter = Counter()
        self.verdict: Verdict | None = None

    def infer_relative_search_space(self, study, trial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(self, study, trial: FrozenTrial, search_space) -> dict[str, Any]:
        fixed = trial.system_attrs.get("fixed_params", {})
        free = {n: d for n, d in search_space.items() if n not in fixed}
        self.rejected, self.verdict = Counter(), None
        if not free:
            return {}
        inner_space = {n: d for n, d in self.inner.infer_relative_search_space(study, trial)
                       .items() if n in free}
        smallest: Verdict | None = None
        for draw in range(self.max_draws):
            proposal = (self.inner.sample_relative(study, trial, inner_space)
                        if draw == 0 and inner_space else {})
            if draw < self.model_draws:
                values = {name: proposal[name] if name in proposal else
                          self.inner.sample_independent(study, trial, name, dist)
                          for name, dist in free.items()}
            else:
                values = {name: uniform_draw(dist, self._rng) for name, dist in free.items()}
            verdict = self._judge({**fixed, **values})
            if verdict.rejected is None:
                self.verdict = verdict
                return values
            self.rejected[verdict.rejected] += 1
            if verdict.needed is not None and (smallest is None or verdict.needed <
                                               smallest.needed):
                smallest = verdict
        raise NoFeasibleDraw(
            f"no feasible configuration in {self.max_draws} draws "
            f"({self.rejected['memory']} over the memory limit, "
            f"{self.rejected['invalid']} invalid"
            + (f"; the smallest {smallest.reason}" if smallest is not None else "") + ")")

    def sample_independent(self, study, trial, name, param_distribution) -> Any:
        return self.inner.sample_independent(study, trial, name, param_distribution)

    def before_trial(self, study, trial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(self, study, trial, state: TrialState, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


@dataclass(frozen=True)
class Fraction:
    """How much of a space fits: ``feasible`` of ``draws`` uniform draws (``invalid`` and
    ``memory`` rejected), the smallest rejected figure, and the seconds it took."""

    draws: int
    feasible: int
    invalid: int
    memory: int
    smallest_rejected: Verdict | None
    seconds: float

    @property
    def share(self) -> float:
        return self.feasible / self.draws if self.draws else 0.0

    def describe(self) -> str:
        """One line for ``init``: the feasible share and why the rest was rejected."""
        return (f"{self.feasible} of {self.draws} uniform draws of the space are feasible "
                f"({self.share:.0%}; {self.memory} over the memory limit, {self.invalid} "
                f"invalid; {self.seconds:.1f} s)")


def uniform_draw(dist: BaseDistribution, rng: random.Random) -> Any:
    """One draw of ``dist`` as Optuna's random sampler draws it (log scales uniform in log)."""
    if isinstance(dist, CategoricalDistribution):
        return rng.choice(dist.choices)
    low, high = dist.low, dist.high
    if isinstance(dist, IntDistribution):
        if dist.log:
            value = math.exp(rng.uniform(math.log(low - 0.5), math.log(high + 0.5)))
            return min(high, max(low, round(value)))
        return rng.randrange(low, high + 1, dist.step)
    if dist.log:
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if dist.step is not None:
        return low + dist.step * rng.randrange(int(round((high - low) / dist.step)) + 1)
    return rng.uniform(low, high)


def feasible_fraction(feasibility: Feasibility, space: Mapping[str, BaseDistribution], *,
                      draws: int = 200, seconds: float = 10.0, min_draws: int = 20,
                      seed: int = 0) -> Fraction:
    """Draw the space uniformly (seeded) and judge each draw, until ``draws`` are judged or,
    once ``min_draws`` are, ``seconds`` have passed. The base configuration is judged first,
    untimed: the estimator's first call pays its imports and warm-up (16 s on a loaded box,
    which once left time for a single draw)."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    smallest: Verdict | None = None
    feasibility.judge({})
    start = time.monotonic()
    done = 0
    while done < draws and not (done >= min_draws and time.monotonic() - start > seconds):
        params = {name: uniform_draw(dist, rng) for name, dist in space.items()}
        verdict = feasibility.judge(params)
        counts[verdict.rejected] += 1
        done += 1
        if verdict.needed is not None and verdict.rejected == "memory" and (
                smallest is None or verdict.needed < smallest.needed):
            smallest = verdict
    return Fraction(done, counts[None], counts["invalid"], counts["memory"], smallest,
                    time.monotonic() - start)


def check_space(settings, device: str, **kwargs) -> Fraction:
    """The feasible fraction of a study's space (``settings``: a StudySettings) on
    ``device``; ConfigError when no draw is feasible, naming the limit and the smallest
    draw. ``kwargs`` go to :func:`feasible_fraction`."""
    task = settings.build_task()
    params = task.params()
    from cnn_mellin.optim.space import distributions

    feasibility = Feasibility(task, task.config(settings.base_config), device,
                              settings.mem_limit_bytes)
    fraction = feasible_fraction(feasibility, distributions(settings.searched, params),
                                 **kwargs)
    if fraction.feasible == 0:
        smallest = fraction.smallest_rejected
        raise ConfigError(
            f"no configuration of the search space fits: none of {fraction.draws} uniform "
            f"draws is feasible ({fraction.memory} over the memory limit of "
            f"{settings.mem_limit_bytes} bytes, {fraction.invalid} invalid"
            + (f"; the smallest needs {smallest.needed} bytes" if smallest else "")
            + "); raise --mem-limit-bytes or narrow the space")
    return fraction
