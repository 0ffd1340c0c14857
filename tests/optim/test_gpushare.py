"""Several trials per GPU: admission arithmetic, the K x limit check, neighbours' OOMs.

No GPU is needed: device sizes and allocator figures are given or mocked.
"""

from __future__ import annotations

import logging

import pytest
import torch
from optuna.trial import TrialState

from cnn_mellin.errors import ConfigError
from cnn_mellin.optim import gpushare
from cnn_mellin.optim.gpushare import (
    ALLOCATOR_RESERVE,
    CUDA_CONTEXT_BYTES,
    caused_by_neighbour,
    check_sharing,
    requested_bytes,
    with_reserve,
)
from cnn_mellin.optim.worker import Worker
from cnn_mellin.tasks.asr import AsrTask
from cnn_mellin.training.augment import shifted_frames
from tests.optim_helpers import fake_study, load
from tests.training_fixtures import TINY_MODEL

GiB = 2**30
# the message torch 2.x gives when the device is full
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "139.72 GiB of which 1.19 GiB is free. Process 4242 has 120.10 GiB memory in use.")


def test_random_shifts_lengthen_the_longest_utterance_by_up_to_1_plus_2p():
    assert shifted_frames(1000, 0.0) == 1000
    assert shifted_frames(1000, 0.1) == 1200
    assert shifted_frames(999, 0.25) == 999 + 2 * 249  # floor per side, as random_shift does


def test_the_allocator_reserve_is_counted():
    assert with_reserve(10 * GiB) == pytest.approx(10 * GiB * (1 + ALLOCATOR_RESERVE), abs=1)
    assert with_reserve(0) == 0


@pytest.mark.parametrize("k, fits", [(1, True), (4, True), (5, False)])
def test_k_workers_times_the_limit_must_fit_the_device(k, fits):
    limit, total = 20 * GiB, 4 * (20 * GiB + CUDA_CONTEXT_BYTES) + GiB // 2
    devices = ["cuda:0"] * k + ["cuda:1"]
    if fits:
        check_sharing(devices, limit, lambda device: total)
    else:
        with pytest.raises(ConfigError, match=rf"{k} workers on cuda:0 .* at most 4 fit"):
            check_sharing(devices, limit, lambda device: total)


def test_several_workers_without_a_limit_are_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="cnn_mellin.optim"):
        check_sharing(["cuda:0", "cuda:0", "cpu"], None, lambda device: 80 * GiB)
    assert "2 workers share cuda:0" in caplog.text


def test_cpu_workers_are_not_checked():
    check_sharing(["cpu"] * 64, GiB, lambda device: pytest.fail("asked a device size"))


def test_an_oom_below_the_cap_was_caused_by_a_neighbour():
    assert requested_bytes(RuntimeError(CUDA_OOM)) == 2 * GiB
    assert requested_bytes(RuntimeError("out of memory")) is None
    # 10 GiB held + 2 GiB asked fit a 20-GiB cap: the device was full, not the trial's share
    assert caused_by_neighbour(RuntimeError(CUDA_OOM), 10 * GiB, 20 * GiB)
    # 19 GiB held + 2 GiB asked go over: the configuration's own constraint
    assert not caused_by_neighbour(RuntimeError(CUDA_OOM), 19 * GiB, 20 * GiB)
    assert not caused_by_neighbour(RuntimeError(CUDA_OOM), 0, None)  # no cap: cannot tell


def _asr_task():
    return AsrTask({"num_coeffs": 10, "max_frames": 400, "data_dir": "unused"})


def test_asr_admission_sees_the_longest_shifted_batch():
    task = _asr_task()
    base = {**TINY_MODEL, "data.batch_size": 4, "data.eval_batch_size": 4}
    plain = task.peak_memory(task.config(base), "cuda").bytes
    shifted = task.peak_memory(
        task.config({**base, "training.random_shift_proportion": 0.5}), "cuda").bytes
    assert shifted > plain * 1.3  # twice as many frames in the longest batch


def test_asr_admission_sees_the_dev_scoring_batch():
    task = _asr_task()
    base = {**TINY_MODEL, "data.batch_size": 2}
    small = task.peak_memory(task.config({**base, "data.eval_batch_size": 2}), "cuda").bytes
    large = task.peak_memory(task.config({**base, "data.eval_batch_size": 256}), "cuda").bytes
    assert large > small


def test_a_neighbours_oom_is_retried_not_recorded_against_the_configuration(
    tmp_path, monkeypatch
):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, num_trials=1, whitelist=["training.learning_rate"],
               base={"training.optimizer": "sgd"}, mem_limit_bytes=20 * GiB)
    monkeypatch.setenv("FAKE_OOM", CUDA_OOM)
    worker = Worker(url, "fake")
    worker.cap_bytes = 20 * GiB  # as apply_cap sets it on a GPU
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * GiB)
    worker.max_trials = 1
    summary = worker.run()
    assert summary.outcomes == {"handed back": 1}
    study = load(url, "fake")
    [failed] = study.get_trials(states=(TrialState.FAIL,))
    assert failed.user_attrs["fail_kind"] == "neighbour"
    assert "constraints:memory" not in failed.system_attrs
    [retry] = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs["retry_of"] == failed.number
    assert retry.user_attrs["interrupt_count"] == 1


def test_an_oom_at_the_cap_is_the_configurations(tmp_path, monkeypatch):
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, num_trials=1, whitelist=["training.learning_rate"],
               base={"training.optimizer": "sgd"}, mem_limit_bytes=20 * GiB)
    monkeypatch.setenv("FAKE_OOM", CUDA_OOM)
    worker = Worker(url, "fake")
    worker.cap_bytes = 20 * GiB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 19 * GiB)
    assert worker.run().outcomes == {"pruned": 1}
    [trial] = load(url, "fake").get_trials()
    assert trial.user_attrs["prune_kind"] == "oom"
    assert trial.system_attrs["constraints:memory"] == 1.0


def test_the_cap_is_the_limits_share_of_the_device():
    assert gpushare.cap_fraction(35 * GiB, 140 * GiB) == 0.25
    assert gpushare.cap_fraction(200 * GiB, 140 * GiB) == 1.0
