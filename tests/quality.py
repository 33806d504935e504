"""Measure rendered talking-head video the way the acceptance does: dlib's 68 landmarks on the output frames.

Pure functions plus one `FaceMeasurer` (numpy, scipy, dlib, PyAV; nothing from the project), so the acceptance tests
and anyone evaluating a render use the same numbers. Lengths are in units of the eye-corner distance
IOD = |p36 - p45| unless a name says otherwise.

Time convention: video frame t shows [t/fps, (t+1)/fps) of the audio and is compared with the audio at its
midpoint (t + 0.5)/fps. Phoneme events come from examples/make_speech.py: a list of
{"phoneme", "start_ms", "end_ms", "class"} dicts.

    python -m tests.quality VIDEO PHONEMES.json [--portrait examples/astronaut.png] [--audio WAV]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import dlib
import face_recognition_models
import numpy as np
from scipy import signal

EYE_CORNERS = (36, 39, 42, 45)
NOSE = tuple(range(27, 36))
INNER_LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
VOWEL_CLASSES = ("open", "spread", "round", "neutral")
VISEME_CLASSES = ("closed", "open", "spread", "round")

# Closed means the inner lips touch. On dlib's points a shut mouth measures 0.00-0.02 IOD (the inner-lip points
# of both lips land on the same line, give or take a pixel at IOD ~ 60 px); 0.03 IOD (about 2 px at that size)
# leaves room for that pixel of landmark noise while staying far below a speaking opening (0.15-0.35).
CLOSED_APERTURE = 0.03

# Faces are enlarged to about this box size (px) before the 68-point predictor runs (see FaceMeasurer._predict).
PREDICT_FACE_PX = 400.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    """The acceptance limits; `passes` names each one a report misses."""

    closure_rate_min: float = 0.80
    spread_minus_round_width_min: float = 0.06
    open_over_spread_aperture_min: float = 1.4
    pause_aperture_p90_max: float = CLOSED_APERTURE
    best_lag_abs_ms_max: float = 80.0
    long_m_closed_frames_min: int = 2
    vowel_closed_fraction_max: float = 0.10
    centroid_accuracy_min: float = 0.55
    envelope_correlation_min: float = 0.5
    descriptor_distance_median_max: float = 0.30
    descriptor_distance_max_max: float = 0.45
    jitter_max: float = 0.01


# ---------------------------------------------------------------------------------------------------- media


def read_video(path: str | Path) -> tuple[list[np.ndarray], float]:
    """Decode every frame of an .mp4/.mkv/.nut/.y4m file as BGR uint8; return them with the stream's fps."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(stream)]
    if rate is None:
        raise ValueError(f"{path}: the video stream declares no frame rate")
    return frames, float(rate)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Decode the first audio stream to float32 mono in [-1, 1] at its own rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        chunks = [out.to_ndarray() for frame in container.decode(stream) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray() for out in resampler.resample(None)]
        rate = stream.rate
    return np.concatenate(chunks, axis=1)[0].astype(np.float32), int(rate)


# ---------------------------------------------------------------------------------------------------- faces


