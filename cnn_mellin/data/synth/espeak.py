"""Driving libespeak-ng through ctypes: speak a text, collect its audio and phoneme events.

Each event names an espeak phoneme (or a word start) and the output sample where it starts.
espeak-ng keeps state between utterances (pitch jitter, noise generators), so each utterance is
spoken in a fork of a process that has initialised espeak but never spoken: the same arguments
give byte-identical output however the work is spread over processes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnn_mellin.errors import UserError

if TYPE_CHECKING:
    from cnn_mellin.data.synth.plan import Speaker


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


class Espeak:
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


_ESPEAK: Espeak | None = None


def shared_espeak() -> Espeak:
    """This process's :class:`Espeak`, initialised on first use."""
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = Espeak()
    return _ESPEAK


def probe_version() -> str:
    """espeak-ng's version, read without initialising it in this process."""
    lib = _load_espeak()
    lib.espeak_Info.restype = ctypes.c_char_p
    lib.espeak_Info.argtypes = [ctypes.c_void_p]
    return lib.espeak_Info(None).decode()
