"""Hours without drift: the live pacer run through 10 simulated hours of speech and silence on a fake clock, with a
clock that jumps (a suspended machine), a video sender that stalls and an audio sender that stalls.

The voice is the master clock and every frame is placed on the same media timeline as its speech, so whatever the
clock and the senders do, the first frame of each utterance goes out stamped with the instant its voice starts, and
every later frame stays on its own slot of that voice: the audio/video offset never grows.
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest

from stream.clock import NS_PER_S, ns_of_samples
from stream.pacing import LivePacer, Timing

TIMING = Timing(Fraction(25), 48000)
FRAME_NS = TIMING.slot_ns(1)
HOUR_NS = 3600 * NS_PER_S


class EventClock:
    """Simulated time for two senders: it moves to the earliest deadline once both are asleep, so each one runs
    exactly when its deadline comes, and jumps when the test says the machine slept."""

    def __init__(self, senders: int = 2) -> None:
        self.now = 5 * NS_PER_S
        self.senders = senders
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._count = 0

    def now_ns(self) -> int:
        return self.now

    async def sleep_until(self, deadline_ns: int) -> None:
        if deadline_ns <= self.now:
            return
        self._count += 1
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline_ns, self._count, woken))
        self._advance()
        await woken

    def leave(self) -> None:
        """A sender is done: time no longer waits for it."""
        self.senders -= 1
        self._advance()

    def _advance(self) -> None:
        if self._sleepers and len(self._sleepers) >= self.senders:
            deadline, _, first = heapq.heappop(self._sleepers)
            self.now = max(self.now, deadline)
            first.set_result(None)


@dataclass
class Ledger:
    """What went out: where each utterance's voice starts on the audio timeline, where each of its frames was
    shown on the video timeline (both media ns, as their RTP timestamps say)."""

    voice_start_ns: dict[int, int] = field(default_factory=dict)
    frame_ns: dict[tuple[int, int], int] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=lambda: {"speech": 0, "repeat": 0, "idle": 0})


async def simulate(hours: float, seed: int = 0) -> tuple[Ledger, LivePacer]:
    """A speaker (a TTS: an utterance of 0.5-8 s said at once, its frames rendered at once, then 0.5-6 s of
    silence), a video sender and an audio sender, each on its own task; at 30 % of the run the machine sleeps for
    7 s, at 60 % the video sender is stuck for 3 s (an encoder, a GC pause) while the audio goes on, at 80 % the
    audio sender is stuck for 2 s."""
    rng = np.random.default_rng(seed)
    clock = EventClock()
    pacer = LivePacer(TIMING, clock, latency_ms=120)
    ledger = Ledger()
    pacer.start()
    end_ns = int(hours * HOUR_NS)
    jump = {"at": int(0.3 * end_ns)}

    def media_now() -> int:
        assert pacer.origin_ns is not None
        return clock.now - pacer.origin_ns

    def maybe_jump(media: int) -> None:
        if "at" in jump and media >= jump["at"]:
            clock.now += 7 * NS_PER_S
            del jump["at"]

    async def video() -> None:
        try:
            await send_video()
        finally:
            clock.leave()

    async def audio() -> None:
        try:
            await send_audio()
        finally:
            clock.leave()

    async def send_video() -> None:
        utterance, next_speech_ns, stalled = 0, NS_PER_S, False
        for slot in range(end_ns // FRAME_NS):
            maybe_jump(TIMING.slot_ns(slot))
            if not stalled and TIMING.slot_ns(slot) >= 0.6 * end_ns:
                stalled = True
                await clock.sleep_until(clock.now + 3 * NS_PER_S)
            await pacer.wait_for(TIMING.slot_ns(slot))
            if media_now() >= next_speech_ns and not pacer.speaking:
                utterance += 1
                frames = int(rng.integers(12, 200))
                pacer.speak(np.full(frames * TIMING.frame_samples, utterance % 30000 + 1, np.int16))
                pacer.end_utterance()
                for index in range(frames):
                    pacer.deliver((utterance % 30000, index))
                next_speech_ns = media_now() + frames * FRAME_NS + int(rng.uniform(0.5, 6.0) * NS_PER_S)
            frame, kind = pacer.video_at(slot)
            ledger.kinds[kind] += 1
            if kind == "idle":
                pacer.shown(("idle", slot))
            elif kind == "speech":
                ledger.frame_ns[frame] = TIMING.slot_ns(slot)

    async def send_audio() -> None:
        stalled = False
        for block in range(end_ns // TIMING.block_ns(1)):
            maybe_jump(TIMING.block_ns(block))
            if not stalled and TIMING.block_ns(block) >= 0.8 * end_ns:
                stalled = True
                await clock.sleep_until(clock.now + 2 * NS_PER_S)
            await pacer.wait_for(TIMING.block_ns(block))
            samples = pacer.audio_at(block)
            voiced = np.flatnonzero(samples)
            if len(voiced):
                ledger.voice_start_ns.setdefault(int(samples[voiced[0]]) - 1, ns_of_samples(
                    block * TIMING.block_samples + int(voiced[0]), TIMING.rate_hz))

    await asyncio.gather(video(), audio())
    return ledger, pacer


@pytest.mark.slow  # 10 simulated hours: 900,000 video slots and 1,800,000 audio blocks (about a minute)
def test_ten_hours_of_speech_and_silence_keep_every_frame_on_its_voice() -> None:
    ledger, pacer = asyncio.run(simulate(hours=10.0))
    assert len(ledger.voice_start_ns) > 3000                   # utterances, every one heard
    assert pacer.stats.reanchors >= 3                          # the sleep and both stalls moved the clock's origin
    offsets = np.array([shown_ns - (ledger.voice_start_ns[utterance] + index * FRAME_NS)
                        for (utterance, index), shown_ns in ledger.frame_ns.items()])
    # Every speech frame went out stamped exactly where its stretch of voice starts, in hour 1 as in hour 10 (the
    # issue asks for less than a frame; by construction it is none).
    assert len(offsets) == ledger.kinds["speech"] and not offsets.any()
    assert ledger.kinds["speech"] > 0.3 * sum(ledger.kinds.values())
    assert ledger.kinds["repeat"] <= 3 * 100                   # only where a stall or the sleep caught a frame late
