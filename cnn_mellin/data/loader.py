"""Reading feature stores for training: Dataset, length-bucketed batches, padded collation.

Batches are drawn by :class:`BucketBatchSampler`: utterances are sorted by length, cut into
buckets of similar length, shuffled within each bucket and cut into batches whose order is
shuffled. The shuffling depends only on ``(seed, epoch)``, so an epoch is the same whoever
draws it and however many loader workers read it (call ``set_epoch`` before each epoch).

Loader worker processes never decide how training ends: they ignore SIGTERM and SIGINT
(SLURM signals every process of a job, a terminal's Ctrl-C the whole process group), so the
main process alone reacts to a stop and shuts them down (:func:`close_loader`). Torch's
SIGCHLD handler, which raises "DataLoader worker ... exited unexpectedly" wherever the main
thread happens to be (inside ``backward()``, a checkpoint's ``fsync``, a database write), is
not installed: a dead worker is noticed when the iterator waits for its next batch, the
only place the error is raised (:func:`is_loader_failure` tells it apart). Their number is
capped to the CPUs this process may use (:func:`cap_workers`).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import signal
import time
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from cnn_mellin.data.store import StoreInfo, StoreReader, read_info
from cnn_mellin.errors import DataError, UserError

_log = logging.getLogger(__name__)
_capped: set[tuple[int, int]] = set()  # (asked, allowed) pairs already warned about


class UtteranceDataset(Dataset):
    """Utterances of a partition directory: ``(feats (T, F) float32, targets (L,) long, id)``.

    ``utt_ids`` picks (and orders) a subset. The HDF5 file is opened on first access in each
    process, so the dataset can be handed to loader worker processes.
    """

    def __init__(self, data_dir, utt_ids: Sequence[str] | None = None):
        self.info: StoreInfo = read_info(data_dir)
        position = {u: i for i, u in enumerate(self.info.utt_ids)}
        if utt_ids is None:
            self.utt_ids = list(self.info.utt_ids)
        else:
            self.utt_ids = [str(u) for u in utt_ids]
            unknown = [u for u in self.utt_ids if u not in position]
            if unknown:
                raise DataError(f"{self.info.path}: {len(unknown)} utterance ids not in the "
                                f"store, e.g. {unknown[0]!r}")
        self.num_frames = [self.info.num_frames[position[u]] for u in self.utt_ids]
        self.num_targets = [self.info.num_targets[position[u]] for u in self.utt_ids]
        self._reader = StoreReader(self.info.path)

    def __len__(self) -> int:
        return len(self.utt_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        utt_id = self.utt_ids[index]
        feats, targets = self._reader.read(utt_id)
        return torch.from_numpy(feats), torch.from_numpy(targets), utt_id


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of indices into ``num_frames`` with similar lengths; every index once per epoch.

    Indices are sorted by length (ties by index) and split into ``num_buckets`` buckets of
    (nearly) equal size. With ``shuffle``, each bucket is shuffled, the buckets are chained in
    length order, cut into batches of ``batch_size`` and the batches are shuffled, all by a
    generator seeded with ``(seed, epoch)``. Only the last, longest batch can be short;
    ``drop_last`` drops it.
    """

    def __init__(self, num_frames: Sequence[int], batch_size: int, num_buckets: int = 10,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
        if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
            raise UserError(f"number of buckets must be an integer >= 1, got {num_buckets!r}")
        self.num_frames = [int(n) for n in num_frames]
        self.batch_size = batch_size
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self._order = sorted(range(len(self.num_frames)), key=lambda i: (self.num_frames[i], i))

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch whose batches ``__iter__`` yields, from its batch ``start`` on
        (a run resumed in the middle of an epoch)."""
        self.epoch = int(epoch)
        self.start = int(start)

    def batches(self) -> list[list[int]]:
        """The batches of the current epoch, in order."""
        order = self._order
        if self.shuffle and order:
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF,
                                         0x5EED])
            edges = np.linspace(0, len(order), min(self.num_buckets, len(order)) + 1)
            edges = np.round(edges).astype(int)
            chained = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                bucket = order[lo:hi]
                chained += [bucket[i] for i in rng.permutation(len(bucket))]
            order = chained
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches()[self.start:])

    def __len__(self) -> int:
        full, rest = divmod(len(self.num_frames), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


class Batch(NamedTuple):
    """A padded batch: features, their lengths, targets (padded with 0), their lengths, ids."""

    feats: torch.Tensor  # (N, Tmax, F) float32, zero-padded
    feat_lens: torch.Tensor  # (N,) long
    targets: torch.Tensor  # (N, Lmax) long, padded with 0
    target_lens: torch.Tensor  # (N,) long
    utt_ids: list[str]

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on ``device``."""
        return Batch(
            self.feats.to(device, non_blocking=non_blocking),
            self.feat_lens.to(device, non_blocking=non_blocking),
            self.targets.to(device, non_blocking=non_blocking),
            self.target_lens.to(device, non_blocking=non_blocking),
            self.utt_ids,
        )


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor, str]]) -> Batch:
    """Pad ``(feats, targets, utt_id)`` items into a :class:`Batch`."""
    if not items:
        raise ValueError("cannot collate an empty batch")
    feat_lens = torch.tensor([f.shape[0] for f, _, _ in items], dtype=torch.long)
    target_lens = torch.tensor([t.shape[0] for _, t, _ in items], dtype=torch.long)
    num_coeffs = items[0][0].shape[1]
    feats = torch.zeros(len(items), int(feat_lens.max()), num_coeffs, dtype=torch.float32)
    targets = torch.zeros(len(items), int(target_lens.max()), dtype=torch.long)
    for i, (f, t, _) in enumerate(items):
        feats[i, : f.shape[0]] = f
        targets[i, : t.shape[0]] = t
    return Batch(feats, feat_lens, targets, target_lens, [u for _, _, u in items])


