"""The measuring code itself, on the real portrait and the real phoneme-timed speech."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests import quality

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT = ROOT / "examples" / "astronaut.png"
SPEECH = ROOT / "examples" / "speech.wav"
VISEMES = ROOT / "tests" / "data" / "visemes.wav"
FPS = 25.0

# (aperture, width) in IOD that an ideal mouth shows for each phoneme class.
IDEAL_SHAPES = {
    "closed": (0.0, 0.70), "open": (0.30, 0.74), "spread": (0.12, 0.84), "round": (0.16, 0.64),
    "neutral": (0.12, 0.74), "fv": (0.04, 0.74), "other_consonant": (0.10, 0.74),
    "pause": (0.0, 0.74), "long_pause": (0.0, 0.74),
}


@pytest.fixture(scope="module")
def measurer() -> quality.FaceMeasurer:
    return quality.FaceMeasurer()


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return cv2.imread(str(PORTRAIT), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def portrait_points(measurer, portrait) -> np.ndarray:
    measurer.reset()
    return measurer.landmarks(portrait)


def load_events(wav: Path) -> list[dict]:
    return json.loads(wav.with_suffix(".phonemes.json").read_text())


def runs_of(events: list[dict], phoneme: str) -> list[float]:
    """Durations of stretches of consecutive events with this mnemonic."""
    durations: list[float] = []
    previous = None
    for event in events:
        if event["phoneme"] == phoneme:
            length = event["end_ms"] - event["start_ms"]
            if previous == phoneme:
                durations[-1] += length
            else:
                durations.append(length)
        previous = event["phoneme"]
    return durations


def pause_lengths(events: list[dict]) -> list[int]:
    return [e["end_ms"] - e["start_ms"] for e in events if e["class"] in ("pause", "long_pause")]


def mouth_points(base: np.ndarray, aperture: float, width: float) -> np.ndarray:
    """The portrait's 68 points with the mouth set to a given inner aperture and corner width (IOD units)."""
    points = base.copy()
    iod = np.linalg.norm(base[45] - base[36])
    across = (base[45] - base[36]) / iod
    down = np.array([-across[1], across[0]])
    centre = base[60:68].mean(axis=0)
    points[48] = centre - across * width * iod / 2
    points[54] = centre + across * width * iod / 2
    for upper, lower in quality.INNER_LIP_PAIRS:
        along = float(np.dot(base[upper] - centre, across))
        points[upper] = centre + across * along - down * aperture * iod / 2
        points[lower] = centre + across * along + down * aperture * iod / 2
    return points


def ideal_shapes(events: list[dict], frame_count: int, fps: float) -> list[tuple[float, float]]:
    """Per frame, the shape of the class under its midpoint, closed if any p/b/m overlaps the frame at all."""
    shapes = []
    for frame in range(frame_count):
        begin, end = frame * 1000 / fps, (frame + 1) * 1000 / fps
        middle = (begin + end) / 2
        overlapping = [e for e in events if e["start_ms"] < end and e["end_ms"] > begin]
        if any(e["class"] == "closed" for e in overlapping):
            shapes.append(IDEAL_SHAPES["closed"])
            continue
        under = [e for e in events if e["start_ms"] <= middle < e["end_ms"]]
        shapes.append(IDEAL_SHAPES[under[0]["class"] if under else "pause"])
    return shapes


def landmarks_for(base: np.ndarray, shapes: list[tuple[float, float]]) -> np.ndarray:
    return np.stack([mouth_points(base, aperture, width) for aperture, width in shapes])


# ------------------------------------------------------------------------------------------ the speech files


def test_viseme_speech_has_the_promised_sounds():
    events = load_events(VISEMES)
    phonemes = [e["phoneme"] for e in events]
    assert sum(1 for d in runs_of(events, "m") if d >= 100) >= 3
    assert sum(1 for e in events if e["class"] == "closed") >= 20
    assert sum(p in ("i:", "i") for p in phonemes) >= 6
    assert sum(p in ("u:", "oU") for p in phonemes) >= 6
    assert sum(p in ("A:", "0", "aa") for p in phonemes) >= 5
    assert sum(d >= 500 for d in pause_lengths(events)) >= 2


def test_demo_speech_has_two_pauses_and_the_advertised_sounds():
    events = load_events(SPEECH)
    assert 6000 <= events[-1]["end_ms"] <= 10000
    assert sum(d >= 400 for d in pause_lengths(events)) >= 2
    assert sum(e["class"] == "closed" for e in events) >= 8
    assert {"spread", "round", "open"} <= {e["class"] for e in events}


@pytest.mark.parametrize("wav", [SPEECH, VISEMES], ids=["speech", "visemes"])
def test_phoneme_events_tile_the_audio(wav):
    events = load_events(wav)
    audio, rate = quality.read_audio(wav)
    assert rate == 22050
    assert events[0]["start_ms"] == 0
    assert all(a["end_ms"] == b["start_ms"] for a, b in zip(events, events[1:]))
    assert all(e["end_ms"] > e["start_ms"] for e in events)
    assert abs(events[-1]["end_ms"] - 1000 * len(audio) / rate) <= 1.0
    assert {e["class"] for e in events} <= set(IDEAL_SHAPES)
    assert wav.stat().st_size < 700_000


