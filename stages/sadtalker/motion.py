"""SadTalker motion: speech -> 3DMM coefficients -> driving keypoints for the facevid2vid renderer.

Two paths compute the same function (spec §1.3–1.10):
- `offline_coefficients`: upstream's, on a whole utterance: audio2exp per frame, audio2pose in 32-frame chunks
  with one seeded latent per chunk, a Savitzky–Golay (13, 2) filter over the whole pose sequence. Parity is checked
  on it and `quality` file renders use it.
- `SadTalkerMotion`: streaming. It deviates from upstream only where upstream looks far ahead, each by a knob:
  `pose_lookahead_frames` (upstream decodes a pose chunk from 32 frames of audio at once: with less look-ahead a
  frame is decoded from the 32-frame window ending that many frames after it, with its chunk's latent),
  `pose_lag_frames` (the smoother's delay: 12 reproduces the whole-sequence filter exactly; less fits the quadratic
  on the frames that have arrived) and `mapping_future_frames` (MappingNet's ±13-frame window with its future half
  edge-replicated past that many frames). With 31 / 12 / 13 it equals the offline path frame for frame.
A frame's latency is mapping_future + pose_lag + pose_lookahead frames plus the mel window's 160 ms (`MEL_LEAD_MS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stages.nets.mapping import keypoint_transformation
from stages.sadtalker.mel import (
    MEL_WINDOW_STEPS,
    SAMPLES_PER_FRAME,
    MelStream,
    first_columns,
    mel_windows,
    sadtalker_mel,
)

POSE_CHUNK = 32                  # audio2pose's sequence length
MAPPING_RADIUS = 13              # MappingNet sees frames t-13 .. t+13
SMOOTH_WINDOW = 13               # Savitzky–Golay window and order (upstream's savgol_filter(pose, 13, 2))
SMOOTH_ORDER = 2
POSE_STYLES = 46
BLINK_SHAPE = np.array([0.5, 0.9, 1.0, 0.9, 0.5], np.float32)
BLINK_GAP_FRAMES = (10, 70)      # a blink starts every 10..69 frames (upstream's range, without its T//2 cap)


@dataclass(frozen=True, slots=True)
class DrivingSettings:
    """What the user chooses about the motion ([backends.sadtalker] and the preset's look-ahead)."""

    pose_style: int = 0                 # 0..45: a learned offset of audio2pose's latent
    expression_scale: float = 1.0
    still: bool = False                 # the head keeps the portrait's pose (and crop parameters)
    blink: bool = True
    seed: int = 0                       # pose latents and blink times
    mapping_future_frames: int = MAPPING_RADIUS
    pose_lookahead_frames: int = POSE_CHUNK - 1
    pose_lag_frames: int = SMOOTH_WINDOW - 1
    head_scale: float = 1.0             # the head's motion away from the portrait's pose (the preset's motion knob)


@dataclass(frozen=True, slots=True)
class SourceMotion:
    """What the portrait contributes to every frame: its coefficients and its canonical keypoints."""

    coefficients: np.ndarray     # (70,) exp|angle|trans, or (73,) with the crop parameters of the full modes
    kp_canonical: torch.Tensor   # (1, 15, 3)

    @property
    def pose(self) -> np.ndarray:
        return self.coefficients[64:70]


@dataclass(frozen=True, slots=True)
class DrivingFrame:
    """The driving keypoints of one video frame."""

    index: int
    keypoints: torch.Tensor      # (15, 3) on the renderer's device


def blink_ratios(first: int, count: int, seed: int) -> np.ndarray:
    """Eye-blink ratio per frame, (count, 1): a 5-frame blink every 10–69 frames, seeded and independent of the
    stream's length so that a stream and a file give the same blinks (upstream draws them unseeded per video)."""
    rng = np.random.default_rng(seed)
    ratios = np.zeros(first + count + len(BLINK_SHAPE), np.float32)
    start = int(rng.integers(*BLINK_GAP_FRAMES))
    while start < first + count:
        ratios[start:start + len(BLINK_SHAPE)] = BLINK_SHAPE
        start += int(rng.integers(*BLINK_GAP_FRAMES))
    return ratios[first:first + count, None]


def fit_weights(offsets: np.ndarray, order: int = SMOOTH_ORDER) -> np.ndarray:
    """Weights that evaluate, at offset 0, the least-squares polynomial through samples at `offsets`."""
    degree = min(order, len(offsets) - 1)
    design = np.vander(offsets.astype(np.float64), degree + 1, increasing=True)
    return np.linalg.pinv(design)[0]


def smoothing_window(frame: int, total: int) -> range:
    """Upstream's filter window for `frame` in a sequence of `total` (scipy's savgol_filter, mode 'interp')."""
    width = min(SMOOTH_WINDOW, total if total % 2 else total - 1)
    low = min(max(frame - width // 2, 0), total - width)
    return range(low, low + width)


def smooth_pose(pose: np.ndarray) -> np.ndarray:
    """Savitzky–Golay (13, 2) over the whole sequence, as upstream (shorter sequences: the largest odd window)."""
    total = len(pose)
    if total < SMOOTH_ORDER + 1:
        return pose.copy()
    out = np.empty_like(pose)
    for frame in range(total):
        window = smoothing_window(frame, total)
        out[frame] = fit_weights(np.asarray(window) - frame) @ pose[window.start:window.stop]
    return out


def mapping_indices(frame: int, last: int) -> np.ndarray:
    """The 27 coefficient frames MappingNet sees for `frame`, clamped to [0, last] (edge replication)."""
    return np.clip(np.arange(frame - MAPPING_RADIUS, frame + MAPPING_RADIUS + 1), 0, last)


def pose_latents(seed: int, chunks: range) -> np.ndarray:
    """(len(chunks), 64) N(0, I) latents, one per pose chunk; each drawn from (seed, chunk) alone, so a stream and a
    file, or two runs, give chunk k the same latent whatever was drawn before (upstream draws them unseeded)."""
    return np.stack([np.random.default_rng((seed, chunk)).standard_normal(64) for chunk in chunks]).astype(np.float32)


class MotionNetworks:
    """audio2exp, audio2pose and MappingNet with the source's contribution, called in float32 batches."""

    def __init__(self, audio2exp: Any, audio2pose: Any, mapping: Any, source: SourceMotion,
                 settings: DrivingSettings, device: torch.device | str) -> None:
        self.audio2exp = audio2exp
        self.audio2pose = audio2pose
        self.mapping = mapping
        self.source = source
        self.settings = settings
        self.device = torch.device(device)
        self.reference = torch.as_tensor(source.coefficients, device=self.device)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array, np.float32)).to(self.device)

    def expressions(self, windows: np.ndarray, ratios: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16) mel windows + (n, 1) blink ratios -> (n, 64) expression coefficients."""
        count = len(windows)
        reference = self.reference[:64].expand(1, count, 64)
        with torch.inference_mode():
            exp = self.audio2exp(self._tensor(windows)[None], reference, self._tensor(ratios)[None])
        return exp[0].float().cpu().numpy()

    def pose_embeddings(self, windows: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16) -> (n, 512): audio2pose's audio encoder, once per frame."""
        with torch.inference_mode():
            return self.audio2pose.embed_audio(self._tensor(windows)[None])[0].float().cpu().numpy()

    def pose_motion(self, latents: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        """(b, 64) latents + (b, 32, 512) embeddings -> (b, 32, 6) motion relative to the source pose."""
        count = len(latents)
        reference = self.reference[64:70].expand(count, 6)
        style = torch.full((count,), self.settings.pose_style, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            motion = self.audio2pose.decode(self._tensor(latents), self._tensor(embeddings), reference, style)
        return motion.float().cpu().numpy()

    def keypoints(self, windows: np.ndarray) -> torch.Tensor:
        """(b, 70|73, 27) coefficient windows -> (b, 15, 3) driving keypoints."""
        with torch.inference_mode():
            head = self.mapping(self._tensor(windows))
            canonical = self.source.kp_canonical.to(self.device).expand(len(windows), -1, -1)
            return keypoint_transformation(canonical, head)

    def frame_coefficients(self, exp: np.ndarray, pose: np.ndarray) -> np.ndarray:
        """Per-frame renderer coefficients: scaled expression, pose (the source's when still; its motion away from
        the source's scaled by `head_scale` otherwise), crop parameters."""
        count = len(exp)
        source = self.source.coefficients
        rest = np.broadcast_to(self.source.pose, (count, 6))
        pose = rest if self.settings.still else rest + self.settings.head_scale * (pose - rest)
        parts = [exp * self.settings.expression_scale, pose]
        if len(source) > 70:
            parts.append(np.broadcast_to(source[70:], (count, len(source) - 70)))
        return np.concatenate(parts, axis=1).astype(np.float32)

    def windows_of(self, coefficients: np.ndarray, frames: range, last: int, future: int) -> np.ndarray:
        """(len(frames), C, 27) MappingNet inputs, the future half cut at `future` frames."""
        return np.stack([coefficients[np.minimum(mapping_indices(t, last), t + future)].T for t in frames])


def offline_coefficients(networks: MotionNetworks, wav16k: np.ndarray) -> np.ndarray:
    """Upstream's coefficients (T, 70|73) for a whole utterance of 16 kHz mono float32 speech."""
    settings = networks.settings
    total = len(wav16k) // SAMPLES_PER_FRAME
    if total == 0:
        return np.zeros((0, len(networks.source.coefficients)), np.float32)
    mel = sadtalker_mel(wav16k)
    windows = mel_windows(mel, 0, total)
    ratios = blink_ratios(0, total, settings.seed) if settings.blink else np.zeros((total, 1), np.float32)
    exp = networks.expressions(windows, ratios)
    if settings.still:
        pose = np.broadcast_to(networks.source.pose, (total, 6))
    else:
        pose = networks.source.pose + offline_pose_motion(networks, windows)
        pose = smooth_pose(pose)
    return networks.frame_coefficients(exp, pose)


def offline_pose_motion(networks: MotionNetworks, windows: np.ndarray) -> np.ndarray:
    """(T, 6) motion: frame 0 still, frames 1.. in 32-frame chunks, the remainder from the last 32 windows."""
    total = len(windows)
    generated = total - 1
    motion = np.zeros((total, 6), np.float32)
    if generated == 0:
        return motion
    embeddings = networks.pose_embeddings(windows[1:])
    full, rest = divmod(generated, POSE_CHUNK)
    latents = pose_latents(networks.settings.seed, range(full + (rest > 0)))
    if full:
        chunks = embeddings[:full * POSE_CHUNK].reshape(full, POSE_CHUNK, -1)
        motion[1:1 + full * POSE_CHUNK] = networks.pose_motion(latents[:full], chunks).reshape(-1, 6)
    if rest:
        motion[total - rest:] = networks.pose_motion(latents[full:], _last_chunk(embeddings)[None])[0, -rest:]
    return motion


def _last_chunk(embeddings: np.ndarray) -> np.ndarray:
    """The last 32 embeddings, front-padded with the first one when fewer exist (upstream's remainder chunk)."""
    tail = embeddings[-POSE_CHUNK:]
    if len(tail) < POSE_CHUNK:
        tail = np.concatenate([np.repeat(tail[:1], POSE_CHUNK - len(tail), axis=0), tail])
    return tail


def offline_keypoints(networks: MotionNetworks, coefficients: np.ndarray, batch: int = 32) -> torch.Tensor:
    """(T, 15, 3) driving keypoints from the whole coefficient sequence (±13-frame windows)."""
    last = len(coefficients) - 1
    parts = [networks.keypoints(networks.windows_of(coefficients, range(start, min(start + batch, last + 1)), last,
                                                    MAPPING_RADIUS))
             for start in range(0, last + 1, batch)]
    return torch.cat(parts) if parts else torch.zeros(0, 15, 3)


class _Rows:
    """Rows indexed by absolute frame (or mel column) number that forgets the ones no window needs any more, so a
    session of hours keeps a few seconds of state and appends in constant time."""

    def __init__(self, width: int) -> None:
        self.data = np.zeros((0, width), np.float32)
        self.base = 0

    @property
    def stop(self) -> int:
        return self.base + len(self.data)

    def append(self, rows: np.ndarray) -> None:
        if len(rows):
            self.data = np.concatenate([self.data, rows.astype(np.float32)])

    def get(self, start: int, stop: int) -> np.ndarray:
        if start < self.base:
            raise IndexError(f"row {start} was forgotten (rows kept from {self.base})")
        return self.data[start - self.base:stop - self.base]

    def forget_before(self, index: int) -> None:
        cut = min(index, self.stop)
        if cut > self.base:
            self.data = self.data[cut - self.base:]
            self.base = cut


class _UtteranceMotion:
    """Streaming state between two interruptions, indexed by frame from the utterance's start."""

    def __init__(self, networks: MotionNetworks) -> None:
        self.networks = networks
        self.settings = networks.settings
        self.mel_stream = MelStream()
        self.mel = _Rows(80)                     # mel columns, one per row
        self.samples = 0
        self.ended = False
        self.total: int | None = None            # frames of the utterance, known at its end
        self.exp = _Rows(64)
        self.embeddings = _Rows(512)             # frame i + 1's at row i (frame 0 has none)
        self.raw_pose: dict[int, np.ndarray] = {0: networks.source.pose.astype(np.float32)}
        self.chunks: dict[int, np.ndarray] = {}
        self.smoothed = _Rows(6)
        self.coefficients = _Rows(len(networks.source.coefficients))
        self.emitted = 0

    # --- audio -> per-frame features -----------------------------------------------------------------------
    def add(self, pcm: np.ndarray) -> None:
        self.samples += len(pcm)
        self._add_mel(self.mel_stream.push(pcm))

    def end(self) -> None:
        self.ended = True
        self.total = self.samples // SAMPLES_PER_FRAME
        self._add_mel(self.mel_stream.end())

    def _add_mel(self, columns: np.ndarray) -> None:
        self.mel.append(columns.T)
        ready = self._frames_with_mel()
        start = self.exp.stop
        if ready <= start:
            return
        windows = mel_windows(self.mel.data.T, start, ready - start, self.mel.base)
        ratios = (blink_ratios(start, ready - start, self.settings.seed) if self.settings.blink
                  else np.zeros((ready - start, 1), np.float32))
        self.exp.append(self.networks.expressions(windows, ratios))
        self.mel.forget_before(max(0, int(first_columns(ready))))
        if not self.settings.still and ready > max(start, 1):
            self.embeddings.append(self.networks.pose_embeddings(windows[max(start, 1) - start:]))

    def _frames_with_mel(self) -> int:
        """Frames whose mel window is final: all of them at the end, else those whose last column has arrived."""
        if self.ended:
            return self.total or 0
        whole = self.samples // SAMPLES_PER_FRAME
        frame = self.exp.stop
        while frame < whole and int(first_columns(frame)) + MEL_WINDOW_STEPS - 1 < self.mel.stop:
            frame += 1
        return frame

    # --- pose -----------------------------------------------------------------------------------------------
    def _latent(self, chunk: int) -> np.ndarray:
        return pose_latents(self.settings.seed, range(chunk, chunk + 1))

    def _chunk_motion(self, chunk: int) -> np.ndarray:
        """(32, 6) motion of a whole pose chunk (frames 32·chunk + 1 ..), decoded once."""
        if chunk not in self.chunks:
            end = POSE_CHUNK * (chunk + 1)
            rows = self.embeddings.get(end - POSE_CHUNK, end)
            self.chunks[chunk] = self.networks.pose_motion(self._latent(chunk), rows[None])[0]
        return self.chunks[chunk]

    def _window_ending(self, end: int) -> np.ndarray:
        """The 32 embeddings of the frames up to `end`, front-padded with frame 1's when fewer exist."""
        return _last_chunk(self.embeddings.get(max(0, end - POSE_CHUNK), end))

    def _raw_pose_ready(self, frame: int) -> bool:
        """Decode `frame`'s pose when what its rule needs has arrived. The rule depends only on the frame, the
        look-ahead and (near the end) the utterance's length, never on how the audio was chunked:
        - its whole chunk lies within the look-ahead: the chunk, as upstream decodes it;
        - else the 32-frame window ending `pose_lookahead_frames` after it, with its chunk's latent;
        - else (that window passes the end) upstream's remainder window, the last 32 frames."""
        if frame in self.raw_pose:
            return True
        embedded = self.embeddings.stop          # frames 1..embedded have embeddings
        chunk = (frame - 1) // POSE_CHUNK
        chunk_end = POSE_CHUNK * (chunk + 1)
        window_end = frame + self.settings.pose_lookahead_frames
        if chunk_end <= window_end and embedded >= chunk_end:
            motion = self._chunk_motion(chunk)[frame - (chunk_end - POSE_CHUNK + 1)]
        elif chunk_end > window_end and embedded >= window_end:
            motion = self.networks.pose_motion(self._latent(chunk), self._window_ending(window_end)[None])[0, -1]
        elif self.ended:
            last = (self.total or 0) - 1
            window = self._window_ending(last)
            motion = self.networks.pose_motion(self._latent(chunk), window[None])[0, POSE_CHUNK - 1 - (last - frame)]
        else:
            return False
        self.raw_pose[frame] = self.networks.source.pose + motion
        return True

    def _smoothed_ready(self, frame: int) -> bool:
        """Smooth `frame` over upstream's window when that ends within the lag, else over the frames up to the lag;
        frames whose lag reaches past the end use upstream's window for the utterance's length."""
        if frame < self.smoothed.stop:
            return True
        lag_end = frame + self.settings.pose_lag_frames
        total = self.total or 0
        if self.ended and lag_end > total - 1:
            window = smoothing_window(frame, total) if total > SMOOTH_ORDER else range(frame, frame + 1)
        else:
            low = max(frame - SMOOTH_WINDOW // 2, 0)
            window = (range(low, low + SMOOTH_WINDOW) if low + SMOOTH_WINDOW - 1 <= lag_end
                      else range(max(0, lag_end - SMOOTH_WINDOW + 1), lag_end + 1))
        if not all(self._raw_pose_ready(t) for t in window):
            return False
        samples = np.stack([self.raw_pose[t] for t in window])
        self.smoothed.append((fit_weights(np.asarray(window) - frame) @ samples)[None])
        return True

    # --- coefficients -> keypoints -------------------------------------------------------------------------
    def _extend_coefficients(self) -> None:
        start = frame = self.coefficients.stop
        while frame < self.exp.stop and (self.settings.still or self._smoothed_ready(frame)):
            frame += 1
        if frame > start:
            pose = (np.zeros((frame - start, 6), np.float32) if self.settings.still
                    else self.smoothed.get(start, frame))
            self.coefficients.append(self.networks.frame_coefficients(self.exp.get(start, frame), pose))
            self._forget(frame)

    def _forget(self, next_frame: int) -> None:
        """Drop what no later frame can need: windows reach 13 frames back (mapping), the smoother 12 (raw pose),
        a pose window 32 frames before its end and a chunk back to its start."""
        self.exp.forget_before(next_frame)
        self.smoothed.forget_before(next_frame)
        oldest_raw = next_frame - SMOOTH_WINDOW
        for frame in [frame for frame in self.raw_pose if frame < oldest_raw]:
            del self.raw_pose[frame]
        for chunk in [chunk for chunk in self.chunks if POSE_CHUNK * (chunk + 1) < oldest_raw]:
            del self.chunks[chunk]
        self.embeddings.forget_before(max(0, POSE_CHUNK * ((oldest_raw - 1) // POSE_CHUNK) - POSE_CHUNK))

    def drain(self) -> tuple[int, torch.Tensor]:
        """(first frame, (n, 15, 3) keypoints) for every frame whose mapping window is now complete."""
        self._extend_coefficients()
        known = self.coefficients.stop
        future = self.settings.mapping_future_frames
        stop = min((self.total or 0) if self.ended else max(known - future, self.emitted), known)
        start = self.emitted
        if stop <= start:
            return start, torch.zeros(0, 15, 3)
        last = (self.total - 1) if self.ended and self.total else known - 1
        first = max(0, start - MAPPING_RADIUS)
        rows = self.coefficients.get(first, known)
        windows = np.stack([rows[np.minimum(mapping_indices(t, last), t + future) - first].T
                            for t in range(start, stop)])
        self.emitted = stop
        self.coefficients.forget_before(max(0, stop - MAPPING_RADIUS))
        return start, self.networks.keypoints(windows)


class SadTalkerMotion:
    """The streaming motion model for `MotionStage`: 16 kHz speech in, `DrivingFrame`s out, in order."""

    def __init__(self, networks: MotionNetworks) -> None:
        self.networks = networks
        self.offset = 0                     # stream frame index of the current utterance's frame 0
        self.utterance = _UtteranceMotion(networks)
        self.finished = False

    def push(self, pcm: np.ndarray) -> list[DrivingFrame]:
        if self.finished:
            raise RuntimeError("push() after finish()")
        self.utterance.add(np.asarray(pcm, np.float32).reshape(-1))
        return self._drain()

    def finish(self) -> list[DrivingFrame]:
        if self.finished:
            return []
        self.finished = True
        self.utterance.end()
        return self._drain()

    def interrupt(self) -> None:
        """Barge-in: the next speech starts a new utterance (upstream's state per video) at the next frame."""
        self.offset += self.utterance.emitted
        self.utterance = _UtteranceMotion(self.networks)

    def _drain(self) -> list[DrivingFrame]:
        start, keypoints = self.utterance.drain()
        return [DrivingFrame(self.offset + start + row, keypoints[row]) for row in range(len(keypoints))]


class OfflineMotion:
    """Upstream's whole-utterance motion for file renders: speech is gathered, every frame comes at the end."""

    def __init__(self, networks: MotionNetworks) -> None:
        self.networks = networks
        self.parts: list[np.ndarray] = []
        self.offset = 0
        self.finished = False

    def push(self, pcm: np.ndarray) -> list[DrivingFrame]:
        if self.finished:
            raise RuntimeError("push() after finish()")
        self.parts.append(np.asarray(pcm, np.float32).reshape(-1))
        return []

    def finish(self) -> list[DrivingFrame]:
        if self.finished:
            return []
        self.finished = True
        wav = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        keypoints = offline_keypoints(self.networks, offline_coefficients(self.networks, wav))
        return [DrivingFrame(self.offset + row, keypoints[row]) for row in range(len(keypoints))]

    def interrupt(self) -> None:
        self.parts = []
