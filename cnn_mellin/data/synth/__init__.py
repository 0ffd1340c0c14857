"""A small TIMIT-shaped corpus spoken by espeak-ng (``cnn-mellin prep synth``).

Modules, in the order the work flows: ``sentences`` (the word lists and grammar that make the
sentences), ``plan`` (speakers, splits and the utterance of each file), ``espeak`` (driving
libespeak-ng: audio and phoneme events), ``alignment`` (events and audio -> TIMIT phone and
word segments) and ``corpus`` (speaking every utterance and writing the TIMIT layout on disk).
The same arguments give byte-identical files.
"""

from __future__ import annotations

from cnn_mellin.data.synth.alignment import ESPEAK_TO_TIMIT, label_utterance
from cnn_mellin.data.synth.corpus import SAMPLE_RATE, SynthSummary, prepare_synth, synthesize
from cnn_mellin.data.synth.plan import (
    DEFAULT_UTTERANCES,
    DEV_VOICES,
    NUM_DIALECT_REGIONS,
    TEST_VOICES,
    TRAIN_VOICES,
    UTTERANCES_PER_SPEAKER,
    Speaker,
    Utterance,
    plan_corpus,
)
from cnn_mellin.data.synth.sentences import SA_SENTENCES, make_sentences

__all__ = [
    "DEFAULT_UTTERANCES", "DEV_VOICES", "ESPEAK_TO_TIMIT", "NUM_DIALECT_REGIONS", "SAMPLE_RATE",
    "SA_SENTENCES", "TEST_VOICES", "TRAIN_VOICES", "UTTERANCES_PER_SPEAKER", "Speaker",
    "SynthSummary", "Utterance", "label_utterance", "make_sentences", "plan_corpus",
    "prepare_synth", "synthesize",
]
