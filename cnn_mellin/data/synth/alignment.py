"""Phone timing: espeak-ng's phoneme events and clean audio -> TIMIT phone and word segments.

espeak symbols are mapped to TIMIT's 61 labels by :data:`ESPEAK_TO_TIMIT`. Stop closures are
found in the audio (espeak renders them as silence at the end of the previous phone, or as a
voice bar); words espeak says as one share their phonemes by each word's phoneme count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnn_mellin.errors import DataError

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

# A clean espeak sample counts as silence at or below this level (int16 units).
_SILENCE = 100
_MIN_PHONE_MS = 2.0
_MIN_CLOSURE_MS = 5.0
_MIN_EDGE_SILENCE_MS = 10.0
_VOICE_BAR_ZC = 0.035  # zero crossings per sample below which a frame is a voice bar


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
                "to TIMIT phones; add it to cnn_mellin.data.synth.alignment.ESPEAK_TO_TIMIT"
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
