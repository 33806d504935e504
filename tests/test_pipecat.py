"""The pipecat video service in real pipecat pipelines: run by pipecat's own test harness (`pipecat.tests.utils`),
and by a `PipelineWorker` (pipecat's pipeline task) on the real clock. Speech is the example's espeak-ng voice as a
TTS sends it: `TTSAudioRawFrame`s of 20 ms at 24 kHz between `TTSStartedFrame` and `TTSStoppedFrame`."""

from __future__ import annotations

import asyncio
import threading
import time
import wave

import numpy as np
import pytest

pytest.importorskip("pipecat", reason="the pipecat extra")
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TextFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.tests.utils import SleepFrame, run_test  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from stages.integrations.pipecat import TalkstreamVideoService  # noqa: E402
from stages.session import Avatar  # noqa: E402
from tests.conftest import PORTRAIT, SPEECH  # noqa: E402
from tests.quality import FaceMeasurer, mouth_geometry, stack_landmarks  # noqa: E402

FPS = 25
RATE_HZ = 24000
SPOKEN_S = 3.0


@pytest.fixture(scope="module")
def avatar() -> Avatar:
    return Avatar.prepare(PORTRAIT, preset="ultra_fast")


def tts_frames(seconds: float = SPOKEN_S, rate_hz: int = RATE_HZ) -> list[TTSAudioRawFrame]:
    """The example's espeak-ng speech (from 0.5 s in) in 20 ms frames, as a TTS service pushes it."""
    from scipy.signal import resample_poly

    with wave.open(str(SPEECH)) as reader:
        native = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32)
    piece = pcm[native // 2:native // 2 + int(native * seconds)]
    speech = np.clip(resample_poly(piece, rate_hz // 50, native // 50), -32768, 32767).astype(np.int16)
    step = rate_hz // 50
    return [TTSAudioRawFrame(audio=speech[start:start + step].tobytes(), sample_rate=rate_hz, num_channels=1)
            for start in range(0, len(speech), step)]


class Arrivals(FrameProcessor):
    """The end of the pipeline: notes each frame going down and when it came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.seen.append((time.perf_counter(), frame))
        await self.push_frame(frame, direction)


def bgr(picture: OutputImageRawFrame) -> np.ndarray:
    width, height = picture.size
    return np.ascontiguousarray(np.frombuffer(picture.image, np.uint8).reshape(height, width, 3)[:, :, ::-1])


def mouth_openings(pictures: list[OutputImageRawFrame]) -> np.ndarray:
    measurer = FaceMeasurer()
    return mouth_geometry(stack_landmarks([measurer.landmarks(bgr(p)) for p in pictures]))["aperture"]


def assert_each_voice_follows_its_picture(frames: list[Frame]) -> None:
    """Every stretch of voice comes after the picture of its media time, before the next picture (frames that pass
    through and a lead-in's silence may come between)."""
    media = [frame for frame in frames if isinstance(frame, OutputImageRawFrame)
             or (isinstance(frame, TTSAudioRawFrame) and frame.pts is not None)]
    for before, frame in zip(media, media[1:]):
        if isinstance(frame, TTSAudioRawFrame):
            assert isinstance(before, OutputImageRawFrame) and before.pts == frame.pts


def spoken_pictures(frames: list[Frame]) -> list[OutputImageRawFrame]:
    """The pictures that carry speech: each followed by its voice."""
    return [frame for frame, after in zip(frames, frames[1:])
            if isinstance(frame, OutputImageRawFrame) and isinstance(after, TTSAudioRawFrame)]


async def test_in_pipecats_harness_speech_becomes_pictures_with_their_voice_and_the_rest_passes(
        avatar: Avatar) -> None:
    face = TalkstreamVideoService(avatar=avatar)
    speech = tts_frames()
    sent = [TextFrame("before"), TTSStartedFrame(), *speech[:50], TextFrame("while"), *speech[50:], TTSStoppedFrame(),
            TextFrame("after"), SleepFrame(sleep=SPOKEN_S + 1.5)]   # the speech shown in real time, then a rest
    down, up = await run_test(face, frames_to_send=sent)
    assert not up
    others = [frame for frame in down if not isinstance(frame, (OutputImageRawFrame, TTSAudioRawFrame))]
    assert [type(frame) for frame in others] == [TextFrame, TTSStartedFrame, TextFrame, TextFrame, TTSStoppedFrame]
    assert [frame.text for frame in others if isinstance(frame, TextFrame)] == ["before", "while", "after"]
    voices = [frame for frame in down if isinstance(frame, TTSAudioRawFrame)]
    assert not set(map(id, voices)) & set(map(id, speech))   # the service's own voice, not the TTS's frames
    # A frame of silence leads the utterance in; then the voice, whole frames of it: the TTS's own samples (24 kHz
    # in, 24 kHz out), then the segment's padding.
    lead_in, timed = voices[0], voices[1:]
    assert lead_in.pts is None and not np.frombuffer(lead_in.audio, np.int16).any()
    said = np.concatenate([np.frombuffer(voice.audio, np.int16) for voice in timed])
    sent = np.concatenate([np.frombuffer(frame.audio, np.int16) for frame in speech])
    assert np.array_equal(said[:len(sent)], sent) and not said[len(sent):].any()
    assert 0 <= len(said) / RATE_HZ - SPOKEN_S <= 1 / FPS
    pictures = [frame for frame in down if isinstance(frame, OutputImageRawFrame)]
    assert all(p.format == "RGB" and p.size == (512, 512) for p in pictures)
    spoken = spoken_pictures(down)
    assert abs(len(spoken) - SPOKEN_S * FPS) <= 1 and len(spoken) == len(timed)
    assert_each_voice_follows_its_picture(down)
    stamps = np.array([p.pts for p in pictures])
    assert np.array_equal(np.diff(stamps), np.full(len(stamps) - 1, 40_000_000))
    # The TTSStoppedFrame goes on after the last frame of its speech.
    assert down.index(spoken[-1]) < down.index(others[-1])
    talking = mouth_openings(spoken)
    rest = mouth_openings(pictures[-5:])
    print(f"{len(pictures)} pictures, {len(spoken)} with speech; aperture talking max {talking.max():.3f}, "
          f"at rest {rest.max():.3f}")
    assert talking.max() > 0.15 and rest.max() < 0.05


async def test_in_a_pipeline_worker_the_face_keeps_the_frame_rate_and_an_interruption_shows_at_the_next_frame(
        avatar: Avatar) -> None:
    face = TalkstreamVideoService(avatar=avatar)
    arrivals = Arrivals()
    worker = PipelineWorker(Pipeline([face, arrivals]), cancel_on_idle_timeout=False)
    runner = WorkerRunner()

    async def speak_then_interrupt() -> None:
        await asyncio.sleep(1.0)
        await worker.queue_frames([TTSStartedFrame(), *tts_frames(), TTSStoppedFrame()])
        await asyncio.sleep(2.0)
        await worker.queue_frame(InterruptionFrame())
        await asyncio.sleep(1.0)
        await worker.queue_frame(EndFrame())

    await runner.add_workers(worker)
    await asyncio.wait_for(asyncio.gather(runner.run(), speak_then_interrupt()), 30)
    seen = arrivals.seen
    frames = [frame for _, frame in seen]
    pictures = [(when, frame) for when, frame in seen if isinstance(frame, OutputImageRawFrame)]
    times = np.array([when for when, _ in pictures])
    rate = (len(times) - 1) / (times[-1] - times[0])
    print(f"{len(times)} pictures at {rate:.2f} fps; largest gap {np.diff(times).max() * 1000:.0f} ms")
    assert 24 <= rate <= 26 and np.diff(times).max() < 0.12
    # Image and voice travel together: each voice right behind its picture, within a frame's time.
    assert_each_voice_follows_its_picture(frames)
    shown = {frame.pts: when for when, frame in pictures}
    assert all(when - shown[frame.pts] < 0.040 for when, frame in seen
               if isinstance(frame, TTSAudioRawFrame) and frame.pts is not None)
    # The interruption: at most one picture with speech after it, and none with voice after that.
    cut = next(i for i, frame in enumerate(frames) if isinstance(frame, InterruptionFrame))
    after_cut = frames[cut:]
    spoken_after = spoken_pictures(after_cut)
    assert len(spoken_after) <= 1
    first_idle = next(when for when, frame in seen[cut:] if isinstance(frame, OutputImageRawFrame)
                      and frame not in spoken_after)
    print(f"interruption to the first idle picture: {(first_idle - seen[cut][0]) * 1000:.1f} ms")
    assert first_idle - seen[cut][0] <= 0.040 + 0.010   # a frame, and the scheduler's slack on a busy machine
    assert sum(isinstance(frame, TTSStoppedFrame) for frame in frames) == 1
    rest = mouth_openings([frame for frame in after_cut if isinstance(frame, OutputImageRawFrame)][2:12])
    assert rest.max() < 0.05


async def watch_the_example(base: str, seconds: float = 6.0) -> tuple[float, np.ndarray, float]:
    """A plain aiortc peer takes the example's page's path: an offer to /api/offer, the answer applied; then
    `seconds` of its video. Returns (frames per second, each frame's mouth aperture, the voice's loudest RMS)."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", direction="recvonly")
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with aiohttp.ClientSession() as http:
            answer = await http.post(f"{base}/api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
            assert answer.status == 200, await answer.text()
            await pc.setRemoteDescription(RTCSessionDescription(**{key: value for key, value in
                                                                   (await answer.json()).items() if key != "pc_id"}))
        tracks = {transceiver.kind: transceiver.receiver.track for transceiver in pc.getTransceivers()}
        pictures, arrivals, loudest = [], [], 0.0

        async def video() -> None:
            while not arrivals or arrivals[-1] - arrivals[0] < seconds:
                frame = await asyncio.wait_for(tracks["video"].recv(), 10)
                arrivals.append(time.perf_counter())
                pictures.append(frame.to_ndarray(format="bgr24"))

        async def audio() -> None:
            nonlocal loudest
            while not arrivals or arrivals[-1] - arrivals[0] < seconds:
                samples = (await asyncio.wait_for(tracks["audio"].recv(), 10)).to_ndarray().astype(float)
                loudest = max(loudest, float(np.sqrt((samples ** 2).mean())))

        await asyncio.gather(video(), audio())
    finally:
        await pc.close()
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    measurer = FaceMeasurer()
    openings = mouth_geometry(stack_landmarks([measurer.landmarks(picture) for picture in pictures[::2]]))["aperture"]
    return rate, openings, loudest


def assert_a_talking_face(rate: float, openings: np.ndarray, loudest: float) -> None:
    print(f"{rate:.2f} fps; aperture max {openings.max():.3f}, open in {(openings > 0.08).mean():.0%} of the frames; "
          f"voice RMS up to {loudest:.0f}")
    assert rate >= 22
    assert openings.max() > 0.15 and (openings > 0.08).mean() > 0.15 and openings.std() > 0.03
    assert loudest > 500


@pytest.mark.slow
def test_the_smallwebrtc_example_shows_an_aiortc_peer_a_talking_face() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port, stop

    port = free_port()
    process = subprocess.Popen([sys.executable, "examples/pipecat_avatar.py", "--port", str(port), "--every", "4"],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if "serving on" in line:
                break
        assert process.poll() is None, "the example ended"
        threading.Thread(target=process.stderr.read, daemon=True).start()   # its log never fills the pipe
        assert_a_talking_face(*asyncio.run(watch_the_example(f"http://127.0.0.1:{port}")))
    finally:
        stop(process)
