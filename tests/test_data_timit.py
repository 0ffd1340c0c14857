"""TIMIT-layout preparation (cnn_mellin.data.timit) run on a small synthetic corpus."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cnn_mellin.data import timit
from cnn_mellin.data.features import FEATURES
from cnn_mellin.data.phones import PHONES48, map_48_to_39, map_61_to_48, speaker_list
from cnn_mellin.data.store import StoreReader, read_info
from cnn_mellin.data.synth import prepare_synth
from cnn_mellin.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("timit") / "corpus"
    prepare_synth(out, utterances=10, num_workers=1)
    return out


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    summary = timit.prepare_timit(corpus, out, list(FEATURES), num_workers=2)
    assert summary.utterances == {"train": 10, "dev": 2, "test": 2}
    assert "train 10 utterances" in str(summary)
    return out


def _expected(corpus: Path) -> dict[str, dict[str, Path]]:
    dev, core = set(speaker_list("dev")), set(speaker_list("core_test"))
    out: dict[str, dict[str, Path]] = {"train": {}, "dev": {}, "test": {}}
    for wav in sorted(corpus.glob("*/DR*/*/*.WAV")):
        speaker = wav.parent.name.lower()
        if wav.name.startswith("SA"):
            continue
        split = "dev" if speaker in dev else "test" if speaker in core else "train"
        out[split][f"{speaker}_{wav.stem.lower()}"] = wav
    return out


@pytest.mark.slow
def test_prep_writes_every_split_and_feature(corpus, prepared):
    expected = _expected(corpus)
    widths = {"fbank-81-10ms": 81, "sigbank-41-2ms": 41, "raw": 1}
    for feature, width in widths.items():
        for split, wavs in expected.items():
            data_dir = prepared / feature / split
            assert [p.name for p in data_dir.iterdir()] == ["feats.h5"]
            info = read_info(data_dir)
            assert (info.feature, info.num_coeffs, info.split) == (feature, width, split)
            assert sorted(info.utt_ids) == sorted(wavs) and len(wavs) == 2 + 8 * (split == "train")
            assert not any("_sa" in u for u in info.utt_ids)
            assert info.phones == PHONES48 and info.phone_map_39 == map_48_to_39
            reader = StoreReader(info.path)
            for utt, frames, length in zip(info.utt_ids, info.num_frames, info.num_targets,
                                           strict=True):
                samples = soundfile.info(str(wavs[utt])).frames
                shift = {"fbank-81-10ms": 160, "sigbank-41-2ms": 32, "raw": 1}[feature]
                formula = 1 + (samples - 400) // 160 if feature.startswith("fbank") else (
                    samples // shift)
                assert frames == formula
                feats, targets = reader.read(utt)
                assert feats.shape == (frames, width) and np.isfinite(feats).all()
                labels = [line.split()[2] for line in wavs[utt].with_suffix(".PHN").open()]
                folded = [map_61_to_48[p] for p in labels if p != "q"]
                assert [PHONES48[t] for t in targets] == folded and len(targets) == length
    raw = StoreReader(prepared / "raw" / "train" / "feats.h5")
    utt, wav = next(iter(expected["train"].items()))
    audio, _ = soundfile.read(str(wav), dtype="float32")
    np.testing.assert_array_equal(raw.read(utt)[0][:, 0], audio)


def _copy(corpus: Path, dest: Path, lower: bool = False) -> Path:
    shutil.copytree(corpus, dest)
    if lower:
        for path in sorted(dest.rglob("*"), key=lambda p: -len(p.parts)):
            path.rename(path.with_name(path.name.lower()))
    return dest


def test_lower_case_layout_gives_the_same_stores(corpus, prepared, tmp_path):
    lower = _copy(corpus, tmp_path / "timit", lower=True)
    assert (lower / "train").is_dir() and not (lower / "TRAIN").exists()
    for wav in sorted(lower.glob("*/*/*/si*.wav"))[:3]:  # converted copies some sites add
        shutil.copy(wav, wav.with_name(wav.name + ".wav"))
    timit.prepare_timit(lower, tmp_path / "out", "raw", num_workers=1)
    for split in ("train", "dev", "test"):
        a = read_info(tmp_path / "out" / "raw" / split)
        b = read_info(prepared / "raw" / split)
        assert (a.utt_ids, a.num_frames, a.num_targets) == (b.utt_ids, b.num_frames, b.num_targets)


def _leaves_nothing(out: Path) -> bool:
    return not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_bad_corpora_are_one_line_errors_with_nothing_written(corpus, tmp_path):
    def broken(name: str) -> Path:
        return _copy(corpus, tmp_path / name)

    cases = []
    missing_phn = broken("missing_phn")
    victim = sorted(missing_phn.glob("TRAIN/*/*/SI*.PHN"))[0]
    victim.unlink()
    cases.append((missing_phn, f"{victim.with_suffix('.WAV')} has no .PHN"))

    rate = broken("rate")
    victim = sorted(rate.glob("TEST/*/*/SI*.WAV"))[0]
    audio, _ = soundfile.read(str(victim), dtype="int16")
    soundfile.write(str(victim), audio[::2], 8000, format="NIST", subtype="PCM_16")
    cases.append((rate, "sample rate 8000 Hz; the audio must be 16000 Hz"))

    label = broken("label")
    victim = sorted(label.glob("TRAIN/*/*/SI*.PHN"))[1]
    victim.write_text(victim.read_text().replace(" h#\n", " sil\n", 1))
    cases.append((label, "unknown phone label 'sil' in .*PHN"))

    garbled = broken("garbled")
    victim = sorted(garbled.glob("TRAIN/*/*/SI*.PHN"))[2]
    victim.write_text("0 100\n")
    cases.append((garbled, "line 1: expected 'START END PHONE'"))

    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "not in the TIMIT layout"))
    cases.append((tmp_path / "nowhere", "does not exist"))
    no_test = broken("no_test")
    shutil.rmtree(no_test / "TEST")
    cases.append((no_test, "no dev utterances"))

    for timit_dir, message in cases:
        out = tmp_path / f"out-{timit_dir.name}"
        with pytest.raises(DataError, match=message) as caught:
            timit.prepare_timit(timit_dir, out, ["raw", "fbank-81-10ms"], num_workers=1)
        assert "\n" not in str(caught.value)
        assert _leaves_nothing(out), timit_dir


def test_bad_features_and_non_directory_output(corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown feature 'mfcc'"):
        timit.prepare_timit(corpus, tmp_path / "out", ["raw", "mfcc"])
    with pytest.raises(ConfigError, match="no feature"):
        timit.prepare_timit(corpus, tmp_path / "out", [])
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        timit.prepare_timit(corpus, tmp_path / "file", ["raw"])
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_keeps_the_old_stores(corpus, prepared, tmp_path, monkeypatch):
    out = tmp_path / "data"
    timit.prepare_timit(corpus, out, ["raw"], num_workers=1)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    calls = []
    real = timit._features

    def failing(job):
        calls.append(job)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(job)

    monkeypatch.setattr(timit, "_features", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        timit.prepare_timit(corpus, out, ["raw", "sigbank-41-2ms"], num_workers=1)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no temporary files, no new feature folder, old stores intact
    assert not (out / "sigbank-41-2ms").exists()
