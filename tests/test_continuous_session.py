"""The unpaced live session, as a voice-agent framework reads it: speech pushed at any rate, an endless video read at
the reader's pace, each speech frame with its stretch of the voice, idle frames with silence between segments, and a
clear that drops everything at once. No clock: the reader's pace is the test's loop."""

from __future__ import annotations

import asyncio
import wave

import av
import numpy as np
import pytest

from stages.session import Avatar, ContinuousSession, LiveFrame
from tests.conftest import PORTRAIT, speech_clip
from tests.quality import FaceMeasurer, mouth_geometry, stack_landmarks

FRAME_MS = 40


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return Avatar.prepare(PORTRAIT, preset="ultra_fast")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """1.5 s of the example's speech, 16 kHz mono int16."""
    path = speech_clip(tmp_path_factory.mktemp("speech") / "clip.wav", 24000)
    with wave.open(str(path)) as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), np.int16)


def at_rate(pcm: np.ndarray, rate_hz: int) -> np.ndarray:
    """16 kHz speech at another rate, resampled in one go (what a TTS at that rate would send)."""
    if rate_hz == 16000:
        return pcm
    resampler = av.AudioResampler("s16", "mono", rate_hz)
    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
    frame.sample_rate = 16000
    return np.concatenate([out.to_ndarray().reshape(-1) for out in [*resampler.resample(frame),
                                                                     *resampler.resample(None)]])


async def read(stream: ContinuousSession, count: int) -> list[LiveFrame]:
    return [await stream.next_frame() for _ in range(count)]


def kinds(frames: list[LiveFrame]) -> str:
    return "".join("s" if frame.kind == "speech" else "." for frame in frames)


@pytest.mark.parametrize(("rate_hz", "voice_rate_hz", "chunk_ms"), [(16000, 48000, 20), (24000, 24000, 10),
                                                                     (48000, 16000, 100)])
