"""The corpus plan: speakers (voice variant, settings, split, region) and their utterances.

Speakers are espeak-ng voice variants with their own pitch, pitch range, speaking rate and
level. Dev and test speakers use variants never heard in training and carry ids from
``dev_spk.list`` and ``core_test_spk.list`` so that :func:`cnn_mellin.data.timit.prepare_timit`
selects them. Every utterance has its own sentence, except the SA sentences read by everyone.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cnn_mellin.data.phones import speaker_list
from cnn_mellin.data.synth.sentences import SA_SENTENCES, make_sentences
from cnn_mellin.errors import DataError

DEFAULT_UTTERANCES = 600  # training utterances; dev and test get a fifth each
UTTERANCES_PER_SPEAKER = 8  # as in TIMIT without the SA sentences
NUM_DIALECT_REGIONS = 8

# espeak-ng voice variants (``en-us+<variant>``) and their gender. Dev and test voices are
# never used in training.
TRAIN_VOICES = (
    ("m1", "m"), ("f1", "f"), ("m2", "m"), ("f2", "f"), ("m3", "m"), ("klatt", "m"),
    ("m4", "m"), ("f3", "f"), ("m5", "m"), ("klatt2", "m"), ("m8", "m"), ("croak", "m"),
    ("Alex", "m"), ("Annie", "f"), ("Gene", "m"), ("linda", "f"), ("Mike", "m"),
    ("steph", "f"), ("sandro", "m"), ("aunty", "f"), ("robert", "m"), ("grandma", "f"),
    ("quincy", "m"), ("belinda", "f"), ("travis", "m"), ("gustave", "m"), ("Andrea", "f"),
    ("grandpa", "m"), ("norbert", "m"), ("max", "m"), ("michel", "m"), ("edward", "m"),
    ("pedro", "m"), ("david", "m"),
)
DEV_VOICES = (("m6", "m"), ("f4", "f"), ("klatt3", "m"))
TEST_VOICES = (("m7", "m"), ("f5", "f"), ("klatt4", "m"))


@dataclass(frozen=True)
class Speaker:
    """One synthetic speaker: an espeak-ng voice variant with its own settings."""

    speaker_id: str  # TIMIT style, upper case: gender letter, initials, digit
    split: str  # train, dev or test
    region: int  # dialect region folder DR<region>
    variant: str
    rate: int  # words per minute
    pitch: int  # espeak 0..100
    pitch_range: int  # espeak 0..100
    gain: float
    noise: float  # standard deviation of the added noise, int16 units


@dataclass(frozen=True)
class Utterance:
    """One utterance of the plan: who says which text, under which file name, with which seed."""

    speaker: Speaker
    name: str  # SA1, SI12, ...
    text: str
    seed: tuple[int, ...]



def _speaker_ids(split: str, genders: list[str], taken: set[str]) -> list[str]:
    """Speaker ids for a split: from the TIMIT lists for dev/test, made up for train."""
    if split == "train":
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        ids, number = [], 0
        for gender in genders:
            while True:
                rest, digit = divmod(number, 10)
                candidate = f"{gender}S{letters[rest // 26 % 26]}{letters[rest % 26]}{digit}"
                number += 1
                if candidate not in taken:
                    break
            ids.append(candidate.upper())
        return ids
    pool = list(speaker_list("dev" if split == "dev" else "core_test"))
    ids = []
    for gender in genders:
        match = next((s for s in pool if s[0] == gender), pool[0])
        pool.remove(match)
        ids.append(match.upper())
    return ids


def plan_corpus(utterances: int | None = None, seed: int = 0,
                max_words: int | None = None) -> list[Utterance]:
    """Every utterance of the corpus (speaker, file name, text) in a fixed order."""
    n_train = DEFAULT_UTTERANCES if utterances is None else utterances
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 5:
        raise DataError(f"number of utterances (--utterances) must be an integer >= 5, "
                        f"got {utterances!r}")
    counts = {"train": n_train, "dev": n_train // 5, "test": n_train // 5}
    limits = {"train": None, "dev": len(speaker_list("dev")),
              "test": len(speaker_list("core_test"))}
    voices = {"train": TRAIN_VOICES, "dev": DEV_VOICES, "test": TEST_VOICES}
    rng = random.Random(f"cnn-mellin synth {seed}")
    sentences = iter(make_sentences(sum(counts.values()), seed, max_words))
    taken = set(speaker_list("dev")) | set(speaker_list("core_test"))
    plan: list[Utterance] = []
    sentence_number = 0
    for split in ("train", "dev", "test"):
        num_speakers = math.ceil(counts[split] / UTTERANCES_PER_SPEAKER)
        if limits[split] is not None:
            num_speakers = min(num_speakers, limits[split])
        variants = [voices[split][i % len(voices[split])] for i in range(num_speakers)]
        ids = _speaker_ids(split, [g for _, g in variants], taken)
        per_speaker = [counts[split] // num_speakers] * num_speakers
        for i in range(counts[split] % num_speakers):
            per_speaker[i] += 1
        for index, ((variant, _), speaker_id, count) in enumerate(
                zip(variants, ids, per_speaker, strict=True)):
            speaker = Speaker(
                speaker_id=speaker_id, split=split, region=index % NUM_DIALECT_REGIONS + 1,
                variant=variant, rate=rng.randint(145, 205), pitch=rng.randint(25, 75),
                pitch_range=rng.randint(20, 80), gain=round(rng.uniform(0.35, 1.0), 3),
                noise=round(rng.uniform(2.0, 8.0), 3),
            )
            for k, text in enumerate(SA_SENTENCES, 1):
                plan.append(Utterance(speaker, f"SA{k}", text, (seed, len(plan))))
            for _ in range(count):
                sentence_number += 1
                plan.append(Utterance(speaker, f"SI{sentence_number}", next(sentences),
                                       (seed, len(plan))))
    return plan