def subset_indices(dataset: UtteranceDataset, subset) -> list[int]:
    """Indices of ``subset`` in ``dataset``: a fraction in (0, 1] (a fixed choice, the same
    for every seed), or a sequence of indices or utterance ids."""
    n = len(dataset)
    if isinstance(subset, numbers.Real) and not isinstance(subset, bool):
        fraction = float(subset)
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"data subset must be a fraction in (0, 1], got {subset!r}")
        keep = max(1, math.ceil(fraction * n)) if n else 0
        rng = np.random.default_rng(0x5B5E7)  # fixed: trials compare on the same utterances
        return sorted(rng.permutation(n)[:keep].tolist())
    items = list(subset)
    if all(isinstance(i, str) for i in items):
        position = {u: i for i, u in enumerate(dataset.utt_ids)}
        missing = [u for u in items if u not in position]
        if missing:
            raise DataError(f"{len(missing)} subset utterances are not in the data, e.g. "
                            f"{missing[0]!r}")
        return [position[u] for u in items]
    indices = [int(i) for i in items]
    if any(not 0 <= i < n for i in indices):
        raise UserError(f"subset indices must be in 0..{n - 1}")
    return indices


def allowed_workers() -> int:
    """Loader workers this process may start: the CPUs of its allocation
    (``SLURM_CPUS_PER_TASK``), at most those its affinity lets it run on."""
    from cnn_mellin.cpus import allocated_cpus

    cpus = allocated_cpus()
    if hasattr(os, "sched_getaffinity"):
        cpus = min(cpus, len(os.sched_getaffinity(0)))
    return max(1, cpus)


def cap_workers(num_workers: int) -> int:
    """``num_workers`` capped to :func:`allowed_workers`; warns once per process and figure
    (a worker process builds loaders for every trial)."""
    allowed = allowed_workers()
    if num_workers <= allowed:
        return num_workers
    if (num_workers, allowed) not in _capped:
        _capped.add((num_workers, allowed))
        _log.warning("%d data loader workers asked for, but this process may use %d CPUs: "
                     "using %d", num_workers, allowed, allowed)
    return allowed


_STOPS = {signal.SIGTERM, signal.SIGINT}


def _ignore_stop_signals(_worker_id: int) -> None:
    """A loader worker's start: stops are the main process's to handle (module doc). They
    were blocked since the fork (:class:`_Loader`): one sent meanwhile is dropped here."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)


class _Loader(DataLoader):
    """A DataLoader whose worker processes start with SIGTERM/SIGINT blocked: torch sets its
    own SIGTERM handler in a new worker (one that dies) before ``worker_init_fn`` runs, and
    a job cancelled at that moment would otherwise kill it."""

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)  # children inherit it
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending stop arrives now

    def __iter__(self):
        batches = super().__iter__()
        return _dead_workers_named(batches) if self.num_workers else batches


def _dead_workers_named(batches) -> Iterator:
    """The batches of torch's multi-process iterator ``batches``; a connection error while a
    batch is fetched, because the worker that shares its tensors died, is raised as torch's
    own dead-worker RuntimeError (:func:`is_loader_failure`)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, EOFError) as err:
            dead = _dead_workers(batches)
            if not dead:
                raise
            raise RuntimeError(
                f"DataLoader worker (pid(s) {', '.join(map(str, dead))}) exited unexpectedly "
                f"while its batch was read ({type(err).__name__}: {err})") from err
        yield batch


def _dead_workers(batches, wait_s: float = 1.0) -> list[int]:
    """Pids of the loader workers of ``batches`` that died; one that is dying (its socket
    closed first) is waited for up to ``wait_s`` in all."""
    workers = list(getattr(batches, "_workers", ()))
    deadline = time.monotonic() + wait_s
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    return [w.pid for w in workers if not w.is_alive()]


def _no_sigchld_handler() -> None:
    """Keep torch from installing its raising SIGCHLD handler in this process (module doc)."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True  # torch installs it only while this is False


def is_loader_failure(err: BaseException) -> bool:
    """Whether ``err`` says a loader worker process died (not an error in the data)."""
    text = str(err)
    return isinstance(err, RuntimeError) and "DataLoader worker" in text and (
        "exited unexpectedly" in text or "killed by signal" in text)


def close_loader(loader: DataLoader | None) -> None:
    """Shut the loader's worker processes down now (persistent ones otherwise live until the
    loader is collected, e.g. while an exception's traceback holds it)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def make_loader(dataset: UtteranceDataset, batch_size: int, num_workers: int = 0,
                shuffle: bool = True, seed: int = 0, num_buckets: int = 10,
                subset=None) -> DataLoader:
    """A DataLoader of :class:`Batch` over ``dataset`` (or its ``subset``) with bucketing.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch. Workers (at most
    :func:`allowed_workers`) stay alive between epochs and ignore SIGTERM/SIGINT; batches are
    pinned when CUDA is available.
    """
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise UserError(f"number of data workers must be an integer >= 0, got {num_workers!r}")
    num_workers = cap_workers(num_workers)
    frames = list(dataset.num_frames)
    if subset is not None:
        indices = subset_indices(dataset, subset)
        dataset = Subset(dataset, indices)
        frames = [frames[i] for i in indices]
    if not frames:
        raise DataError("no utterances to load")
    sampler = BucketBatchSampler(frames, batch_size, num_buckets=num_buckets, shuffle=shuffle,
                                 seed=seed)
    if num_workers:
        _no_sigchld_handler()
    return _Loader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_ignore_stop_signals if num_workers else None,
    )
