"""Writing the synthetic corpus in TIMIT's layout (``cnn-mellin prep synth``).

Each utterance is spoken, labelled, resampled to 16 kHz, padded with silence, given its
speaker's level and noise, and written as ``<split>/DR<region>/<speaker>/<name>.WAV`` (NIST
SPHERE) with its .PHN, .WRD and .TXT; ``SYNTH.json`` records the speakers and settings.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from cnn_mellin.data.phones import PHONES61
from cnn_mellin.data.synth.alignment import label_utterance
from cnn_mellin.data.synth.espeak import probe_version, shared_espeak
from cnn_mellin.data.synth.plan import Utterance, plan_corpus
from cnn_mellin.errors import DataError

SAMPLE_RATE = 16000


@dataclass
class SynthSummary:
    """What :func:`prepare_synth` wrote."""

    out_dir: Path
    utterances: dict[str, int] = field(default_factory=dict)  # per split, without SA
    speakers: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    espeak_version: str = ""

    def __str__(self) -> str:
        parts = [
            f"{split} {_plural(self.utterances[split], 'utterance')} "
            f"({_plural(self.speakers[split], 'speaker')}, {self.seconds[split] / 60:.1f} min)"
            for split in ("train", "dev", "test")
        ]
        return (f"wrote {self.out_dir}: " + ", ".join(parts)
                + f" plus SA sentences; espeak-ng {self.espeak_version}")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _to_16k(samples: np.ndarray, rate: int) -> tuple[np.ndarray, float]:
    if rate == SAMPLE_RATE:
        return samples.astype(np.float64), 1.0
    g = math.gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // g, rate // g
    return resample_poly(samples.astype(np.float64), up, down), up / down


def synthesize(utt: Utterance, root: Path) -> tuple[str, float]:
    """Speak one utterance and write its .WAV/.PHN/.WRD/.TXT under ``root``."""
    espeak = shared_espeak()
    rng = np.random.default_rng(list(utt.seed))
    clean, events, counts = espeak.speak(utt.text, utt.speaker, int(rng.integers(1, 2**31 - 1)))
    phones, words = label_utterance(clean, events, utt.text, espeak.sample_rate, counts)
    if not phones:
        raise RuntimeError(f"espeak-ng produced no phonemes for {utt.text!r}")
    audio, ratio = _to_16k(clean, espeak.sample_rate)
    lead = int(rng.integers(1600, 4000))
    tail = int(rng.integers(1600, 4000))
    total = lead + len(audio) + tail
    signal = np.zeros(total)
    signal[lead:lead + len(audio)] = audio * utt.speaker.gain
    signal += rng.normal(0.0, utt.speaker.noise, total)
    pcm = np.clip(np.rint(signal), -32768, 32767).astype(np.int16)

    # phone boundaries at 16 kHz; rounding must not empty a phone, so nudge them apart
    edges = [phones[0][0]] + [end for _, end, _ in phones]
    edges16 = [0] + [lead + min(round(b * ratio), len(audio)) for b in edges] + [total]
    for i in range(1, len(edges16) - 1):
        edges16[i] = max(edges16[i], edges16[i - 1] + 1)
    labels = ["h#"] + [label for *_, label in phones] + ["h#"]
    if edges16[-2] >= total or not set(labels) <= set(PHONES61):
        raise RuntimeError(f"bad labels for {utt.text!r}")
    phn = [(edges16[i], edges16[i + 1], label) for i, label in enumerate(labels)]
    to16 = dict(zip(edges, edges16[1:-1], strict=True))
    wrd = [(to16[s], to16[e], w) for s, e, w in words]

    speaker = utt.speaker
    split_dir = "TRAIN" if speaker.split == "train" else "TEST"
    folder = root / split_dir / f"DR{speaker.region}" / speaker.speaker_id
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / utt.name
    soundfile.write(f"{stem}.WAV", pcm, SAMPLE_RATE, format="NIST", subtype="PCM_16")
    Path(f"{stem}.PHN").write_text("".join(f"{s} {e} {p}\n" for s, e, p in phn))
    Path(f"{stem}.WRD").write_text("".join(f"{s} {e} {w}\n" for s, e, w in wrd))
    Path(f"{stem}.TXT").write_text(f"0 {total} {utt.text}\n")
    return speaker.split, total / SAMPLE_RATE


def _pool_init() -> None:
    shared_espeak()


def prepare_synth(out_dir, utterances: int | None = None, seed: int = 0,
                  num_workers: int | None = None, max_words: int | None = None) -> SynthSummary:
    """Write the synthetic corpus under ``out_dir`` (which must not exist or be empty).

    ``utterances`` training utterances (default 600; dev and test get a fifth each), plus two
    SA sentences per speaker. Built in a temporary sibling directory and renamed into place.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output directory {out} already exists and is not empty; "
                        "remove it or choose another")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    if num_workers is not None and (isinstance(num_workers, bool)
                                    or not isinstance(num_workers, int) or num_workers < 1):
        raise DataError(f"number of workers must be an integer >= 1, got {num_workers!r}")
    plan = plan_corpus(utterances, seed, max_words)
    espeak_version = probe_version()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        workers = num_workers or min(os.cpu_count() or 1, 8)
        if workers <= 1:
            results = [synthesize(utt, tmp) for utt in plan]
        else:
            context = multiprocessing.get_context("fork")
            with context.Pool(workers, initializer=_pool_init) as pool:
                results = pool.starmap(synthesize, [(utt, tmp) for utt in plan],
                                       chunksize=max(1, len(plan) // (8 * workers)))
        summary = SynthSummary(out, espeak_version=espeak_version)
        for split in ("train", "dev", "test"):
            summary.utterances[split] = sum(
                1 for u in plan if u.speaker.split == split and not u.name.startswith("SA"))
            summary.speakers[split] = len({u.speaker for u in plan if u.speaker.split == split})
            summary.seconds[split] = sum(
                sec for (sp, sec), u in zip(results, plan, strict=True)
                if sp == split and not u.name.startswith("SA"))
        manifest = {
            "generator": "cnn-mellin prep synth", "seed": seed,
            "utterances": summary.utterances, "espeak_ng": espeak_version,
            "speakers": [
                {"id": s.speaker_id, "split": s.split, "region": s.region,
                 "variant": s.variant, "rate": s.rate, "pitch": s.pitch,
                 "pitch_range": s.pitch_range, "gain": s.gain, "noise": s.noise}
                for s in dict.fromkeys(u.speaker for u in plan)
            ],
        }
        (tmp / "SYNTH.json").write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary

