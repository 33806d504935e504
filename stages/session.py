"""The public API: prepare an avatar once, open sessions on it, push speech, iterate finished frames.

```python
avatar = Avatar.prepare("portrait.png", preset="balanced")
async with avatar.open_session(speech_rate_hz=16000) as session:
    await session.push(pcm_int16)      # as speech arrives; waits when the pipeline is full
    await session.end()                # no more speech
    async for frame in session.frames():
        ...                            # frame.image (BGR), frame.speech (int16), frame.index (pts in 1/fps)
```
`stream.cli`, `server.py` and applications are clients of this module and import nothing else of `stages/` (the
import contracts in pyproject.toml hold them to it): what they need is here, the WebRTC sink and the live benchmark
loaded only when asked for, so that file renders never import aiortc.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from stages.audio import (
    AAC_RATES_HZ,
    AudioReader,
    FeatureChunker,
    SpeechFormat,
    notice_on_stderr,
    output_format,
)
from stages.backend import Backend, needs_extra
from stages.blend import BLEND_MODES, Blender, ComposeStage
from stages.embedded.backend import EmbeddedBackend
from stages.enhance import WISHES, Restorer, make_enhancer, prepare_restorer, resolve_enhancer
from stages.motion import MotionModel, MotionStage, SpeechBuffer
from stages.portrait import DlibDetector, Portrait, prepare_portrait
from stages.render import RenderStage
from stages.sinks import Sink, check_writable, open_sink
from stream.clock import FrameClock
from stream.errors import InputError, PresetError
from stream.frames import StreamInfo, VideoFrame
from stream.pacing import Clock, LivePacer, Timing
from stream.pipeline import DRAIN_MAX, Chain, Pipeline, Stage, run_together
from stream.presets import DEFAULT_PRESET, Preset, PresetBook, build_section, check_choice, check_fixed
from stream.profile import Profiler, StageTimes

BACKENDS = ("embedded", "sadtalker")
WEBRTC_NAMES = ("BadOffer", "WebRtcPeer", "is_loopback", "restrict_ice_to", "use_live_encoders")
# The door: the engine, and what its clients need of the stages (speech in, files out, landmarks); the WebRTC
# names and `bench_live` come from `__getattr__` below, on first use.
__all__ = [
    "LIVE_RATES_HZ", "AudioReader", "Avatar", "DlibDetector", "LiveSession", "Session", "check_writable",
    "describe_checkpoints", "enhancer_benchmark", "load_networks", "load_preset", "open_sink", "render",
    "renderer_benchmark", "speech_lead_ms",
]
LIVE_RENDER_MARGIN_MS = 40   # a live frame's rendering and its hops between stages, with a busy second core
LIVE_RATES_HZ = (16000, 24000, 48000)  # raw live PCM's rates: a 16 kHz microphone, 24 kHz TTS, Opus' 48 kHz


def backend_named(name: str) -> type[Backend]:
    """The backend called `name`: SadTalker's side (and torch with it) is imported only when it is chosen."""
    if name == "embedded":
        return EmbeddedBackend
    if name == "sadtalker":
        from stages.sadtalker.backend import SadTalkerBackend

        return SadTalkerBackend
    raise PresetError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")


def load_preset(
    name: str = DEFAULT_PRESET, overrides: Iterable[str] = (), backend: str = "embedded", book: PresetBook | None = None
) -> tuple[Preset, Any]:
    """A preset validated against the backend and the stages' own choices, with the backend's settings."""
    kind = backend_named(backend)
    book = book or PresetBook()
    preset, backends = book.get(name, overrides)
    check_fixed(preset, kind.fixed, backend)
    check_choice(preset, "blend.mode", BLEND_MODES)
    check_choice(preset, "enhance.enhancer", WISHES)
    settings: Any = build_section(kind.settings_class, backends.get(backend, {}), backend, kind.setting_checks)
    return preset, settings


def speech_lead_ms(preset: Preset, settings: Any) -> float:
    """How far past a frame's start the speech must have arrived before the frame can be made: the frame itself and
    the motion's look-ahead (SadTalker: MappingNet's future frames, the pose's look-ahead and smoother lag, and the
    mel window)."""
    return backend_named(settings.backend).speech_lead_ms(preset, settings)


