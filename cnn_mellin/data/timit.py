"""A corpus in the TIMIT layout to HDF5 feature stores (``cnn-mellin prep timit``).

Reads ``TRAIN|TEST/DR*/SPEAKER/*.WAV`` (NIST SPHERE or any format soundfile reads, 16 kHz)
with their ``.PHN`` transcriptions, in upper or lower case, and leaves out the SA sentences.
Speakers of ``dev_spk.list`` form the dev set, those of ``core_test_spk.list`` the core test
set and the other TRAIN speakers the training set. Targets are 48-phone ids (61 -> 48, ``q``
dropped); the 48 -> 39 map is stored for scoring. Everything is checked before anything is
written, and all stores are renamed into place only when every one of them is complete.

Each ``.PHN`` is checked against its audio: segments must be in order, must not overlap and must
end within the audio (gaps and a first segment after sample 0 are accepted). A transcript
that overshoots the audio by at most :data:`PHN_END_TOLERANCE` samples is clamped with a
warning; anything further is an error. ``.WRD`` and ``.TXT`` files are not read.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile

from cnn_mellin.data import features as feats_mod
from cnn_mellin.data.phones import PHONES48, map_48_to_39, speaker_list, targets_from_61
from cnn_mellin.data.store import StoreWriter
from cnn_mellin.errors import ConfigError, DataError

SPLITS = ("train", "dev", "test")
SAMPLE_RATE = 16000
# samples a last .PHN segment may end past the audio (clamped with a warning): one 10 ms
# frame shift, room for an end rounded up to a frame rather than a transcript of other audio
PHN_END_TOLERANCE = 160

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimitUtterance:
    """One utterance of the corpus and where its files are."""

    utt_id: str  # "<speaker>_<sentence>", lower case, e.g. "fcjf0_si1027"
    speaker: str
    split: str
    wav: Path
    phn: Path


@dataclass
class PrepSummary:
    """What :func:`prepare_timit` wrote."""

    out_dir: Path
    features: list[str]
    utterances: dict[str, int] = field(default_factory=dict)
    speakers: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [
            f"{split} {_plural(self.utterances[split], 'utterance')} "
            f"({_plural(self.speakers[split], 'speaker')}, {self.seconds[split] / 3600:.2f} h)"
            for split in SPLITS
        ]
        names = self.features[0] if len(self.features) == 1 else f"{{{','.join(self.features)}}}"
        where = f"{self.out_dir}/{names}/{{{','.join(SPLITS)}}}/feats.h5"
        return f"wrote {where}: " + ", ".join(parts)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _children(folder: Path) -> dict[str, Path]:
    """Entries of ``folder`` by lower-case name."""
    return {p.name.lower(): p for p in sorted(folder.iterdir())}


def find_utterances(timit_dir) -> list[TimitUtterance]:
    """Every non-SA utterance of the train, dev and core test speakers, in a fixed order."""
    root = Path(timit_dir)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise DataError(f"TIMIT directory {root} {what}")
    top = _children(root)
    layout = ("expected TRAIN and TEST folders (any letter case) holding "
              "DR*/SPEAKER/*.WAV with .PHN files")
    if "train" not in top and "test" not in top:
        raise DataError(f"{root} is not in the TIMIT layout: {layout}")
    dev, core = set(speaker_list("dev")), set(speaker_list("core_test"))
    found: list[TimitUtterance] = []
    for part in ("train", "test"):
        if part not in top or not top[part].is_dir():
            continue
        for region in _children(top[part]).values():
            if not region.is_dir():
                continue
            for speaker_dir in _children(region).values():
                if not speaker_dir.is_dir():
                    continue
                speaker = speaker_dir.name.lower()
                split = "dev" if speaker in dev else "test" if speaker in core else (
                    "train" if part == "train" else None)
                if split is None:
                    continue
                files = _children(speaker_dir)
                for name, wav in files.items():
                    stem, ext = os.path.splitext(name)
                    # "x.wav.wav": a converted copy some distributions put next to x.wav
                    if ext != ".wav" or stem.startswith("sa") or "." in stem:
                        continue
                    phn = files.get(f"{stem}.phn")
                    if phn is None:
                        raise DataError(f"{wav} has no .PHN transcription next to it")
                    found.append(TimitUtterance(f"{speaker}_{stem}", speaker, split, wav, phn))
    for split, where in (("train", "TRAIN"), ("dev", "TEST (dev_spk.list)"),
                         ("test", "TEST (core_test_spk.list)")):
        if not any(u.split == split for u in found):
            raise DataError(f"no {split} utterances found in {root}/{where}: {layout}")
    order = {s: i for i, s in enumerate(SPLITS)}
    return sorted(found, key=lambda u: (order[u.split], u.utt_id))


class Segment(NamedTuple):
    """One line of a .PHN file: samples [start, end) hold ``label``; ``line`` counts from 1."""

    start: int
    end: int
    label: str
    line: int


def read_phn(path: Path) -> list[Segment]:
    """The segments of a .PHN file.

    DataError for malformed lines, a negative start, a segment that ends before it starts,
    and segments out of order or overlapping (each error names the file and the line).
    """
    rows: list[Segment] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            start, end, label = int(fields[0]), int(fields[1]), fields[2]
            if len(fields) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise DataError(f"{path} line {number}: expected 'START END PHONE', "
                            f"got {line.strip()!r}") from None
        where = f"{path} line {number}: segment {start} {end} {label}"
        if start < 0:
            raise DataError(f"{where} starts before sample 0")
        if end < start:
            raise DataError(f"{where} ends before it starts")
        if rows and start < rows[-1].start:
            raise DataError(f"{where} is out of order: it starts before the segment of "
                            f"line {rows[-1].line} ({rows[-1].start} {rows[-1].end})")
        if rows and start < rows[-1].end:
            raise DataError(f"{where} overlaps the segment of line {rows[-1].line} "
                            f"({rows[-1].start} {rows[-1].end})")
        rows.append(Segment(start, end, label, number))
    if not rows:
        raise DataError(f"{path} is empty")
    return rows


def check_segments(segments: list[Segment], num_samples: int, phn: Path,
                   wav: Path) -> list[Segment]:
    """``segments`` (in order, as :func:`read_phn` gives them) checked against the audio length.

    Segments ending at most :data:`PHN_END_TOLERANCE` samples past the audio are clamped to
    its end with a warning; further is a DataError naming the file and the line.
    """
    last = segments[-1]
    over = last.end - num_samples
    if over <= 0:
        return segments
    where = (f"{phn} line {last.line}: segment {last.start} {last.end} {last.label} ends "
             f"{over} samples past the end of {wav} ({num_samples} samples)")
    if over > PHN_END_TOLERANCE:
        raise DataError(f"{where}; the transcript does not fit its audio (at most "
                        f"{PHN_END_TOLERANCE} samples past the end are tolerated)")
    _log.warning("%s; clamped to the end of the audio", where)
    return [s if s.end <= num_samples
            else s._replace(start=min(s.start, num_samples), end=num_samples) for s in segments]


def _targets(utt: TimitUtterance, segments: list[Segment]) -> np.ndarray:
    ids = targets_from_61([s.label for s in segments], where=str(utt.phn))
    if not ids:
        raise DataError(f"{utt.phn} has no phones besides q")
    return np.asarray(ids, dtype=np.int16)


def _check_audio(utt: TimitUtterance) -> int:
    """Number of samples of the utterance's audio; DataError unless 16 kHz mono."""
    try:
        info = soundfile.info(str(utt.wav))
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DataError(f"{utt.wav}: cannot read audio ({err})") from None
    if info.samplerate != SAMPLE_RATE:
        raise DataError(f"{utt.wav}: sample rate {info.samplerate} Hz; the audio must be "
                        f"{SAMPLE_RATE} Hz")
    if info.channels != 1:
        raise DataError(f"{utt.wav}: {info.channels} channels; the audio must be mono")
    return info.frames


