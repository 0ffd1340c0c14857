"""optim/feasible.py: the feasible share of a space that init and stage print."""

from __future__ import annotations

from optuna.distributions import IntDistribution

from cnn_mellin.optim import feasible


def test_the_feasible_share_is_not_cut_short_by_the_estimators_warm_up(monkeypatch):
    """On a loaded box the estimator's first call took 16 s of the 10-s allowance, and the
    share printed was "1 of 1 draws". The warm-up is now untimed, and at least 20 draws
    are judged."""
    now = [0.0]
    monkeypatch.setattr(feasible.time, "monotonic", lambda: now[0])

    class Judge:
        calls = 0

        def judge(self, params):
            self.calls += 1
            now[0] += 16.0 if self.calls == 1 else 1.0
            fits = not params or params["x"] <= 5
            return feasible.Verdict(None if fits else "memory", needed=None if fits else 9)

    judge = Judge()
    share = feasible.feasible_fraction(judge, {"x": IntDistribution(1, 10)}, seconds=10.0)
    assert share.draws == 20 and judge.calls == 21
    assert share.feasible + share.memory == 20 and 0 < share.feasible < 20
    assert share.seconds == 20.0


def test_a_sampler_that_keeps_proposing_past_the_limit_still_gets_a_feasible_draw():
    """TPE in the worker tests proposed batch sizes just past the limit 1000 times in a row
    (rejected draws are not trials, so nothing told it where memory ends) and the trial was
    pruned: "no feasible configuration in 1000 draws". After MODEL_DRAWS rejected proposals
    the draws are uniform, and the space's feasible part is found."""
    import optuna

    class PastTheLimit(optuna.samplers.RandomSampler):
        def sample_independent(self, study, trial, name, distribution):
            return 10

    space = {"x": IntDistribution(1, 10)}
    verdict = feasible.Verdict(None)

    def judge(params):
        return verdict if params["x"] <= 2 else feasible.Verdict("memory", needed=params["x"])

    study = optuna.create_study(sampler=feasible.FeasibleSampler(
        PastTheLimit(), space, judge, model_draws=50, seed=3))
    trial = study.ask(space)
    assert trial.params["x"] <= 2
    assert study.sampler.rejected["memory"] >= 50
    again = optuna.create_study(sampler=feasible.FeasibleSampler(
        PastTheLimit(), space, judge, model_draws=50, seed=3))
    assert again.ask(space).params == trial.params  # seeded like the sampler