class Avatar:
    """A portrait prepared for one preset and backend: the picture, where the face goes, the backend's renderer, the
    paste-back mask and the enhancer's network, built once and only read by the sessions opened on it."""

    def __init__(self, portrait: Portrait, preset: Preset, settings: Any, backend: Backend, *,
                 enhancer: str | None = None, restorer: Restorer | None = None) -> None:
        """`backend` is the face the backend prepared from `portrait`; `enhancer` is what `resolve_enhancer` chose
        (default: the preset's own name, when it is one); a neural one comes with its loaded `restorer`."""
        self.portrait = portrait
        self.preset = preset
        self.settings = settings
        self.backend = backend
        self.image, self.roi, self.mask = backend.image, backend.roi, backend.mask
        self.enhancer = enhancer or preset.enhance.enhancer
        self.restorer = restorer
        # A neural enhancer aligns each frame by its landmarks: where the crops carry none, the backend finds them.
        self.locate = backend.landmark_locator() if restorer is not None else None

    def compose_stage(self) -> ComposeStage:
        """Paste-back and enhancer keep scratch buffers: every session gets its own."""
        return ComposeStage(Blender(self.preset.blend.mode, self.image, self.roi, self.mask),
                            make_enhancer(self.enhancer, self.roi, self.mask, restorer=self.restorer,
                                          locate=self.locate))

    def motion_model(self) -> MotionModel:
        """The motion model of one session (it keeps that session's state)."""
        return self.backend.motion_model()

    def render_stage(self) -> RenderStage:
        """Crops carry their landmarks where a neural enhancer aligns faces by them."""
        return self.backend.render_stage(with_landmarks=self.restorer is not None)

    def idle_painter(self, seed: int = 0) -> Callable[[int, float], np.ndarray]:
        """(frame index, media time s) -> an idle frame (BGR), made just in time: blinks and the head's sway at
        rest for the embedded backend, the portrait itself for SadTalker (seconds a frame on a CPU)."""
        return self.backend.idle_painter(self.compose_stage(), seed, with_landmarks=self.restorer is not None)

    @property
    def speech_lead_ms(self) -> float:
        """See `speech_lead_ms`: what a live session's latency covers, before render time."""
        return speech_lead_ms(self.preset, self.settings)

    @property
    def live_latency_ms(self) -> float:
        """A live session's default latency: the speech lead, a batch's wait, and a margin for rendering and the
        hops between stages on a busy machine (the embedded backend at ultra_fast: 60 + 0 + 40 ms)."""
        return self.speech_lead_ms + self.preset.render.max_wait_ms + LIVE_RENDER_MARGIN_MS

    def open_live(self, *, clock: Clock | None = None, latency_ms: float | None = None,
                  seed: int = 0) -> LiveSession:
        """A live session: speech pushed as it is spoken; paced video and voice out, idle in the silences.
        `latency_ms`: from speech in to its frame out (default: `live_latency_ms`)."""
        return LiveSession(self, clock=clock, latency_ms=latency_ms, seed=seed)

    @classmethod
    def prepare(
        cls,
        portrait: str | Path | bytes,
        *,
        preset: str = DEFAULT_PRESET,
        overrides: Iterable[str] = (),
        backend: str = "embedded",
        checkpoints: str | Path | None = None,
        networks: Any = None,
        cache_dir: Path | None = None,
        name: str | None = None,
        notice: Callable[[str], None] = notice_on_stderr,
        strict: bool = False,
    ) -> Avatar:
        """Load the portrait, find the face (cached), and build everything per-frame work will only read.

        `checkpoints` is the folder with the official model files (SadTalker's, and GFPGANv1.4.pth or
        RestoreFormer.pth for the neural enhancers); `networks` (from `load_networks`) lets several avatars share
        one loaded set. `strict`: a missing enhancer file is an error instead of a fallback with a notice.
        """
        if checkpoints is not None:
            overrides = [*overrides, f"sadtalker.checkpoints={str(checkpoints)!r}"]
        resolved, settings = load_preset(preset, overrides, backend)
        kind = backend_named(backend)
        checkpoints = kind.checkpoint_folder(settings) or checkpoints
        enhance = resolved.enhance
        choice = resolve_enhancer(enhance.enhancer, checkpoints, device=enhance.device, strict=strict, notice=notice)
        prepared = prepare_portrait(portrait, max_side_px=resolved.video.max_side_px,
                                    crop_size=resolved.render.crop_size, cache_dir=cache_dir, name=name)
        if prepared.faces_found > 1:
            notice(f"found {prepared.faces_found} faces; animating the largest")
        face = kind.prepare(prepared, resolved, settings, networks)
        with needs_extra("enhance", f"the {choice.name} enhancer"):
            restorer = prepare_restorer(choice, device=enhance.device, max_batch=enhance.max_batch,
                                        threads=enhance.threads, notice=notice)
        return cls(prepared, resolved, settings, face, enhancer=choice.name, restorer=restorer)

    def open_session(self, speech_rate_hz: int, speech_channels: int = 1, *,
                     profiler: Profiler | None = None) -> Session:
        """A session for speech pushed as int16 at `speech_rate_hz` (a rate AAC carries), mono or stereo."""
        speech = output_format(speech_rate_hz, speech_channels)
        if (speech.rate_hz, speech.channels) != (speech_rate_hz, speech_channels):
            raise InputError(f"a session takes mono or stereo speech at one of {', '.join(map(str, AAC_RATES_HZ))} "
                             f"Hz, not {speech_channels} channels at {speech_rate_hz} Hz")
        return Session(self, speech, profiler=profiler)


