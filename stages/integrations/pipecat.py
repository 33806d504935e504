"""A talkstream face for pipecat: a frame processor placed after the TTS that turns its speech into a talking face.

```python
from stages.integrations.pipecat import TalkstreamVideoService

face = TalkstreamVideoService("portrait.png")          # no weights, no account, one CPU core
pipeline = Pipeline([transport.input(), stt, user_aggregator, llm, tts, face, transport.output(),
                     assistant_aggregator])
```
It takes the TTS's audio (`TTSAudioRawFrame`, any rate) and sends on, at the preset's frame rate, the face as
`OutputImageRawFrame`s (RGB) with each frame's own stretch of the speech as `TTSAudioRawFrame`s right behind it: the
voice is held back to its frames' media time, so the service owns lip sync, as pipecat's cloud avatar services do.
Between utterances it sends idle frames (blinks, the head's sway). An `InterruptionFrame` or `UserStartedSpeakingFrame`
drops the queued speech and frames at once and the face relaxes at the next frame. A `TTSStoppedFrame` waits for the
last frame of its speech; every other frame passes straight through, in order. Set the output transport's
`video_out_width`/`video_out_height` to `.size` and `video_out_is_live=True`. Needs the `pipecat` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    UserStartedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from stages.session import Avatar, ContinuousSession, LiveFrame

LATE_FRAMES = 2          # a frame this late (the renderer kept the reader waiting) restarts the clock from it
END_TIMEOUT_S = 30.0     # at the pipeline's end, how long the speech still queued may take to be shown


def pipecat_frames(frame: LiveFrame, fps: float, voice_rate_hz: int, *, lead_in: bool = False) -> list[Frame]:
    """A frame of the face as pipecat takes it: the picture (RGB), then, if it has speech, its whole stretch of the
    voice (whole frames keep the transport's 40 ms audio chunks aligned with the pictures), both stamped with the
    frame's media time from the session's start. `lead_in`: a frame of silence before the first voice of an
    utterance. The output transport shows a live picture a frame after it comes and plays audio as it comes: the
    silence lines the voice up with its pictures and keeps a frame of voice queued against a late tick."""
    pts = round(frame.index * 1e9 / fps)
    height, width = frame.image.shape[:2]
    picture = OutputImageRawFrame(image=cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB).tobytes(), size=(width, height),
                                  format="RGB")
    picture.pts = pts
    if not frame.spoken:
        return [picture]
    out: list[Frame] = [picture]
    if lead_in:
        out.append(TTSAudioRawFrame(audio=bytes(frame.voice.nbytes), sample_rate=voice_rate_hz, num_channels=1))
    voice = TTSAudioRawFrame(audio=frame.voice.tobytes(), sample_rate=voice_rate_hz, num_channels=1)
    voice.pts = pts
    return [*out, voice]


class TalkstreamVideoService(FrameProcessor):
    """A portrait that speaks what the TTS says (see the module's docstring). `avatar`: one already prepared
    (several services may share it); `voice_rate_hz`: the rate of the speech it sends on (default: the pipeline's
    output rate)."""

    def __init__(self, portrait: str | Path | bytes | None = None, preset: str = "ultra_fast", *,
                 overrides: Iterable[str] = (), avatar: Avatar | None = None, voice_rate_hz: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if avatar is None and portrait is None:
            raise ValueError("a portrait or a prepared avatar is needed")
        self._portrait, self._preset, self._overrides = portrait, preset, tuple(overrides)
        self.avatar: Avatar | None = avatar
        self.voice_rate_hz = voice_rate_hz
        self.stream: ContinuousSession | None = None
        self._player: asyncio.Task[None] | None = None
        self._held: deque[tuple[int, Frame]] = deque()   # TTSStoppedFrames, each after the segments before it
        self._segments_ended = 0
        self._voiced = False   # the last frame sent had speech
        self._frame_sent = asyncio.Event()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the frames: what the output transport's video should be set to."""
        assert self.avatar is not None, "the avatar is prepared in setup() or passed in"
        height, width = self.avatar.image.shape[:2]
        return width, height

    async def setup(self, setup: FrameProcessorSetup) -> None:  # type: ignore[override]  # (as pipecat's own)
        """The slow start-up, beside the other processors': the portrait prepared (on a thread), the session opened
        at the pipeline's output rate."""
        await super().setup(setup)
        avatar = self.avatar
        if avatar is None:
            assert self._portrait is not None
            avatar = self.avatar = await asyncio.to_thread(Avatar.prepare, self._portrait, preset=self._preset,
                                                           overrides=self._overrides)
        fps = avatar.preset.video.frame_rate
        rate = self.voice_rate_hz or setup.audio_out_sample_rate
        self.voice_rate_hz = rate if (rate / fps).denominator == 1 else 48000
        self.stream = avatar.open_continuous(voice_rate_hz=self.voice_rate_hz)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        stream = self.stream
        assert stream is not None
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await stream.start()
            self._player = self.create_task(self._play(stream), "talkstream-face")
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            pcm = np.frombuffer(frame.audio, np.int16)
            if frame.num_channels > 1:
                pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
            stream.push(pcm, frame.sample_rate)
        elif isinstance(frame, TTSStoppedFrame) and direction == FrameDirection.DOWNSTREAM:
            stream.end_segment()
            self._held.append((stream.segments_opened, frame))
            await self._release_held()
        elif isinstance(frame, (InterruptionFrame, UserStartedSpeakingFrame)):
            stream.clear()
            self._segments_ended = stream.segments_opened
            self._voiced = False
            await self.push_frame(frame, direction)
            await self._release_held()
        elif isinstance(frame, EndFrame):
            await self._finish(stream)
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _play(self, stream: ContinuousSession) -> None:
        """The face at the frame rate on the pipeline's clock: each frame taken when it is due (so a clear shows
        at the next one), the picture, then its speech."""
        loop = asyncio.get_running_loop()
        fps = stream.fps
        anchor = loop.time()
        index = 0
        while True:
            due = anchor + index / fps
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            frame = await stream.next_frame()
            generation = stream.generation
            if loop.time() - due > LATE_FRAMES / fps:   # the renderer held the speech back: go on from here
                anchor = loop.time() - index / fps
            lead_in, self._voiced = frame.spoken > 0 and not self._voiced, frame.spoken > 0
            for out in pipecat_frames(frame, float(fps), stream.voice_rate_hz, lead_in=lead_in):
                if stream.generation != generation:   # interrupted while this frame went out: the rest is stale
                    break
                await self.push_frame(out)
            if stream.generation == generation:
                self._segments_ended += frame.ends_segment
            await self._release_held()
            self._frame_sent.set()
            index += 1

    async def _release_held(self) -> None:
        """A TTSStoppedFrame goes on once the last frame of its speech has."""
        while self._held and self._segments_ended >= self._held[0][0]:
            await self.push_frame(self._held.popleft()[1])

    async def _finish(self, stream: ContinuousSession) -> None:
        """The pipeline ends: the speech already given is shown to its end, then the face stops."""
        stream.end_segment()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(END_TIMEOUT_S):
                while (stream.speaking or self._held) and self._player is not None:
                    self._frame_sent.clear()
                    await self._frame_sent.wait()
        await self._stop()

    async def _stop(self) -> None:
        if self._player is not None:
            await self.cancel_task(self._player)
            self._player = None
        self._held.clear()

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()
        if self.stream is not None:
            await self.stream.aclose()
