"""Live pacing: one session clock, the voice as the master, video frames sent at absolute deadlines.

A live session lays its speech out on one media timeline. Speech that arrives while nobody speaks opens an
*utterance* at the first video frame slot at least `latency_ms` ahead (the render latency it must hide); its voice
plays from that instant, contiguously, and its frames fill the slots from there on, in order. Slots that no utterance
covers show idle frames made just in time, so new speech waits behind nothing. A frame not rendered by its deadline
is replaced by a repeat of the last frame sent, and dropped when it arrives; a sender far behind its deadlines moves
the clock's origin instead of bursting, so timestamps stay contiguous. Interruption forgets every utterance at once.

Knows nothing about faces: frames are opaque; the senders (aiortc tracks, a preview) ask `video_at(slot)` and
`audio_at(block)` when their deadline comes (`wait_for`), each from its own cursor on the same clock.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Protocol

import numpy as np

from stream.clock import MS_PER_S, FrameClock, ns_of_ms, ns_of_samples, samples_of_ns, seconds_of_ns


class Clock(Protocol):
    """Monotonic nanoseconds, and a way to wait until one of them (tests pass a fake)."""

    def now_ns(self) -> int: ...

    async def sleep_until(self, deadline_ns: int) -> None: ...


class MonotonicClock:
    def now_ns(self) -> int:
        return time.monotonic_ns()

    async def sleep_until(self, deadline_ns: int) -> None:
        delay = deadline_ns - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(seconds_of_ns(delay))


@dataclass(frozen=True, slots=True)
class Timing:
    """The media grid of a live session: video frame slots, audio blocks, the voice's sample rate."""

    fps: Fraction
    rate_hz: int                  # the voice as sent
    block_ms: int = 20            # audio frames: what a WebRTC packet carries

    def __post_init__(self) -> None:
        if (self.rate_hz / self.fps).denominator != 1:
            raise ValueError(f"{self.rate_hz} Hz does not divide into whole frames at {self.fps} fps")

    @property
    def frame_samples(self) -> int:
        """Voice samples per video frame (1920 at 48 kHz and 25 fps)."""
        return int(self.rate_hz / self.fps)

    @property
    def block_samples(self) -> int:
        """Voice samples per audio block (960 in 20 ms at 48 kHz)."""
        return FrameClock(Fraction(MS_PER_S, self.block_ms), self.rate_hz).start(1)

    def slot_ns(self, slot: int) -> int:
        return ns_of_samples(slot * self.frame_samples, self.rate_hz)

    def block_ns(self, block: int) -> int:
        return ns_of_samples(block * self.block_samples, self.rate_hz)

    def first_slot_from(self, offset_ns: int) -> int:
        """The first slot that starts at or after media time `offset_ns`."""
        return -(-samples_of_ns(max(0, offset_ns), self.rate_hz) // self.frame_samples)


@dataclass(slots=True)
class _ScheduledUtterance:
    """An utterance on the live schedule: its voice, and its frames as the renderer delivers them."""

    first_slot: int
    first_sample: int                 # where its voice starts on the media timeline (its first slot's start)
    opened_ns: int                    # when its first speech arrived (clock time)
    voice: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    played: int = 0                   # voice samples before `voice[0]` that were already sent and let go
    ended: bool = False
    frames: dict[int, Any] = field(default_factory=dict)   # slot -> frame, as they come
    delivered: int = 0

    @property
    def samples(self) -> int:
        return self.played + len(self.voice)

    @property
    def end_sample(self) -> int:
        return self.first_sample + self.samples


@dataclass(slots=True)
class PacingStats:
    """What the senders did (for /metrics)."""

    speech_frames: int = 0
    idle_frames: int = 0
    repeated_frames: int = 0
    dropped_frames: int = 0
    reanchors: int = 0
    speech_latency_ns: int = 0        # the last utterance's: from its first speech in to its first frame out
    least_slack_ns: int | None = None # the least time a speech frame arrived before its deadline (< 0: late)


class LivePacer:
    """The media timeline of one live session: what each video slot shows and each audio block plays.

    Speech goes in as voice samples at `timing.rate_hz` (`speak`), cut into utterances (`end_utterance`); rendered
    frames go in in order (`deliver`), each belonging to the oldest utterance still owed frames: an utterance of n
    frames' worth of voice is owed exactly n frames (the caller pads its speech to whole frames).
    """

    def __init__(self, timing: Timing, clock: Clock | None = None, *, latency_ms: float = 120.0,
                 reanchor_ms: float = 300.0) -> None:
        self.timing = timing
        self.clock = clock or MonotonicClock()
        self.latency_ns = ns_of_ms(latency_ms)
        self.reanchor_ns = ns_of_ms(reanchor_ms)
        self.origin_ns: int | None = None
        self.stats = PacingStats()
        self._utterances: deque[_ScheduledUtterance] = deque()
        self._next_slot = 0           # the first video slot not sent yet
        self._next_sample = 0         # the first voice sample not sent yet
        self._late_frames = 0         # frames still to come for utterances already let go: dropped
        self._last_frame: Any = None

    # ------------------------------------------------------------------------------------------------ the clock

    def start(self) -> None:
        """The start barrier: media time 0 is now. Called once, when both senders are ready."""
        if self.origin_ns is None:
            self.origin_ns = self.clock.now_ns()

    def deadline_ns(self, offset_ns: int) -> int:
        """When media time `offset_ns` is due on the wall clock (the same for both senders)."""
        if self.origin_ns is None:
            raise RuntimeError("the pacer has not started")
        return self.origin_ns + offset_ns

    async def wait_for(self, offset_ns: int) -> None:
        """Sleep until media time `offset_ns` is due; far behind it, re-anchor first (no burst to catch up)."""
        late = self.clock.now_ns() - self.deadline_ns(offset_ns)
        if late > self.reanchor_ns:
            assert self.origin_ns is not None  # deadline_ns raised otherwise
            self.origin_ns += late
            self.stats.reanchors += 1
        await self.clock.sleep_until(self.deadline_ns(offset_ns))

    def _media_now_ns(self) -> int:
        return 0 if self.origin_ns is None else self.clock.now_ns() - self.origin_ns

    # ------------------------------------------------------------------------------------------------ speech in

    def speak(self, voice: np.ndarray) -> None:
        """Voice samples (int16 mono at `timing.rate_hz`) that just arrived. After silence they open an utterance
        at the first free slot `latency_ms` from now; while one is open they extend it."""
        current = self._utterances[-1] if self._utterances else None
        if current is None or current.ended:
            slot = max(self.timing.first_slot_from(self._media_now_ns() + self.latency_ns), self._next_slot,
                       self._first_free_slot())
            current = _ScheduledUtterance(slot, slot * self.timing.frame_samples, self.clock.now_ns())
            self._utterances.append(current)
        if len(voice):
            current.voice = np.concatenate([current.voice, np.asarray(voice, np.int16).reshape(-1)])

    def end_utterance(self) -> None:
        """The open utterance gets no more speech (its voice must be whole frames long)."""
        if self._utterances and not self._utterances[-1].ended:
            current = self._utterances[-1]
            if current.samples % self.timing.frame_samples:
                raise ValueError("an utterance must end on a frame boundary: pad its speech to whole frames")
            current.ended = True

    @property
    def open_voice_ends_ns(self) -> int | None:
        """Media time where the open utterance's voice runs out (None without one): the speech source must end it
        or extend it before then."""
        if not self._utterances or self._utterances[-1].ended:
            return None
        return ns_of_samples(self._utterances[-1].end_sample, self.timing.rate_hz)

    def _frames(self, utterance: _ScheduledUtterance) -> int:
        return utterance.samples // self.timing.frame_samples

    def _slots(self, utterance: _ScheduledUtterance) -> int:
        return -(-utterance.samples // self.timing.frame_samples)

    def _first_free_slot(self) -> int:
        return self._utterances[-1].first_slot + self._slots(self._utterances[-1]) if self._utterances else 0

    # ------------------------------------------------------------------------------------------------ frames in

    def deliver(self, frame: Any) -> None:
        """The next rendered frame of the speech, in order. One whose slot has been sent is dropped."""
        if self._late_frames:
            self._late_frames -= 1
            self.stats.dropped_frames += 1
            return
        utterance = next((u for u in self._utterances if u.delivered < self._frames(u)), None)
        if utterance is None:
            return  # a frame of no known speech: the caller interrupted, or did not announce its speech
        slot = utterance.first_slot + utterance.delivered
        utterance.delivered += 1
        if self.origin_ns is not None:
            slack = self.deadline_ns(self.timing.slot_ns(slot)) - self.clock.now_ns()
            least = self.stats.least_slack_ns
            self.stats.least_slack_ns = slack if least is None else min(least, slack)
        if slot < self._next_slot:
            self.stats.dropped_frames += 1
        else:
            utterance.frames[slot] = frame

    def interrupt(self) -> None:
        """Barge-in: every utterance ends now; what was said and rendered for them is forgotten. The caller flushes
        the renderer too (its frames in flight are never delivered)."""
        self._utterances.clear()
        self._late_frames = 0

    @property
    def queued_voice_ns(self) -> int:
        """Voice scheduled past the media time now (ns)."""
        if not self._utterances:
            return 0
        return max(0, ns_of_samples(self._utterances[-1].end_sample, self.timing.rate_hz) - self._media_now_ns())

    @property
    def buffered_frames(self) -> int:
        """Rendered frames waiting for their slot."""
        return sum(len(utterance.frames) for utterance in self._utterances)

    @property
    def speaking(self) -> bool:
        """Whether any voice or frame is still to be sent."""
        return bool(self._utterances)

    # ------------------------------------------------------------------------------------------------ media out

    def video_at(self, slot: int) -> tuple[Any, str]:
        """What slot `slot` shows: its speech frame ("speech"), the last frame again when that one is late
        ("repeat"), or (None, "idle") where no speech plays: the caller makes an idle frame just in time."""
        self._next_slot = max(self._next_slot, slot + 1)
        # An open utterance also covers the slot of its partial last frame: more voice is on its way.
        utterance = next((u for u in self._utterances if u.first_slot <= slot < u.first_slot + self._slots(u)), None)
        if utterance is not None and slot == utterance.first_slot:
            self.stats.speech_latency_ns = self.clock.now_ns() - utterance.opened_ns
        if utterance is not None and slot in utterance.frames:
            self._last_frame, kind = utterance.frames.pop(slot), "speech"
            self.stats.speech_frames += 1
        elif utterance is not None and self._last_frame is not None:
            kind = "repeat"
            self.stats.repeated_frames += 1
        else:
            self._last_frame, kind = None, "idle"
            self.stats.idle_frames += 1
        self._let_go()
        return self._last_frame, kind

    def shown(self, frame: Any) -> None:
        """The idle frame the caller made for the last idle slot: what a late speech frame repeats."""
        self._last_frame = frame

    def audio_at(self, block: int) -> np.ndarray:
        """Block `block` of the voice (int16, `timing.block_samples` long): speech where an utterance plays,
        silence elsewhere. Never waits for anything."""
        size = self.timing.block_samples
        start = block * size
        out = np.zeros(size, np.int16)
        for utterance in self._utterances:
            begin, end = max(start, utterance.first_sample), min(start + size, utterance.end_sample)
            if begin < end:
                offset = utterance.first_sample + utterance.played
                out[begin - start:end - start] = utterance.voice[begin - offset:end - offset]
        self._next_sample = max(self._next_sample, start + size)
        for utterance in self._utterances:  # the voice already sent is let go
            sent = min(max(0, self._next_sample - utterance.first_sample - utterance.played), len(utterance.voice))
            if sent:
                utterance.voice = utterance.voice[sent:]
                utterance.played += sent
        self._let_go()
        return out

    def _let_go(self) -> None:
        """Forget ended utterances whose voice and slots are all sent; their frames still to come are dropped."""
        while self._utterances:
            first = self._utterances[0]
            frames = self._frames(first)
            if not first.ended or first.first_slot + frames > self._next_slot or first.end_sample > self._next_sample:
                return
            self._late_frames += frames - first.delivered
            self._utterances.popleft()
