"""Regenerate the example speech and the phoneme-timed test speech with libespeak-ng (no model weights).

Run `.venv/bin/python examples/make_speech.py [--out ROOT]`. It writes, deterministically:
  examples/speech.wav + examples/speech.phonemes.json        (a short demo line with two pauses)
  tests/data/visemes.wav + tests/data/visemes.phonemes.json  (speech built to measure lip sync)

Each JSON file is a list of phoneme events, in order and without gaps:
  {"phoneme": espeak mnemonic, "start_ms": int, "end_ms": int, "class": one of MOUTH_CLASSES}
where end_ms is the next event's start (the last one ends with the audio). The WAVs are mono 16-bit at
espeak's native rate (22050 Hz).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import wave
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AUDIO_OUTPUT_SYNCHRONOUS = 2
ESPEAK_INITIALIZE_PHONEME_EVENTS = 0x0001
ESPEAK_EVENT_LIST_TERMINATED = 0
ESPEAK_EVENT_PHONEME = 7
ESPEAK_CHARS_UTF8 = 1
ESPEAK_SSML = 0x10
ESPEAK_PHONEMES = 0x100
ESPEAK_RATE = 1
POS_CHARACTER = 1

# A pause at least this long gets its own class, so measurements can use its settled middle.
LONG_PAUSE_MS = 300

MOUTH_CLASSES = (
    "closed", "open", "spread", "round", "neutral", "fv", "other_consonant", "pause", "long_pause",
)

# espeak-ng's en-us phoneme mnemonics (see `espeak-ng -x`), grouped by what the lips do.
# Diphthongs take the class of the part that lasts longest on the lips: aI and aU start wide open,
# oU and OI are rounded, eI/i@/e@ stay spread. Reduced central vowels (schwa, r-coloured schwa)
# move the lips little either way and form their own "neutral" class.
_PHONEME_CLASSES = {
    "closed": ("p", "b", "m"),
    "open": ("a", "aa", "a#", "A:", "A@", "A", "0", "V", "aI", "aI@", "aI3", "aU", "aU@"),
    "spread": ("i", "i:", "I", "I2", "I#", "e", "E", "E2", "E3", "eI", "e@", "i@", "i@3", "j"),
    "round": ("u:", "U", "u@", "o", "oU", "o@", "O", "O:", "O@", "OI", "w", "W"),
    "neutral": ("@", "@2", "@5", "@L", "3", "3:", "@-", "r-", "3:r"),
    "fv": ("f", "v"),
}


@dataclass(frozen=True, slots=True)
class PhonemeEvent:
    """One phoneme of synthesized speech, timed in milliseconds from the start of its WAV."""

    phoneme: str   # espeak-ng mnemonic, e.g. "i:", "oU", "_:"
    start_ms: int
    end_ms: int
    mouth_class: str


@dataclass(frozen=True, slots=True)
class Speech:
    """Synthesized audio (int16 mono) with its phoneme timing."""

    samples: np.ndarray
    rate_hz: int
    events: tuple[PhonemeEvent, ...]


def mouth_class_of(phoneme: str, duration_ms: int) -> str:
    """Map an espeak-ng en-us mnemonic to the mouth class the lips should show."""
    if phoneme.startswith("_") or not phoneme.strip():
        return "long_pause" if duration_ms >= LONG_PAUSE_MS else "pause"
    bare = phoneme.replace("'", "").replace(",", "")
    for mouth_class, members in _PHONEME_CLASSES.items():
        if bare in members:
            return mouth_class
    # Unknown vowels by their first letter (espeak writes vowels with a vowel letter or @/3/0/V first).
    if bare[:1] in "aAV0":
        return "open"
    if bare[:1] in "iIeE":
        return "spread"
    if bare[:1] in "uUoO":
        return "round"
    if bare[:1] in "@3":
        return "neutral"
    return "other_consonant"


class _EspeakEvent(ctypes.Structure):
    """Mirror of espeak_EVENT in speak_lib.h."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


class Espeak:
    """libespeak-ng in synchronous mode: each `synthesize` call returns its samples and phoneme events."""

    def __init__(self, voice: str = "en-us", rate_wpm: int = 165) -> None:
        self._lib = ctypes.CDLL("libespeak-ng.so.1")
        self._lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self._lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        self.rate_hz = self._lib.espeak_Initialize(
            AUDIO_OUTPUT_SYNCHRONOUS, 0, None, ESPEAK_INITIALIZE_PHONEME_EVENTS
        )
        if self.rate_hz <= 0:
            raise RuntimeError("espeak_Initialize failed; is espeak-ng-data installed?")
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self._lib.espeak_SetParameter(ESPEAK_RATE, rate_wpm, 0)
        self._chunks: list[np.ndarray] = []
        self._marks: list[tuple[str, int]] = []
        # Keep the ctypes callback object alive as long as espeak may call it.
        self._callback = _SynthCallback(self._collect)
        self._lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, sample_count, events) -> int:
        if sample_count > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(sample_count,)).copy())
        index = 0
        while events[index].type != ESPEAK_EVENT_LIST_TERMINATED:
            event = events[index]
            if event.type == ESPEAK_EVENT_PHONEME:
                self._marks.append((event.id.decode("utf-8", "replace"), event.audio_position))
            index += 1
        return 0

    def synthesize(self, ssml: str) -> Speech:
        """Speak SSML text (with [[phoneme]] input allowed); phoneme times are relative to this text's start."""
        self._chunks, self._marks = [], []
        text = ssml.encode()
        flags = ESPEAK_CHARS_UTF8 | ESPEAK_SSML | ESPEAK_PHONEMES
        if self._lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, flags, None, None) != 0:
            raise RuntimeError("espeak_Synth failed")
        self._lib.espeak_Synchronize()
        samples = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        duration_ms = round(1000 * len(samples) / self.rate_hz)
        return Speech(samples, self.rate_hz, _timed_events(self._marks, duration_ms))


