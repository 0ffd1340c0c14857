"""A small TIMIT-shaped corpus spoken by espeak-ng (``cnn-mellin prep synth``).

Sentences are drawn from word lists with a seeded RNG, every utterance has its own sentence, and
speakers are espeak-ng voice variants with their own pitch, pitch range, speaking rate and level.
Dev and test speakers use variants never heard in training and carry ids from ``dev_spk.list``
and ``core_test_spk.list`` so that :func:`cnn_mellin.data.timit.prepare_timit` selects them.

Phone timing comes from libespeak-ng's phoneme events (through ctypes): each event names an
espeak phoneme and the output sample where it starts. Stop closures are found in the audio
(espeak renders them as silence at the end of the previous phone, or as a voice bar), and the
espeak symbols are mapped to TIMIT's 61 labels by :data:`ESPEAK_TO_TIMIT`.

espeak-ng keeps state between utterances (pitch jitter, noise generators), so each utterance is
spoken in a fork of a process that has initialised espeak but never spoken: the same arguments
give byte-identical files however the work is spread over processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import multiprocessing
import os
import pickle
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import resample_poly

from cnn_mellin.data.phones import PHONES61, speaker_list
from cnn_mellin.errors import DataError, UserError

SAMPLE_RATE = 16000
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

# espeak-ng (en-us) phoneme mnemonics -> TIMIT labels. Stops and affricates get their closure
# (bcl, dcl, ...) from the audio; r-colouring and palatalisation marks join the previous phone.
ESPEAK_TO_TIMIT: dict[str, tuple[str, ...]] = {
    "p": ("p",), "b": ("b",), "t": ("t",), "d": ("d",), "k": ("k",), "g": ("g",),
    "tS": ("ch",), "dZ": ("jh",), "t#": ("dx",), "*": ("dx",), "?": ("q",),
    "f": ("f",), "v": ("v",), "T": ("th",), "D": ("dh",), "s": ("s",), "z": ("z",),
    "S": ("sh",), "Z": ("zh",), "h": ("hh",), "x": ("hh",), "C": ("hh",),
    "m": ("m",), "n": ("n",), "N": ("ng",), "l": ("l",), "r": ("r",), "w": ("w",),
    "W": ("w",), "j": ("y",),
    "m-": ("em",), "n-": ("en",), "@L": ("el",), "l-": ("el",),
    "a": ("ae",), "aa": ("ae",), "A:": ("aa",), "A": ("aa",), "0": ("aa",), "A@": ("aa", "r"),
    "O:": ("ao",), "O": ("ao",), "O2": ("ao",), "O@": ("ao", "r"), "o@": ("ao", "r"),
    "V": ("ah",), "@": ("ax",), "@2": ("ax",), "@5": ("ax",), "a#": ("ax",),
    "3": ("axr",), "3:": ("er",), "E": ("eh",), "e@": ("eh", "r"),
    "I": ("ih",), "I2": ("ix",), "I#": ("ix",), "i": ("iy",), "i:": ("iy",),
    "i@": ("ih", "r"), "i@3": ("ih", "r"),
    "U": ("uh",), "u:": ("uw",), "U@": ("uh", "r"),
    "aI": ("ay",), "aU": ("aw",), "eI": ("ey",), "OI": ("oy",), "oU": ("ow",),
    "aI@": ("ay", "axr"), "aI3": ("ay", "axr"), "aU@": ("aw", "axr"),
}
_JOIN_PREVIOUS = frozenset({"r-", ";"})
_CLOSURE = {"b": "bcl", "d": "dcl", "g": "gcl", "p": "pcl", "t": "tcl", "k": "kcl",
            "jh": "dcl", "ch": "tcl"}
_VOICED_STOPS = frozenset({"b", "d", "g", "jh"})

# Words for the sentence generator: a clause is "NP [ADV] VERB NP [PREP NP]".
_DETERMINERS = "the the the every each this that my his her our your their one some".split()
_ADJECTIVES = """able ancient angry awkward bitter black blue bold brave brief bright broad broken
brown busy calm careful cheap chilly clever cloudy cold crooked cruel curious damp dark deep
delicate distant dry dusty eager early empty endless enormous fancy fierce foggy fragile fresh
friendly frozen gentle giant glad golden good grassy gray greasy green happy harsh heavy hidden
hollow honest huge humble hungry icy jolly juicy kind large lazy little lonely loud lucky mellow
merry mighty modest muddy narrow nervous noisy odd orange pale patient pleasant plain polite poor
proud purple quick quiet rapid rare rough round royal rusty sad salty scarlet shallow sharp shiny
short silent silver simple sleepy slim slow small smooth soft sour spotted steady steep sticky
stormy strange strong sunny sweet tall tame thick thin tidy tiny tough usual vast violet visual
warm weary wet white wide wild wise wooden yellow young zealous""".split()
_NOUNS = """actor anchor apple artist baker balloon banker basket beach beaver bell bicycle bird
blanket boat bottle boy bridge brother bucket butcher button cabin camel candle canyon captain
carpet castle cat cellar chair cherry child church circle city closet cloud clown coach coin
collar cottage cousin cowboy crab crayon cushion daughter desert doctor dog doll donkey dragon
drawer driver drum duck eagle engine farmer feather fence fisherman flower forest fox frog garage
garden giraffe girl goat guitar hammer harbor hat hedge helmet horse island jacket jewel judge
kettle king kitchen kitten ladder lamp lawyer leather lemon letter lion lizard magazine measure
merchant meadow mirror monkey mountain mouse museum nephew nurse ocean orchard owl oyster painter
palace parrot pebble pencil penguin pepper piano pillow pilot pirate planet pocket poet pony puppy
puzzle queen rabbit river robot rocket sailor saucer scholar shadow sheep shepherd shoe singer
sister soldier spider squirrel stranger student sugar table teacher tiger toy tractor treasure
tunnel turtle uncle valley village violin vision wagon waiter wallet whistle widow window wizard
woman worker yard zebra""".split()
_VERBS = """admired avoided baked borrowed bought brought built buried carried caught chased
cleaned climbed collected copied covered crushed dropped enjoyed fetched filled followed found
grabbed guarded hid hugged joined kicked kissed lifted liked loaded lost loved moved noticed opened
packed painted passed pulled pushed reached rescued ruined sold searched shook showed sketched
smelled squeezed stole stretched studied tasted taught thanked threw touched traded visited washed
watched weighed wrapped""".split()
_ADVERBS = """almost always boldly briefly calmly carefully cheerfully clearly eagerly easily
finally gently gladly happily honestly hungrily loudly merrily nearly never often openly patiently
politely proudly quickly quietly rarely really sadly seldom slowly softly suddenly surely swiftly
usually warmly wearily wisely""".split()
_PREPOSITIONS = """above across after against along among around behind below beneath beside
between beyond by near inside outside over through toward under underneath with within
without""".split()
_CONJUNCTIONS = "while because and but before after when although since until".split()
_MIN_WORDS, _MAX_WORDS = 10, 18

# Read by every speaker, like TIMIT's SA sentences (and, like them, left out by prep).
SA_SENTENCES = (
    "A curious child watched the yellow ship sail through the harbor at dawn.",
    "Joyful voices rang out as the brave pilot measured each thin rope.",
)

# A clean espeak sample counts as silence at or below this level (int16 units).
_SILENCE = 100
_MIN_PHONE_MS = 2.0
_MIN_CLOSURE_MS = 5.0
_MIN_EDGE_SILENCE_MS = 10.0
_VOICE_BAR_ZC = 0.035  # zero crossings per sample below which a frame is a voice bar


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
class _Utterance:
    speaker: Speaker
    name: str  # SA1, SI12, ...
    text: str
    seed: tuple[int, ...]


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


# ---------------------------------------------------------------------------- espeak-ng
class _Event(ctypes.Structure):
    class _Id(ctypes.Union):
        _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p),
                    ("string", ctypes.c_char * 8)]

    # espeak_EVENT in speak_lib.h (API revision 12)
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint),
                ("text_position", ctypes.c_int), ("length", ctypes.c_int),
                ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.POINTER(_Event))
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_EVENT_WORD, _EVENT_PHONEME = 1, 7
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_ESPEAK_VOLUME = 60  # of 200 (default 100): loud voices would clip inside espeak


def _load_espeak() -> ctypes.CDLL:
    names = [ctypes.util.find_library("espeak-ng"), "libespeak-ng.so.1", "libespeak-ng.so",
             "libespeak-ng.dylib", "libespeak-ng.1.dylib"]
    prefix = os.environ.get("CONDA_PREFIX")
    if prefix:
        names += [str(Path(prefix, "lib", n)) for n in ("libespeak-ng.so.1", "libespeak-ng.so")]
    for name in names:
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise UserError(
        "espeak-ng's library (libespeak-ng) was not found; install it, e.g. "
        "'apt-get install espeak-ng libespeak-ng1' or 'conda install -c conda-forge espeak-ng'"
    )


class _NoVoice(Exception):
    """espeak-ng lacks a voice variant (raised in the speaking fork)."""


class _Espeak:
    """libespeak-ng, initialised but silent; :meth:`speak` runs each utterance in a fork."""

    def __init__(self):
        lib = _load_espeak()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int,
                                              ctypes.c_int]
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS
        )
        if self.sample_rate <= 0:
            raise UserError("espeak-ng failed to initialise (is espeak-ng-data installed?)")
        self.version = lib.espeak_Info(None).decode()
        self._lib = lib
        self._libc = ctypes.CDLL(None)
        self._chunks: list[bytes] = []
        self._events: list[tuple] = []
        self._callback = _CALLBACK(self._collect)  # keep a reference: C holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(ctypes.string_at(wav, 2 * num_samples))
        i = 0
        while events[i].type != 0:
            event = events[i]
            if event.type == _EVENT_PHONEME:
                name = bytes(event.id.string).split(b"\0")[0].decode("utf-8", "replace")
                self._events.append(("phone", event.sample, name))
            elif event.type == _EVENT_WORD:
                self._events.append(("word", event.sample, event.text_position))
            i += 1
        return 0

    def _phone_count(self, word: str) -> int:
        """Number of phonemes espeak gives ``word`` on its own (stress marks not counted)."""
        buffer = ctypes.create_string_buffer(word.encode())
        pointer = ctypes.c_void_p(ctypes.addressof(buffer))
        names = []
        while pointer.value:
            out = self._lib.espeak_TextToPhonemes(ctypes.byref(pointer), _CHARS_UTF8,
                                                  ord("|") << 8)
            if not out:
                break
            names += out.decode("utf-8", "replace").replace(" ", "|").split("|")
        return sum(1 for n in names if n.strip("'%,=") and not n.startswith("_"))

    def _speak_here(self, text: str, speaker: Speaker, seed: int) -> tuple[bytes, list, list]:
        lib = self._lib
        if lib.espeak_SetVoiceByName(f"en-us+{speaker.variant}".encode()) != 0:
            raise _NoVoice(speaker.variant)
        for param, value in ((_RATE, speaker.rate), (_PITCH, speaker.pitch),
                             (_RANGE, speaker.pitch_range), (_VOLUME, _ESPEAK_VOLUME)):
            lib.espeak_SetParameter(param, value, 0)
        self._libc.srand(seed)
        data = text.encode()
        if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None,
                            None) != 0:
            raise RuntimeError("espeak_Synth failed")
        counts = [self._phone_count(w.strip(".,?!")) for w in text.split()]
        return b"".join(self._chunks), self._events, counts

    def speak(self, text: str, speaker: Speaker, seed: int) -> tuple[np.ndarray, list, list]:
        """Speak ``text``: (int16 samples at ``sample_rate``, events in output order, number
        of phonemes of each word said on its own)."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: speak, send the result, exit without Python cleanup
            status = 1
            try:
                os.close(read_fd)
                try:
                    payload = ("ok", self._speak_here(text, speaker, seed))
                except _NoVoice as err:
                    payload = ("voice", str(err))
                except Exception as err:  # noqa: BLE001 - reported by the parent
                    payload = ("error", repr(err))
                with os.fdopen(write_fd, "wb") as pipe:
                    pickle.dump(payload, pipe, protocol=pickle.HIGHEST_PROTOCOL)
                status = 0
            finally:
                os._exit(status)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if status != 0 or not data:
            raise RuntimeError(f"espeak-ng crashed while speaking {text!r}")
        kind, result = pickle.loads(data)
        if kind == "voice":
            raise UserError(f"espeak-ng has no voice en-us+{result}; the synthetic corpus needs "
                            "espeak-ng >= 1.50 with its standard voice variants")
        if kind != "ok":
            raise RuntimeError(f"espeak-ng failed on {text!r}: {result}")
        audio, events, counts = result
        return np.frombuffer(audio, dtype=np.int16), events, counts


