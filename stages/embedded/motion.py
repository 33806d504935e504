"""Embedded motion: speech (16 kHz mono) -> one `Expression` per video frame, with no model weights.

`EmbeddedMotion` takes each hop's mouth target (`visemes`), groups hops into video frames, looks one hop ahead for
lip closures, smooths the mouth asymmetrically and adds seeded blinks and a small head motion; `IdleMotion` is the
face at rest between utterances. Every step is causal in hop order, so a stream pushed in 20 ms chunks yields
exactly the frames of one push.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from stages.audio import FEATURE_RATE_HZ
from stages.embedded.visemes import HopTargets, SpeakerNormaliser, SpectralAnalyser
from stream.clock import FrameClock, seconds_of_ms


@dataclass(frozen=True, slots=True)
class Expression:
    """What the face does during one video frame; lengths are fractions of the eye-corner distance (IOD).

    The renderer turns these targets into landmark moves so that the *measured* geometry of the output
    (dlib's 68 points) follows them: aperture 0 means the lips touch, width 0 means the portrait's own width.
    """

    index: int                 # video frame number in the stream
    aperture: float = 0.0      # inner-lip opening (0 closed; speech peaks ≈ 0.25–0.35)
    width: float = 0.0         # mouth-width change: + spread ("ee"), - round ("oo"); about ±0.08
    blink: float = 0.0         # eyelid closure, 0 open .. 1 shut
    head_roll_deg: float = 0.0 # in-plane head rotation about the neck pivot
    head_dx: float = 0.0       # head shift right, fraction of IOD
    head_dy: float = 0.0       # head shift down (nod), fraction of IOD


@dataclass(frozen=True, slots=True)
class FrameTarget:
    """What one video frame asks of the mouth, before smoothing."""

    aperture: float      # IOD
    width: float         # IOD
    lips_closed: bool    # a p/b/m closure: shut now, whatever the smoothing
    silent: bool         # nothing audible in the frame: a pause, or the closure of a /t/ or /k/
    speech: float        # 0..1, loudest hop of the frame


class BlinkSchedule:
    """Seeded blinks the way people blink: every 2-6 s, held back while the speech is loud, and now and then at the
    end of a phrase. Each one varies: the lids close in 60-80 ms, stay shut 50-70 ms and reopen in 90-130 ms, so a
    blink shows on 3-6 frames at 25 fps (120-240 ms), and the eyes are exactly open again after it.
    """

    CLOSE_S, HOLD_S, OPEN_S = (0.060, 0.080), (0.050, 0.070), (0.090, 0.130)
    INTERVAL_S = (2.0, 6.0)
    LOUD = 0.6                 # speech activity at which a blink that falls due waits ...
    WAIT_S = (0.3, 0.8)        # ... this long (at most twice)
    PHRASE_END_CHANCE = 0.5    # a phrase's end (loud, then silent) brings the next blink forward this often
    MIN_GAP_S = 1.5            # but never this soon after the last one

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.next_start_s = float(rng.uniform(*self.INTERVAL_S))
        self.current_start_s = -math.inf
        self.last_start_s = 0.0       # the phrase-end rule's gap counts from the stream's start too
        self.phases = self._phases()
        self.waited = 0
        self.loud_until_s = -math.inf

    def _phases(self) -> tuple[float, float, float]:
        return (float(self.rng.uniform(*self.CLOSE_S)), float(self.rng.uniform(*self.HOLD_S)),
                float(self.rng.uniform(*self.OPEN_S)))

    def value(self, time_s: float, speech: float = 0.0) -> float:
        """Lid closure at `time_s` (0 open .. 1 shut) given the speech activity 0..1 there; times must not decrease
        between calls."""
        if speech >= 0.4:
            self.loud_until_s = time_s
        elif (speech < 0.1 and 0.0 < time_s - self.loud_until_s < 0.1
              and time_s - self.last_start_s > self.MIN_GAP_S and self.next_start_s - time_s > 0.5
              and self.rng.random() < self.PHRASE_END_CHANCE):
            self.next_start_s = time_s + float(self.rng.uniform(0.05, 0.2))
            self.loud_until_s = -math.inf
        while time_s >= self.next_start_s:
            if speech >= self.LOUD and self.waited < 2:
                self.next_start_s += float(self.rng.uniform(*self.WAIT_S))
                self.waited += 1
                continue
            self.current_start_s = self.last_start_s = self.next_start_s
            self.waited = 0
            self.phases = self._phases()
            self.next_start_s += sum(self.phases) + float(self.rng.uniform(*self.INTERVAL_S))
        close_s, hold_s, open_s = self.phases
        phase = time_s - self.current_start_s
        if phase < close_s:
            return 0.5 - 0.5 * math.cos(math.pi * phase / close_s)
        if phase < close_s + hold_s:
            return 1.0
        phase -= close_s + hold_s
        if phase < open_s:
            return 0.5 + 0.5 * math.cos(math.pi * phase / open_s)
        return 0.0


class HeadMotion:
    """The head, driven by the speech: nods on stressed syllables and at the start of a phrase, a slow turn and tilt
    while talking, and back to the photo's pose in the silences (a faint sway stays: the face is alive at rest).

    A nod is a kick to a critically damped spring on the head's vertical shift (the head dips and comes back in about
    0.4 s); a syllable counts as stressed when its loudness jumps well above the running level. The turn and tilt are
    seeded drifts (2.5-8 s periods) scaled by the envelope of talking, which rises in 0.5 s and falls in 0.3 s. Every
    amplitude is multiplied by `scale` (the preset's `motion.head_scale`; 0 keeps the photo's pose).
    """

    NOD_IOD = 0.1              # a full-strength kick (the dip it gives peaks at about 0.22 of this)
    PHRASE_NOD_IOD = 0.14      # a phrase's first syllable nods harder
    NOD_HZ = 2.2               # the springs' natural frequency: a nod is over in about 0.4 s
    STRESS_JUMP = 0.2          # loudness over the running level that makes a syllable stressed
    NOD_GAP_S = 0.25           # at most one nod this often
    PAUSE_S = 0.3              # silence that ends a phrase
    TURN_IOD, TILT_DEG = 0.04, 2.5     # drifts at full envelope
    REST_TURN_IOD, REST_TILT_DEG = 0.0015, 0.08  # the sway at rest
    RISE_S, FALL_S = 0.5, 0.3
    TALKING = 0.3              # speech activity from which the drifts take their full amplitude
    LEVEL_S = 0.3              # the running loudness a stress is measured against

    def __init__(self, rng: np.random.Generator, frame_s: float, scale: float = 1.0) -> None:
        self.frame_s = frame_s
        self.scale = scale
        self.freqs_hz = rng.uniform(0.12, 0.4, size=(3, 2))
        self.phases = rng.uniform(0.0, 2.0 * math.pi, size=(3, 2))
        self.rise = 1.0 - math.exp(-frame_s / self.RISE_S)
        self.fall = 1.0 - math.exp(-frame_s / self.FALL_S)
        self.level_alpha = 1.0 - math.exp(-frame_s / self.LEVEL_S)
        self.stage1 = self.envelope = self.level = 0.0
        self.nod = self.nod_speed = self.drive = self.drive_speed = 0.0
        self.last_nod_s = -math.inf
        self.quiet_s = math.inf

    def pose(self, time_s: float, speech: float) -> tuple[float, float, float]:
        """(roll °, dx IOD, dy IOD) at `time_s` given this frame's speech activity 0..1 (frames in order)."""
        if not self.scale:
            return 0.0, 0.0, 0.0
        self._kick(time_s, speech)
        # A kick moves a spring whose position the head's own spring follows: the nod starts and ends softly.
        omega = 2.0 * math.pi * self.NOD_HZ
        self.drive, self.drive_speed = _spring(self.drive, self.drive_speed, 0.0, omega, self.frame_s)
        self.nod, self.nod_speed = _spring(self.nod, self.nod_speed, self.drive, omega, self.frame_s)
        talking = min(1.0, speech / self.TALKING)
        for stage in ("stage1", "envelope"):
            source = talking if stage == "stage1" else self.stage1
            current = getattr(self, stage)
            setattr(self, stage, current + (self.rise if source > current else self.fall) * (source - current))
        waves = np.sin(2.0 * math.pi * self.freqs_hz * time_s + self.phases) @ np.array([0.6, 0.4])
        tilt = self.REST_TILT_DEG + self.TILT_DEG * self.envelope
        turn = self.REST_TURN_IOD + self.TURN_IOD * self.envelope
        return (self.scale * tilt * float(waves[0]), self.scale * turn * float(waves[1]),
                self.scale * (self.nod + 0.5 * turn * float(waves[2])))

    def _kick(self, time_s: float, speech: float) -> None:
        phrase_start = speech > 0.4 and self.quiet_s >= self.PAUSE_S
        self.quiet_s = self.quiet_s + self.frame_s if speech < 0.1 else 0.0
        stressed = speech > 0.5 and speech - self.level > self.STRESS_JUMP
        self.level += self.level_alpha * (speech - self.level)
        if (phrase_start or stressed) and time_s - self.last_nod_s >= self.NOD_GAP_S:
            strength = self.PHRASE_NOD_IOD if phrase_start else self.NOD_IOD * min(1.0, speech)
            self.drive_speed += 2.0 * math.pi * self.NOD_HZ * strength
            self.last_nod_s = time_s