@pytest.mark.parametrize("wav", [SPEECH, VISEMES], ids=["speech", "visemes"])
def test_events_match_what_is_heard(wav):
    """Silence is silent and speech is loud where the events say so (espeak's timing is usable)."""
    events = load_events(wav)
    audio, rate = quality.read_audio(wav)

    def rms_db(event: dict) -> float:
        segment = audio[int(event["start_ms"] * rate / 1000): int(event["end_ms"] * rate / 1000)]
        return 10 * math.log10(float(np.mean(segment.astype(np.float64) ** 2)) + 1e-12)

    pauses = [rms_db(e) for e in events if e["class"] == "long_pause"]
    vowels = [rms_db(e) for e in events if e["class"] in ("open", "spread", "round")]
    assert max(pauses) < np.median(vowels) - 30


def test_make_speech_reproduces_the_stored_files(tmp_path):
    script = ROOT / "examples" / "make_speech.py"
    subprocess.run([sys.executable, str(script), "--out", str(tmp_path)], check=True, capture_output=True)
    for stored in (SPEECH, SPEECH.with_suffix(".phonemes.json"), VISEMES, VISEMES.with_suffix(".phonemes.json")):
        regenerated = tmp_path / stored.relative_to(ROOT)
        assert regenerated.read_bytes() == stored.read_bytes(), stored.name


# ------------------------------------------------------------------------------------------ faces and video


def test_portrait_measures_as_itself(measurer, portrait, portrait_points):
    assert portrait_points.shape == (68, 2)
    assert 55 < np.linalg.norm(portrait_points[36] - portrait_points[45]) < 65
    report = quality.identity_report([portrait] * 4, portrait, measurer)
    assert report["face_in_every_frame"]
    assert report["descriptor_distance_max"] < 1e-6
    assert report["jitter"] == 0.0
    assert quality.passes(report) == []


def test_smooth_head_motion_is_not_jitter(measurer, portrait):
    frames = []
    for index in range(30):
        phase = 2 * math.pi * index / 30
        matrix = cv2.getRotationMatrix2D((222, 200), 3 * math.sin(phase), 1 + 0.02 * math.sin(phase))
        matrix[:, 2] += (4 * math.sin(phase), 2 * math.cos(phase))
        frames.append(cv2.warpAffine(portrait, matrix, (512, 512), flags=cv2.INTER_LINEAR,
                                     borderMode=cv2.BORDER_REFLECT))
    report = quality.identity_report(frames, portrait, measurer, descriptor_stride=5)
    assert report["face_in_every_frame"]
    assert report["jitter"] < 0.008
    assert report["descriptor_distance_max"] < 0.2


def test_a_different_face_is_far_and_no_face_is_reported(measurer, portrait):
    mirrored_noise = np.random.default_rng(0).integers(0, 255, portrait.shape, dtype=np.uint8)
    report = quality.identity_report([portrait, mirrored_noise, portrait], portrait, measurer)
    assert report["faces_found"] == 2
    assert any("face_in_every_frame" in failure for failure in quality.passes(report))


