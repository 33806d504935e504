"""A talkstream face for LiveKit Agents: a `VideoGenerator` that an `AvatarRunner` publishes to a room.

```python
from stages.integrations.livekit import TalkstreamVideoGenerator, start_in_process

face = TalkstreamVideoGenerator("portrait.png")                   # prepared once: no weights, no account
runner = await start_in_process(session, ctx.room, face)           # the agent's speech now goes to the face
await session.start(agent, room=ctx.room, room_options=RoomOptions(audio_output=False))
```
The generator is the engine's unpaced live session (`ContinuousSession`) seen through LiveKit's types: the agent's
speech in as `rtc.AudioFrame`s (any rate, mono or stereo), the face's frames out as fast as the reader takes them,
each speech frame followed by its own stretch of the voice, idle frames (blinks, the head's sway) in the silences.
The runner's `rtc.AVSynchronizer` sets the pace. Needs the `livekit` extra: `pip install -e '.[livekit]'`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
from livekit import api, rtc
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import (
    AudioSegmentEnd,
    AvatarOptions,
    AvatarRunner,
    DataStreamAudioOutput,
    DataStreamAudioReceiver,
    QueueAudioOutput,
    VideoGenerator,
)

from stages.session import Avatar, LiveFrame

if TYPE_CHECKING:
    from livekit.agents import AgentSession

DEFAULT_SAMPLE_RATE_HZ = 24000   # what LiveKit's TTS plugins speak at: the voice goes out as it came in


class TalkstreamVideoGenerator(VideoGenerator):
    """A portrait that speaks what the agent says. `.options` is what `AvatarRunner` needs (size, fps, the voice's
    rate and channels); `avatar`: one already prepared (several generators may share it)."""

    def __init__(self, portrait: str | Path | bytes | None = None, preset: str = "ultra_fast", *,
                 sample_rate: int = DEFAULT_SAMPLE_RATE_HZ, overrides: Iterable[str] = (),
                 avatar: Avatar | None = None) -> None:
        if avatar is None:
            if portrait is None:
                raise ValueError("a portrait or a prepared avatar is needed")
            avatar = Avatar.prepare(portrait, preset=preset, overrides=overrides)
        self.avatar = avatar
        height, width = avatar.image.shape[:2]
        self.options = AvatarOptions(video_width=width, video_height=height,
                                     video_fps=float(avatar.preset.video.frame_rate),
                                     audio_sample_rate=sample_rate, audio_channels=1)
        self.stream = avatar.open_continuous(voice_rate_hz=sample_rate)
        self._ends: deque[int] = deque()   # per AudioSegmentEnd pushed: the segments to end before it goes out
        self._segments_ended = 0
        self._pushed = False   # speech pushed since the last end or clear

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        """The agent's speech as it comes (never waits); an `AudioSegmentEnd` goes out after that speech's frames."""
        await self.stream.start()
        if isinstance(frame, AudioSegmentEnd):
            if self._pushed:   # (a receiver ends a cleared stream too: that end is the clear's, already told)
                self.stream.end_segment()
                self._ends.append(self.stream.segments_opened)
                self._pushed = False
            return
        self._pushed = True
        pcm = np.frombuffer(frame.data, np.int16)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        self.stream.push(pcm, frame.sample_rate)

    def clear_buffer(self) -> None:
        """Barge-in: no frame of the speech not yet yielded comes after, and the face relaxes within two frames (the
        runner tells the agent the playback was interrupted, so no `AudioSegmentEnd` follows; what its synchroniser
        had queued, 100 ms at most, still plays)."""
        self.stream.clear()
        self._segments_ended = self.stream.segments_opened
        self._ends.clear()
        self._pushed = False

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._media()

    async def _media(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        await self.stream.start()
        while True:
            frame = await self.stream.next_frame()
            generation = self.stream.generation
            yield video_frame(frame)
            if generation != self.stream.generation:   # cleared while the reader had the picture: no voice
                continue
            if frame.spoken:
                yield audio_frame(frame, self.options.audio_sample_rate)
            self._segments_ended += frame.ends_segment
            while self._ends and self._segments_ended >= self._ends[0]:
                self._ends.popleft()
                yield AudioSegmentEnd()

    async def aclose(self) -> None:
        await self.stream.aclose()


def video_frame(frame: LiveFrame) -> rtc.VideoFrame:
    """A frame as LiveKit takes it: RGBA, the layout its video source converts without a detour."""
    height, width = frame.image.shape[:2]
    return rtc.VideoFrame(width, height, rtc.VideoBufferType.RGBA, cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGBA).data)


def audio_frame(frame: LiveFrame, rate_hz: int) -> rtc.AudioFrame:
    """A frame's speech (its padding left out) as LiveKit takes it."""
    return rtc.AudioFrame(frame.voice[:frame.spoken].tobytes(), rate_hz, 1, frame.spoken)


async def start_in_process(session: AgentSession, room: rtc.Room, face: TalkstreamVideoGenerator) -> AvatarRunner:
    """The face inside the agent's own process, as LiveKit's local avatars run: the agent's speech goes to a queue
    instead of the room, and the runner publishes the face and the voice together, in sync. Call it before
    `session.start(...)`, and start the session with the room's audio output off (the runner publishes it)."""
    speech = QueueAudioOutput(sample_rate=face.options.audio_sample_rate)
    session.output.audio = speech
    runner = AvatarRunner(room, audio_recv=speech, video_gen=face, options=face.options)
    await runner.start()
    return runner


# A face in a process (or on a machine) of its own: the agent streams its speech to it over the room.

def avatar_worker_token(api_key: str, api_secret: str, *, room: str, identity: str, agent_identity: str) -> str:
    """The avatar worker's room token: it publishes on the agent's behalf (`lk.publish_on_behalf`), so that the
    room's clients see its face and voice as the agent's."""
    return (api.AccessToken(api_key, api_secret).with_identity(identity).with_kind("agent")
            .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
            .with_grants(api.VideoGrants(room_join=True, room=room)).to_jwt())


def send_speech_to(session: AgentSession, room: rtc.Room, avatar_identity: str, sample_rate: int) -> None:
    """On the agent's side: its speech goes to the avatar worker `avatar_identity` as a data stream."""
    session.output.audio = DataStreamAudioOutput(room, destination_identity=avatar_identity, sample_rate=sample_rate,
                                                 wait_remote_track=rtc.TrackKind.KIND_VIDEO)


async def run_avatar_worker(room: rtc.Room, face: TalkstreamVideoGenerator, *,
                            agent_identity: str | None = None) -> AvatarRunner:
    """On the worker's side, in a room it has joined: the agent's speech in (from `agent_identity`, or the first
    agent in the room), the face and the voice published."""
    speech = DataStreamAudioReceiver(room, sender_identity=agent_identity)
    runner = AvatarRunner(room, audio_recv=speech, video_gen=face, options=face.options)
    await runner.start()
    return runner
