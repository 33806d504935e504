"""Live pacing on a fake clock: one origin for both senders, the voice as master, late frames repeated then dropped,
re-anchoring when far behind, interruption forgetting everything queued."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import numpy as np
import pytest

from stream.pacing import LivePacer, Timing

TIMING = Timing(Fraction(25), 48000)
FRAME = TIMING.frame_samples   # 1920 voice samples per video frame at 48 kHz


class FakeClock:
    """Time moves only when a sender sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000
        self.sleeps: list[int] = []

    def now_ns(self) -> int:
        return self.now

    async def sleep_until(self, deadline_ns: int) -> None:
        self.sleeps.append(deadline_ns)
        self.now = max(self.now, deadline_ns)


def show(pacer: LivePacer, slot: int) -> tuple[object, str]:
    """What a sender shows at `slot`: an idle frame made on the spot where the pacer has none."""
    frame, kind = pacer.video_at(slot)
    if kind == "idle":
        frame = f"idle {slot}"
        pacer.shown(frame)
    return frame, kind


def voice(frames: int, value: int = 1000) -> np.ndarray:
    return np.full(frames * FRAME, value, np.int16)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pacer(clock: FakeClock) -> LivePacer:
    pacer = LivePacer(TIMING, clock, latency_ms=120)
    pacer.start()
    return pacer


def test_video_and_audio_stamp_the_same_instant_with_the_same_deadline(pacer: LivePacer) -> None:
    # Slot 5 (200 ms) and block 10 (200 ms) are the same media instant: same offset, same wall deadline.
    assert TIMING.slot_ns(5) == TIMING.block_ns(10) == 200_000_000
    assert pacer.deadline_ns(TIMING.slot_ns(5)) == pacer.deadline_ns(TIMING.block_ns(10)) == pacer.origin_ns + 200e6
    # In 90 kHz video ticks and 48 kHz audio samples, the steps are +3600 and +960.
    assert TIMING.slot_ns(1) * 90_000 // 1_000_000_000 == 3600
    assert TIMING.block_samples == 960 and TIMING.block_ns(1) == 20_000_000


def test_speech_opens_at_the_first_slot_past_the_latency_and_plays_in_sync(pacer: LivePacer) -> None:
    pacer.speak(voice(3, 700))
    pacer.end_utterance()
    # 120 ms ahead of media time 0: slot 3. Its voice starts at block 6 (120 ms), the frames at slot 3.
    for frame in ("a", "b", "c"):
        pacer.deliver(frame)
    shown = [show(pacer, slot) for slot in range(8)]
    assert [kind for _, kind in shown] == ["idle"] * 3 + ["speech"] * 3 + ["idle"] * 2
    assert [frame for frame, _ in shown[3:6]] == ["a", "b", "c"]
    blocks = [pacer.audio_at(block) for block in range(14)]
    assert not any(blocks[block].any() for block in range(6))
    assert all((blocks[block] == 700).all() for block in range(6, 12))
    assert not any(blocks[block].any() for block in (12, 13))
    assert not pacer.speaking


def test_the_latency_from_speech_in_to_its_first_frame_out_is_measured(clock: FakeClock, pacer: LivePacer) -> None:
    clock.now += 130_000_000                  # speech arrives 130 ms into the session: 250 ms is the first slot past
    pacer.speak(voice(2))                     # 130 + 120 ms (slot 7 starts at 280 ms)
    pacer.end_utterance()
    pacer.deliver("a")
    for slot in range(7):
        asyncio.run(pacer.wait_for(TIMING.slot_ns(slot)))
        show(pacer, slot)
    assert pacer.stats.speech_latency_ns == 0
    asyncio.run(pacer.wait_for(TIMING.slot_ns(7)))
    assert show(pacer, 7) == ("a", "speech")
    assert pacer.stats.speech_latency_ns == 150_000_000