def _spring(position: float, speed: float, target: float, omega: float, step: float) -> tuple[float, float]:
    """One step of a critically damped spring towards `target` (y'' = -w^2 (y - target) - 2 w y'), exact for a
    target held over the step: smooth and stable at any frame rate."""
    offset = position - target
    decay, carry = math.exp(-omega * step), speed + omega * offset
    return target + (offset + carry * step) * decay, (speed - omega * carry * step) * decay


class IdleMotion:
    """The face while nobody speaks in a live session: seeded blinks and the head's slow sway at rest, asked for
    frame by frame at the live clock's media time (never through the speech pipeline)."""

    def __init__(self, *, fps: Fraction | int, seed: int = 0, head_scale: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.blinks = BlinkSchedule(np.random.default_rng(rng.integers(2**63)))
        self.head = HeadMotion(np.random.default_rng(rng.integers(2**63)), float(1 / Fraction(fps)), head_scale)

    def at(self, index: int, time_s: float) -> Expression:
        """The pose of frame `index` at media time `time_s` (times must not decrease between calls)."""
        roll, dx, dy = self.head.pose(time_s, 0.0)
        return Expression(index, 0.0, 0.0, self.blinks.value(time_s), roll, dx, dy)


class EmbeddedMotion:
    """16 kHz mono float32 speech -> Expressions, streaming, bounded memory, fixed look-ahead.

    Frame k covers samples [k, k+1) * sample_rate_hz / fps and is emitted once audio up to its end plus
    `lookahead_ms` has been pushed (or at `finish`). Hop features are computed in batches but consumed in hop
    order by causal state, so the output does not depend on how the audio was chunked.
    """

    WINDOW_MS = 32
    LPC_ORDER = 18
    OPEN_TAU_S = 0.050
    CLOSE_TAU_S = 0.100
    SHAPE_TAU_S = 0.040
    BLOCK_HOPS = 256       # a long push is worked through in blocks of this many hops: bounded memory
    REST_APERTURE = 0.005  # below this a relaxing mouth counts as at rest

    def __init__(self, *, fps: Fraction | int, sample_rate_hz: int = FEATURE_RATE_HZ, hop_ms: int = 20,
                 lookahead_ms: int = 40, seed: int = 0, head_scale: float = 1.0) -> None:
        self.clock = FrameClock(Fraction(fps), sample_rate_hz)
        self.hop = self.clock.samples_of_ms(hop_ms)
        self.window = self.clock.samples_of_ms(self.WINDOW_MS)
        self.lookahead = self.clock.samples_of_ms(lookahead_ms)
        if self.lookahead < self.window // 2:
            raise ValueError(f"lookahead_ms={lookahead_ms} is under half the {self.WINDOW_MS} ms analysis window")
        self.frame_s = seconds_of_ms(self.clock.frame_ms)
        self.analyser = SpectralAnalyser(sample_rate_hz=sample_rate_hz, window=self.window, lpc_order=self.LPC_ORDER)
        self.normaliser = SpeakerNormaliser()
        rng = np.random.default_rng(seed)
        self.blinks = BlinkSchedule(np.random.default_rng(rng.integers(2**63)))
        self.head = HeadMotion(np.random.default_rng(rng.integers(2**63)), self.frame_s, head_scale)
        self.open_alpha = 1.0 - math.exp(-self.frame_s / self.OPEN_TAU_S)
        self.close_alpha = 1.0 - math.exp(-self.frame_s / self.CLOSE_TAU_S)
        self.shape_alpha = 1.0 - math.exp(-self.frame_s / self.SHAPE_TAU_S)
        self.aperture = 0.0
        self.width = 0.0
        self.relaxing = False
        self.silent_run = 0
        self.next_frame = 0
        self.finished = False
        self._start_segment(0)

    def _start_segment(self, origin: int) -> None:
        """Restart the hop grid at absolute sample `origin` (stream start, or where an interrupt cut the audio)."""
        self.origin = origin
        self.received = origin                      # absolute samples pushed so far
        self.pad = self.window // 2 - self.hop // 2  # hop j's window is centred on its 20 ms span
        self.audio = np.zeros(self.pad, dtype=np.float32)
        self.audio_start = origin - self.pad        # absolute sample index of audio[0]
        self.next_hop = 0
        self.hops: list[HopTargets] = []
        self.hops_start = 0                         # hop index of hops[0]

    def push(self, pcm: np.ndarray) -> list[Expression]:
        """Add speech (any length); returns every frame now complete, in order."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        samples = np.asarray(pcm, dtype=np.float32).reshape(-1)
        block = self.BLOCK_HOPS * self.hop
        frames: list[Expression] = []
        for begin in range(0, len(samples), block):
            piece = samples[begin : begin + block]
            self.audio = np.concatenate((self.audio, piece))
            self.received += len(piece)
            frames += self._emit(self.received - self.lookahead)
        return frames

    def finish(self) -> list[Expression]:
        """End of stream: emits the rest, so that ceil(total_samples / samples_per_frame) frames came out in all."""
        if self.finished:
            return []
        self.finished = True
        last_frame = self.clock.frames_for(self.received)
        tail = self.clock.start(last_frame) + self.lookahead + self.window - self.received
        self.audio = np.concatenate((self.audio, np.zeros(max(tail, 0), dtype=np.float32)))
        frames: list[Expression] = []
        for stop in range(self.next_frame, last_frame, self.BLOCK_HOPS // 2):
            frames += self._emit_until(min(stop + self.BLOCK_HOPS // 2, last_frame))
        return frames

    def interrupt(self) -> None:
        """Barge-in: drop audio not yet shown; the mouth relaxes from where it is, blinks and head go on."""
        self.relaxing = True
        self._start_segment(self.clock.start(self.next_frame))

    def _emit(self, covered_until: int) -> list[Expression]:
        """Emit frames whose end lies at or before absolute sample `covered_until`."""
        frame = self.next_frame
        while self.clock.start(frame + 1) <= covered_until:
            frame += 1
        return self._emit_until(frame)

    def _emit_until(self, stop_frame: int) -> list[Expression]:
        if stop_frame <= self.next_frame:
            return []
        self._analyse_hops(self._hop_for_window_end(self.clock.start(stop_frame) + self.lookahead))
        out = [self._frame(k) for k in range(self.next_frame, stop_frame)]
        self.next_frame = stop_frame
        self._forget_before(self._hops_of(stop_frame)[0])
        return out

    def _hop_for_window_end(self, end: int) -> int:
        """Number of hops (from 0) whose windows end at or before absolute sample `end`."""
        first_window_end = self.origin - self.pad + self.window
        return max((end - first_window_end) // self.hop + 1, 0)

    def _analyse_hops(self, stop_hop: int) -> None:
        while self.next_hop < stop_hop:
            batch = min(stop_hop - self.next_hop, self.BLOCK_HOPS)
            begin = self.origin - self.pad + self.next_hop * self.hop - self.audio_start
            span = self.audio[begin : begin + (batch - 1) * self.hop + self.window]
            windows = np.lib.stride_tricks.sliding_window_view(span, self.window)[:: self.hop]
            features = self.analyser.analyse(windows)
            for j in range(batch):
                self.hops.append(self.normaliser.targets(
                    float(features.band_db[j]), float(features.low_ratio[j]), float(features.high_ratio[j]),
                    float(features.f1_hz[j]), float(features.f2_hz[j])))
            self.next_hop += batch

    def _hops_of(self, frame: int) -> range:
        """Hops whose centres fall inside the frame; the hop under the frame centre if none do (fps > 50)."""
        first_centre = self.origin + self.hop // 2
        start, end = self.clock.start(frame), self.clock.start(frame + 1)
        first = max(-(-(start - first_centre) // self.hop), 0)
        stop = max(-(-(end - first_centre) // self.hop), 0)
        if stop <= first:
            first = max((start + end) // 2 - self.origin, 0) // self.hop
            stop = first + 1
        return range(first, stop)

    def _forget_before(self, hop: int) -> None:
        """Keep memory bounded: drop hop targets and audio that no future frame will read."""
        drop = min(hop, self.next_hop) - self.hops_start
        if drop > 0:
            del self.hops[:drop]
            self.hops_start += drop
        keep_from = self.origin - self.pad + self.next_hop * self.hop - self.audio_start
        if keep_from > 0:
            self.audio = self.audio[keep_from:]
            self.audio_start += keep_from

    def _frame(self, k: int) -> Expression:
        hop_range = self._hops_of(k)
        hops = [self.hops[j - self.hops_start] for j in hop_range]
        # The look-ahead hop counts only if its window ends inside the look-ahead, whatever has been analysed.
        ahead_fits = hop_range.stop < self._hop_for_window_end(self.clock.start(k + 1) + self.lookahead)
        target = self._mouth_target(hops, self.hops[hop_range.stop - self.hops_start] if ahead_fits else None)

        if self.relaxing and target.speech > 0.3:
            self.relaxing = False
        # One silent frame may be the closure of a /t/ or /k/ (the lips stay apart): it closes smoothly;
        # from the second one on it is a pause, and the mouth goes to rest.
        self.silent_run = self.silent_run + 1 if target.silent else 0
        shut = target.lips_closed or self.silent_run > 1
        if shut and not self.relaxing:
            self.aperture = 0.0
        else:
            alpha = self.open_alpha if target.aperture > self.aperture else self.close_alpha
            self.aperture += alpha * (target.aperture - self.aperture)
        if self.relaxing and self.aperture < self.REST_APERTURE:
            self.relaxing = False
        self.width += self.shape_alpha * (target.width - self.width)

        centre_s = (self.clock.start(k) + self.clock.start(k + 1)) / 2 / self.clock.rate_hz
        blink = self.blinks.value(centre_s, target.speech)
        roll, dx, dy = self.head.pose(centre_s, target.speech)
        return Expression(k, self.aperture, self.width, blink, roll, dx, dy)

    @staticmethod
    def _mouth_target(hops: list[HopTargets], ahead: HopTargets | None) -> FrameTarget:
        """One frame's target from its hops and, where the look-ahead holds it, the hop after it."""
        # Half a vote for the next hop cancels most of the smoothing lag of an opening mouth.
        weighted = [(h.aperture, 1.0) for h in hops] + ([(ahead.aperture, 0.5)] if ahead is not None else [])
        aperture = sum(a * w for a, w in weighted) / sum(w for _, w in weighted)
        width = sum(h.width for h in hops) / len(hops)
        ahead_closes = ahead is not None and ahead.closure
        # A mostly silent frame before a lip release is the closure of a /p/ or /b/: shut before the burst.
        lips_closed = any(h.closure for h in hops) or (hops[-1].silent and hops[0].loudness < 0.5 and ahead_closes)
        if ahead_closes:
            aperture *= 0.5  # lips start closing a hop before a p/b/m is heard
        silent = all(h.silent for h in hops) and not lips_closed
        return FrameTarget(aperture, width, lips_closed, silent, max(h.loudness for h in hops))