# ---------------------------------------------------------------------------- labels
@dataclass
class _Unit:
    start: int
    end: int
    labels: tuple[str, ...]  # TIMIT labels; () for a pause
    word: int  # index of the word it belongs to, -1 for pauses

    @property
    def is_pause(self) -> bool:
        return not self.labels


def _word_index(text: str) -> dict[int, int]:
    """1-based character position of each word's first letter -> word index."""
    positions, index, pos = {}, 0, 0
    for token in text.split():
        pos = text.index(token, pos)
        positions[pos + 1] = index
        index += 1
        pos += len(token)
    return positions


def _split_group(size: int, counts: list[int]) -> list[int]:
    """Share ``size`` phonemes among words with ``counts`` phonemes each when said alone."""
    if sum(counts) == size:
        return counts
    shares = [max(1, round(size * c / max(1, sum(counts)))) for c in counts]
    shares[-1] = size - sum(shares[:-1])
    return shares if shares[-1] >= 1 else [size] + [0] * (len(counts) - 1)


def _phone_words(events: list, text: str, counts: list[int]) -> list[int]:
    """Word index of each phoneme event (-1 for pauses).

    espeak says some word pairs as one (e.g. "with the") and reports a single word event for
    them; their phonemes are shared out by the words' phoneme counts.
    """
    starts = _word_index(text)
    num_words = len(text.split())
    word, owner, firsts = -1, [], []
    for kind, _, payload in events:
        if kind == "word":
            word = min(max(starts.get(payload, word + 1), word + 1), num_words - 1)
            firsts.append(word)
        else:
            owner.append(-1 if payload.startswith("_") else word)
    for i, first in enumerate(firsts):
        last = firsts[i + 1] if i + 1 < len(firsts) else num_words
        members = [j for j, w in enumerate(owner) if w == first]
        if last - first > 1 and members:
            shares = _split_group(len(members), counts[first:last])
            pos = 0
            for offset, share in enumerate(shares):
                for j in members[pos:pos + share]:
                    owner[j] = first + offset
                pos += share
    return owner