def _check_utterance(utt: TimitUtterance) -> tuple[np.ndarray, int]:
    """The utterance's 48-phone targets and its number of samples, transcript and audio checked."""
    segments = read_phn(utt.phn)
    num_samples = _check_audio(utt)
    segments = check_segments(segments, num_samples, utt.phn, utt.wav)
    return _targets(utt, segments), num_samples


def _features(job: tuple[Path, tuple[str, ...]]) -> dict[str, np.ndarray]:
    path, names = job
    try:
        audio, _ = soundfile.read(str(path), dtype="float32", always_2d=False)
    except (RuntimeError, soundfile.LibsndfileError) as err:
        raise DataError(f"{path}: cannot read audio ({err})") from None
    out = {}
    for name in names:
        values = feats_mod.compute_features(name, audio).numpy()
        expected = feats_mod.num_frames(name, audio.shape[0])
        if values.shape[0] != expected:
            raise RuntimeError(f"{name} gave {values.shape[0]} frames for {path}, the "
                               f"frame-shift formula {expected}")
        out[name] = values
    return out


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _check_features(features: Iterable[str] | str) -> list[str]:
    names = [features] if isinstance(features, str) else list(features)
    if not names:
        raise ConfigError(f"no feature given; allowed: {', '.join(feats_mod.FEATURES)}")
    return [feats_mod.check_feature(n) for n in dict.fromkeys(names)]


