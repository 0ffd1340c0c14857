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
- :func:`estimate_peak_bytes` runs it on meta tensors (shapes and dtypes, no data, no
  arithmetic) while a dispatch mode counts every tensor storage from its creation until
  it is freed: a few hundredths of a second, whatever the model's size. Recurrent
  layers and CTC, which have no meta kernels, run as stand-ins that allocate what the
  CPU kernels allocate. For a CUDA target each allocation is rounded up to the caching
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


def _training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                   batch_size: int,
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
    if optimizer is not None:  # (the estimate adds the step's bytes itself)
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
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._storages and self._storages[key]() is storage:
                continue
            nbytes = self._size(storage)
            self.live += nbytes
            self._storages[key] = weakref.ref(
                storage, lambda _, key=key, nbytes=nbytes: self._freed(key, nbytes))
        self.peak = max(self.peak, self.live)
        return out


class _RecurrentStandIn(torch.autograd.Function):
    """Allocates what one recurrent layer (one direction) allocates on torch's CPU path.

    Meta tensors cannot run recurrent kernels. LSTM (oneDNN, one call per layer) keeps
    its workspace (:func:`_lstm_workspace`) and four ``N x H`` states, and its backward
    allocates the gradients and a ``4 (T N G H + G H (I + H))``-byte scratch at once:
    the kernels' own sizes, measured on torch 2.11. GRU and RNN run per-step cells whose
    allocations are fitted (:data:`_CELL_STEPS`; docs/benchmarks.md has their error).
    """

    @staticmethod
    def forward(ctx, x, kind, hidden, *weights):
        steps, batch, inputs = x.shape
        tnh, nh = steps * batch * hidden, batch * hidden
        if kind == "lstm":
            saved, transient = _lstm_workspace(steps, batch, inputs, hidden) // 4 + 4 * nh, 0
        else:
            kept, stacked, gates = _CELL_STEPS[kind]
            saved = kept * tnh + nh + gates * hidden * (inputs + hidden)
            transient = stacked * tnh + nh
        ctx.kind, ctx.hidden = kind, hidden
        ctx.state = x.new_empty(saved)  # not save_for_backward: backward frees it early
        ctx.save_for_backward(x, *weights)
        out = x.new_empty(steps, batch, hidden)
        x.new_empty(transient)  # the per-step outputs while they are stacked at the end
        return out

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        steps, batch, inputs = x.shape
        gates = {"lstm": 4, "gru": 3, "rnn": 1}[ctx.kind]
        hidden = ctx.hidden
        grads = [torch.empty_like(w) for w in weights]
        if ctx.kind == "lstm":  # one oneDNN call: everything at once, then the state goes
            grad_x = x.new_empty(x.shape)
            work = x.new_empty(steps * batch * gates * hidden + gates * hidden * (inputs + hidden))
            del work, ctx.state
        else:  # step by step: the state is freed as the input's gradient is built
            work = x.new_empty(gates * hidden * hidden)
            del work, ctx.state
            grad_x = x.new_empty(x.shape)
        return (grad_x, None, None, *grads)


# per-step cells (GRU, RNN): multiples of T N H kept for backward and held while the
# outputs are stacked, and the number of gates
_CELL_STEPS = {"gru": (6, 3, 3), "rnn": (1, 1, 1)}


def _lstm_workspace(steps: int, batch: int, inputs: int, hidden: int) -> int:
    return 4 * steps * batch * (9 * hidden + 6 * max(inputs, hidden))


class _Recurrent(torch.nn.Module):
    """Holds a recurrent module's parameters; runs :class:`_RecurrentStandIn` over them."""

    def __init__(self, rnn: torch.nn.RNNBase):
        super().__init__()
        self.kind = {"LSTM": "lstm", "GRU": "gru"}.get(rnn.mode, "rnn")
        self.hidden = rnn.hidden_size
        self.weights = torch.nn.ParameterList(rnn.parameters())

    def forward(self, x):
        return _RecurrentStandIn.apply(x, self.kind, self.hidden, *self.weights), None


def _stand_in_recurrent(model: AcousticModel) -> None:
    for stack in (model.forward_rnns, model.backward_rnns):
        for index, rnn in enumerate(stack):
            stack[index] = _Recurrent(rnn)


class _CTCStandIn(torch.autograd.Function):
    """Allocates what ``ctc_loss`` allocates (no data to run the real one on).

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
                        train: bool = True) -> int:
    """Peak bytes of one training step of the model ``params`` describe, without real tensors.

    The step runs on meta tensors (shapes only, no data, no arithmetic), so its cost does
    not grow with the batch or the model (a few hundredths of a second); recurrent
    layers and CTC run as stand-ins that allocate what the real kernels allocate.
    ``optimizer_name`` is one of the trainer's (adam, adamw, sgd, rmsprop);
    ``momentum`` and ``weight_decay`` as the ``training`` group sets them.
    ``train=False``: the forward pass of dev scoring instead. Raises ConfigError for
    invalid model parameters.
    """
    from cnn_mellin.training.schedule import OPTIMIZERS

    check_model_config(params, num_coeffs)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"memory can be estimated for cpu or cuda devices, not {device.type}")
    if optimizer_name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer_name!r}; allowed: "
                          f"{', '.join(OPTIMIZERS)}")
    meta = torch.device("meta")
    block = _CUDA_BLOCK if device.type == "cuda" else 1
    tracker = _LiveBytes(block)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracker:
            with meta:
                model = AcousticModel(params, num_coeffs, num_classes)
            _stand_in_recurrent(model)
            if dtype != torch.float32:
                model = model.to(dtype)
            _training_step(model, None, batch_size, num_frames, num_coeffs, dtype, meta,
                           _fake_ctc, None, train)
            if not train:
                return tracker.peak
            sizes = [math.ceil(p.numel() * p.element_size() / block) * block
                     for p in model.parameters()]
            step = _optimizer_step_bytes(sizes, optimizer_name, momentum, weight_decay,
                                         foreach=device.type == "cuda")
            return max(tracker.peak, tracker.live + step)


def _optimizer_step_bytes(sizes: list[int], name: str, momentum: float, weight_decay: float,
                          foreach: bool) -> int:
    """Bytes an optimiser step adds at its peak to what backward left: the state it
    creates at its first step plus its largest temporaries, as torch's code allocates them.

    ``sizes``: the parameters' bytes. Single-tensor code (CPU) holds temporaries of one
    parameter at a time; multi-tensor (``foreach``, CUDA) code of all of them at once.
    Adam and AdamW keep two moments and take ``sqrt`` then divide (two temporaries);
    L2 weight decay (adam, sgd, rmsprop; not adamw's decoupled one) adds the decayed
    gradient; SGD keeps a momentum buffer when it has momentum; RMSprop keeps its square
    average (and a momentum buffer) and takes one ``sqrt`` temporary.
    """
    total, largest = sum(sizes), max(sizes, default=0)
    decayed = weight_decay > 0 and name != "adamw"
    if name in ("adam", "adamw"):
        state, temporaries = 2, 2 if not foreach else 1
    elif name == "sgd":
        state, temporaries = (1 if momentum > 0 else 0), 0
    else:
        state, temporaries = (2 if momentum > 0 else 1), 1
    temporaries += decayed
    return state * total + temporaries * (total if foreach else largest)