def _units(events: list, num_samples: int, text: str, counts: list[int]) -> list[_Unit]:
    """espeak events -> contiguous units covering [first phone, num_samples)."""
    owners = iter(_phone_words(events, text, counts))
    raw = [(min(max(sample, 0), num_samples), name, next(owners))
           for kind, sample, name in events if kind == "phone"]
    units: list[_Unit] = []
    for i, (start, name, word) in enumerate(raw):
        end = raw[i + 1][0] if i + 1 < len(raw) else num_samples
        end = max(end, start)
        if name.startswith("_"):
            units.append(_Unit(start, end, (), -1))
        elif name in _JOIN_PREVIOUS:
            if units:
                units[-1].end = end
            else:
                units.append(_Unit(start, end, (), -1))
        elif name in ESPEAK_TO_TIMIT:
            units.append(_Unit(start, end, ESPEAK_TO_TIMIT[name], word))
        else:
            raise DataError(
                f"espeak-ng produced the phoneme {name!r}, which the synthetic corpus cannot map "
                "to TIMIT phones; add it to cnn_mellin.data.synth.ESPEAK_TO_TIMIT"
            )
    return units


def _give_short_phones_time(units: list[_Unit], min_len: int) -> list[_Unit]:
    """Drop near-empty pauses; give near-empty phones a share of a neighbouring phone."""
    out: list[_Unit] = []
    for unit in units:
        if unit.end - unit.start >= min_len:
            out.append(unit)
        elif unit.is_pause:
            if out:
                out[-1].end = unit.end
            else:
                out.append(unit)  # merged into the leading silence later
        elif out and not out[-1].is_pause and unit.end - out[-1].start >= 3 * min_len:
            # espeak folds e.g. a post-vocalic /l/ into the vowel: split the pair 2:1
            prev = out[-1]
            prev.end = unit.start = unit.end - max(min_len, (unit.end - prev.start) // 3)
            out.append(unit)
        else:
            out.append(unit)  # fixed below from the next unit
    fixed: list[_Unit] = []
    for i, unit in enumerate(out):
        if unit.end - unit.start < min_len and not unit.is_pause and i + 1 < len(out):
            nxt = out[i + 1]
            if nxt.end - unit.start >= 3 * min_len:
                unit.end = nxt.start = unit.start + max(min_len, (nxt.end - unit.start) // 3)
        fixed.append(unit)
    return [u for u in fixed if u.end > u.start or u.is_pause]


def _expand(units: list[_Unit]) -> list[_Unit]:
    """Split two-label units (e.g. aa r) 3:2 so every unit has one label."""
    out = []
    for unit in units:
        if len(unit.labels) <= 1:
            out.append(unit)
            continue
        cut = unit.start + (unit.end - unit.start) * 3 // 5
        out.append(_Unit(unit.start, cut, unit.labels[:1], unit.word))
        out.append(_Unit(cut, unit.end, unit.labels[1:], unit.word))
    return out


def _silent_run_before(audio: np.ndarray, end: int, floor: int) -> int:
    """Start of the run of silent samples that ends at ``end`` (not before ``floor``)."""
    loud = np.flatnonzero(np.abs(audio[floor:end].astype(np.int32)) > _SILENCE)
    return floor + int(loud[-1]) + 1 if loud.size else floor


def _silent_run_after(audio: np.ndarray, start: int, ceiling: int) -> int:
    loud = np.flatnonzero(np.abs(audio[start:ceiling].astype(np.int32)) > _SILENCE)
    return start + int(loud[0]) if loud.size else ceiling


def _voice_bar_end(audio: np.ndarray, start: int, ceiling: int, frame: int) -> int:
    """End of the low-frequency (few zero crossings) stretch that starts at ``start``."""
    pos = start
    signs = np.signbit(audio.astype(np.int32))
    while pos + frame <= ceiling:
        crossings = np.count_nonzero(signs[pos + 1:pos + frame] != signs[pos:pos + frame - 1])
        if crossings >= _VOICE_BAR_ZC * frame:
            break
        pos += frame
    return pos


def _add_closures(units: list[_Unit], audio: np.ndarray, rate: int) -> list[_Unit]:
    """Insert closures before stops/affricates; move edge silences into pauses."""
    min_len = int(rate * _MIN_PHONE_MS / 1000)
    min_closure = int(rate * _MIN_CLOSURE_MS / 1000)
    min_edge = int(rate * _MIN_EDGE_SILENCE_MS / 1000)
    frame = int(rate * 0.004)
    out: list[_Unit] = []
    for unit in units:
        prev = out[-1] if out else None
        label = unit.labels[0] if unit.labels else None
        if label in _CLOSURE:
            begin = unit.start
            if prev is not None and not prev.is_pause:
                begin = _silent_run_before(audio, unit.start, prev.start + min_len)
            release = unit.start
            if label in _VOICED_STOPS:
                release = _voice_bar_end(audio, unit.start, unit.end - min_len, frame)
            if release - begin >= min_closure:
                if prev is not None and begin < unit.start:
                    prev.end = begin
                out.append(_Unit(begin, release, (_CLOSURE[label],), unit.word))
                unit.start = release
        elif unit.labels and prev is not None and prev.is_pause:
            lead = _silent_run_after(audio, unit.start, unit.end - min_len)
            if lead - unit.start >= min_edge:
                prev.end = unit.start = lead
        if unit.is_pause and prev is not None and not prev.is_pause:
            tail = _silent_run_before(audio, prev.end, prev.start + min_len)
            if prev.end - tail >= min_edge:
                prev.end = unit.start = tail
        out.append(unit)
    last = out[-1] if out else None
    if last is not None and not last.is_pause:  # trailing silence belongs to h#
        tail = _silent_run_before(audio, last.end, last.start + min_len)
        if last.end - tail >= min_edge:
            last.end = tail
    return out


def label_utterance(audio: np.ndarray, events: list, text: str, rate: int, counts: list[int]
                    ) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """TIMIT phone and word segments (samples at ``rate``) for one espeak utterance.

    ``audio`` is espeak's clean int16 output, ``events`` its phoneme and word events, ``counts``
    the number of phonemes of each word said alone. Returns
    (phones, words) as (start, end, label) lists; silence before the first and after the last
    phone is left out (the caller labels it ``h#``), inner pauses are ``pau``.
    """
    min_len = int(rate * _MIN_PHONE_MS / 1000)
    units = _units(events, len(audio), text, counts)
    units = _give_short_phones_time(units, min_len)
    units = _add_closures(_expand(units), audio, rate)
    while units and units[0].is_pause:
        units.pop(0)
    while units and units[-1].is_pause:
        units.pop()
    phones: list[tuple[int, int, str]] = []
    for unit in units:
        label = "pau" if unit.is_pause else unit.labels[0]
        if phones and label == "pau" and phones[-1][2] == "pau":
            phones[-1] = (phones[-1][0], unit.end, "pau")
        elif unit.end > unit.start:
            phones.append((unit.start, unit.end, label))
    words = []
    tokens = [t.strip(".,?!").lower() for t in text.split()]
    for index, token in enumerate(tokens):
        spans = [(u.start, u.end) for u in units if u.word == index and u.end > u.start]
        if spans:
            words.append((min(s for s, _ in spans), max(e for _, e in spans), token))
    return phones, words


# ---------------------------------------------------------------------------- corpus plan
def _sentence(rng: random.Random) -> str:
    def noun_phrase() -> list[str]:
        words = [rng.choice(_DETERMINERS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADJECTIVES))
        return words + [rng.choice(_NOUNS)]

    def clause() -> list[str]:
        words = noun_phrase()
        if rng.random() < 0.4:
            words.append(rng.choice(_ADVERBS))
        words += [rng.choice(_VERBS)] + noun_phrase()
        if rng.random() < 0.6:
            words += [rng.choice(_PREPOSITIONS)] + noun_phrase()
        return words

    words = clause()
    if rng.random() < 0.7:
        words[-1] += ","
        words += [rng.choice(_CONJUNCTIONS)] + clause()
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def _short_sentence(rng: random.Random, max_words: int) -> str:
    """A noun phrase, with a verb when there is room: "The quiet owl.", "A dog hid."."""
    words = [rng.choice(_DETERMINERS)]
    if len(words) + 2 <= max_words and rng.random() < 0.5:
        words.append(rng.choice(_ADJECTIVES))
    words.append(rng.choice(_NOUNS))
    if len(words) < max_words and rng.random() < 0.5:
        words.append(rng.choice(_VERBS))
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]


def make_sentences(count: int, seed: int = 0, max_words: int | None = None) -> list[str]:
    """``count`` distinct sentences of 10 to 18 words (of 2 to ``max_words`` words when that is
    below 10), the same for the same seed."""
    if max_words is not None and (isinstance(max_words, bool) or not isinstance(max_words, int)
                                  or max_words < 2):
        raise DataError(f"--max-words must be an integer >= 2, got {max_words!r}")
    short = max_words is not None and max_words < _MIN_WORDS
    low, high = (2, max_words) if short else (_MIN_WORDS, min(_MAX_WORDS, max_words or _MAX_WORDS))
    rng = random.Random(seed)
    seen: set[str] = set(SA_SENTENCES)
    out = []
    misses = 0
    while len(out) < count:
        text = _short_sentence(rng, max_words) if short else _sentence(rng)
        if low <= len(text.split()) <= high and text not in seen:
            seen.add(text)
            out.append(text)
            misses = 0
        else:
            misses += 1
            if misses > 100_000:
                raise DataError(f"cannot make {count} distinct sentences of at most "
                                f"{max_words} words (made {len(out)}); use fewer --utterances")
    return out


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
                max_words: int | None = None) -> list[_Utterance]:
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
    plan: list[_Utterance] = []
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
                plan.append(_Utterance(speaker, f"SA{k}", text, (seed, len(plan))))
            for _ in range(count):
                sentence_number += 1
                plan.append(_Utterance(speaker, f"SI{sentence_number}", next(sentences),
                                       (seed, len(plan))))
    return plan


# ---------------------------------------------------------------------------- writing
_ESPEAK: _Espeak | None = None


def _espeak() -> _Espeak:
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = _Espeak()
    return _ESPEAK


def _to_16k(samples: np.ndarray, rate: int) -> tuple[np.ndarray, float]:
    if rate == SAMPLE_RATE:
        return samples.astype(np.float64), 1.0
    g = math.gcd(SAMPLE_RATE, rate)
    up, down = SAMPLE_RATE // g, rate // g
    return resample_poly(samples.astype(np.float64), up, down), up / down


def synthesize(utt: _Utterance, root: Path) -> tuple[str, float]:
    """Speak one utterance and write its .WAV/.PHN/.WRD/.TXT under ``root``."""
    espeak = _espeak()
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
    _espeak()


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
    espeak_version = _probe_espeak_version()
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


def _probe_espeak_version() -> str:
    """espeak-ng's version, read without initialising it in this process."""
    lib = _load_espeak()
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    return lib.espeak_Info(None).decode()
