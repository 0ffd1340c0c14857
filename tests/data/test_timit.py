"""TIMIT-layout preparation (cnn_mellin.data.timit) run on a small synthetic corpus."""

from __future__ import annotations

import re
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

    past_end = broken("past_end")
    victim = sorted(past_end.glob("TEST/*/*/SI*.PHN"))[0]
    _move_last_end(victim, 1000)
    last = len(victim.read_text().splitlines())
    cases.append((past_end, rf"{re.escape(str(victim))} line {last}: .* 1000 samples past "))

    overlap = broken("overlap")
    victim = sorted(overlap.glob("TRAIN/*/*/SI*.PHN"))[3]
    lines = victim.read_text().splitlines(keepends=True)
    start, end, label = lines[2].split()
    lines[2] = f"{int(start) - 1} {end} {label}\n"
    victim.write_text("".join(lines))
    cases.append((overlap, rf"{re.escape(str(victim))} line 3: .* overlaps the segment of "))

    for timit_dir, message in cases:
        out = tmp_path / f"out-{timit_dir.name}"
        with pytest.raises(DataError, match=message) as caught:
            timit.prepare_timit(timit_dir, out, ["raw", "fbank-81-10ms"], num_workers=1)
        assert "\n" not in str(caught.value)
        assert _leaves_nothing(out), timit_dir


def _move_last_end(phn: Path, by: int) -> None:
    lines = phn.read_text().splitlines(keepends=True)
    start, end, label = lines[-1].split()
    lines[-1] = f"{start} {int(end) + by} {label}\n"
    phn.write_text("".join(lines))


def _phn(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "X.PHN"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ("0 100 h#\n300 400 aa\n100 300 b\n", r"line 3: segment 100 300 b is out of order: it "
     r"starts before the segment of line 2 \(300 400\)"),
    ("0 100 h#\n90 300 b\n", r"line 2: segment 90 300 b overlaps the segment of line 1 "
     r"\(0 100\)"),
    ("0 100 h#\n100 300 b\n200 250 aa\n", "line 3: segment 200 250 aa overlaps"),
    ("0 100 h#\n\n300 200 b\n", "line 3: segment 300 200 b ends before it starts"),
    ("-5 100 h#\n", "line 1: segment -5 100 h# starts before sample 0"),
], ids=["out-of-order", "overlap", "overlap-within", "reversed", "negative"])
def test_phn_segments_out_of_order_or_overlapping_are_errors(tmp_path, text, message):
    path = _phn(tmp_path, text)
    with pytest.raises(DataError, match=message) as caught:
        timit.read_phn(path)
    assert str(caught.value).startswith(f"{path} line ") and "\n" not in str(caught.value)


def test_phn_gaps_and_a_late_start_are_accepted(tmp_path):
    segments = timit.read_phn(_phn(tmp_path, "50 100 h#\n\n120 120 q\n150 300 b\n"))
    assert [tuple(s) for s in segments] == [(50, 100, "h#", 1), (120, 120, "q", 3),
                                            (150, 300, "b", 4)]


def test_phn_past_the_audio_end(tmp_path, caplog):
    phn, wav = tmp_path / "X.PHN", tmp_path / "X.WAV"
    segments = timit.read_phn(_phn(tmp_path, "0 100 h#\n100 1000 b\n1000 2000 h#\n"))
    with caplog.at_level("WARNING"):
        assert timit.check_segments(segments, 2000, phn, wav) == segments
    assert caplog.records == []
    tolerance = timit.PHN_END_TOLERANCE
    assert tolerance == 160  # one 10 ms frame at 16 kHz, as README and --help say
    with pytest.raises(DataError, match=rf"{re.escape(str(phn))} line 3: segment 1000 2000 h# "
                       rf"ends {tolerance + 1} samples past the end of {re.escape(str(wav))} "
                       rf"\({1999 - tolerance} samples\)"):
        timit.check_segments(segments, 1999 - tolerance, phn, wav)

    with caplog.at_level("WARNING"):
        clamped = timit.check_segments(segments, 2000 - tolerance, phn, wav)
    assert clamped[:2] == segments[:2]
    assert tuple(clamped[2]) == (1000, 2000 - tolerance, "h#", 3)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    assert f"{phn} line 3" in record.getMessage() and "clamped" in record.getMessage()
    # every segment reaching past the end is clamped, one wholly past it becomes empty
    late = timit.read_phn(_phn(tmp_path, "0 100 h#\n100 150 h#\n"))
    assert [tuple(s) for s in timit.check_segments(late, 90, phn, wav)] == [
        (0, 90, "h#", 1), (90, 90, "h#", 2)]


def test_synthetic_corpus_passes_the_checks(corpus, caplog):
    with caplog.at_level("WARNING"):
        for utt in timit.find_utterances(corpus):
            segments = timit.read_phn(utt.phn)
            num_samples = soundfile.info(str(utt.wav)).frames
            assert timit.check_segments(segments, num_samples, utt.phn, utt.wav) == segments
            # contiguous from 0 to the end, like real TIMIT
            assert segments[0].start == 0 and segments[-1].end == num_samples
            assert all(a.end == b.start for a, b in zip(segments[:-1], segments[1:], strict=True))
    assert caplog.records == []


def test_end_a_little_past_the_audio_is_clamped_with_a_warning(corpus, prepared, tmp_path,
                                                               caplog):
    tolerated = _copy(corpus, tmp_path / "timit")
    victim = sorted(tolerated.glob("TRAIN/*/*/SI*.PHN"))[0]
    _move_last_end(victim, timit.PHN_END_TOLERANCE)
    with caplog.at_level("WARNING", logger="cnn_mellin.data.timit"):
        timit.prepare_timit(tolerated, tmp_path / "out", ["raw"], num_workers=1)
    [record] = [r for r in caplog.records if r.name == timit.__name__]
    assert str(victim) in record.getMessage() and "clamped" in record.getMessage()
    for split in ("train", "dev", "test"):  # the times are not stored: the same stores
        a = read_info(tmp_path / "out" / "raw" / split)
        b = read_info(prepared / "raw" / split)
        assert (a.utt_ids, a.num_frames, a.num_targets) == (b.utt_ids, b.num_frames, b.num_targets)


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