class FaceMeasurer:
    """dlib's HOG detector, 68-point predictor and 128-d descriptor ResNet, loaded once.

    `landmarks` runs the detector on every frame, so "a face was found" means what the acceptance means, but after
    the first frame only in a region around the last face (the box grown by half its size per side; several times
    faster than the whole frame), falling back to the whole frame when that fails. The predictor, though, is
    not given each frame's detection: HOG boxes jump by whole cells, and the predictor's points follow its box, which
    would read as jitter. It gets the first detection's box carried along by the similarity that moved the
    face's eye corners and nose since then; identical frames thus give identical points. A detection that no longer
    overlaps the carried box (IoU < 0.5) starts a new anchor.
    """

    def __init__(self) -> None:
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())
        self._encoder = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())
        self._anchor: _Anchor | None = None
        self._previous: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the tracked face (call before measuring an unrelated video)."""
        self._anchor, self._previous = None, None

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """68 (x, y) points in pixels, float64, of the largest face in a BGR frame; None when there is none."""
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        carried = self._carried_box()
        found = self._detect_near(rgb, carried) if carried is not None else None
        if found is None:
            found = self._detect(rgb)
        if found is None:
            self.reset()
            return None
        if carried is None or _iou(carried, found) < 0.5:
            points = self._predict(rgb, found)
            self._anchor = _Anchor(box=np.array(found, dtype=np.float64), points=points)
        else:
            points = self._predict(rgb, carried)
        self._previous = points
        return points

    def descriptor(self, frame: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """dlib's 128-d face descriptor of a BGR frame, aligned by the given 68 points."""
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        left, top = np.floor(landmarks.min(axis=0)).astype(int)
        right, bottom = np.ceil(landmarks.max(axis=0)).astype(int)
        points = dlib.points([dlib.point(int(round(x)), int(round(y))) for x, y in landmarks])
        shape = dlib.full_object_detection(dlib.rectangle(int(left), int(top), int(right), int(bottom)), points)
        return np.array(self._encoder.compute_face_descriptor(rgb, shape), dtype=np.float64)

    def _predict(self, rgb: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """Run the predictor on the face region enlarged to PREDICT_FACE_PX, for sub-pixel points.

        dlib returns whole pixels; at IOD ~ 60 px a pixel is 0.017 IOD, and rounding alone would give a smoothly
        moving face about 0.012 IOD of "jitter" and blur the 0.03 IOD closed-mouth line.
        """
        left, top, right, bottom = box
        size = max(right - left, bottom - top, 1.0)
        margin = 0.3 * size
        x0, y0 = max(int(left - margin), 0), max(int(top - margin), 0)
        x1 = min(int(math.ceil(right + margin)), rgb.shape[1])
        y1 = min(int(math.ceil(bottom + margin)), rgb.shape[0])
        scale = max(1.0, PREDICT_FACE_PX / size)
        region = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        if scale > 1.0:
            region = cv2.resize(region, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        scaled_box = dlib.rectangle(
            int(round((left - x0) * scale)), int(round((top - y0) * scale)),
            int(round((right - x0) * scale)), int(round((bottom - y0) * scale)),
        )
        shape = self._predictor(region, scaled_box)
        scaled = np.array([(point.x, point.y) for point in shape.parts()], dtype=np.float64)
        # cv2.resize puts source pixel centre x at scale * (x + 0.5) - 0.5.
        return (scaled + 0.5) / scale - 0.5 + np.array([x0, y0], dtype=np.float64)

    def _carried_box(self) -> np.ndarray | None:
        """The anchor box moved by the similarity taking the anchor's stable points to the previous frame's."""
        if self._anchor is None or self._previous is None:
            return None
        stable = list(EYE_CORNERS) + list(NOSE)
        source, target = self._anchor.points[stable], self._previous[stable]
        scale_rotation, shift = _similarity(source, target)
        left, top, right, bottom = self._anchor.box
        centre = scale_rotation * complex((left + right) / 2.0, (top + bottom) / 2.0) + shift
        half_width, half_height = abs(scale_rotation) * (right - left) / 2.0, abs(scale_rotation) * (bottom - top) / 2.0
        return np.array([
            centre.real - half_width, centre.imag - half_height, centre.real + half_width, centre.imag + half_height,
        ])

    def _detect(self, rgb: np.ndarray) -> tuple[int, int, int, int] | None:
        # Upsampling finds small faces but also invents faces in textures, so it is only the second try.
        for upsample in (0, 1):
            faces = self._detector(rgb, upsample)
            if len(faces):
                best = max(faces, key=lambda r: r.width() * r.height())
                return best.left(), best.top(), best.right(), best.bottom()
        return None

    def _detect_near(self, rgb: np.ndarray, box: np.ndarray) -> tuple[int, int, int, int] | None:
        left, top, right, bottom = (int(round(v)) for v in box)
        margin = max(right - left, bottom - top) // 2
        x0, y0 = max(left - margin, 0), max(top - margin, 0)
        x1, y1 = min(right + margin, rgb.shape[1]), min(bottom + margin, rgb.shape[0])
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        # The HOG window is 80 px: enlarge small regions so a small face is still found without dlib's upsampling.
        scale = max(1.0, 100.0 / max(right - left, 1))
        region = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        if scale > 1.0:
            region = cv2.resize(region, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        faces = self._detector(region, 0)
        if not len(faces):
            return None
        best = max(faces, key=lambda r: r.width() * r.height())
        return (
            x0 + round(best.left() / scale), y0 + round(best.top() / scale),
            x0 + round(best.right() / scale), y0 + round(best.bottom() / scale),
        )


@dataclass(frozen=True, slots=True)
class _Anchor:
    """A detection box and the points predicted in it, from which later boxes are carried."""

    box: np.ndarray     # (4,) left, top, right, bottom in px
    points: np.ndarray  # (68, 2) px


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    overlap = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - overlap
    return overlap / union if union > 0 else 0.0


def _similarity(points: np.ndarray, reference: np.ndarray) -> tuple[complex, complex]:
    """Least-squares similarity z -> a*z + b (complex a: scale and rotation) taking points (K, 2) to reference."""
    source = points[:, 0] + 1j * points[:, 1]
    target = reference[:, 0] + 1j * reference[:, 1]
    source_mean, target_mean = source.mean(), target.mean()
    centred = source - source_mean
    a = np.vdot(centred, target - target_mean) / max(np.vdot(centred, centred).real, 1e-12)
    return complex(a), complex(target_mean - a * source_mean)


# ---------------------------------------------------------------------------------------------------- geometry


def mouth_geometry(landmarks: np.ndarray) -> dict[str, np.ndarray]:
    """Per frame of (N, 68, 2) points: width |p48-p54| and inner aperture (mean of three lip gaps) in IOD, iod in px.

    Frames without a face (NaN rows) give NaN.
    """
    points = np.asarray(landmarks, dtype=np.float64).reshape(-1, 68, 2)
    iod = np.linalg.norm(points[:, 36] - points[:, 45], axis=1)
    width = np.linalg.norm(points[:, 48] - points[:, 54], axis=1) / iod
    gaps = [np.linalg.norm(points[:, upper] - points[:, lower], axis=1) for upper, lower in INNER_LIP_PAIRS]
    aperture = np.mean(gaps, axis=0) / iod
    return {"width": width, "aperture": aperture, "iod": iod}


def stack_landmarks(per_frame: Sequence[np.ndarray | None]) -> np.ndarray:
    """(N, 68, 2) array from `FaceMeasurer.landmarks` results, NaN where no face was found."""
    stacked = np.full((len(per_frame), 68, 2), np.nan)
    for index, points in enumerate(per_frame):
        if points is not None:
            stacked[index] = points
    return stacked


# ---------------------------------------------------------------------------------------------------- lip sync


def speech_envelope_db(audio: np.ndarray, audio_rate: int, hop_s: float, window_s: float) -> np.ndarray:
    """Speech-band (300-3400 Hz) energy in dB, one value per hop, each window centred on its hop.

    Zero-phase filtering keeps the envelope aligned with the audio, so any lag measured against it belongs to the
    video. Values are floored 50 dB below the loudest window so silence does not dominate a correlation.
    """
    sos = signal.butter(4, (300.0, 3400.0), btype="bandpass", fs=audio_rate, output="sos")
    band = signal.sosfiltfilt(sos, np.asarray(audio, dtype=np.float64))
    hop = max(1, round(hop_s * audio_rate))
    half = max(1, round(window_s * audio_rate / 2))
    power = np.concatenate(([0.0], np.cumsum(band**2)))
    centres = np.arange(0, len(band), hop)
    lo, hi = np.clip(centres - half, 0, len(band)), np.clip(centres + half, 0, len(band))
    mean_power = (power[hi] - power[lo]) / np.maximum(hi - lo, 1)
    level = 10.0 * np.log10(mean_power + 1e-12)
    return np.maximum(level, level.max() - 50.0)


def _frame_classes(phonemes: Sequence[dict], frame_count: int, fps: float) -> list[dict | None]:
    """The phoneme event under each frame's midpoint."""
    starts = np.array([event["start_ms"] for event in phonemes], dtype=np.float64)
    midpoints_ms = (np.arange(frame_count) + 0.5) * 1000.0 / fps
    indices = np.searchsorted(starts, midpoints_ms, side="right") - 1
    under = []
    for frame, index in enumerate(indices):
        inside = index >= 0 and midpoints_ms[frame] < phonemes[index]["end_ms"]
        under.append(phonemes[index] if inside else None)
    return under


def _runs(phonemes: Sequence[dict], keep) -> list[tuple[float, float]]:
    """(start_ms, end_ms) of maximal stretches of consecutive events that satisfy `keep`."""
    runs: list[tuple[float, float]] = []
    previous_kept = False
    for event in phonemes:
        kept = keep(event)
        if kept and previous_kept:
            runs[-1] = (runs[-1][0], event["end_ms"])
        elif kept:
            runs.append((event["start_ms"], event["end_ms"]))
        previous_kept = kept
    return runs


def _frames_within(start_ms: float, end_ms: float, fps: float, frame_count: int, tolerance_frames: int) -> np.ndarray:
    """Frames whose midpoint lies in [start, end) widened by whole frames on each side."""
    frame_ms = 1000.0 / fps
    midpoints_ms = (np.arange(frame_count) + 0.5) * frame_ms
    low, high = start_ms - tolerance_frames * frame_ms, end_ms + tolerance_frames * frame_ms
    return np.flatnonzero((midpoints_ms >= low) & (midpoints_ms < high))


def _centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-centroid accuracy on standardised features, averaged over classes (chance = 1/k).

    Averaging per class keeps a frequent class (open vowels) from hiding a class that is never recognised.
    """
    classes = np.unique(labels)
    if len(classes) < 2:
        return math.nan
    scaled = (features - features.mean(axis=0)) / np.maximum(features.std(axis=0), 1e-9)
    sums = {c: scaled[labels == c].sum(axis=0) for c in classes}
    counts = {c: int(np.sum(labels == c)) for c in classes}
    recalls = []
    for c in classes:
        correct = 0
        for x in scaled[labels == c]:
            distances = []
            for other in classes:
                n = counts[other] - (other == c)
                if n == 0:
                    distances.append(math.inf)
                    continue
                centroid = (sums[other] - (x if other == c else 0.0)) / n
                distances.append(float(np.sum((x - centroid) ** 2)))
            correct += classes[int(np.argmin(distances))] == c
        recalls.append(correct / counts[c])
    return float(np.mean(recalls))


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else math.nan


def lipsync_report(
    landmarks: np.ndarray,
    phonemes: Sequence[dict],
    audio: np.ndarray,
    audio_rate: int,
    fps: float,
    *,
    pause_edge_ms: float = 200.0,
    max_lag_ms: float = 200.0,
) -> dict:
    """Every lip-sync number of the acceptance, from (N, 68, 2) output landmarks and the speech's phoneme events.

    - closure_rate: share of p/b/m closures (runs of consecutive closed events count once: "mb" is one closure)
      during which some frame within +-1 frame of the run has aperture <= CLOSED_APERTURE.
    - spread_minus_round_width: median width over spread frames minus median over round frames.
    - open_over_spread_aperture: median aperture over open frames / median over spread frames.
    - pause_aperture_p90: 90th percentile of aperture over long-pause frames more than `pause_edge_ms` inside
      the pause (the mouth needs time to settle after speech and opens before the next word).
    - best_lag_ms: the shift L in +-max_lag_ms (5 ms steps) maximising corr(aperture(t), envelope(t - L));
      positive means the mouth moves after the sound.
    - long_m_closed_frames: per held /m/ (>= 100 ms), closed frames within +-1 frame of it; its minimum too.
    - vowel_closed_fraction: closed frames among vowel frames, leaving out frames within one frame of a closure.
    - centroid_accuracy: leave-one-out nearest-centroid accuracy (class-averaged) on (width, aperture) over
      closed/open/spread/round frames (open/spread/round frames within one frame of a closure left out).
    - envelope_correlation: Pearson correlation of aperture with the speech-band dB envelope at zero lag
      (envelope_correlation_at_best_lag alongside).
    """
    geometry = mouth_geometry(landmarks)
    aperture, width = geometry["aperture"], geometry["width"]
    frame_count = len(aperture)
    frame_ms = 1000.0 / fps
    closed = aperture <= CLOSED_APERTURE
    under = _frame_classes(phonemes, frame_count, fps)
    frame_class = np.array([event["class"] if event else "" for event in under])

    closures = [
        run for run in _runs(phonemes, lambda e: e["class"] == "closed")
        if run[0] < frame_count * frame_ms
    ]
    closure_hits = [
        bool(np.any(closed[_frames_within(start, end, fps, frame_count, 1)])) for start, end in closures
    ]

    near_closure = np.zeros(frame_count, dtype=bool)
    for start, end in closures:
        near_closure[_frames_within(start, end, fps, frame_count, 1)] = True
    vowel_frames = np.isin(frame_class, VOWEL_CLASSES) & ~near_closure & np.isfinite(aperture)

    pause_frames = np.zeros(frame_count, dtype=bool)
    for event in phonemes:
        if event["class"] == "long_pause":
            start, end = event["start_ms"] + pause_edge_ms, event["end_ms"] - pause_edge_ms
            if end > start:
                pause_frames[_frames_within(start, end, fps, frame_count, 0)] = True
    pause_apertures = aperture[pause_frames & np.isfinite(aperture)]

    long_m = [
        run for run in _runs(phonemes, lambda e: e["phoneme"] == "m")
        if run[1] - run[0] >= 100.0 and run[0] < frame_count * frame_ms
    ]
    long_m_closed = [int(np.sum(closed[_frames_within(s, e, fps, frame_count, 1)])) for s, e in long_m]

    hop_s = 0.005
    envelope = speech_envelope_db(audio, audio_rate, hop_s, 1.0 / fps)
    midpoints_s = (np.arange(frame_count) + 0.5) / fps
    valid = np.isfinite(aperture) & (midpoints_s < len(audio) / audio_rate)
    lags_ms = np.arange(-max_lag_ms, max_lag_ms + 0.5, hop_s * 1000.0)
    correlations = []
    for lag_ms in lags_ms:
        shifted = np.interp(midpoints_s[valid] - lag_ms / 1000.0, np.arange(len(envelope)) * hop_s, envelope)
        correlations.append(_pearson(aperture[valid], shifted))
    correlations_array = np.array(correlations)
    best = int(np.nanargmax(correlations_array)) if np.any(np.isfinite(correlations_array)) else None
    zero = int(np.argmin(np.abs(lags_ms)))

    # Vowel frames next to a closure may rightly show it (the closure's +-1 frame tolerance), so they are left out.
    labelled = (
        ((frame_class == "closed") | (np.isin(frame_class, VISEME_CLASSES) & ~near_closure))
        & np.isfinite(aperture) & np.isfinite(width)
    )
    features = np.stack([width[labelled], aperture[labelled]], axis=1)

    def class_median(values: np.ndarray, name: str) -> float:
        return _median(values[frame_class == name])

    open_aperture, spread_aperture = class_median(aperture, "open"), class_median(aperture, "spread")
    return {
        "frames": frame_count,
        "fps": fps,
        "closed_aperture": CLOSED_APERTURE,
        "closures": len(closures),
        "closure_rate": float(np.mean(closure_hits)) if closures else math.nan,
        "width_spread_median": class_median(width, "spread"),
        "width_round_median": class_median(width, "round"),
        "spread_minus_round_width": class_median(width, "spread") - class_median(width, "round"),
        "aperture_open_median": open_aperture,
        "aperture_spread_median": spread_aperture,
        "open_over_spread_aperture": open_aperture / max(spread_aperture, 1e-3),
        "pause_frames": int(len(pause_apertures)),
        "pause_aperture_p90": float(np.percentile(pause_apertures, 90)) if len(pause_apertures) else math.nan,
        "best_lag_ms": float(lags_ms[best]) if best is not None else math.nan,
        "long_m_closed_frames": long_m_closed,
        "long_m_closed_frames_min": min(long_m_closed) if long_m_closed else math.nan,
        "vowel_frames": int(np.sum(vowel_frames)),
        "vowel_closed_fraction": float(np.mean(closed[vowel_frames])) if np.any(vowel_frames) else math.nan,
        "centroid_accuracy": _centroid_accuracy(features, frame_class[labelled]),
        "envelope_correlation": float(correlations_array[zero]),
        "envelope_correlation_at_best_lag": float(correlations_array[best]) if best is not None else math.nan,
        "faces_missing": int(np.sum(~np.isfinite(aperture))),
    }


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 3 or np.std(a) < 1e-12 or np.std(b) < 1e-12:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


# ---------------------------------------------------------------------------------------------------- identity


def similarity_align(points: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map `points` (K, 2) onto `reference` (K, 2) by the least-squares similarity (scale, rotation, shift)."""
    a, b = _similarity(points, reference)
    mapped = a * (points[:, 0] + 1j * points[:, 1]) + b
    return np.stack([mapped.real, mapped.imag], axis=1)


def jitter_report(landmarks: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Eye-corner and nose jitter of (N, 68, 2) points, in units of the reference's IOD.

    Each frame's stable points (eye corners and nose) are mapped onto the reference by a similarity fitted on
    them, which removes head motion and zoom; what is left moves only if the points wobble. Jitter is the RMS
    length of the frame-to-frame second difference of those points: smooth motion scores 0, a point that
    alternates by d pixels scores 2d. Frames without a face are skipped (the sequence is cut there).
    """
    stable = list(EYE_CORNERS) + list(NOSE)
    reference_stable = np.asarray(reference, dtype=np.float64)[stable]
    reference_iod = float(np.linalg.norm(reference[36] - reference[45]))
    aligned = np.full((len(landmarks), len(stable), 2), np.nan)
    for index, points in enumerate(np.asarray(landmarks, dtype=np.float64)):
        if np.all(np.isfinite(points[stable])):
            aligned[index] = similarity_align(points[stable], reference_stable)
    second = aligned[2:] - 2.0 * aligned[1:-1] + aligned[:-2]
    lengths = np.linalg.norm(second, axis=2) / reference_iod
    eyes, nose = lengths[:, : len(EYE_CORNERS)], lengths[:, len(EYE_CORNERS):]

    def rms(values: np.ndarray) -> float:
        values = values[np.isfinite(values)]
        return float(np.sqrt(np.mean(values**2))) if len(values) else math.nan

    return {"jitter_eyes": rms(eyes), "jitter_nose": rms(nose), "jitter": max(rms(eyes), rms(nose))}


def identity_report(
    frames: Sequence[np.ndarray],
    portrait: np.ndarray,
    measurer: FaceMeasurer,
    *,
    descriptor_stride: int = 1,
) -> dict:
    """Is it still the portrait's face, and are its eyes and nose steady? Also returns the per-frame landmarks.

    descriptor_stride > 1 computes the (slow, ~50 ms) descriptor on every n-th frame only.
    """
    measurer.reset()
    portrait_points = measurer.landmarks(portrait)
    if portrait_points is None:
        raise ValueError("no face found in the portrait")
    portrait_descriptor = measurer.descriptor(portrait, portrait_points)
    measurer.reset()
    per_frame = [measurer.landmarks(frame) for frame in frames]
    distances = [
        float(np.linalg.norm(measurer.descriptor(frames[i], per_frame[i]) - portrait_descriptor))
        for i in range(0, len(frames), descriptor_stride)
        if per_frame[i] is not None
    ]
    landmarks = stack_landmarks(per_frame)
    return {
        "frames": len(frames),
        "faces_found": sum(points is not None for points in per_frame),
        "face_in_every_frame": all(points is not None for points in per_frame) and len(frames) > 0,
        "descriptor_distance_median": float(np.median(distances)) if distances else math.nan,
        "descriptor_distance_max": float(np.max(distances)) if distances else math.nan,
        **jitter_report(landmarks, portrait_points),
        "landmarks": landmarks,
    }


# ---------------------------------------------------------------------------------------------------- verdict


def passes(report: dict, thresholds: Thresholds = Thresholds()) -> list[str]:
    """Name every acceptance threshold the report misses (a lip-sync report, an identity report, or both merged).

    A metric that could not be measured (NaN) fails: a render must give the measurement a chance.
    """
    limits = {
        "closure_rate": (">=", thresholds.closure_rate_min),
        "spread_minus_round_width": (">=", thresholds.spread_minus_round_width_min),
        "open_over_spread_aperture": (">=", thresholds.open_over_spread_aperture_min),
        "pause_aperture_p90": ("<=", thresholds.pause_aperture_p90_max),
        "long_m_closed_frames_min": (">=", thresholds.long_m_closed_frames_min),
        "vowel_closed_fraction": ("<=", thresholds.vowel_closed_fraction_max),
        "centroid_accuracy": (">=", thresholds.centroid_accuracy_min),
        "envelope_correlation": (">=", thresholds.envelope_correlation_min),
        "descriptor_distance_median": ("<=", thresholds.descriptor_distance_median_max),
        "descriptor_distance_max": ("<=", thresholds.descriptor_distance_max_max),
        "jitter": ("<=", thresholds.jitter_max),
    }
    failures = []
    for name, (relation, limit) in limits.items():
        if name not in report:
            continue
        value = float(report[name])
        ok = value >= limit if relation == ">=" else value <= limit
        if not ok:  # NaN compares false, so it fails here too
            failures.append(f"{name} = {value:.4g} (needs {relation} {limit:g})")
    if "best_lag_ms" in report:
        lag = float(report["best_lag_ms"])
        if not abs(lag) <= thresholds.best_lag_abs_ms_max:
            failures.append(f"best_lag_ms = {lag:.4g} (needs within +-{thresholds.best_lag_abs_ms_max:g})")
    if "face_in_every_frame" in report and not report["face_in_every_frame"]:
        failures.append(f"face_in_every_frame: found in {report['faces_found']} of {report['frames']} frames")
    return failures


def _jsonable(report: dict) -> dict:
    return {key: value for key, value in report.items() if not isinstance(value, np.ndarray)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.quality", description=__doc__.split("\n")[0])
    parser.add_argument("video", type=Path)
    parser.add_argument("phonemes", type=Path, help="NAME.phonemes.json from examples/make_speech.py")
    parser.add_argument("--portrait", type=Path, default=Path("examples/astronaut.png"))
    parser.add_argument("--audio", type=Path, help="speech the phonemes time (default: NAME.wav beside the JSON, "
                        "else the video's own audio)")
    parser.add_argument("--descriptor-stride", type=int, default=1)
    args = parser.parse_args(argv)

    phonemes = json.loads(args.phonemes.read_text())
    beside = args.phonemes.with_name(args.phonemes.name.removesuffix(".phonemes.json") + ".wav")
    audio_path = args.audio or (beside if beside.exists() else args.video)
    audio, audio_rate = read_audio(audio_path)
    frames, fps = read_video(args.video)
    portrait = cv2.imread(str(args.portrait), cv2.IMREAD_COLOR)
    if portrait is None:
        raise FileNotFoundError(f"cannot read portrait {args.portrait}")

    identity = identity_report(frames, portrait, FaceMeasurer(), descriptor_stride=args.descriptor_stride)
    lipsync = lipsync_report(identity["landmarks"], phonemes, audio, audio_rate, fps)
    failures = passes({**lipsync, **identity})
    print(json.dumps({"lipsync": lipsync, "identity": _jsonable(identity), "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
