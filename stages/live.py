"""Live sessions: speech pushed as it arrives, a video that never stops.

`ContinuousSession` is the engine's live path, unpaced: push speech (any rate), read the frames of one endless video
as they finish, each with its stretch of the voice; a segment of speech gives speech frames, the silences between
give idle frames (blinks, the head's sway), and `clear()` drops everything at once. Whoever reads sets the pace: a
voice-agent framework's synchroniser, or `LiveSession`, which lays the same frames and voice on one clock for
real-time senders (WebRTC), with idle frames, repeats and drops where the clock demands them.

One live chunk of speech: resampled once to the voice's rate (what the reader plays) and once to the features' 16 kHz
(what the motion model reads); the voice waits in the session, the 16 kHz copy goes through the stages in hops over
the pipeline's bounded queues, and each finished frame takes its slice of the voice on the way out.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import av
import numpy as np

from stages.audio import FEATURE_RATE_HZ, OPUS_RATE_HZ, FeatureCopy, joined_samples
from stages.motion import MotionModel, MotionStage
from stream.clock import FrameClock, ms_of_ns, ns_of_ms, seconds_of_frames, seconds_of_ms, seconds_of_ns
from stream.errors import InputError
from stream.frames import AudioChunk, SpeechBuffer
from stream.pacing import Clock, LivePacer, Timing
from stream.pipeline import Chain, Closing, Pipeline, Stage
from stream.presets import Preset
from stream.profile import Profiler

LIVE_RENDER_MARGIN_MS = 40   # a live frame's rendering and its hops between stages, with a busy second core
LIVE_RATES_HZ = (16000, 24000, 48000)  # raw live PCM's rates: a 16 kHz microphone, 24 kHz TTS, Opus' 48 kHz
VOICE_RATE_HZ = OPUS_RATE_HZ  # the paced voice: Opus' own rate, so the WebRTC sink never resamples
SEGMENT_GAP_MS = 100         # an unpaced reader's wait for more of a segment nobody ended, before ending it
SPEECH_RATES_HZ = range(8000, 192001)


class LiveAvatar(Protocol):
    """What a live session reads of an avatar (`stages.session.Avatar`)."""

    preset: Preset

    @property
    def speech_lead_ms(self) -> float: ...

    @property
    def live_latency_ms(self) -> float: ...

    def motion_model(self) -> MotionModel: ...

    def render_stage(self) -> Stage: ...

    def compose_stage(self) -> Stage: ...

    def idle_painter(self, seed: int = 0) -> Callable[[int, float], np.ndarray]: ...


@dataclass(frozen=True, slots=True)
class LiveFrame:
    """One frame of a live video and the voice that plays with it."""

    index: int            # its place in the video the reader reads (pts in 1/fps)
    image: np.ndarray     # (H, W, 3) uint8 BGR
    voice: np.ndarray     # int16 mono at the session's voice rate: this frame's stretch (silence when idle)
    kind: str             # "speech" or "idle"
    ends_segment: bool = False   # the last frame of a segment of speech
    spoken: int = 0       # how many of `voice`'s first samples are speech (after them: a segment's padding)


@dataclass(slots=True)
class _Segment:
    """A stretch of speech between silences, as the renderer makes it: `frames` speech frames (known once it
    ends), then `extra` frames of the look-ahead's silence, which nobody shows."""

    frames: int | None = None
    extra: int = 0
    rendered: int = 0
    spoken: int = 0       # samples of voice that are speech (known once it ends), before the padding

    @property
    def speaking(self) -> bool:
        """Speech frames still to come out of the renderer."""
        return self.frames is None or self.rendered < self.frames


