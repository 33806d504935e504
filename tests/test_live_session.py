"""A live session on the example portrait, paced by the real clock: the voice plays contiguously from the first slot
past the latency, speech frames fill those slots, idle frames (made just in time) fill the silences, and an
interruption silences the voice and returns to idle at once."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from stages.session import Avatar
from stream.errors import InputError
from tests.conftest import PORTRAIT, speech_clip


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return Avatar.prepare(PORTRAIT, preset="ultra_fast")


def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path)) as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), np.int16)


async def run_live(avatar: Avatar, pcm: np.ndarray, *, slots: int, push_at_block: int,
                   interrupt_at_block: int | None = None) -> tuple[list[tuple[np.ndarray, str]], list[np.ndarray]]:
    video: list[tuple[np.ndarray, str]] = []
    audio: list[np.ndarray] = []
    async with avatar.open_live() as live:
        async def send_video() -> None:
            for slot in range(slots):
                video.append(await live.next_video(slot))

        async def send_audio() -> None:
            for block in range(2 * slots):
                audio.append(await live.next_audio(block))
                if block == push_at_block:
                    live.push(pcm, 16000)
                if block == interrupt_at_block:
                    live.interrupt()

        await asyncio.gather(send_video(), send_audio())
        assert live.received_speech_s == pytest.approx(len(pcm) / 16000)
    return video, audio


@pytest.mark.slow  # seconds on the real clock
def test_voice_and_frames_start_together_and_idle_fills_the_silence(avatar: Avatar, tmp_path: Path) -> None:
    pcm = read_pcm(speech_clip(tmp_path / "one.wav", 16000))
    video, audio = asyncio.run(run_live(avatar, pcm, slots=60, push_at_block=10))
    kinds = [kind for _, kind in video]
    first = kinds.index("speech")
    # Pushed at 200 ms: the utterance opens at the first slot 100 ms later (the preset's latency), slot 8 (320 ms).
    assert avatar.live_latency_ms == 100
    assert first == 8 and kinds[:first] == ["idle"] * first
    spoken = kinds[first:first + 27]        # 25 frames of voice and a 2-frame tail of silence
    assert spoken.count("speech") >= 25 and set(spoken) <= {"speech", "repeat"}
    assert set(kinds[first + 27:]) == {"idle"}
    # The voice: block 2 * 8 on, the input resampled to 48 kHz, contiguous (its own silences included).
    voice = np.concatenate(audio)
    assert not voice[:16 * 960].any()
    played = voice[16 * 960:16 * 960 + 48000].astype(np.float64)
    resampled = np.interp(np.arange(48000) / 3, np.arange(16000), pcm.astype(np.float64))
    assert np.corrcoef(played[:47000], resampled[:47000])[0, 1] > 0.95
    assert not voice[(16 + 50) * 960:].any()
    # Idle frames move (the head sways) and speech frames differ from them (the mouth).
    idle_images = [image for image, kind in video if kind == "idle"]
    assert any(np.any(a != b) for a, b in zip(idle_images, idle_images[1:]))


def test_a_latency_below_what_the_frames_need_is_refused(avatar: Avatar) -> None:
    assert avatar.speech_lead_ms == 60          # a 40 ms frame and the ultra_fast motion's 20 ms look-ahead
    with pytest.raises(InputError, match="under the 60 ms"):
        avatar.open_live(latency_ms=50)


@pytest.mark.slow  # seconds on the real clock
def test_interrupt_silences_the_voice_and_returns_to_idle(avatar: Avatar, tmp_path: Path) -> None:
    pcm = read_pcm(speech_clip(tmp_path / "two.wav", 32000))
    video, audio = asyncio.run(run_live(avatar, pcm, slots=50, push_at_block=5, interrupt_at_block=50))
    voice = np.concatenate(audio)
    assert voice[30 * 960:50 * 960].any()              # speaking before the interruption ...
    assert not voice[51 * 960:].any()                  # ... silent from the next block on
    kinds = [kind for _, kind in video]
    assert "speech" in kinds[:25]
    assert set(kinds[27:]) == {"idle"}                 # the face is idle from the next frame (1 s = block 50)
