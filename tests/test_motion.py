"""The embedded motion stage on real speech (espeak-ng en-us with phoneme timing, see examples/README.md)."""

from __future__ import annotations

import json
import math
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from stages.embedded.motion import EmbeddedMotion, Expression

ROOT = Path(__file__).resolve().parent.parent
VISEMES = ROOT / "tests" / "data" / "visemes"
SPEECH = ROOT / "examples" / "speech"
# "Ma, my mom, ma.": espeak-ng en-us through examples/make_speech.py's `Espeak`, first message of a fresh process.
# espeak times the /m/ of the first "ma" at 0–156 ms and that of the last one at 1303–1459 ms.
OPENS_ON_M = ROOT / "tests" / "data" / "opens_on_m"
FIRST_M = {"start_ms": 0, "end_ms": 156}
LAST_M = {"start_ms": 1303, "end_ms": 1459}
RATE_HZ = 16000
FPS = 25
CLOSED_IOD = 0.03


def load_speech(stem: Path) -> np.ndarray:
    """The WAV as 16 kHz mono float32, resampled with a polyphase filter like the audio stage."""
    with wave.open(str(stem.with_suffix(".wav"))) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), dtype=np.int16)
    step = math.gcd(RATE_HZ, rate)
    return resample_poly(pcm.astype(np.float64) / 32768.0, RATE_HZ // step, rate // step).astype(np.float32)


def load_events(stem: Path) -> list[dict]:
    return json.loads(stem.with_suffix(".phonemes.json").read_text())


def run_motion(pcm: np.ndarray, fps: Fraction | int = FPS, **options: object) -> list[Expression]:
    motion = EmbeddedMotion(fps=fps, **options)
    return motion.push(pcm) + motion.finish()


def run_in_chunks(pcm: np.ndarray, chunk: int, fps: Fraction | int = FPS) -> list[Expression]:
    motion = EmbeddedMotion(fps=fps)
    frames: list[Expression] = []
    for start in range(0, len(pcm), chunk):
        frames += motion.push(pcm[start : start + chunk])
    return frames + motion.finish()


def frame_classes(events: list[dict], n_frames: int) -> np.ndarray:
    """The phoneme class under each frame's centre."""
    centres_ms = (np.arange(n_frames) + 0.5) * 1000 / FPS
    classes = np.full(n_frames, "", dtype=object)
    for event in events:
        classes[(centres_ms >= event["start_ms"]) & (centres_ms < event["end_ms"])] = event["class"]
    return classes


def frames_overlapping(event: dict, n_frames: int) -> range:
    frame_ms = 1000 / FPS
    first = int(event["start_ms"] // frame_ms)
    stop = min(math.ceil(event["end_ms"] / frame_ms), n_frames)
    return range(first, stop)


@pytest.fixture(scope="module")
def visemes() -> tuple[np.ndarray, list[dict], list[Expression]]:
    pcm = load_speech(VISEMES)
    return pcm, load_events(VISEMES), run_motion(pcm)


def apertures(frames: list[Expression]) -> np.ndarray:
    return np.array([frame.aperture for frame in frames])


def widths(frames: list[Expression]) -> np.ndarray:
    return np.array([frame.width for frame in frames])


@pytest.mark.parametrize("fps", [25, 30, Fraction(30000, 1001), 60])
@pytest.mark.parametrize("n_samples", [0, 1, 639, 640, 641, 16000 * 3 + 17])
def test_frame_count_is_ceil_of_audio_length(fps: Fraction | int, n_samples: int) -> None:
    pcm = load_speech(SPEECH)[:n_samples]
    frames = run_motion(pcm, fps=fps)
    assert len(pcm) == n_samples
    assert len(frames) == math.ceil(n_samples * Fraction(fps) / RATE_HZ)
    assert [frame.index for frame in frames] == list(range(len(frames)))


def test_frames_come_out_once_their_lookahead_has_arrived() -> None:
    pcm = load_speech(SPEECH)[: RATE_HZ * 2]
    motion = EmbeddedMotion(fps=FPS, lookahead_ms=40)
    samples_per_frame, lookahead = RATE_HZ // FPS, RATE_HZ * 40 // 1000
    emitted = 0
    for start in range(0, len(pcm), 320):
        emitted += len(motion.push(pcm[start : start + 320]))
        pushed = min(start + 320, len(pcm))
        assert emitted == max((pushed - lookahead) // samples_per_frame, 0)


@pytest.mark.parametrize("fps", [25, 30])
def test_chunked_stream_equals_one_push(visemes: tuple, fps: int) -> None:
    pcm, _, _ = visemes
    whole = run_motion(pcm, fps=fps)
    assert run_in_chunks(pcm, 320, fps=fps) == whole   # 20 ms live chunks
    assert run_in_chunks(pcm, 113, fps=fps) == whole   # ragged chunks that split hops and frames


def test_silence_keeps_the_mouth_at_rest() -> None:
    frames = run_motion(np.zeros(RATE_HZ * 3, dtype=np.float32))
    assert all(frame.aperture == 0.0 and frame.width == 0.0 for frame in frames)


def test_pauses_close_the_mouth(visemes: tuple) -> None:
    _, events, frames = visemes
    classes = frame_classes(events, len(frames))
    pause = apertures(frames)[classes == "long_pause"]
    assert len(pause) > 20
    assert np.median(pause) == 0.0
    assert np.mean(pause < CLOSED_IOD) >= 0.9


def test_lips_close_for_p_b_m(visemes: tuple) -> None:
    _, events, frames = visemes
    aperture = apertures(frames)
    closures = [event for event in events if event["class"] == "closed"]
    reached = [any(aperture[k] < CLOSED_IOD for k in frames_overlapping(e, len(frames))) for e in closures]
    assert len(closures) >= 15
    assert np.mean(reached) >= 0.85
    long_m = [e for e in closures if e["phoneme"].startswith("m") and e["end_ms"] - e["start_ms"] >= 100]
    assert long_m
    for event in long_m:
        assert sum(aperture[k] < CLOSED_IOD for k in frames_overlapping(event, len(frames))) >= 2, event


@pytest.mark.parametrize("chunk", [None, 320], ids=["one_push", "20ms_chunks"])
@pytest.mark.parametrize("gain_db", [0, -20])
def test_lips_close_on_an_m_that_opens_the_stream(chunk: int | None, gain_db: int) -> None:
    """No vowel has told the voice's level yet, so no dip can show: the opening /m/ still closes like the last."""
    pcm = load_speech(OPENS_ON_M) * np.float32(10 ** (gain_db / 20))
    aperture = apertures(run_motion(pcm) if chunk is None else run_in_chunks(pcm, chunk))
    first, last = (aperture[list(frames_overlapping(event, len(aperture)))] for event in (FIRST_M, LAST_M))
    assert np.all(first[:2] < CLOSED_IOD), first  # 0–80 ms: the murmur alone, before any vowel
    assert np.sum(first < CLOSED_IOD) >= np.sum(last < CLOSED_IOD) >= 2, (first, last)


def test_vowels_rarely_look_closed(visemes: tuple) -> None:
    _, events, frames = visemes
    classes = frame_classes(events, len(frames))
    vowels = apertures(frames)[np.isin(classes, ["open", "spread", "round"])]
    assert np.mean(vowels < CLOSED_IOD) <= 0.07


def test_spread_vowels_are_wider_than_round_ones(visemes: tuple) -> None:
    _, events, frames = visemes
    classes = frame_classes(events, len(frames))
    width = widths(frames)
    assert np.median(width[classes == "spread"]) - np.median(width[classes == "round"]) >= 0.10


def test_open_vowels_open_wider_than_spread_ones(visemes: tuple) -> None:
    _, events, frames = visemes
    classes = frame_classes(events, len(frames))
    aperture = apertures(frames)
    assert np.median(aperture[classes == "open"]) >= 1.7 * np.median(aperture[classes == "spread"])
    assert 0.25 <= np.percentile(aperture, 98) <= 0.36


def test_aperture_follows_the_speech_band_envelope_without_lag(visemes: tuple) -> None:
    pcm, _, frames = visemes
    spectrum = np.fft.rfft(pcm.astype(np.float64))
    freqs = np.fft.rfftfreq(len(pcm), 1 / RATE_HZ)
    speech_band = np.fft.irfft(np.where((freqs >= 300) & (freqs <= 3400), spectrum, 0), n=len(pcm))
    per_frame = RATE_HZ // FPS
    padded = np.pad(speech_band, (0, len(frames) * per_frame - len(pcm)))
    envelope = np.sqrt(np.mean(padded.reshape(len(frames), per_frame) ** 2, axis=1))
    aperture = apertures(frames)

    def correlation(lag: int) -> float:
        a, e = (aperture[lag:], envelope[: len(envelope) - lag]) if lag >= 0 else (aperture[:lag], envelope[-lag:])
        return float(np.corrcoef(a, e)[0, 1])

    by_lag = {lag: correlation(lag) for lag in range(-2, 3)}
    assert by_lag[0] >= 0.6
    assert max(by_lag, key=by_lag.get) in (0, 1)


def test_a_quieter_voice_moves_the_mouth_the_same_way(visemes: tuple) -> None:
    pcm, _, frames = visemes
    quiet = run_motion(pcm * np.float32(10 ** (-20 / 20)))
    difference = np.abs(apertures(quiet) - apertures(frames))
    assert np.median(difference) < 0.005
    assert np.percentile(difference, 95) < 0.02
    assert np.abs(widths(quiet) - widths(frames)).max() < 0.02


def blink_peaks(frames: list[Expression]) -> np.ndarray:
    """Frame indices where a blink shuts the eyes."""
    blink = np.array([frame.blink for frame in frames])
    shut = blink >= 0.9
    return np.flatnonzero(shut & ~np.concatenate(([False], shut[:-1])))


def test_blinks_last_three_to_six_frames_come_every_few_seconds_and_follow_the_seed() -> None:
    pcm = np.tile(load_speech(SPEECH), 3)  # ≈ 27 s
    frames = run_motion(pcm, seed=7)
    peaks = blink_peaks(frames)
    intervals_s = np.diff(peaks) / FPS
    assert len(peaks) >= 5
    # 2-6 s apart, later by up to two waits of 0.3-0.8 s while the speech is loud, sooner (not under 1.5 s) at the
    # end of a phrase.
    assert np.all((intervals_s >= 1.5 - 0.1) & (intervals_s <= 6.0 + 1.6 + 0.1))
    assert 1.5 - 0.1 <= peaks[0] / FPS <= 6.0 + 1.6 + 0.1
    blink = np.array([frame.blink for frame in frames])
    for peak in peaks:  # each blink is 120-240 ms of closed-enough lids: 3-6 frames at 25 fps
        start, end = peak, peak
        while start > 0 and blink[start - 1] > 0.2:
            start -= 1
        while end < len(blink) and blink[end] > 0.2:
            end += 1
        assert 3 <= end - start <= 6, (peak, blink[start - 1:end + 1])
    assert blink_peaks(run_motion(pcm, seed=7)).tolist() == peaks.tolist()
    assert blink_peaks(run_motion(pcm, seed=8)).tolist() != peaks.tolist()


def test_head_scale_zero_keeps_the_photos_pose_but_keeps_blinks_and_mouth(visemes: tuple) -> None:
    pcm, _, frames = visemes
    still = run_motion(pcm, head_scale=0.0)
    assert all(f.head_roll_deg == 0.0 and f.head_dx == 0.0 and f.head_dy == 0.0 for f in still)
    assert [f.blink for f in still] == [f.blink for f in frames]
    assert apertures(still).tolist() == apertures(frames).tolist()


def nose_offset(frames: list[Expression], nose_above_pivot_iod: float = 1.3) -> np.ndarray:
    """How far the head's pose moves the nose tip (IOD): the shift, and the roll about the neck below it."""
    roll = np.radians([f.head_roll_deg for f in frames])
    return np.hypot([f.head_dx for f in frames] + roll * nose_above_pivot_iod, [f.head_dy for f in frames])


def test_the_head_moves_with_the_speech_smoothly_and_comes_back_in_silence(visemes: tuple) -> None:
    pcm, events, _ = visemes
    frames = run_motion(np.concatenate([pcm, np.zeros(3 * RATE_HZ, np.float32)]))
    speech_end = math.ceil(len(pcm) / (RATE_HZ // FPS))
    offset = nose_offset(frames)
    speaking = np.sqrt(np.mean(offset[:speech_end] ** 2))
    assert 0.015 <= speaking <= 0.08
    assert offset[speech_end + FPS:].max() < 0.005             # back to the photo's pose a second into silence
    shifts = np.array([(f.head_dx, f.head_dy) for f in frames])
    roll = np.array([f.head_roll_deg for f in frames])
    assert np.abs(np.diff(shifts, 2, axis=0)).max() < 0.006      # no jolt: nods start and end softly
    assert np.abs(np.diff(roll, 2)).max() < 0.05
    # Nods come with stressed syllables: the head dips within 0.3 s after a loud onset.
    dips = np.flatnonzero(np.diff(np.sign(np.diff(shifts[:speech_end, 1]))) < 0) + 1
    assert len(dips) >= 8
    # Scaled by the preset's knob.
    doubled = nose_offset(run_motion(np.concatenate([pcm, np.zeros(3 * RATE_HZ, np.float32)]), head_scale=2.0))
    assert np.sqrt(np.mean(doubled[:speech_end] ** 2)) == pytest.approx(2 * speaking, rel=1e-6)


def test_interrupt_relaxes_the_mouth_and_keeps_the_clock() -> None:
    pcm = load_speech(SPEECH)
    motion = EmbeddedMotion(fps=FPS)
    frames: list[Expression] = []
    chunk = 320
    for start in range(0, len(pcm), chunk):
        frames += motion.push(pcm[start : start + chunk])
        if frames and frames[-1].aperture > 0.15:
            break
    assert frames and frames[-1].aperture > 0.15
    motion.interrupt()
    after: list[Expression] = []
    for _ in range(40):  # 0.8 s of silence
        after += motion.push(np.zeros(chunk, dtype=np.float32))
    after += motion.finish()

    assert after[0].index == frames[-1].index + 1
    assert [f.index for f in after] == list(range(after[0].index, after[0].index + len(after)))
    assert len(frames) + len(after) == math.ceil((frames[-1].index + 1) + 40 * chunk / (RATE_HZ // FPS))
    relaxing = apertures(after)
    assert relaxing[0] < frames[-1].aperture
    assert np.all(relaxing[:3] > 0.03)  # relaxes from where it was (≈ 100 ms time constant), no snap shut
    assert np.all(np.diff(relaxing[:10]) <= 0)
    assert relaxing[15:].max() < 0.01
    uninterrupted = run_motion(np.zeros(len(pcm) * 2, dtype=np.float32))
    assert [f.blink for f in after] == [uninterrupted[f.index].blink for f in after]