def load_networks(backend: str, checkpoints: str | Path | None, overrides: Iterable[str] = ()) -> Any:
    """The loaded networks a backend's avatars can share (None for the embedded backend, which has none)."""
    extra = [f"sadtalker.checkpoints={str(checkpoints)!r}"] if checkpoints is not None else []
    _, settings = load_preset(overrides=[*overrides, *extra], backend=backend)
    return backend_named(backend).load_shared_networks(settings)


def describe_checkpoints(directory: str | Path) -> list[tuple[str, bool, str, str]]:
    """(file set, usable, detail, fix) for what a checkpoint folder holds (for `talkstream doctor`): SadTalker's
    networks and the neural enhancers, each file loaded."""
    from stages.nets.checkpoints import describe_sadtalker_files
    from stages.nets.restorers import describe_restorers

    return [*describe_sadtalker_files(directory), *describe_restorers(directory)]


def renderer_benchmark(avatar: Avatar, frames: int = 4) -> dict[str, Any]:
    """SadTalker's generator alone: ms per frame of our cached, batched path and of upstream's way (the source
    encoding recomputed for every frame, one frame at a time), on the same driving keypoints."""
    if avatar.backend.name != "sadtalker":
        raise InputError("the renderer benchmark is for the sadtalker backend")
    from stages.sadtalker.backend import SadTalkerBackend
    from stages.sadtalker.render import renderer_speed

    assert isinstance(avatar.backend, SadTalkerBackend)
    return renderer_speed(avatar.backend.renderer, frames)


def enhancer_benchmark(avatar: Avatar, batches: Iterable[int] = (1, 4)) -> dict[str, Any]:
    """The avatar's enhancer alone on its portrait's face: ms per frame for each batch size (the median of timed
    calls after one warm-up: 2 for a neural enhancer, 50 for the light one), alignment and paste-back included."""
    import statistics
    import time

    stage = avatar.compose_stage()
    enhancer = stage.enhancer
    if enhancer is None:
        raise InputError("the enhancer benchmark needs an enhancer (the preset has none)")
    x0, y0, x1, y1 = avatar.roi
    landmarks = avatar.backend.portrait_landmarks()  # None: found in each frame, as in a SadTalker session
    timings = {}
    for batch in batches:
        if avatar.restorer is not None:
            avatar.restorer.batch = batch  # measured as asked, also where the avatar would run smaller batches
        per_frame = []
        for _ in range((2 if avatar.restorer else 50) + 1):
            frames = [avatar.image.copy() for _ in range(batch)]
            started = time.perf_counter()
            enhancer.enhance_batch(frames, [landmarks] * batch)
            per_frame.append((time.perf_counter() - started) * 1000 / batch)
        timings[batch] = statistics.median(per_frame[1:])
    restorer = avatar.restorer
    return {"enhancer": avatar.enhancer, "roi_px": [x1 - x0, y1 - y0],
            "device": restorer.placement.device if restorer else "cpu",
            "precision": restorer.placement.precision if restorer else "uint8/float32",
            "ms_per_frame_by_batch": timings}


