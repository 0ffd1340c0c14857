"""The espeak-ng corpus of cnn_mellin.data.synth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from cnn_mellin.data import synth
from cnn_mellin.data.phones import PHONES61, speaker_list
from cnn_mellin.errors import DataError

RATE = 22050


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    synth.prepare_synth(out, utterances=10, num_workers=1)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_arguments_give_identical_files(corpus, tmp_path):
    again = tmp_path / "again"
    summary = synth.prepare_synth(again, utterances=10, num_workers=2)
    assert _files(again) == _files(corpus)
    assert summary.utterances == {"train": 10, "dev": 2, "test": 2}
    other_seed = tmp_path / "other"
    synth.prepare_synth(other_seed, utterances=10, seed=1, num_workers=1)
    assert (other_seed / "TRAIN").exists()
    assert _files(other_seed) != _files(corpus)


def _rows(path: Path) -> list[tuple[int, int, str]]:
    return [(int(a), int(b), c) for a, b, c in (line.split() for line in path.open())]


def test_files_are_timit_shaped(corpus):
    wavs = sorted(corpus.glob("*/DR*/*/*.WAV"))
    assert {w.parts[-4] for w in wavs} == {"TRAIN", "TEST"}
    assert len([w for w in wavs if not w.name.startswith("SA")]) == 14
    for wav in wavs:
        assert wav.read_bytes()[:7] == b"NIST_1A"
        info = soundfile.info(str(wav))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 2.5 < info.duration < 9.0 or wav.name.startswith("SA")
        phn = _rows(wav.with_suffix(".PHN"))
        assert phn[0][0] == 0 and phn[-1][1] == info.frames
        assert phn[0][2] == phn[-1][2] == "h#"
        assert all(s < e for s, e, _ in phn), wav
        assert all(a[1] == b[0] for a, b in zip(phn, phn[1:], strict=False)), wav
        assert {label for *_, label in phn} <= set(PHONES61)
        text = wav.with_suffix(".TXT").read_text().split(maxsplit=2)
        assert text[:2] == ["0", str(info.frames)]
        words = _rows(wav.with_suffix(".WRD"))
        assert [w for *_, w in words] == [t.strip(".,").lower() for t in text[2].split()]
        assert all(0 < s < e <= info.frames for s, e, _ in words)
        assert all(a[1] <= b[0] for a, b in zip(words, words[1:], strict=False))


def test_dev_and_test_use_listed_speakers_held_out_voices_and_new_sentences(corpus):
    manifest = json.loads((corpus / "SYNTH.json").read_text())
    variants = {split: {s["variant"] for s in manifest["speakers"] if s["split"] == split}
                for split in ("train", "dev", "test")}
    assert variants["train"] and not variants["train"] & (variants["dev"] | variants["test"])
    test_speakers = {p.name.lower() for p in corpus.glob("TEST/DR*/*")}
    assert test_speakers <= set(speaker_list("dev")) | set(speaker_list("core_test"))
    assert test_speakers & set(speaker_list("dev"))
    assert test_speakers & set(speaker_list("core_test"))

    def sentences(part: str) -> set[str]:
        return {p.read_text().split(maxsplit=2)[2] for p in corpus.glob(f"{part}/*/*/SI*.TXT")}

    train, test = sentences("TRAIN"), sentences("TEST")
    assert len(train) == 10 and len(test) == 4 and not train & test


def test_make_sentences_is_deterministic_and_distinct():
    first = synth.make_sentences(200, seed=3)
    assert first == synth.make_sentences(200, seed=3)
    assert len(set(first)) == 200
    assert all(10 <= len(s.split()) <= 18 and s.endswith(".") for s in first)
    assert first != synth.make_sentences(200, seed=4)


def test_max_words_gives_short_distinct_sentences_and_leaves_the_default_alone():
    assert synth.make_sentences(50, seed=3, max_words=None) == synth.make_sentences(50, seed=3)
    short = synth.make_sentences(300, seed=3, max_words=3)
    assert short == synth.make_sentences(300, seed=3, max_words=3)
    assert len(set(short)) == 300 and all(2 <= len(s.split()) <= 3 for s in short)
    assert {len(s.split()) for s in short} == {2, 3}
    assert all(10 <= len(s.split()) <= 12 for s in synth.make_sentences(20, max_words=12))
    with pytest.raises(DataError, match="at most 2 words"):  # determiners x nouns run out
        synth.make_sentences(100_000, max_words=2)
    with pytest.raises(DataError, match="--max-words"):
        synth.make_sentences(5, max_words=1)


@pytest.mark.slow
def test_a_short_corpus_has_utterances_of_about_a_second(tmp_path):
    import soundfile

    corpus = tmp_path / "short"
    synth.prepare_synth(corpus, utterances=10, num_workers=1, max_words=3)
    seconds = [soundfile.info(str(wav)).duration for wav in corpus.glob("*/*/*/SI*.WAV")]
    assert len(seconds) == 14 and max(seconds) < 2.0 and min(seconds) > 0.4


def test_refuses_a_non_empty_output_and_bad_arguments(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        synth.prepare_synth(out, utterances=10)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for bad in (0, 4, "10", 2.5):
        with pytest.raises(DataError, match="utterances"):
            synth.prepare_synth(tmp_path / "new", utterances=bad)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# --- labelling espeak output (hand-made events, no espeak needed) -----------------------------
def _loud(n: int) -> np.ndarray:
    return (3000 * np.sin(np.arange(n) * 0.3)).astype(np.int16)


def test_silence_before_a_stop_becomes_its_closure():
    audio = np.concatenate([_loud(2000), np.zeros(500, np.int16), _loud(1500)])
    events = [("word", 0, 1), ("phone", 0, "a"), ("phone", 2500, "k"), ("phone", 4000, "_")]
    phones, words = synth.label_utterance(audio, events, "ak", RATE, [2])
    assert phones == [(0, 2000, "ae"), (2000, 2500, "kcl"), (2500, 4000, "k")]
    assert words == [(0, 4000, "ak")]


def test_empty_phones_get_time_and_pauses_become_pau():
    audio = np.concatenate([_loud(3000), np.zeros(3000, np.int16), _loud(3000),
                            np.zeros(1000, np.int16)])
    events = [("word", 0, 1), ("phone", 0, "O:"), ("phone", 3000, "l"), ("phone", 3000, "_:"),
              ("word", 6000, 5), ("phone", 6000, "m"), ("phone", 9000, "_")]
    phones, words = synth.label_utterance(audio, events, "all, me", RATE, [2, 1])
    assert [p for *_, p in phones] == ["ao", "l", "pau", "m"]
    assert phones[0][0] == 0 and phones[1][0] == 2000 and phones[1][1] == 3000
    assert phones[-1] == (6000, 9000, "m")  # trailing silence is left to h#
    assert words == [(0, 3000, "all"), (6000, 9000, "me")]


def test_words_said_as_one_share_their_phonemes():
    audio = _loud(5000)
    events = [("word", 0, 1), ("phone", 0, "w"), ("phone", 1000, "I"), ("phone", 2000, "D"),
              ("phone", 3000, "D"), ("phone", 4000, "@2")]
    _, words = synth.label_utterance(audio, events, "with the", RATE, [3, 2])
    assert words == [(0, 3000, "with"), (3000, 5000, "the")]


def test_unknown_espeak_phoneme_is_an_error():
    events = [("word", 0, 1), ("phone", 0, "Q!")]
    with pytest.raises(DataError, match="'Q!'"):
        synth.label_utterance(_loud(1000), events, "x", RATE, [1])
