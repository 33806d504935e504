"""The LiveKit Agents avatar with LiveKit's own objects, offline: `rtc.AudioFrame`s of espeak speech in, the face's
`rtc.VideoFrame`s and the voice's `rtc.AudioFrame`s out, through a real `rtc.AVSynchronizer` into real sources.
No LiveKit server exists here: joining a room is left to examples/livekit_agent.py."""

from __future__ import annotations

import asyncio
import time
import wave

import numpy as np
import pytest

pytest.importorskip("livekit.agents", reason="the livekit extra")
from livekit import api, rtc  # noqa: E402
from livekit.agents import AgentSession  # noqa: E402
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, QueueAudioOutput  # noqa: E402

from stages.integrations.livekit import TalkstreamVideoGenerator, avatar_worker_token, start_in_process  # noqa: E402
from stages.session import Avatar  # noqa: E402
from tests.conftest import PORTRAIT, SPEECH  # noqa: E402
from tests.quality import FaceMeasurer, mouth_geometry, stack_landmarks  # noqa: E402

FPS = 25
SPOKEN_S = 4.0


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return Avatar.prepare(PORTRAIT, preset="ultra_fast")


def espeak_speech(rate_hz: int) -> np.ndarray:
    """4 s of the example's espeak-ng speech (from 0.5 s in), at `rate_hz`."""
    from scipy.signal import resample_poly

    with wave.open(str(SPEECH)) as reader:
        native = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32)
    piece = pcm[native // 2:native // 2 + int(native * SPOKEN_S)]
    return np.clip(resample_poly(piece, rate_hz // 50, native // 50), -32768, 32767).astype(np.int16)


def audio_frames(pcm: np.ndarray, rate_hz: int, chunk_ms: int) -> list[rtc.AudioFrame]:
    step = rate_hz * chunk_ms // 1000
    return [rtc.AudioFrame(pcm[start:start + step].tobytes(), rate_hz, 1, len(pcm[start:start + step]))
            for start in range(0, len(pcm), step)]


def image(frame: rtc.VideoFrame) -> np.ndarray:
    """A LiveKit frame as BGR, for dlib."""
    rgba = np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 4)
    return np.ascontiguousarray(rgba[:, :, 2::-1])


def mouth_openings(frames: list[rtc.VideoFrame]) -> np.ndarray:
    measurer = FaceMeasurer()
    return mouth_geometry(stack_landmarks([measurer.landmarks(image(frame)) for frame in frames]))["aperture"]


async def take_video(media, count: int) -> tuple[list[rtc.VideoFrame], list[object]]:
    """The next `count` video frames, and everything read on the way."""
    videos, everything = [], []
    while len(videos) < count:
        item = await anext(media)
        everything.append(item)
        if isinstance(item, rtc.VideoFrame):
            videos.append(item)
    return videos, everything


@pytest.mark.parametrize(("rate_hz", "chunk_ms"), [(16000, 10), (24000, 20), (48000, 10)])
async def test_speech_gives_frames_and_its_voice_then_a_segment_end_then_idle(avatar: Avatar, rate_hz: int,
                                                                              chunk_ms: int) -> None:
    face = TalkstreamVideoGenerator(avatar=avatar)
    assert (face.options.video_width, face.options.video_height, face.options.video_fps) == (512, 512, FPS)
    assert (face.options.audio_sample_rate, face.options.audio_channels) == (24000, 1)
    media = aiter(face)
    try:
        before, read_before = await take_video(media, 5)
        for frame in audio_frames(espeak_speech(rate_hz), rate_hz, chunk_ms):
            await face.push_audio(frame)
        await face.push_audio(AudioSegmentEnd())
        items = []
        while not items or not isinstance(items[-1], AudioSegmentEnd):
            items.append(await anext(media))
        after, read_after = await take_video(media, 10)
    finally:
        await face.aclose()
    assert all(isinstance(item, rtc.VideoFrame) for item in read_before + read_after)   # idle: no voice
    voices = [item for item in items if isinstance(item, rtc.AudioFrame)]
    videos = [item for item in items if isinstance(item, rtc.VideoFrame)]
    assert sum(isinstance(item, AudioSegmentEnd) for item in items) == 1
    # Every voice frame follows its video frame; the frames with voice cover the speech at 25 fps.
    voiced = [i for i, item in enumerate(items) if isinstance(item, rtc.AudioFrame)]
    assert all(isinstance(items[i - 1], rtc.VideoFrame) for i in voiced)
    assert abs(len(voiced) - SPOKEN_S * FPS) <= 1
    assert all(voice.sample_rate == 24000 and voice.num_channels == 1 for voice in voices)
    assert abs(sum(voice.duration for voice in voices) - SPOKEN_S) <= 0.020
    assert len(videos) <= len(voiced) + 3   # the mouth closes over the segment's short tail, then the end
    talking, rest = mouth_openings(videos[:len(voiced)]), mouth_openings(before + after)
    print(f"aperture talking max {talking.max():.3f}, at rest max {rest.max():.3f}")
    assert talking.max() > 0.15 and (talking > 0.08).sum() >= len(voiced) // 5
    assert rest.max() < 0.05


async def test_clear_buffer_mid_speech_stops_the_voice_and_rests_the_face_at_once(avatar: Avatar) -> None:
    face = TalkstreamVideoGenerator(avatar=avatar)
    media = aiter(face)
    try:
        for frame in audio_frames(espeak_speech(24000), 24000, 20):
            await face.push_audio(frame)
        await face.push_audio(AudioSegmentEnd())
        spoken, _ = await take_video(media, 30)
        face.clear_buffer()
        after, items = await take_video(media, 25)
    finally:
        await face.aclose()
    assert not [item for item in items if not isinstance(item, rtc.VideoFrame)]   # no voice, no segment end
    openings = mouth_openings(after)
    print(f"aperture before the clear max {mouth_openings(spoken).max():.3f}, after {openings.round(3)}")
    assert mouth_openings(spoken).max() > 0.15
    assert openings[2:].max() < 0.05


class RecordingVideoSource(rtc.VideoSource):
    """LiveKit's video source, noting when each frame is captured."""

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self.captured: list[float] = []

    def capture_frame(self, frame: rtc.VideoFrame, **options) -> None:
        self.captured.append(time.perf_counter())
        super().capture_frame(frame, **options)


async def test_through_a_real_av_synchronizer_the_face_plays_at_25_fps(avatar: Avatar) -> None:
    face = TalkstreamVideoGenerator(avatar=avatar)
    audio = rtc.AudioSource(24000, 1, queue_size_ms=100)
    video = RecordingVideoSource(512, 512)
    sync = rtc.AVSynchronizer(audio_source=audio, video_source=video, video_fps=FPS, video_queue_size_ms=100)
    played = 0.0

    async def forward() -> None:
        nonlocal played
        async for item in face:
            if isinstance(item, (rtc.VideoFrame, rtc.AudioFrame)):
                await sync.push(item)
                played += item.duration if isinstance(item, rtc.AudioFrame) else 0

    try:
        for frame in audio_frames(espeak_speech(48000), 48000, 10):
            await face.push_audio(frame)
        await face.push_audio(AudioSegmentEnd())
        forwarding = asyncio.ensure_future(forward())
        await asyncio.sleep(6.0)
        forwarding.cancel()
        await asyncio.gather(forwarding, return_exceptions=True)
    finally:
        await sync.aclose()
        await audio.aclose()
        await video.aclose()
        await face.aclose()
    stamps = np.array(video.captured)
    window = stamps[(stamps >= stamps[0] + 0.5) & (stamps < stamps[0] + 5.5)]   # 5 s, past the start
    print(f"{len(window)} frames in 5 s; voice pushed {played:.3f} s")
    assert 24 * 5 <= len(window) <= 26 * 5
    assert np.diff(window).max() < 0.1   # never a stall
    assert abs(played - SPOKEN_S) <= 0.020


async def test_in_the_agents_process_the_agents_speech_reaches_the_face(avatar: Avatar) -> None:
    """`start_in_process` as the example calls it: the session's audio output becomes the runner's queue."""
    face = TalkstreamVideoGenerator(avatar=avatar)
    session = AgentSession()
    runner = await start_in_process(session, rtc.Room(), face)
    try:
        assert isinstance(session.output.audio, QueueAudioOutput)
        for frame in audio_frames(espeak_speech(24000)[:4800], 24000, 20):
            await session.output.audio.capture_frame(frame)
        for _ in range(100):
            if face.stream.segments_opened:
                break
            await asyncio.sleep(0.01)
        assert face.stream.segments_opened == 1 and face.stream.speaking
    finally:
        await runner.aclose()
        await face.aclose()


def test_the_worker_token_publishes_on_the_agents_behalf() -> None:
    token = avatar_worker_token("key", "a-secret-of-32-characters-or-more", room="demo", identity="talkstream-face",
                                agent_identity="agent-1")
    claims = api.TokenVerifier("key", "a-secret-of-32-characters-or-more").verify(token)
    assert claims.identity == "talkstream-face" and claims.kind == "agent"
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-1"}
    assert claims.video.room == "demo" and claims.video.room_join
