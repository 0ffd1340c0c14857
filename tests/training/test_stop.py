"""A data loader worker that dies while training is asked to stop: the stop, not an error.

SLURM signals every process of a cancelled job, loader workers included; a worker that died
of it made the trial fail as an error (issue 23). Here the loader fails the way torch's does
(``RuntimeError: DataLoader worker (pid(s) ...) exited unexpectedly``) just as the stop is
requested, in the middle of an epoch (in the middle of a gradient accumulation too) or while
the dev set is scored; training must stop at its last optimiser step, and the resumed run
must end with the weights of a run never stopped.
"""

from __future__ import annotations

import pytest
import torch

from cnn_mellin.data import loader as loader_module
from cnn_mellin.modelfile import load_checkpoint_file
from cnn_mellin.training import TrainingInterrupted, train
from tests.training_fixtures import tiny_config, write_store

FAST = {"learning_rate": 0.01}
DIED = "DataLoader worker (pid(s) 4242) exited unexpectedly"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return write_store(root / "train", 32, seed=0), write_store(root / "dev", 10, seed=1,
                                                                prefix="d")


class _Dying:
    """A loader whose workers die (as torch reports it) at a given point; the stop is
    requested at that moment (``stopping``) unless ``stop`` is False."""

    def __init__(self, real, plan):
        self.real, self.plan = real, plan
        self.batch_sampler = real.batch_sampler

    def __len__(self):
        return len(self.real)

    def __iter__(self):
        self.plan["iterations"] = self.plan.get("iterations", 0) + 1
        return self._batches(iter(self.real))  # the real iterator now: it draws a seed

    def _batches(self, batches):
        plan = self.plan
        for done, batch in enumerate(batches):
            if not plan.get("died") and plan["dies"](self, plan["iterations"], done):
                plan["died"] = True
                plan["stopping"] = plan.get("stop", True)
                raise RuntimeError(DIED)
            yield batch


def _plan(monkeypatch, which, dies, stop=True):
    """Make train()'s ``which`` ("train" or "dev") loader die where ``dies`` says."""
    plan = {"dies": dies, "stop": stop}
    real_make = loader_module.make_loader

    def make(dataset, batch_size, shuffle=True, **kwargs):
        real = real_make(dataset, batch_size, shuffle=shuffle, **kwargs)
        return _Dying(real, plan) if shuffle == (which == "train") else real

    monkeypatch.setattr(loader_module, "make_loader", make)
    return plan


def _config(accumulation):
    config = tiny_config(num_epochs=3, noise_std=0.2, max_time_warp=2, num_time_masks=1,
                         grad_accumulation=accumulation, **FAST)
    return config.replace({"model.dropout": 0.2})  # every batch draws from the RNGs


def _weights(model_dir):
    return load_checkpoint_file(model_dir / "last.pt")["model"]


@pytest.mark.parametrize("which, accumulation, died_after, batches, step", [
    ("train", 1, 5, 5, 13),  # epoch 2 after its batch 5: 8 batches an epoch
    ("train", 2, 5, 4, 6),  # batch 5 began the third step of epoch 2: back to its second
    ("dev", 1, None, 8, 8),  # epoch 1 trained, its dev set being scored
])
def test_a_loader_that_dies_while_stopping_stops_at_the_last_step_and_resume_matches(
    stores, tmp_path, monkeypatch, which, accumulation, died_after, batches, step
):
    train_dir, dev_dir = stores
    config = _config(accumulation)
    straight = train(config, train_dir, dev_dir, model_dir=tmp_path / "straight")
    if which == "train":
        plan = _plan(monkeypatch, "train",
                     lambda lo, _, done: lo.batch_sampler.epoch == 2 and done == died_after)
    else:
        plan = _plan(monkeypatch, "dev", lambda lo, iterations, _: iterations == 1)
    with pytest.raises(TrainingInterrupted) as cut:
        train(config, train_dir, dev_dir, model_dir=tmp_path / "cut",
              stop_requested=lambda: plan.get("stopping", False))
    assert plan["died"]
    saved = load_checkpoint_file(tmp_path / "cut" / "last.pt")
    assert (cut.value.batches, cut.value.step) == (batches, step)
    assert saved["schedule"]["steps"] == step and saved["mid_epoch"]["batches"] == batches
    resumed = train(config, train_dir, dev_dir, model_dir=tmp_path / "cut")
    assert resumed.resumed_from_step == step
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert [h["train_loss"] for h in resumed.history] == \
        pytest.approx([h["train_loss"] for h in straight.history], abs=1e-6)
    assert [h["dev_error"] for h in resumed.history] == [h["dev_error"] for h in straight.history]


def test_a_loader_that_dies_without_a_stop_is_an_error(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    plan = _plan(monkeypatch, "train", lambda lo, _, done: done == 3, stop=False)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        train(_config(1), train_dir, dev_dir, model_dir=tmp_path,
              stop_requested=lambda: plan.get("stopping", False))


@pytest.mark.parametrize("stop_after", [2, None])
def test_loader_workers_are_shut_down_when_training_stops_or_ends(stores, tmp_path,
                                                                  monkeypatch, stop_after):
    """Not left to the collector: an exception's traceback keeps the loader alive, and the
    workers were then ended at interpreter exit (a loader worker's traceback from __del__)."""
    import multiprocessing

    monkeypatch.setattr(loader_module, "allowed_workers", lambda: 4)
    train_dir, dev_dir = stores
    calls = []

    def stop():
        calls.append(1)
        return stop_after is not None and len(calls) > stop_after

    config = tiny_config(num_epochs=1, **FAST)
    if stop_after is None:
        train(config, train_dir, dev_dir, model_dir=tmp_path, num_workers=2,
              stop_requested=stop)
    else:
        with pytest.raises(TrainingInterrupted) as cut:
            train(config, train_dir, dev_dir, model_dir=tmp_path, num_workers=2,
                  stop_requested=stop)
        assert cut.value.step == stop_after
    assert calls and multiprocessing.active_children() == []
