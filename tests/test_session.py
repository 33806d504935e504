"""The public API: a session fed like a live stream gives every frame, in order, with its own slice of the speech."""

from __future__ import annotations

import asyncio
import wave

import numpy as np
import pytest

from stages.session import Avatar
from tests.conftest import PORTRAIT, SPEECH


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return Avatar.prepare(PORTRAIT, preset="ultra_fast")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    with wave.open(str(SPEECH)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").reshape(-1, 1)


async def run_session(avatar: Avatar, pushes, *, interrupt_after: int | None = None):
    frames = []
    async with avatar.open_session(speech_rate_hz=22050) as session:
        async def speak() -> None:
            for number, block in enumerate(pushes):
                await session.push(block)
                if number == interrupt_after:
                    session.interrupt()
            await session.end()

        async def watch() -> None:
            async for frame in session.frames():
                frames.append(frame)

        await asyncio.gather(speak(), watch())
    return frames


async def test_each_frame_carries_its_own_speech_and_together_they_are_the_input(avatar, speech):
    blocks = [speech[offset: offset + 441] for offset in range(0, len(speech), 441)]  # 20 ms reads
    frames = await run_session(avatar, blocks)
    assert [frame.index for frame in frames] == list(range(len(frames)))
    assert len(frames) == -(-len(speech) * 25 // 22050)
    assert all(len(frame.speech) == 882 for frame in frames[:-1]) and 0 < len(frames[-1].speech) <= 882
    assert np.array_equal(np.concatenate([frame.speech for frame in frames]), speech)
    assert all(frame.image.shape == (512, 512, 3) and frame.changed == avatar.portrait.roi for frame in frames)


async def test_a_whole_file_in_one_push_gives_the_same_frames(avatar, speech):
    live = await run_session(avatar, [speech[offset: offset + 441] for offset in range(0, len(speech), 441)])
    whole = await run_session(avatar, [speech])
    assert len(live) == len(whole)
    assert all(np.array_equal(a.image, b.image) for a, b in zip(live, whole))


async def test_interrupt_drops_queued_speech_and_the_stream_goes_on(avatar, speech):
    second = speech[: 22050 * 2]
    blocks = [speech[: 22050 * 3], second]
    frames = await run_session(avatar, blocks, interrupt_after=0)
    indices = [frame.index for frame in frames]
    assert indices == sorted(set(indices))  # still in order, nothing twice
    spoken = np.concatenate([frame.speech for frame in frames])
    assert len(spoken) < len(speech[: 22050 * 3]) + len(second)  # some of the first utterance was dropped
    assert np.array_equal(spoken[-len(second):], second)  # the new speech comes out whole, at the end