async def test_a_segment_gives_its_frames_with_its_voice_between_idle_frames(
        avatar: Avatar, speech: np.ndarray, rate_hz: int, voice_rate_hz: int, chunk_ms: int) -> None:
    pcm = at_rate(speech, rate_hz)
    step = rate_hz * chunk_ms // 1000
    async with avatar.open_continuous(voice_rate_hz=voice_rate_hz) as stream:
        before = await read(stream, 3)
        voice = [stream.push(pcm[start:start + step], rate_hz) for start in range(0, len(pcm), step)]
        voice.append(stream.end_segment())
        spoken_frames = -(-sum(map(len, voice[:-1])) // (voice_rate_hz // 25)) + ContinuousSession.TAIL_FRAMES
        frames = await read(stream, spoken_frames + 3)
    assert kinds(before) == "..." and [frame.index for frame in before + frames] == list(range(len(frames) + 3))
    assert kinds(frames) == "s" * spoken_frames + "..."
    assert [frame.ends_segment for frame in frames].index(True) == spoken_frames - 1
    # Every frame carries exactly its stretch of the voice, and together they are the voice the pushes returned.
    per_frame = voice_rate_hz // 25
    assert all(len(frame.voice) == per_frame for frame in frames)
    spoken = np.concatenate([frame.voice for frame in frames[:spoken_frames]])
    assert np.array_equal(spoken, np.concatenate(voice))
    assert not any(frame.voice.any() for frame in before + frames[spoken_frames:])
    # `spoken` marks the speech in each frame's voice, the segment's padding left out: as long as the speech pushed.
    said = [frame.spoken for frame in frames[:spoken_frames]]
    assert said == sorted(said, reverse=True) and said[0] == per_frame and said[-1] == 0
    assert abs(sum(said) - len(pcm) * voice_rate_hz / rate_hz) <= voice_rate_hz * 0.002
    # Resampled once, straight from the input: at the input's own rate the voice is the input itself.
    if voice_rate_hz == rate_hz:
        assert np.array_equal(spoken[:len(pcm)], pcm)
    else:
        direct = at_rate(speech, voice_rate_hz)
        assert np.corrcoef(spoken[:len(direct) - 100].astype(float), direct[:-100].astype(float))[0, 1] > 0.99


def mouth_openings(frames: list[LiveFrame]) -> np.ndarray:
    """The inner-lip aperture of each frame, in interocular distances (dlib's 68 points)."""
    measurer = FaceMeasurer()
    return mouth_geometry(stack_landmarks([measurer.landmarks(frame.image) for frame in frames]))["aperture"]


async def test_the_mouth_moves_with_the_speech_and_rests_in_the_silences(avatar: Avatar, speech: np.ndarray) -> None:
    async with avatar.open_continuous() as stream:
        idle = await read(stream, 5)
        stream.push(speech, 16000)
        stream.end_segment()
        spoken = await read(stream, len(speech) // 640 + ContinuousSession.TAIL_FRAMES)
        after = await read(stream, 5)
    assert kinds(spoken) == "s" * len(spoken)
    rest, talking, closed = mouth_openings(idle), mouth_openings(spoken), mouth_openings(after)
    print(f"aperture at rest {rest.max():.3f}, talking {talking.round(3)}, after {closed.max():.3f}")
    assert rest.max() < 0.05 and closed.max() < 0.05
    assert talking.max() > 0.15 and (talking > 0.08).sum() >= len(spoken) // 4


async def test_back_to_back_segments_keep_their_own_frames(avatar: Avatar, speech: np.ndarray) -> None:
    """The renderer makes frames past each segment's end for its look-ahead: none of them is shown."""
    first, second = speech[:8000], speech[8000:20000]
    async with avatar.open_continuous(voice_rate_hz=16000) as stream:
        voices = []
        for part in (first, second):
            voices.append(np.concatenate([stream.push(part, 16000), stream.end_segment()]))
        frames = await read(stream, sum(len(v) for v in voices) // 640 + 2)
    assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("talkstream")]
    counts = [len(v) // 640 for v in voices]
    assert kinds(frames) == "s" * sum(counts) + ".."
    assert [i for i, frame in enumerate(frames) if frame.ends_segment] == [counts[0] - 1, sum(counts) - 1]
    assert np.array_equal(np.concatenate([frame.voice for frame in frames[:sum(counts)]]), np.concatenate(voices))


async def test_clear_drops_queued_speech_at_once_and_the_next_speech_comes_whole(avatar: Avatar,
                                                                                 speech: np.ndarray) -> None:
    async with avatar.open_continuous(voice_rate_hz=16000) as stream:
        stream.push(speech, 16000)
        stream.end_segment()
        spoken = await read(stream, 5)
        stream.clear()
        cleared = await read(stream, 3)
        again = np.concatenate([stream.push(speech[:6400], 16000), stream.end_segment()])
        frames = await read(stream, len(again) // 640 + 1)
    assert kinds(spoken) == "sssss" and kinds(cleared) == "..."
    assert kinds(frames) == "s" * (len(again) // 640) + "."
    assert np.array_equal(np.concatenate([frame.voice for frame in frames[:-1]]), again)


async def test_a_clear_wakes_a_reader_waiting_for_speech_with_an_idle_frame(avatar: Avatar,
                                                                           speech: np.ndarray) -> None:
    async with ContinuousSession(avatar, gap_ms=None) as stream:   # an open segment waits for more speech forever
        stream.push(speech[:8000], 16000)
        spoken = await read(stream, 8000 // 640)                    # what the 20 ms look-ahead lets out
        waiting = asyncio.ensure_future(stream.next_frame())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        stream.clear()
        frame = await asyncio.wait_for(waiting, timeout=5)
    assert kinds(spoken) == "s" * len(spoken) and frame.kind == "idle" and not frame.voice.any()


async def test_a_segment_nobody_ends_is_ended_when_its_speech_runs_dry(avatar: Avatar, speech: np.ndarray) -> None:
    async with avatar.open_continuous(voice_rate_hz=16000) as stream:
        stream.push(speech[:8000], 16000)    # 0.5 s, and then nothing: a source that stalled without saying so
        frames = await asyncio.wait_for(read(stream, 8000 // 640 + 2 + 2), timeout=10)
    spoken = 8000 // 640 + 1 + ContinuousSession.TAIL_FRAMES   # a partial frame, padded, and the tail
    assert kinds(frames)[:spoken] == "s" * spoken and frames[spoken - 1].ends_segment


def test_a_voice_rate_that_cuts_frames_is_refused(avatar: Avatar) -> None:
    from stream.errors import InputError

    with pytest.raises(InputError, match="whole frames"):
        avatar.open_continuous(voice_rate_hz=44101)

