"""Peak memory of one training step (forward + backward + optimiser step) of a configuration.

Two ways, running the same step code (:func:`_training_step`) on a synthetic
batch of ``batch_size`` full-length sequences of ``num_frames`` frames:

- :func:`measure_peak_bytes` runs it for real. On CUDA the figure is exact:
  ``torch.cuda.max_memory_allocated`` minus what was allocated before (so it
  includes the model copy, the batch, activations, gradients, optimiser state and
  cuDNN/cuBLAS workspaces the caching allocator hands out). On CPU there is no
  allocator statistic, so the step runs under ``torch.profiler`` with memory
  profiling and the figure is the peak of the running sum of every allocation and
  free the CPU allocator reports: exact for torch tensors, blind to memory that
  libraries (oneDNN scratchpads, BLAS) take with their own ``malloc``.
- :func:`estimate_peak_bytes` runs it without real tensors: the model is built and
  stepped under ``FakeTensorMode`` (shapes, dtypes and aliasing, no data) while a
  dispatch mode counts every tensor storage from its creation until it is freed.
  Fake tensors live on the CPU (autograd refuses fake CUDA tensors on a host
  without a GPU); for a CUDA target each allocation is rounded up to the caching
  allocator's 512-byte blocks and the optimiser uses its CUDA (foreach) code path.
  Device-private workspaces (cuDNN) are not counted; with a GPU at hand, measure.

:class:`MemoryLimitExceeded` carries both figures for "pruned: needs N bytes >
limit M" messages.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cnn_mellin.errors import ConfigError
from cnn_mellin.model import AcousticModel, check_model_config

__all__ = [
    "MemoryLimitExceeded",
    "check_memory_limit",
    "estimate_peak_bytes",
    "measure_peak_bytes",
]

_CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to this
_TARGETS_PER_OUTPUT = 4  # synthetic CTC targets: one phone per 4 outputs (~12 phones/s)


class MemoryLimitExceeded(ConfigError):
    """A configuration needs more memory than allowed."""

    def __init__(self, needed: int, limit: int):
        self.needed, self.limit = int(needed), int(limit)
        super().__init__(f"needs {self.needed} bytes > limit {self.limit} bytes "
                         f"({self.needed / 2**30:.2f} GiB > {self.limit / 2**30:.2f} GiB)")


def check_memory_limit(needed: int, limit: int | None) -> None:
    """Raise :class:`MemoryLimitExceeded` if ``needed`` exceeds ``limit`` (None: no limit)."""
    if limit is not None and needed > limit:
        raise MemoryLimitExceeded(needed, limit)


def _ctc_targets(batch_size: int, num_outputs: int, num_classes: int, device) -> torch.Tensor:
    length = max(1, num_outputs // _TARGETS_PER_OUTPUT)
    return torch.randint(1, num_classes, (batch_size, length), device=device)


def _training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch_size: int,
                   num_frames: int, num_coeffs: int, dtype: torch.dtype, device: torch.device,
                   ctc: Callable, autocast_dtype: torch.dtype | None,
                   train: bool = True) -> None:
    """One synthetic step as the trainer takes it: forward, CTC, backward, clip, step; or
    (``train=False``) the forward pass of dev scoring, without gradients."""
    feats = torch.randn(batch_size, num_frames, num_coeffs, dtype=dtype, device=device)
    context = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
               else nullcontext())
    if not train:
        model.eval()
        with torch.no_grad(), context:
            model(feats, None)
        return
    with context:
        log_probs, _ = model(feats, None)
    num_outputs = log_probs.shape[0]
    targets = _ctc_targets(batch_size, num_outputs, log_probs.shape[2], device)
    loss = ctc(log_probs.float(), targets, [num_outputs] * batch_size,
               [targets.shape[1]] * batch_size)
    loss.backward()  # the batch, log-probs and loss stay alive, as in the trainer's loop
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()


def measure_peak_bytes(model: torch.nn.Module, batch_size: int, num_frames: int,
                       num_coeffs: int, optimizer_factory: Callable[[Iterable], Any],
                       device: str | torch.device, *,
                       autocast_dtype: torch.dtype | None = None, train: bool = True) -> int:
    """Peak bytes of one real training step of a copy of ``model`` on ``device``.

    ``optimizer_factory(parameters)`` builds the optimiser (e.g. the trainer's
    ``make_optimizer`` with its settings bound). ``model`` itself is not touched.
    """
    device = torch.device(device)
    if getattr(model, "num_coeffs", num_coeffs) != num_coeffs:
        raise ValueError(f"model takes {model.num_coeffs} coefficients, not {num_coeffs}")
    dtype = next(model.parameters()).dtype

    def run() -> None:
        trial = copy.deepcopy(model).to(device)
        trial.zero_grad(set_to_none=True)
        trial.train()
        optimizer = optimizer_factory(trial.parameters())
        _training_step(trial, optimizer, batch_size, num_frames, num_coeffs, dtype, device,
                       F.ctc_loss, autocast_dtype, train)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    if device.type == "cpu":
        return _profile_cpu_peak(run)
    raise ConfigError(f"memory can be measured on cpu or cuda devices, not {device.type}")


def _profile_cpu_peak(run: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence kineto's GPU probing on CPU hosts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
    cpu = torch._C._autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages alive at each op; keeps the peak."""

    def __init__(self, block: int = 1):
        super().__init__()
        self.block = block
        self.live = self.peak = 0
        self._storages: dict[int, weakref.ref] = {}

    def _size(self, storage) -> int:
        return math.ceil(storage.nbytes() / self.block) * self.block

    def _freed(self, key: int, nbytes: int) -> None:
        self._storages.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = _hidden_sizes(func, args, out)
        for index, tensor in enumerate(tree_flatten(out)[0]):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._storages and self._storages[key]() is storage:
                continue
            nbytes = sizes.get(index, self._size(storage))
            self.live += nbytes
            self._storages[key] = weakref.ref(
                storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
        self.peak = max(self.peak, self.live + _scratch_bytes(func, args))
        return out


def _hidden_sizes(func, args, out) -> dict[int, int]:
    """Bytes of outputs whose fake version is smaller than the real one, by output index.

    oneDNN's LSTM (torch's CPU path) keeps a training workspace whose fake
    version is empty; measured on torch 2.11 it takes
    ``4 T N (9 H + 6 max(I, H))`` bytes per layer and direction (within 5% for
    T N >= 100). It stands in for cuDNN's reserve space on CUDA targets too.
    """
    if func is not torch.ops.aten.mkldnn_rnn_layer.default or not args[15]:
        return {}
    steps, batch, inputs = args[0].shape
    if args[14]:  # batch_first
        steps, batch = batch, steps
    hidden = args[10]
    return {3: 4 * steps * batch * (9 * hidden + 6 * max(inputs, hidden))}


def _scratch_bytes(func, args) -> int:
    """Bytes an op allocates and frees inside itself, beyond its outputs.

    oneDNN's LSTM backward (measured on torch 2.11): ``4 (T N G H + G H (I + H))``
    bytes with ``G = 4`` gates, within 3%.
    """
    if func is not torch.ops.aten.mkldnn_rnn_layer_backward.default:
        return 0
    steps, batch, inputs = args[0].shape
    gates = 4 * args[15]
    return 4 * (steps * batch * gates + gates * (inputs + args[15]))


class _CTCStandIn(torch.autograd.Function):
    """Allocates what ``ctc_loss`` allocates (fake tensors cannot run the real one).

    Forward keeps ``log_alpha`` (N, T, 2L + 1) and returns per-sequence losses;
    backward builds ``log_beta`` of the same size and the gradient (T, N, C).
    """

    @staticmethod
    def forward(ctx, log_probs, target_length):
        steps, batch, _ = log_probs.shape
        alpha = log_probs.new_empty(batch, steps, 2 * target_length + 1)
        ctx.save_for_backward(log_probs, alpha)
        return log_probs.new_zeros(batch)

    @staticmethod
    def backward(ctx, grad):
        log_probs, alpha = ctx.saved_tensors
        beta = torch.empty_like(alpha)
        grad_input = torch.zeros_like(log_probs)
        del beta
        return grad_input, None


def _fake_ctc(log_probs, targets, input_lengths, target_lengths):
    return _CTCStandIn.apply(log_probs, targets.shape[1]).mean()


def estimate_peak_bytes(params: Mapping[str, Any], num_coeffs: int, batch_size: int,
                        num_frames: int, optimizer_name: str, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cuda", *, num_classes: int = 49,
                        momentum: float = 0.9, weight_decay: float = 0.0,
                        autocast_dtype: torch.dtype | None = None, train: bool = True) -> int:
    """Peak bytes of one training step of the model ``params`` describe, without real tensors.

    ``optimizer_name`` is one of the trainer's (adam, adamw, sgd, rmsprop);
    ``momentum`` and ``weight_decay`` as the ``training`` group sets them.
    ``train=False``: the forward pass of dev scoring instead. Raises ConfigError for
    invalid model parameters.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from cnn_mellin.training.schedule import make_optimizer

    check_model_config(params, num_coeffs)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"memory can be estimated for cpu or cuda devices, not {device.type}")
    cpu = torch.device("cpu")
    tracker = _LiveBytes(_CUDA_BLOCK if device.type == "cuda" else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FakeTensorMode(), tracker, torch.device(cpu):
            model = AcousticModel(params, num_coeffs, num_classes)
            if dtype != torch.float32:
                model = model.to(dtype)
            optimizer = make_optimizer(model.parameters(), optimizer_name, 1e-3, weight_decay,
                                       momentum)
            if device.type == "cuda":  # torch's default on CUDA: multi-tensor (foreach) kernels
                for group in optimizer.param_groups:
                    group["foreach"] = True
            _training_step(model, optimizer, batch_size, num_frames, num_coeffs, dtype, cpu,
                           _fake_ctc, autocast_dtype, train)
    return tracker.peak