class _Closing:
    """`async with` starts it and closes it, whatever happens inside."""

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()


class Session(_Closing):
    """One stream of speech in, frames out, on an avatar. Push from one task, iterate frames from another."""

    def __init__(self, avatar: Avatar, speech: SpeechFormat, *, profiler: Profiler | None = None,
                 chained: bool = False) -> None:
        """`chained`: the stages run one after another on one thread (see `Chain`): for live sessions, many side
        by side, where a hand-off between threads costs more than it overlaps."""
        self.avatar = avatar
        self.speech = speech
        preset = avatar.preset
        height, width = avatar.image.shape[:2]
        self.info = StreamInfo(width, height, preset.video.frame_rate, speech.rate_hz, speech.channels)
        self.profiler = profiler or Profiler()
        stages: list[Stage] = [
            FeatureChunker(speech, preset.stream.chunk_ms),
            MotionStage(avatar.motion_model(),
                        SpeechBuffer(FrameClock(preset.video.frame_rate, speech.rate_hz), speech.channels)),
            avatar.render_stage(),
            avatar.compose_stage(),
        ]
        if chained:
            stages = [Chain(stages)]
        self._pipeline = Pipeline(stages, queue_depth=preset.stream.queue_depth, profiler=self.profiler)
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self._pipeline.start()

    async def push(self, speech: np.ndarray) -> None:
        """Speech as int16 (samples, channels) at the session's rate; waits while the pipeline is full."""
        await self.start()
        await self._pipeline.put(speech)

    async def end(self) -> None:
        """No more speech: the remaining frames come out, then `frames()` ends."""
        await self._pipeline.end()

    def frames(self) -> AsyncIterator[VideoFrame]:
        return self._pipeline.results()

    def frame_batches(self, max_batch: int = DRAIN_MAX) -> AsyncIterator[list[VideoFrame]]:
        """Finished frames, several at a time when several are ready (cheaper for a sink on another thread)."""
        return self._pipeline.results(max_batch)

    def interrupt(self) -> None:
        """Barge-in: drop queued speech and frames at once; the face relaxes and the session goes on."""
        self._pipeline.flush()

    async def aclose(self) -> None:
        await self._pipeline.aclose()