def _timed_events(marks: list[tuple[str, int]], duration_ms: int) -> tuple[PhonemeEvent, ...]:
    """Turn (mnemonic, start) marks into back-to-back events.

    espeak splits a held sound into repeated marks ("m", "m" for a long hum; "_:", "_" for a break); they are
    merged so that one event is one held sound and its duration is the one a viewer sees.
    """
    if marks and marks[0][1] > 0:
        marks = [("_", 0), *marks]
    spans: list[tuple[str, int, int]] = []
    for index, (phoneme, start_ms) in enumerate(marks):
        end_ms = marks[index + 1][1] if index + 1 < len(marks) else duration_ms
        if end_ms <= start_ms:
            continue
        if spans and _same_sound(spans[-1][0], phoneme):
            spans[-1] = (spans[-1][0], spans[-1][1], end_ms)
        else:
            spans.append((phoneme, start_ms, end_ms))
    return tuple(PhonemeEvent(p, start, end, mouth_class_of(p, end - start)) for p, start, end in spans)


def _same_sound(previous: str, phoneme: str) -> bool:
    """Two marks continue one sound when they repeat it, or when both are silence."""
    return previous == phoneme or (previous.startswith("_") and phoneme.startswith("_"))


def write_speech(speech: Speech, wav_path: Path) -> Path:
    """Write the WAV and, beside it, NAME.phonemes.json; return the JSON path."""
    wav_path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(wav_path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(speech.rate_hz)
        wav.writeframes(speech.samples.astype("<i2").tobytes())
    json_path = wav_path.with_suffix(".phonemes.json")
    rows = [
        {"phoneme": e.phoneme, "start_ms": e.start_ms, "end_ms": e.end_ms, "class": e.mouth_class}
        for e in speech.events
    ]
    json_path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    return json_path


def summarize(name: str, speech: Speech) -> dict[str, int]:
    """Counts the tests rely on, printed so a regeneration shows at a glance what changed."""
    counts = Counter(e.mouth_class for e in speech.events)
    long_m = sum(1 for e in speech.events if e.phoneme == "m" and e.end_ms - e.start_ms >= 100)
    long_pauses = [e.end_ms - e.start_ms for e in speech.events if e.mouth_class == "long_pause"]
    summary = {
        "duration_ms": round(1000 * len(speech.samples) / speech.rate_hz),
        "closed": counts["closed"], "long_m": long_m,
        "spread": counts["spread"], "round": counts["round"], "open": counts["open"],
        "i_like": sum(1 for e in speech.events if e.phoneme in ("i:", "i")),
        "u_o_like": sum(1 for e in speech.events if e.phoneme in ("u:", "oU", "O:", "U")),
        "a_like": sum(1 for e in speech.events if e.phoneme in ("A:", "0", "aa", "a", "A@")),
        "neutral": counts["neutral"], "fv": counts["fv"],
        "pauses_ge_400ms": sum(1 for d in long_pauses if d >= 400),
        "pauses_ge_500ms": sum(1 for d in long_pauses if d >= 500),
    }
    print(f"{name}: " + ", ".join(f"{key}={value}" for key, value in summary.items()))
    return summary


# The demo: friendly, with p/b/m, "ee", "oo", "ah", and two breaks a viewer can see the mouth rest in.
DEMO_TEXT = (
    "Hello! I am talkstream. <break time=\"600ms\"/> "
    "I move my lips with your voice, and I speak in real time. <break time=\"600ms\"/> "
    "Bob, Pam, and Mo, see you soon!"
)

# Built to be measured: held /m/ (spelled as phonemes so espeak does not read "mmm" as letters),
# many bilabials, clear /i/, /u/ /o/, /a/, and long breaks.
VISEMES_TEXT = (
    "[[h'Vm::]], [[h'Vm::]]. Maybe Bob may be mumbling. <break time=\"700ms\"/> "
    "Beet, see, keep, me, bee, pea. Boot, blue, go, whoa, moo, who knew. <break time=\"700ms\"/> "
    "Father, hot, spa, papa, mama, pop. [[m'm::]]."
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the example and test speech with espeak-ng.")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="repository root to write examples/ and tests/data/ under (default: this checkout)")
    root = parser.parse_args(argv).out
    # espeak keeps state between messages, so both texts are always spoken in this order, in a fresh process.
    espeak = Espeak()
    demo = espeak.synthesize(DEMO_TEXT)
    visemes = espeak.synthesize(VISEMES_TEXT)
    write_speech(demo, root / "examples" / "speech.wav")
    write_speech(visemes, root / "tests" / "data" / "visemes.wav")
    demo_summary = summarize("examples/speech.wav", demo)
    visemes_summary = summarize("tests/data/visemes.wav", visemes)
    problems = []
    if not 6000 <= demo_summary["duration_ms"] <= 10000 or demo_summary["pauses_ge_400ms"] < 2:
        problems.append("demo speech must last 6-10 s with two pauses >= 400 ms")
    if not 10000 <= visemes_summary["duration_ms"] <= 15000 or visemes_summary["pauses_ge_500ms"] < 2:
        problems.append("viseme speech must last 10-15 s with two pauses >= 500 ms")
    if visemes_summary["long_m"] < 3:
        problems.append("viseme speech needs three /m/ of >= 100 ms")
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
