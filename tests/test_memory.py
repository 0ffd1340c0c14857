"""Tests for cnn_mellin.memory: measured and estimated peak bytes of a training step.

No GPU here: the estimator is checked against the CPU measurement (profiler
allocation events); the CUDA test runs only where a GPU is present.
"""

from functools import partial

import pytest
import torch

from cnn_mellin.errors import ConfigError
from cnn_mellin.memory import (
    MemoryLimitExceeded,
    check_memory_limit,
    estimate_peak_bytes,
    measure_peak_bytes,
)
from cnn_mellin.model import AcousticModel
from cnn_mellin.training.schedule import make_optimizer

torch.set_num_threads(1)


def _optimizer(name):
    return partial(make_optimizer, name=name, learning_rate=1e-3, momentum=0.9)


CASES = [  # params, num_coeffs, batch, frames, optimizer, tolerance
    ({}, 81, 8, 300, "adam", 0.05),
    ({"convolutional_mellin": True}, 81, 8, 300, "adamw", 0.05),
    ({"convolutional_mellin": True, "recurrent_bidirectional": False,
      "convolutional_factor_sched": 2}, 41, 4, 200, "rmsprop", 0.05),
    # GRU and RNN cells are stand-ins with fitted sizes (docs/benchmarks.md): up to 8 % off
    ({"recurrent_type": "gru", "convolutional_layers": 3, "recurrent_size": 64}, 40, 4, 120,
     "sgd", 0.08),
    ({"recurrent_type": "rnn", "recurrent_size": 200, "recurrent_layers": 3}, 81, 8, 300,
     "adam", 0.05),
    ({"convolutional_mellin": True, "raw_window_size": 200, "raw_window_stride": 160}, 1, 2,
     16000, "adam", 0.05),
    ({"layer_norm": True, "input_dropout": 0.1, "input_smoothing_width": 2.0}, 81, 8, 300,
     "adam", 0.05),
]


@pytest.mark.slow
@pytest.mark.parametrize("params,num_coeffs,batch,frames,optimizer,tolerance", CASES)
def test_estimate_close_to_the_cpu_measurement(params, num_coeffs, batch, frames, optimizer,
                                               tolerance):
    torch.manual_seed(0)
    model = AcousticModel(params, num_coeffs)
    measured = measure_peak_bytes(model, batch, frames, num_coeffs, _optimizer(optimizer),
                                  "cpu")
    estimated = estimate_peak_bytes(params, num_coeffs, batch, frames, optimizer, device="cpu")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert measured > 3 * weights  # weights, gradients and optimiser state at least
    assert abs(estimated - measured) <= tolerance * measured, (estimated, measured)


def test_measurement_leaves_the_model_alone():
    torch.manual_seed(1)
    model = AcousticModel({"recurrent_size": 16}, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peak = measure_peak_bytes(model, 2, 50, 10, _optimizer("adam"), "cpu")
    assert peak > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_estimate_grows_with_the_batch_and_rounds_for_cuda():
    params = {"recurrent_size": 32, "convolutional_initial_channels": 4}
    small = estimate_peak_bytes(params, 20, 2, 100, "sgd", device="cpu", momentum=0.0)
    large = estimate_peak_bytes(params, 20, 8, 100, "sgd", device="cpu", momentum=0.0)
    assert 2.5 * small < large < 4.5 * small
    assert estimate_peak_bytes(params, 20, 2, 100, "sgd", device="cuda", momentum=0.0) > small
    # Adam keeps two state tensors per weight, plain SGD none: with weights larger than the
    # activations the step's peak grows by about twice the weights
    wide = {"recurrent_size": 256, "convolutional_initial_channels": 4}
    sgd = estimate_peak_bytes(wide, 20, 1, 10, "sgd", device="cpu", momentum=0.0)
    adam = estimate_peak_bytes(wide, 20, 1, 10, "adam", device="cpu")
    weights = sum(p.numel() * 4 for p in AcousticModel(wide, 20).parameters())
    assert 1.5 * weights < adam - sgd <= 2.5 * weights


def test_estimate_rejects_bad_input():
    with pytest.raises(ConfigError, match="window_stride"):
        estimate_peak_bytes({"window_size": 2, "window_stride": 3}, 40, 2, 100, "adam")
    with pytest.raises(ConfigError, match="unknown optimizer"):
        estimate_peak_bytes({}, 40, 2, 100, "adagrad")
    with pytest.raises(ConfigError, match="cpu or cuda"):
        estimate_peak_bytes({}, 40, 2, 100, "adam", device="meta")


def test_memory_limit_error():
    check_memory_limit(100, 100)
    check_memory_limit(10**12, None)
    with pytest.raises(MemoryLimitExceeded) as info:
        check_memory_limit(3 * 2**30, 2**30)
    assert info.value.needed == 3 * 2**30 and info.value.limit == 2**30
    assert str(info.value).startswith(f"needs {3 * 2**30} bytes > limit {2**30} bytes")
    assert isinstance(info.value, ConfigError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measurement_counts_the_whole_step():
    torch.manual_seed(2)
    model = AcousticModel({"convolutional_mellin": True}, 81)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = measure_peak_bytes(model, 8, 300, 81, _optimizer("adam"), "cuda")
    assert peak > 4 * weights  # weights, gradients, two Adam states and activations
    assert next(model.parameters()).device.type == "cpu"