class LiveSession(_Closing):
    """Speech in as it is spoken; video frames and the voice out at their deadlines on one clock, idle frames where
    nobody speaks. What a WebRTC peer (or any live sink) reads from.

    ```python
    async with avatar.open_live() as live:
        live.push(pcm, 16000)                      # int16 mono as it arrives (a microphone, a TTS stream)
        image, kind = await live.next_video(n)     # at frame n's deadline: "speech", "repeat" or "idle"
        voice = await live.next_audio(k)           # 20 ms block k at 48 kHz, silence when nobody speaks
    ```
    The voice goes out at 48 kHz from the speech as it came in (the renderer gets the same samples and makes its
    own 16 kHz copy for features). Speech is cut into utterances: `end_utterance()` when a source ends, or
    automatically when the voice is about to run dry; either pads it with silence to whole frames.
    """

    VOICE_RATE_HZ = 48000
    AHEAD_FRAMES = 25     # rendered frames held ahead of the video cursor (1 s at 25 fps): bounded memory
    TAIL_FRAMES = 2       # silence that ends an utterance: the mouth closes while the voice is quiet
    # An open utterance whose voice runs out sooner than this is ended (padded): its last frames wait for the
    # padding's look-ahead and must still make their slots, which takes a render margin. A real-time stream keeps
    # `latency_ms` of voice ahead (less one chunk), so only a pause or a hiccup longer than that less this ends it.
    GUARD_MS = LIVE_RENDER_MARGIN_MS

    def __init__(self, avatar: Avatar, *, clock: Clock | None = None, latency_ms: float | None = None,
                 seed: int = 0) -> None:
        self.avatar = avatar
        if latency_ms is None:
            latency_ms = avatar.live_latency_ms
        elif latency_ms < avatar.speech_lead_ms:
            raise InputError(f"a latency of {latency_ms:g} ms is under the {avatar.speech_lead_ms:g} ms of speech "
                             "this avatar's frames need ahead of them")
        self.timing = Timing(avatar.preset.video.frame_rate, self.VOICE_RATE_HZ)
        frame_ms = 1000 / float(self.timing.fps)
        self._lookahead_frames = math.ceil(avatar.speech_lead_ms / frame_ms - 1 - 1e-9)  # past a frame's own end
        self.pacer = LivePacer(self.timing, clock, latency_ms=latency_ms)
        self.session = Session(avatar, output_format(self.VOICE_RATE_HZ, 1), chained=True)
        self._to_voice: dict[int, Any] = {}   # input rate -> its streaming resampler to the voice rate
        self._idle = avatar.idle_painter(seed)
        self._painter = ThreadPoolExecutor(1, thread_name_prefix="talkstream-idle")
        self._open_samples = 0           # voice samples of the open utterance
        # The renderer is fed from a queue of its own: the voice is scheduled at once and the senders never wait
        # behind the renderer's backpressure; frames come back no further ahead than `AHEAD_FRAMES`.
        self._to_render: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self._sent_slot = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.received_speech_s = 0.0

    async def start(self) -> None:
        """Start the renderer. The clock starts when a sender first asks for media (idle video and silence are
        always ready, so that is the start barrier)."""
        if not self._tasks:
            await self.session.start()
            self._tasks = [asyncio.create_task(self._feed(), name="talkstream-live-feed"),
                           asyncio.create_task(self._receive(), name="talkstream-live-frames")]

    async def _feed(self) -> None:
        while True:
            await self.session.push((await self._to_render.get())[:, None])

    async def _receive(self) -> None:
        async for frame in self.session.frames():
            while self.pacer.buffered_frames >= self.AHEAD_FRAMES:
                self._sent_slot.clear()
                await self._sent_slot.wait()
            self.pacer.deliver(frame.image)

    def push(self, speech: np.ndarray, rate_hz: int) -> None:
        """int16 mono speech at `rate_hz`, as it arrives: scheduled at once, rendered in order."""
        if not 8000 <= rate_hz <= 192000:
            raise InputError(f"speech at {rate_hz} Hz: 8000 to 192000 Hz expected")
        speech = np.asarray(speech, np.int16).reshape(-1)
        self.received_speech_s += len(speech) / rate_hz
        voice = self._resampled(speech, rate_hz)
        if len(voice):
            self._say(voice)

    def _resampled(self, speech: np.ndarray, rate_hz: int) -> np.ndarray:
        if rate_hz == self.VOICE_RATE_HZ:
            return speech
        import av

        resampler = self._to_voice.setdefault(rate_hz, av.AudioResampler("s16", "mono", self.VOICE_RATE_HZ))
        frame = av.AudioFrame.from_ndarray(speech[None, :], format="s16", layout="mono")
        frame.sample_rate = rate_hz
        parts = [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)

    def _say(self, voice: np.ndarray) -> None:
        self.pacer.speak(voice)
        self._open_samples += len(voice)
        self._to_render.put_nowait(voice)

    def end_utterance(self) -> None:
        """The speech paused or its source ended: pad it with silence to whole frames (and a short tail), and give
        the renderer the silence its look-ahead needs to let the last frame out (the frames that silence makes are
        discarded)."""
        if not self._open_samples:
            return
        frame = self.timing.frame_samples
        self._say(np.zeros(-self._open_samples % frame + self.TAIL_FRAMES * frame, np.int16))
        self._to_render.put_nowait(np.zeros(self._lookahead_frames * frame, np.int16))
        self.pacer.end_utterance(self._lookahead_frames)
        self._open_samples = 0

    def interrupt(self) -> None:
        """Barge-in: the voice stops at the next block, the face relaxes at the next frame; the clock runs on."""
        self.pacer.interrupt()
        while not self._to_render.empty():
            self._to_render.get_nowait()
        self.session.interrupt()
        self._open_samples = 0

    async def next_video(self, slot: int) -> tuple[np.ndarray, str]:
        """Frame `slot` at its deadline: (image BGR, "speech" | "repeat" | "idle")."""
        self.pacer.start()
        await self.pacer.wait_for(self.timing.slot_ns(slot))
        image, kind = self.pacer.video_at(slot)
        self._sent_slot.set()
        if kind == "idle":
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(self._painter, self._idle, slot, self.timing.slot_ns(slot) / 1e9)
            self.pacer.shown(image)
        return image, kind

    async def next_audio(self, block: int) -> np.ndarray:
        """Voice block `block` (int16 mono, 20 ms at 48 kHz) at its deadline; never waits for the renderer."""
        offset = self.timing.block_ns(block)
        self.pacer.start()
        await self.pacer.wait_for(offset)
        ends = self.pacer.open_voice_ends_ns
        if ends is not None and ends - offset < self.GUARD_MS * 1_000_000:
            self.end_utterance()
        return self.pacer.audio_at(block)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.session.aclose()
        self._painter.shutdown(wait=False, cancel_futures=True)