class ContinuousSession(Closing):
    """Speech in as it arrives, an endless video out as fast as it is read (see the module's docstring).

    ```python
    async with avatar.open_continuous(voice_rate_hz=24000) as stream:
        stream.push(pcm, 24000)          # int16 mono, any time, any length: never waits
        stream.end_segment()             # the speech paused or ended: its last frames come out
        frame = await stream.next_frame()   # LiveFrame: speech frames in order, idle frames in the silences
        stream.clear()                   # barge-in: queued speech and frames dropped, back to idle
    ```
    """

    TAIL_FRAMES = 2       # silence that ends a segment: the mouth closes while the voice is quiet

    def __init__(self, avatar: LiveAvatar, *, voice_rate_hz: int = VOICE_RATE_HZ, seed: int = 0,
                 gap_ms: float | None = SEGMENT_GAP_MS, profiler: Profiler | None = None) -> None:
        """`gap_ms`: how long a reader waits for more speech of a segment the speaker did not end before the
        segment is ended for it (its last frames need speech past their own end); None: never (a pacer ends
        segments on its own clock)."""
        preset = avatar.preset
        self.fps = preset.video.frame_rate
        if voice_rate_hz not in SPEECH_RATES_HZ or (voice_rate_hz / self.fps).denominator != 1:
            raise InputError(f"a voice at {voice_rate_hz} Hz does not divide into whole frames at {self.fps} fps")
        self.voice_rate_hz = voice_rate_hz
        self.voice_frames = FrameClock(self.fps, voice_rate_hz)
        self.feature_frames = FrameClock(self.fps, FEATURE_RATE_HZ)
        self.lookahead_frames = math.ceil(avatar.speech_lead_ms / self.voice_frames.frame_ms - 1 - 1e-9)
        self.gap_ms = gap_ms
        self.profiler = profiler or Profiler()
        self.generation = 0   # counts clears: a frame read before one is stale after it
        self.segments_opened = 0   # counts segments, however they end: a reader matches them to `ends_segment`
        stages: list[Stage] = [MotionStage(avatar.motion_model()), avatar.render_stage(), avatar.compose_stage()]
        # Chained on one thread: many sessions side by side, where a hand-off between threads costs more than it
        # overlaps.
        self._pipeline = Pipeline([Chain(stages)], queue_depth=preset.stream.queue_depth, profiler=self.profiler)
        self._hop = self.feature_frames.samples_of_ms(preset.stream.chunk_ms)
        self._idle = avatar.idle_painter(seed)
        self._painter = ThreadPoolExecutor(1, thread_name_prefix="talkstream-idle")
        self._fed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._waiting: asyncio.Future[tuple[int, LiveFrame]] | None = None
        self._cleared: asyncio.Future[None] | None = None   # done by the next `clear()`
        self._rendered = self._speech_frames()
        self._next_index = 0
        self._reset()

    def _reset(self) -> None:
        """Forget every segment: the renderer's timeline restarts at frame 0 (after its flush)."""
        self._voice = SpeechBuffer(self.voice_frames, 1)   # the voice of the frames being rendered, by frame
        self._to_voice: dict[int, Any] = {}                # input rate -> its streaming resampler
        self._to_features: dict[int, FeatureCopy] = {}
        self._pending: deque[np.ndarray] = deque()         # 16 kHz copy not yet in the pipeline
        self._segments: deque[_Segment] = deque()
        self._segment_start = 0       # the renderer's frame where the next segment starts
        self._voice_samples = 0       # voice of the open segment
        self._feature_samples = 0     # 16 kHz copy given to the renderer since the reset (pending included)
        self._rendered_frames = 0

    async def start(self) -> None:
        if not self._tasks:
            await self._pipeline.start()
            self._tasks = [asyncio.create_task(self._feed(), name="talkstream-live-feed")]

    # ------------------------------------------------------------------------------------------------ speech in

    def push(self, speech: np.ndarray, rate_hz: int) -> np.ndarray:
        """int16 mono speech at `rate_hz`, as it arrives: opens a segment after silence, extends the open one.
        Returns the voice it adds (int16 at the voice rate): what a pacer schedules."""
        if rate_hz not in SPEECH_RATES_HZ:
            raise InputError(f"speech at {rate_hz} Hz: {SPEECH_RATES_HZ.start} to {SPEECH_RATES_HZ.stop - 1} Hz "
                             "expected")
        speech = np.asarray(speech, np.int16).reshape(-1)
        if not len(speech):
            return speech
        if not self._open:
            self._segments.append(_Segment())
            self.segments_opened += 1
        voice = self._resampled(speech, rate_hz)
        copy = self._to_features.setdefault(rate_hz, FeatureCopy(rate_hz)).push(speech)
        self._say(voice, copy)
        return voice

    @property
    def _open(self) -> bool:
        return bool(self._segments) and self._segments[-1].frames is None

    @property
    def speaking(self) -> bool:
        """Speech frames still to come: a reader waits for them rather than paint idle frames."""
        return any(segment.speaking for segment in self._segments)

    def _resampled(self, speech: np.ndarray, rate_hz: int) -> np.ndarray:
        if rate_hz == self.voice_rate_hz:
            return speech
        resampler = self._to_voice.setdefault(rate_hz, av.AudioResampler("s16", "mono", self.voice_rate_hz))
        frame = av.AudioFrame.from_ndarray(speech[None, :], format="s16", layout="mono")
        frame.sample_rate = rate_hz
        return joined_samples(resampler.resample(frame), np.int16)

    def _resamplers_flushed(self) -> tuple[np.ndarray, np.ndarray]:
        """What the open segment's resamplers still hold (voice, 16 kHz copy); they start afresh after."""
        voice = [joined_samples(resampler.resample(None), np.int16) for resampler in self._to_voice.values()]
        copy = [to_features.flush() for to_features in self._to_features.values()]
        self._to_voice.clear()
        return (np.concatenate([np.zeros(0, np.int16), *voice]), np.concatenate([np.zeros(0, np.float32), *copy]))

    def _say(self, voice: np.ndarray, copy: np.ndarray) -> None:
        self._voice.add(voice)
        self._voice_samples += len(voice)
        if len(copy):
            self._pending.append(copy)
            self._feature_samples += len(copy)
            self._fed.set()

    def end_segment(self) -> np.ndarray | None:
        """The speech paused or its source ended: the open segment is padded with silence to whole frames (and a
        short tail), and the renderer gets the silence its look-ahead needs to let the last frame out. Returns the
        voice it adds (None when no segment was open)."""
        if not self._open:
            return None
        segment = self._segments[-1]
        held, copy = self._resamplers_flushed()
        self._say(held, copy)
        spoken = self._voice_samples
        frames = self.voice_frames.frames_for(spoken) + self.TAIL_FRAMES
        padding = np.zeros(self.voice_frames.start(frames) - self._voice_samples, np.int16)
        first = self._segment_start
        # The 16 kHz copy must end exactly where the segment's frames and look-ahead do, so that the next segment
        # starts on a frame boundary of the renderer's timeline (a resampler's few samples over: one extra frame).
        target = self.feature_frames.start(first + frames + self.lookahead_frames)
        if self._feature_samples > target:
            target = self.feature_frames.start(self.feature_frames.frames_for(self._feature_samples))
        extra = self.feature_frames.frames_for(target) - first - frames
        self._say(padding, np.zeros(target - self._feature_samples, np.float32))
        self._voice.add(np.zeros(self.voice_frames.start(first + frames + extra)
                                 - self.voice_frames.start(first + frames), np.int16))
        segment.frames, segment.extra, segment.spoken = frames, extra, spoken
        self._segment_start = first + frames + extra
        self._voice_samples = 0
        return np.concatenate([held, padding])

    def clear(self) -> None:
        """Barge-in: queued speech and frames are dropped at once; the face relaxes from where it is."""
        self.generation += 1
        self._pipeline.flush()
        self._reset()
        if self._cleared is not None and not self._cleared.done():
            self._cleared.set_result(None)
        self._cleared = None

    async def _feed(self) -> None:
        """The 16 kHz copy into the pipeline, a hop at a time, as its bounded queues take it."""
        hops = 0
        while True:
            while not self._pending:
                self._fed.clear()
                await self._fed.wait()
            copy = self._pending.popleft()
            if len(copy) > self._hop:
                self._pending.appendleft(copy[self._hop:])
                copy = copy[:self._hop]
            await self._pipeline.put(AudioChunk(hops, copy))
            hops += 1

    # ------------------------------------------------------------------------------------------------ frames out

    async def _speech_frames(self) -> AsyncGenerator[tuple[int, LiveFrame]]:
        """(generation, frame) for each speech frame as it finishes; the look-ahead's extra frames are dropped."""
        async for frame in self._pipeline.results():
            voice = self._voice.take(self._rendered_frames).reshape(-1)
            self._rendered_frames += 1
            segment = self._segments[0]
            spoken = len(voice) if segment.frames is None \
                else min(len(voice), max(0, segment.spoken - self.voice_frames.start(segment.rendered)))
            segment.rendered += 1
            shown = segment.frames is None or segment.rendered <= segment.frames
            ends = segment.frames is not None and segment.rendered == segment.frames
            if segment.frames is not None and segment.rendered == segment.frames + segment.extra:
                self._segments.popleft()
            if shown:
                yield self.generation, LiveFrame(-1, frame.image, voice, "speech", ends, spoken)

    async def next_speech_frame(self) -> LiveFrame | None:
        """The next speech frame, as soon as it is rendered; None if `clear()` comes first (a frame read before a
        clear is never returned after it). A segment the speaker leaves open and starved for `gap_ms` is ended
        here, so its last frames come out."""
        if self._cleared is None:
            self._cleared = asyncio.get_running_loop().create_future()
        cleared = self._cleared
        while True:
            if self._waiting is None:
                self._waiting = asyncio.ensure_future(anext(self._rendered))
            waiting = self._waiting
            gap = self.gap_ms if self._starved else None
            either: set[asyncio.Future[Any]] = {waiting, cleared}
            done, _ = await asyncio.wait(either, timeout=None if gap is None else seconds_of_ms(gap),
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                self._waiting = None
                generation, frame = waiting.result()
                if generation == self.generation:
                    return frame
            elif cleared in done:
                return None
            elif self._starved:
                self.end_segment()

    @property
    def _starved(self) -> bool:
        """The open segment's next frame needs speech past what was pushed."""
        needed = self.feature_frames.start(self._rendered_frames + 1 + self.lookahead_frames)
        return self._open and self._feature_samples < needed

    async def idle_frame(self, index: int, time_s: float) -> np.ndarray:
        """An idle frame (BGR) for frame `index` at media time `time_s`, painted on a thread of its own."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._painter, self._idle, index, time_s)

    async def next_frame(self) -> LiveFrame:
        """The next frame of the video: the speech's frames in order (waiting for them), idle frames where
        nobody speaks."""
        index = self._next_index
        self._next_index += 1
        if self.speaking and (frame := await self.next_speech_frame()) is not None:
            return replace(frame, index=index)
        image = await self.idle_frame(index, seconds_of_frames(index, self.fps))
        silence = np.zeros(self.voice_frames.start(index + 1) - self.voice_frames.start(index), np.int16)
        return LiveFrame(index, image, silence, "idle")

    def __aiter__(self) -> AsyncIterator[LiveFrame]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[LiveFrame]:
        while True:
            yield await self.next_frame()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        await asyncio.gather(*self._tasks, *([self._waiting] if self._waiting else []), return_exceptions=True)
        await self._pipeline.aclose()
        await self._rendered.aclose()
        self._painter.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class LiveStats:
    """A live session's figures at one instant (for /metrics and the live benchmark)."""

    speech_frames: int
    idle_frames: int
    repeated_frames: int
    dropped_frames: int
    clock_reanchors: int
    speech_received_s: float
    latency_target_s: float
    speech_to_frame_s: float       # the last utterance's: from its first speech in to its first frame out
    least_frame_slack_s: float     # the least time a speech frame was ready before its deadline (< 0: late)
    stage_ms_per_frame: dict[str, float] = field(default_factory=dict)


class LiveSession(Closing):
    """Speech in as it is spoken; video frames and the voice out at their deadlines on one clock, idle frames where
    nobody speaks. What a WebRTC peer (or any live sink) reads from: a pacer over a `ContinuousSession`.

    ```python
    async with avatar.open_live() as live:
        live.push(pcm, 16000)                      # int16 mono as it arrives (a microphone, a TTS stream)
        image, kind = await live.next_video(n)     # at frame n's deadline: "speech", "repeat" or "idle"
        voice = await live.next_audio(k)           # 20 ms block k at 48 kHz, silence when nobody speaks
    ```
    The voice is scheduled the moment it arrives and never waits for the renderer; an utterance ends with
    `end_utterance()` when a source ends, or by itself when the voice is about to run dry.
    """

    AHEAD_FRAMES = 25     # rendered frames held ahead of the video cursor (1 s at 25 fps): bounded memory
    # An open utterance whose voice runs out sooner than this is ended (padded): its last frames wait for the
    # padding's look-ahead and must still make their slots, which takes a render margin. A real-time stream keeps
    # `latency_ms` of voice ahead (less one chunk), so only a pause or a hiccup longer than that less this ends it.
    GUARD_MS = LIVE_RENDER_MARGIN_MS

    def __init__(self, avatar: LiveAvatar, *, clock: Clock | None = None, latency_ms: float | None = None,
                 seed: int = 0) -> None:
        if latency_ms is None:
            latency_ms = avatar.live_latency_ms
        elif latency_ms < avatar.speech_lead_ms:
            raise InputError(f"a latency of {latency_ms:g} ms is under the {avatar.speech_lead_ms:g} ms of speech "
                             "this avatar's frames need ahead of them")
        self.stream = ContinuousSession(avatar, voice_rate_hz=VOICE_RATE_HZ, seed=seed, gap_ms=None)
        self.timing = Timing(avatar.preset.video.frame_rate, VOICE_RATE_HZ)
        self.pacer = LivePacer(self.timing, clock, latency_ms=latency_ms)
        self._sent_slot = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.received_speech_s = 0.0

    async def start(self) -> None:
        """Start the renderer. The clock starts when a sender first asks for media (idle video and silence are
        always ready, so that is the start barrier)."""
        if not self._tasks:
            await self.stream.start()
            self._tasks = [asyncio.create_task(self._receive(), name="talkstream-live-frames")]

    async def _receive(self) -> None:
        """Speech frames to the pacer as they finish, no more than `AHEAD_FRAMES` ahead of the video cursor."""
        while True:
            if (frame := await self.stream.next_speech_frame()) is None:
                continue
            generation = self.stream.generation
            while self.pacer.buffered_frames >= self.AHEAD_FRAMES:
                self._sent_slot.clear()
                await self._sent_slot.wait()
            if generation == self.stream.generation:
                self.pacer.deliver(frame.image)

    def push(self, speech: np.ndarray, rate_hz: int) -> None:
        """int16 mono speech at `rate_hz`, as it arrives: scheduled at once, rendered in order."""
        voice = self.stream.push(speech, rate_hz)
        self.received_speech_s += len(np.asarray(speech).reshape(-1)) / rate_hz
        if len(voice):
            self.pacer.speak(voice)

    def end_utterance(self) -> None:
        """The speech paused or its source ended: its voice is padded to whole frames and a short tail."""
        padding = self.stream.end_segment()
        if padding is not None:
            self.pacer.speak(padding)
            self.pacer.end_utterance()

    def queued_speech_s(self) -> float:
        """Speech received and not yet played (s): what a sender that floods the session has piled up."""
        return seconds_of_ns(self.pacer.queued_voice_ns)

    def interrupt(self) -> None:
        """Barge-in: the voice stops at the next block, the face relaxes at the next frame; the clock runs on."""
        self.pacer.interrupt()
        self.stream.clear()

    async def next_video(self, slot: int) -> tuple[np.ndarray, str]:
        """Frame `slot` at its deadline: (image BGR, "speech" | "repeat" | "idle")."""
        self.pacer.start()
        await self.pacer.wait_for(self.timing.slot_ns(slot))
        image, kind = self.pacer.video_at(slot)
        self._sent_slot.set()
        if kind == "idle":
            image = await self.stream.idle_frame(slot, seconds_of_ns(self.timing.slot_ns(slot)))
            self.pacer.shown(image)
        return image, kind

    async def next_audio(self, block: int) -> np.ndarray:
        """Voice block `block` (int16 mono, 20 ms at 48 kHz) at its deadline; never waits for the renderer."""
        offset = self.timing.block_ns(block)
        self.pacer.start()
        await self.pacer.wait_for(offset)
        ends = self.pacer.open_voice_ends_ns
        if ends is not None and ends - offset < ns_of_ms(self.GUARD_MS):
            self.end_utterance()
        return self.pacer.audio_at(block)

    def stats(self) -> LiveStats:
        paced = self.pacer.stats
        return LiveStats(
            speech_frames=paced.speech_frames, idle_frames=paced.idle_frames,
            repeated_frames=paced.repeated_frames, dropped_frames=paced.dropped_frames,
            clock_reanchors=paced.reanchors, speech_received_s=self.received_speech_s,
            latency_target_s=seconds_of_ns(self.pacer.latency_ns),
            speech_to_frame_s=seconds_of_ns(paced.speech_latency_ns),
            least_frame_slack_s=seconds_of_ns(paced.least_slack_ns or 0),
            stage_ms_per_frame={stage.name: ms_of_ns(stage.busy_ns) / max(1, stage.items)
                                for stage in self.stream.profiler.stages})

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stream.aclose()