def prepare_timit(timit_dir, out_dir, features, num_workers: int | None = None) -> PrepSummary:
    """Write ``out_dir/<feature>/{train,dev,test}/feats.h5`` for each of ``features``.

    ``num_workers`` processes compute features (default: the CPU cores available).
    """
    names = _check_features(features)
    if num_workers is not None and (isinstance(num_workers, bool)
                                    or not isinstance(num_workers, int) or num_workers < 1):
        raise ConfigError(f"number of workers must be an integer >= 1, got {num_workers!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output directory {out} exists and is not a directory")
    utterances = find_utterances(timit_dir)
    checked = {u.utt_id: _check_utterance(u) for u in utterances}
    targets = {utt: t for utt, (t, _) in checked.items()}
    seconds = {utt: n / SAMPLE_RATE for utt, (_, n) in checked.items()}
    ids = [u.utt_id for u in utterances]
    if len(set(ids)) != len(ids):
        dup = next(u for u in ids if ids.count(u) > 1)
        raise DataError(f"utterance {dup} appears twice in {timit_dir}")

    source = {"corpus": str(Path(timit_dir).resolve()), "generator": "cnn-mellin prep timit"}
    writers: dict[tuple[str, str], StoreWriter] = {}
    workers = num_workers or _available_cores()
    folders = [out] + [out / n for n in names] + [out / n / s for n in names for s in SPLITS]
    new_folders = [f for f in folders if not f.exists()]
    try:
        for name in names:
            config = feats_mod.load_feature_config(name)
            for split in SPLITS:
                writers[name, split] = StoreWriter(
                    out / name / split, name, config, config["num_coeffs"],
                    config["frame_shift_ms"], PHONES48, map_48_to_39, split=split,
                    source=source,
                )
        jobs = [(u.wav, tuple(names)) for u in utterances]
        if workers <= 1:
            results = map(_features, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)
            results = pool.imap(_features, jobs, chunksize=4)
        try:
            for utt, values in zip(utterances, results, strict=True):
                for name in names:
                    writers[name, utt.split].add(utt.utt_id, values[name], targets[utt.utt_id])
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        for writer in writers.values():
            writer.finish()
        for writer in writers.values():
            writer.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        for folder in reversed(new_folders):
            try:
                folder.rmdir()
            except OSError:
                pass
        raise
    summary = PrepSummary(out, names)
    for split in SPLITS:
        chosen = [u for u in utterances if u.split == split]
        summary.utterances[split] = len(chosen)
        summary.speakers[split] = len({u.speaker for u in chosen})
        summary.seconds[split] = sum(seconds[u.utt_id] for u in chosen)
    return summary