async def render(
    avatar: Avatar,
    reader: AudioReader,
    sink_factory: Callable[[StreamInfo], Sink],
    *,
    profiler: Profiler | None = None,
    on_frame: Callable[[VideoFrame], None] | None = None,
) -> int:
    """Speech from `reader` -> frames into the sink made for the stream; returns the number of frames written.

    The reader and the sink each run on a thread of their own, so decoding, rendering and encoding overlap.
    On any error (or cancellation) the sink is aborted, never closed as if complete.
    """
    profiler = profiler or Profiler()
    loop = asyncio.get_running_loop()
    session = avatar.open_session(reader.format.rate_hz, reader.format.channels, profiler=profiler)
    sink = await loop.run_in_executor(None, sink_factory, session.info)
    decode_times, sink_times = profiler.stage("decode"), profiler.stage("sink")
    sink_pool = ThreadPoolExecutor(1, thread_name_prefix="talkstream-sink")
    blocks = _read_in_background(reader, loop, decode_times)
    frames = 0

    async def feed() -> None:
        while (block := await blocks.get()) is not None:
            if isinstance(block, BaseException):
                raise block
            decode_times.items += 1
            await session.push(block)
        await session.end()

    def write(batch: list[VideoFrame]) -> None:
        for frame in batch:
            sink.write(frame)

    async def drain() -> None:
        nonlocal frames
        async for batch in session.frame_batches():
            await loop.run_in_executor(sink_pool, sink_times.timed, write, batch)
            sink_times.items += len(batch)
            frames += len(batch)
            if on_frame is not None:
                on_frame(batch[-1])

    try:
        async with session:
            await run_together(feed(), drain())
        await loop.run_in_executor(sink_pool, sink.close)
    except BaseException:
        await asyncio.shield(loop.run_in_executor(sink_pool, sink.abort))
        raise
    finally:
        sink_pool.shutdown(wait=False, cancel_futures=True)
    return frames


def _read_in_background(reader: AudioReader, loop: asyncio.AbstractEventLoop,
                        times: StageTimes) -> asyncio.Queue[np.ndarray | BaseException | None]:
    """Decode on a daemon thread: a read blocked on a live stdin must never keep the process from exiting
    (pool threads are joined at exit). Blocks, then None at the end, or the error, arrive on the queue."""
    blocks: asyncio.Queue[np.ndarray | BaseException | None] = asyncio.Queue(maxsize=4)

    def hand_over(item: np.ndarray | BaseException | None) -> None:
        asyncio.run_coroutine_threadsafe(blocks.put(item), loop).result()

    def pump() -> None:
        try:
            while (block := times.timed(reader.read)) is not None:
                hand_over(block)
            hand_over(None)
        except RuntimeError:
            return  # the loop is gone: nobody is listening any more
        except Exception as error:  # noqa: BLE001 - handed to the event loop, raised there
            with contextlib.suppress(RuntimeError):
                hand_over(error)

    threading.Thread(target=pump, name="talkstream-decode", daemon=True).start()
    return blocks


def __getattr__(name: str) -> Any:
    """The WebRTC sink's names and the live benchmark, imported on first use (aiortc costs a file render 0.3 s)."""
    if name in WEBRTC_NAMES:
        from stages import webrtc

        return getattr(webrtc, name)
    if name == "bench_live":
        from stages.live_bench import bench_live

        return bench_live
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
