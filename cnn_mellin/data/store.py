"""HDF5 feature stores: one file (``feats.h5``) per partition directory.

Layout (format ``cnn-mellin-feats``, version :data:`STORE_VERSION`):

- root attributes: ``format``, ``version``, ``feature``, ``num_coeffs``, ``frame_shift_ms``
  (absent for raw audio), ``split``, and JSON strings ``feature_config``, ``phones`` (the
  48-phone inventory targets index into), ``phone_map_39`` (48 -> 39 for scoring), ``source``;
- root datasets: ``utt_ids`` (UTF-8), ``num_frames``, ``num_targets`` (int64), ``mean`` and
  ``std`` (float32 per coefficient over the partition);
- ``feats/<utt_id>``: float32 (frames, coefficients); ``targets/<utt_id>``: int16 phone ids.

Files are written under a temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cnn_mellin.errors import DataError

STORE_FILE = "feats.h5"
STORE_FORMAT = "cnn-mellin-feats"
STORE_VERSION = 1
_INDEX = ("utt_ids", "num_frames", "num_targets", "mean", "std")
_STD_FLOOR = 1e-6


@dataclass(frozen=True, eq=False)
class StoreInfo:
    """What a feature store holds, read without touching the feature data."""

    path: Path
    feature: str
    num_coeffs: int
    frame_shift_ms: float | None  # None for raw audio: one frame per sample
    utt_ids: list[str]
    num_frames: list[int]
    num_targets: list[int]
    phones: tuple[str, ...]
    phone_map_39: dict[str, str]
    mean: np.ndarray
    std: np.ndarray
    feature_config: dict
    version: int
    split: str = ""
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.utt_ids)


def store_path(data_dir) -> Path:
    """The ``feats.h5`` of a partition directory (or the file itself), checked to exist."""
    path = Path(data_dir)
    if not path.exists():
        raise DataError(f"data dir {path} does not exist")
    if path.is_dir():
        file = path / STORE_FILE
        if not file.is_file():
            what = "is empty" if not any(path.iterdir()) else f"has no {STORE_FILE}"
            raise DataError(
                f"data dir {path} {what}; expected a partition directory written by "
                "'cnn-mellin prep' (e.g. data/timit/fbank-81-10ms/train)"
            )
        path = file
    if not h5py.is_hdf5(path):
        raise DataError(f"{path} is not an HDF5 file; expected a feature store written by "
                        "'cnn-mellin prep'")
    return path


def _json_attr(attrs, name: str, path: Path):
    try:
        return json.loads(attrs[name])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} is not a valid feature store: bad attribute {name!r}") from None


def read_info(data_dir) -> StoreInfo:
    """The :class:`StoreInfo` of a partition directory; DataError if it is not a store."""
    path = store_path(data_dir)
    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if attrs.get("format") != STORE_FORMAT:
                raise DataError(f"{path} is an HDF5 file but not a cnn-mellin feature store "
                                f"(no format attribute {STORE_FORMAT!r})")
            version = int(attrs.get("version", -1))
            if not 1 <= version <= STORE_VERSION:
                raise DataError(f"{path} has store version {version}; this cnn-mellin reads "
                                f"versions 1..{STORE_VERSION}")
            missing = [name for name in (*_INDEX, "feats", "targets") if name not in f]
            if missing:
                raise DataError(f"{path} is not a valid feature store: missing "
                                f"{', '.join(missing)}")
            num_coeffs = int(attrs["num_coeffs"])
            shift = attrs.get("frame_shift_ms")
            info = StoreInfo(
                path=path,
                feature=str(attrs["feature"]),
                num_coeffs=num_coeffs,
                frame_shift_ms=None if shift is None else float(shift),
                utt_ids=[u.decode() if isinstance(u, bytes) else str(u) for u in f["utt_ids"][()]],
                num_frames=[int(n) for n in f["num_frames"][()]],
                num_targets=[int(n) for n in f["num_targets"][()]],
                phones=tuple(_json_attr(attrs, "phones", path)),
                phone_map_39=dict(_json_attr(attrs, "phone_map_39", path)),
                mean=np.asarray(f["mean"][()], dtype=np.float32),
                std=np.asarray(f["std"][()], dtype=np.float32),
                feature_config=_json_attr(attrs, "feature_config", path),
                version=version,
                split=str(attrs.get("split", "")),
                source=_json_attr(attrs, "source", path) if "source" in attrs else {},
            )
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path} is not a readable feature store: {err}") from None
    lengths = {len(info.utt_ids), len(info.num_frames), len(info.num_targets)}
    if len(lengths) != 1 or info.mean.shape != (num_coeffs,) or info.std.shape != (num_coeffs,):
        raise DataError(f"{path} is not a valid feature store: inconsistent index")
    return info


class StoreWriter:
    """Writes one partition's ``feats.h5`` under a temporary name.

    ``add`` utterances, then ``finish()`` (index, statistics, close) and ``commit()`` (rename
    into place); ``abort()`` removes the temporary file. As a context manager it finishes
    and commits on success and aborts on error.
    """

    def __init__(self, data_dir, feature: str, feature_config: dict, num_coeffs: int,
                 frame_shift_ms: float | None, phones, phone_map_39: dict, split: str = "",
                 source: dict | None = None):
        self.path = Path(data_dir) / STORE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{STORE_FILE}.tmp-{os.getpid()}")
        self.num_coeffs = int(num_coeffs)
        self._file = h5py.File(self.tmp, "w")
        attrs = self._file.attrs
        attrs["format"] = STORE_FORMAT
        attrs["version"] = STORE_VERSION
        attrs["feature"] = feature
        attrs["num_coeffs"] = self.num_coeffs
        if frame_shift_ms is not None:
            attrs["frame_shift_ms"] = float(frame_shift_ms)
        attrs["split"] = split
        attrs["feature_config"] = json.dumps(feature_config, sort_keys=True)
        attrs["phones"] = json.dumps(list(phones))
        attrs["phone_map_39"] = json.dumps(dict(phone_map_39), sort_keys=True)
        attrs["source"] = json.dumps(source or {}, sort_keys=True)
        self._feats = self._file.create_group("feats")
        self._targets = self._file.create_group("targets")
        self._ids: list[str] = []
        self._frames: list[int] = []
        self._lengths: list[int] = []
        self._count = 0
        self._sum = np.zeros(self.num_coeffs)
        self._sumsq = np.zeros(self.num_coeffs)
        self._done = False

    def add(self, utt_id: str, feats: np.ndarray, targets) -> None:
        """Store one utterance: ``feats`` (frames, num_coeffs), ``targets`` phone ids."""
        feats = np.asarray(feats, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.int16).reshape(-1)
        if feats.ndim != 2 or feats.shape[1] != self.num_coeffs:
            raise ValueError(f"{utt_id}: features of shape {feats.shape}, expected "
                             f"(frames, {self.num_coeffs})")
        if "/" in utt_id or utt_id in self._feats:
            raise ValueError(f"utterance id {utt_id!r} is not unique or contains '/'")
        self._feats.create_dataset(utt_id, data=feats)
        self._targets.create_dataset(utt_id, data=targets)
        self._ids.append(utt_id)
        self._frames.append(feats.shape[0])
        self._lengths.append(targets.size)
        as64 = feats.astype(np.float64)
        self._count += feats.shape[0]
        self._sum += as64.sum(0)
        self._sumsq += np.square(as64).sum(0)

    def finish(self) -> Path:
        """Write the index and statistics and close the temporary file (not yet renamed)."""
        if not self._ids:
            raise DataError(f"no utterances to write to {self.path}")
        mean = self._sum / max(self._count, 1)
        var = np.maximum(self._sumsq / max(self._count, 1) - mean ** 2, 0.0)
        f = self._file
        f.create_dataset("utt_ids", data=self._ids, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("num_frames", data=np.asarray(self._frames, dtype=np.int64))
        f.create_dataset("num_targets", data=np.asarray(self._lengths, dtype=np.int64))
        f.create_dataset("mean", data=mean.astype(np.float32))
        f.create_dataset("std", data=np.maximum(np.sqrt(var), _STD_FLOOR).astype(np.float32))
        f.close()
        self._done = True
        return self.tmp

    def commit(self) -> Path:
        """Rename the finished file to ``feats.h5`` (replacing an older one)."""
        if not self._done:
            self.finish()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Close and delete the temporary file."""
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - already closed or broken: removing it is what matters
            pass
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


class StoreReader:
    """Reads utterances from a store; opens the file lazily, once per process."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = None
        self._pid = None

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def read(self, utt_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(features float32 (frames, coeffs), targets int64) of ``utt_id``."""
        f = self._handle()
        try:
            feats = f["feats"][utt_id][()]
            targets = f["targets"][utt_id][()].astype(np.int64)
        except KeyError:
            raise DataError(f"{self.path} has no utterance {utt_id!r}") from None
        return feats, targets

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_pid": None}