def test_a_late_frame_is_repeated_at_its_deadline_then_dropped(clock: FakeClock, pacer: LivePacer) -> None:
    pacer.speak(voice(3))
    pacer.end_utterance()
    pacer.deliver("a")
    assert show(pacer, 3) == ("a", "speech")
    assert show(pacer, 4) == ("a", "repeat")     # "b" is late: the last frame holds the cadence
    clock.now = pacer.deadline_ns(TIMING.slot_ns(4)) + 5_000_000
    pacer.deliver("b")                                     # ... and "b" arrives after its slot: dropped
    pacer.deliver("c")
    assert show(pacer, 5) == ("c", "speech")
    assert (pacer.stats.repeated_frames, pacer.stats.dropped_frames) == (1, 1)
    assert pacer.stats.least_slack_ns == -5_000_000


def test_frames_owed_to_a_finished_utterance_are_not_given_to_the_next(pacer: LivePacer) -> None:
    pacer.speak(voice(2, 100))
    pacer.end_utterance()
    for slot in range(6):
        show(pacer, slot)
    for block in range(12):
        pacer.audio_at(block)
    assert not pacer.speaking                              # both its frames never came; it is over
    pacer.speak(voice(1, 200))
    pacer.end_utterance()
    pacer.deliver("late first")
    pacer.deliver("late second")
    pacer.deliver("new")
    shown = [show(pacer, slot) for slot in range(6, 20)]
    assert [frame for frame, kind in shown if kind == "speech"] == ["new"]
    assert pacer.stats.dropped_frames == 2


def test_new_speech_preempts_idle_at_the_next_free_slot(clock: FakeClock, pacer: LivePacer) -> None:
    for slot in range(10):
        show(pacer, slot)
    clock.now += 400_000_000                               # media time 400 ms: slot 10 is next
    pacer.speak(voice(1))
    pacer.end_utterance()
    pacer.deliver("hello")
    kinds = {slot: show(pacer, slot)[1] for slot in range(10, 16)}
    assert kinds == {10: "idle", 11: "idle", 12: "idle", 13: "speech", 14: "idle", 15: "idle"}


def test_a_far_behind_sender_reanchors_instead_of_bursting(clock: FakeClock, pacer: LivePacer) -> None:
    origin = pacer.origin_ns
    asyncio.run(pacer.wait_for(TIMING.slot_ns(1)))
    assert clock.now == origin + 40_000_000
    clock.now += 2_000_000_000                             # the loop stalled for two seconds
    asyncio.run(pacer.wait_for(TIMING.slot_ns(2)))
    assert pacer.stats.reanchors == 1
    assert pacer.origin_ns > origin + 1_900_000_000        # the origin moved: slot 2 is due now, not 2 s ago
    late_deadline = pacer.deadline_ns(TIMING.slot_ns(3))
    asyncio.run(pacer.wait_for(TIMING.slot_ns(3)))
    assert clock.now == late_deadline and late_deadline - pacer.deadline_ns(TIMING.slot_ns(2)) == 40_000_000
    clock.now += 100_000_000                               # a little late: no re-anchor, the next one just runs
    asyncio.run(pacer.wait_for(TIMING.slot_ns(4)))
    assert pacer.stats.reanchors == 1


def test_interrupt_forgets_voice_and_frames_at_once(pacer: LivePacer) -> None:
    pacer.speak(voice(50, 500))
    pacer.end_utterance()
    for frame in range(10):
        pacer.deliver(frame)
    assert show(pacer, 3) == (0, "speech") and pacer.audio_at(6).any()
    pacer.interrupt()
    assert not pacer.speaking
    assert not pacer.audio_at(7).any()
    assert show(pacer, 4) == ("idle 4", "idle")
    pacer.deliver("stale")                                 # a frame of the flushed speech finds no utterance
    assert show(pacer, 5)[1] == "idle"


def test_an_utterance_must_end_on_a_frame_boundary(pacer: LivePacer) -> None:
    pacer.speak(np.zeros(FRAME + 5, np.int16))
    with pytest.raises(ValueError, match="whole frames"):
        pacer.end_utterance()


def test_open_speech_tells_when_its_voice_runs_out(clock: FakeClock, pacer: LivePacer) -> None:
    assert pacer.open_voice_ends_ns is None
    pacer.speak(voice(2))
    assert pacer.open_voice_ends_ns == 120_000_000 + 80_000_000
    pacer.speak(voice(1))
    assert pacer.open_voice_ends_ns == 120_000_000 + 120_000_000
    pacer.end_utterance()
    assert pacer.open_voice_ends_ns is None
