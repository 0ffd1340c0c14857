"""``best --independent``: the per-parameter choice repaired to fit the study's memory limit."""

from __future__ import annotations

from optuna.trial import TrialState, create_trial

from cnn_mellin.optim import space
from cnn_mellin.optim.attrs import WORKER
from cnn_mellin.optim.best import best_trial, independent_config
from cnn_mellin.optim.study import read_settings
from cnn_mellin.tasks import MemoryFigure
from tests.optim_fake import MB, FakeTask
from tests.optim_helpers import fake_study, load

SEARCHED = ["data.batch_size", "model.window_size"]


class TwoFactorMemory(FakeTask):
    """Memory grows with batch size times window size, so each choice alone may fit and
    their combination not."""

    devices: list[str] = []

    def peak_memory(self, config, device):
        self.devices.append(device)
        return MemoryFigure(config["data.batch_size"] * config["model.window_size"] * MB,
                            "estimated")


def _study(tmp_path, limit):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, num_trials=1, whitelist=SEARCHED, mem_limit_bytes=limit,
               base={"model.window_stride": 1})
    study = load(url, "fake")
    settings = read_settings(study)
    task = TwoFactorMemory(settings.task_info)
    dists = space.distributions(settings.searched, task.params())
    # (batch, window, value): large batches do well with small windows and small batches
    # with large windows, so the per-parameter medians pick a large batch and a large window
    # (512 MB); the best trial is (16, 5): 80 MB
    rows = [(32, 3, 0.20), (32, 3, 0.21), (32, 4, 0.22), (4, 16, 0.19), (4, 16, 0.20),
            (8, 3, 0.9), (8, 3, 0.9), (8, 4, 0.9), (4, 5, 0.9), (4, 5, 0.9),
            (16, 5, 0.10), (16, 5, 0.9), (16, 5, 0.9)]
    for batch, window, value in rows:
        study.add_trial(create_trial(
            params={"data.batch_size": batch, "model.window_size": window},
            distributions={name: dists[name] for name in SEARCHED}, value=value,
            user_attrs={WORKER: {"device": "cuda:1"}}, state=TrialState.COMPLETE,
        ))
    return study, settings, task


def test_independent_choice_is_repaired_to_fit_the_memory_limit(tmp_path):
    # before: only window geometry was repaired, so a stage could start from a combination
    # every trial of which is pruned for memory
    study, settings, task = _study(tmp_path, limit=200 * MB)
    assert best_trial(study).params == {"data.batch_size": 16, "model.window_size": 5}
    config = independent_config(study, settings, task)
    # the window, which saves the most, is taken back from the best trial: 160 MB
    assert (config["data.batch_size"], config["model.window_size"]) == (32, 5)
    assert set(task.devices) == {"cuda:1"}  # judged on the device the trials ran on


def test_independent_choice_that_fits_is_left_alone(tmp_path):
    study, settings, task = _study(tmp_path, limit=10_000 * MB)
    config = independent_config(study, settings, task)
    assert (config["data.batch_size"], config["model.window_size"]) == (32, 16)


def test_without_a_limit_memory_is_not_asked(tmp_path):
    study, settings, task = _study(tmp_path, limit=None)
    task.devices.clear()
    independent_config(study, settings, task)
    assert task.devices == []