def test_jitter_ignores_similarity_motion_and_sees_wobble(portrait_points):
    rng = np.random.default_rng(1)
    moved = []
    for _ in range(40):
        angle, scale, shift = rng.uniform(-0.1, 0.1), rng.uniform(0.9, 1.1), rng.uniform(-20, 20, 2)
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        moved.append(portrait_points @ rotation.T * scale + shift)
    moved = np.stack(moved)
    assert quality.jitter_report(moved, portrait_points)["jitter"] < 1e-9

    iod = np.linalg.norm(portrait_points[36] - portrait_points[45])
    wobbling = np.repeat(portrait_points[None], 40, axis=0)
    wobbling[::2, 30, 0] += 0.05 * iod  # nose tip alternates by 0.05 IOD
    report = quality.jitter_report(wobbling, portrait_points)
    assert 0.02 < report["jitter_nose"] < 0.1
    assert report["jitter_eyes"] < report["jitter_nose"]
    assert quality.jitter_report(wobbling * 2.0, portrait_points * 2.0)["jitter"] == pytest.approx(report["jitter"])


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".y4m", "rawvideo"), (".nut", "ffv1")])
def test_read_video_returns_frames_and_rate(tmp_path, portrait, measurer, suffix, codec):
    path = tmp_path / f"clip{suffix}"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(25))
        stream.width, stream.height = 512, 512
        stream.pix_fmt = "yuv420p"
        for _ in range(5):
            for packet in stream.encode(av.VideoFrame.from_ndarray(portrait, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, fps = quality.read_video(path)
    assert len(frames) == 5 and fps == 25.0
    assert frames[0].shape == (512, 512, 3) and frames[0].dtype == np.uint8
    assert np.mean(np.abs(frames[2].astype(int) - portrait.astype(int))) < 6
    measurer.reset()
    assert measurer.landmarks(frames[2]) is not None


def test_command_line_prints_both_reports(tmp_path, portrait, capsys):
    path = tmp_path / "still.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        for _ in range(6):
            for packet in stream.encode(av.VideoFrame.from_ndarray(portrait, format="bgr24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    status = quality.main([str(path), str(VISEMES.with_suffix(".phonemes.json")), "--portrait", str(PORTRAIT)])
    printed = json.loads(capsys.readouterr().out)
    assert status == 1  # a still, smiling portrait never closes its mouth
    assert printed["identity"]["face_in_every_frame"] is True
    assert any(failure.startswith("closure_rate") for failure in printed["failures"])


# ------------------------------------------------------------------------------------------ mouth and lip sync


def test_mouth_geometry_reads_known_shapes(portrait_points):
    points = np.stack([mouth_points(portrait_points, 0.25, 0.8), mouth_points(portrait_points, 0.0, 0.6)])
    geometry = quality.mouth_geometry(points * 1.7)
    np.testing.assert_allclose(geometry["aperture"], [0.25, 0.0], atol=1e-9)
    np.testing.assert_allclose(geometry["width"], [0.8, 0.6], atol=1e-9)
    assert geometry["iod"][0] == pytest.approx(1.7 * np.linalg.norm(portrait_points[36] - portrait_points[45]))


def test_portrait_mouth_is_open_by_dlib(portrait_points):
    """The astronaut smiles with her teeth showing: the renderer has to close it, the measure must see that."""
    geometry = quality.mouth_geometry(portrait_points[None])
    assert geometry["aperture"][0] > 0.08
    assert 0.65 < geometry["width"][0] < 0.85


@pytest.fixture(scope="module")
def viseme_speech():
    audio, rate = quality.read_audio(VISEMES)
    events = load_events(VISEMES)
    frame_count = int(len(audio) / rate * FPS)
    return events, audio, rate, frame_count


def test_ideal_mouth_passes_every_lipsync_threshold(portrait_points, viseme_speech):
    events, audio, rate, frame_count = viseme_speech
    shapes = ideal_shapes(events, frame_count, FPS)
    report = quality.lipsync_report(landmarks_for(portrait_points, shapes), events, audio, rate, FPS)
    assert report["closure_rate"] == 1.0
    assert report["spread_minus_round_width"] == pytest.approx(0.84 - 0.64)
    assert report["open_over_spread_aperture"] == pytest.approx(0.30 / 0.12)
    assert report["pause_aperture_p90"] == pytest.approx(0.0, abs=1e-9)
    assert report["pause_frames"] >= 10
    assert len(report["long_m_closed_frames"]) >= 3 and report["long_m_closed_frames_min"] >= 3
    assert report["vowel_closed_fraction"] == 0.0
    assert report["centroid_accuracy"] == 1.0
    assert abs(report["best_lag_ms"]) <= 40
    assert quality.passes(report) == []


def test_late_mouth_shows_its_lag(portrait_points, viseme_speech):
    events, audio, rate, frame_count = viseme_speech
    shapes = ideal_shapes(events, frame_count, FPS)
    late = [IDEAL_SHAPES["pause"]] * 3 + shapes[:-3]  # 120 ms behind the sound
    on_time = quality.lipsync_report(landmarks_for(portrait_points, shapes), events, audio, rate, FPS)
    report = quality.lipsync_report(landmarks_for(portrait_points, late), events, audio, rate, FPS)
    assert report["best_lag_ms"] - on_time["best_lag_ms"] == pytest.approx(120, abs=25)
    assert any(failure.startswith("best_lag_ms") for failure in quality.passes(report))


def test_loudness_only_mouth_fails_shape_and_closure(portrait_points, viseme_speech):
    """A mouth that opens with loudness alone (the spec's 'one shape') must fail, or the measure is too kind."""
    events, audio, rate, frame_count = viseme_speech
    envelope = quality.speech_envelope_db(audio, rate, 1 / FPS, 1 / FPS)[:frame_count]
    loudness = (envelope - envelope.min()) / (envelope.max() - envelope.min())
    shapes = [(0.3 * level, 0.74) for level in loudness]
    report = quality.lipsync_report(landmarks_for(portrait_points, shapes), events, audio, rate, FPS)
    failures = quality.passes(report)
    assert report["envelope_correlation"] > 0.9
    assert any(failure.startswith("spread_minus_round_width") for failure in failures)
    assert any(failure.startswith("closure_rate") for failure in failures)
    assert any(failure.startswith("long_m_closed_frames_min") for failure in failures)
    # One shape tells closed from open but not spread from round: well short of what the ideal mouth scores.
    assert report["centroid_accuracy"] < 0.75


def test_missing_faces_are_not_counted_as_shapes(portrait_points, viseme_speech):
    events, audio, rate, frame_count = viseme_speech
    landmarks = landmarks_for(portrait_points, ideal_shapes(events, frame_count, FPS))
    landmarks[::10] = np.nan
    report = quality.lipsync_report(landmarks, events, audio, rate, FPS)
    assert report["faces_missing"] == len(range(0, frame_count, 10))
    assert report["centroid_accuracy"] == 1.0
    assert report["vowel_closed_fraction"] == 0.0
