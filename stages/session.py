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
import hashlib
import io
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.audio import (
    AAC_RATES_HZ,
    AudioReader,
    FeatureChunker,
    SpeechFormat,
    notice_on_stderr,
    output_format,
    wav_bytes,
)
from stages.backend import Backend, needs_extra
from stages.blend import BLEND_MODES, Blender, ComposeStage
from stages.embedded.backend import EmbeddedBackend
from stages.enhance import WISHES, Restorer, make_enhancer, prepare_restorer, resolve_enhancer
from stages.live import (
    LIVE_RATES_HZ,
    LIVE_RENDER_MARGIN_MS,
    VOICE_RATE_HZ,
    ContinuousSession,
    LiveFrame,
    LiveSession,
    LiveStats,
)
from stages.motion import MotionModel, MotionStage
from stages.portrait import DlibDetector, Portrait, prepare_portrait
from stages.render import RenderStage
from stages.sinks import Sink, check_writable, discard_partial, open_sink
from stream.clock import FrameClock, ms_of_seconds
from stream.errors import InputError, PresetError, TalkstreamError, first_line
from stream.frames import SpeechBuffer, StreamInfo, VideoFrame
from stream.pacing import Clock
from stream.pipeline import DRAIN_MAX, Chain, Closing, Pipeline, Stage, run_together
from stream.presets import DEFAULT_PRESET, Preset, PresetBook, build_section, check_choice, check_fixed
from stream.profile import Profiler, StageTimes

BACKENDS = ("embedded", "sadtalker")
WEBRTC_NAMES = ("BadOffer", "WebRtcPeer", "is_loopback", "live_peer_connections", "restrict_ice_to",
                "use_live_encoders")
# The door: the engine, and what its clients need of the stages (speech in, files out, landmarks); the WebRTC
# names and `bench_live` come from `__getattr__` below, on first use.
__all__ = [
    "LIVE_RATES_HZ", "AudioReader", "Avatar", "ContinuousSession", "DlibDetector", "LiveFrame", "LiveSession",
    "LiveStats", "Session", "check_writable", "discard_partial",
    "describe_checkpoints", "enhancer_benchmark", "load_networks", "load_preset", "open_sink", "render",
    "render_job", "renderer_benchmark", "speech_lead_ms", "wav_bytes",
]


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

    def open_continuous(self, *, voice_rate_hz: int = VOICE_RATE_HZ, seed: int = 0) -> ContinuousSession:
        """An unpaced live session: speech pushed as it comes, an endless video read at the reader's own pace
        (speech frames with their voice at `voice_rate_hz`, idle frames between); for frameworks that pace
        themselves."""
        return ContinuousSession(self, voice_rate_hz=voice_rate_hz, seed=seed)

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
                     profiler: Profiler | None = None, chained: bool = False) -> Session:
        """A session for speech pushed as int16 at `speech_rate_hz` (a rate AAC carries), mono or stereo; `chained`:
        its stages on one thread (see `Session`)."""
        speech = output_format(speech_rate_hz, speech_channels)
        if (speech.rate_hz, speech.channels) != (speech_rate_hz, speech_channels):
            raise InputError(f"a session takes mono or stereo speech at one of {', '.join(map(str, AAC_RATES_HZ))} "
                             f"Hz, not {speech_channels} channels at {speech_rate_hz} Hz")
        return Session(self, speech, profiler=profiler, chained=chained)


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
            per_frame.append(ms_of_seconds(time.perf_counter() - started) / batch)
        timings[batch] = statistics.median(per_frame[1:])
    restorer = avatar.restorer
    return {"enhancer": avatar.enhancer, "roi_px": [x1 - x0, y1 - y0],
            "device": restorer.placement.device if restorer else "cpu",
            "precision": restorer.placement.precision if restorer else "uint8/float32",
            "ms_per_frame_by_batch": timings}


class Session(Closing):
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
        # The speech waits here for its frames; the stages only see its 16 kHz copy.
        self._speech = SpeechBuffer(FrameClock(preset.video.frame_rate, speech.rate_hz), speech.channels)
        stages: list[Stage] = [
            FeatureChunker(speech, preset.stream.chunk_ms),
            MotionStage(avatar.motion_model()),
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
        self._speech.add(np.asarray(speech, np.int16))
        await self._pipeline.put(speech)

    async def end(self) -> None:
        """No more speech: the remaining frames come out, then `frames()` ends."""
        await self._pipeline.end()

    async def frames(self) -> AsyncIterator[VideoFrame]:
        async for frame in self._pipeline.results():
            yield self._with_speech(frame)

    async def frame_batches(self, max_batch: int = DRAIN_MAX) -> AsyncIterator[list[VideoFrame]]:
        """Finished frames, several at a time when several are ready (cheaper for a sink on another thread)."""
        async for batch in self._pipeline.results(max_batch):
            yield [self._with_speech(frame) for frame in batch]

    def _with_speech(self, frame: VideoFrame) -> VideoFrame:
        return replace(frame, speech=self._speech.take(frame.index))

    def interrupt(self) -> None:
        """Barge-in: drop queued speech and frames at once; the face relaxes and the session goes on."""
        self._pipeline.flush()
        self._speech.clear()

    async def aclose(self) -> None:
        await self._pipeline.aclose()


async def render(
    avatar: Avatar,
    reader: AudioReader,
    sink_factory: Callable[[StreamInfo], Sink],
    *,
    profiler: Profiler | None = None,
    on_frame: Callable[[VideoFrame], None] | None = None,
    chained: bool = False,
) -> int:
    """Speech from `reader` -> frames into the sink made for the stream; returns the number of frames written.

    The reader and the sink each run on a thread of their own, so decoding, rendering and encoding overlap.
    On any error (or cancellation) the sink is aborted, never closed as if complete. `chained`: the stages on one
    thread, for renders side by side (a batch), where each should take one core, not overlap its stages on two.
    """
    profiler = profiler or Profiler()
    loop = asyncio.get_running_loop()
    session = avatar.open_session(reader.format.rate_hz, reader.format.channels, profiler=profiler, chained=chained)
    making = loop.run_in_executor(None, sink_factory, session.info)
    try:
        sink = await asyncio.shield(making)
    except BaseException:   # stopped while the sink was being made (its temporary file too): removed once made
        with contextlib.suppress(Exception):
            await loop.run_in_executor(None, (await making).abort)
        raise
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


# `talkstream batch`: one job in a worker process or a Ray task, a failure told in its result, never raised (the
# other jobs go on); the avatars this process prepared are kept for the jobs after it (a course's 300 lessons prepare
# their portrait once per worker, not 300 times).

BATCH_AVATARS_KEPT = 8
_avatars: OrderedDict[tuple[Any, ...], Avatar] = OrderedDict()


def render_job(spec: dict[str, Any]) -> dict[str, Any]:
    """Render `spec` (its portrait, audio, output, format, preset, overrides, backend, checkpoints; the inputs' bytes
    where they were shipped). Returns status, seconds, frames, the seconds spent preparing its avatar (0 when this
    process had it) and, for a failure, the reason in one line."""
    started = time.perf_counter()
    prepare_s = 0.0
    try:
        cv2.setNumThreads(1)   # one thread per library: the parallelism is the jobs'
        output = Path(spec["output"])
        check_writable(output)
        audio = spec.get("audio_bytes")   # opened first: corrupt speech fails before any face work
        reader = AudioReader(io.BytesIO(audio) if audio is not None else Path(spec["audio"]), name=spec["audio"],
                             notice=_quiet)
        avatar, prepare_s = _avatar(spec)
        frames = asyncio.run(render(avatar, reader,
                                    lambda info: open_sink(output, spec["format"], info, avatar.preset.encode),
                                    chained=bool(spec.get("side_by_side"))))
    except TalkstreamError as error:
        return _failed(started, prepare_s, str(error))
    except Exception as error:  # noqa: BLE001 - one job's failure, told in its result; the batch goes on
        return _failed(started, prepare_s, f"{type(error).__name__}: {first_line(error)}")
    return {"status": "done", "seconds": time.perf_counter() - started, "frames": frames, "prepare_s": prepare_s}


def _failed(started: float, prepare_s: float, reason: str) -> dict[str, Any]:
    return {"status": "failed", "seconds": time.perf_counter() - started, "error": reason, "prepare_s": prepare_s}


def _avatar(spec: dict[str, Any]) -> tuple[Avatar, float]:
    """This process's avatar for the job's portrait (by the image's hash) and preset: prepared on first use."""
    portrait = spec.get("portrait_bytes")
    if portrait is None:
        portrait = Path(spec["portrait"]).read_bytes()
    key = (hashlib.sha256(portrait).hexdigest(), spec.get("preset"), tuple(spec.get("overrides", ())),
           spec.get("backend", "embedded"), spec.get("checkpoints"))
    if key in _avatars:
        _avatars.move_to_end(key)
        return _avatars[key], 0.0
    started = time.perf_counter()
    options: dict[str, Any] = {"overrides": spec.get("overrides", ()), "backend": spec.get("backend", "embedded"),
                               "checkpoints": spec.get("checkpoints"), "name": spec["portrait"], "notice": _quiet,
                               "strict": bool(spec.get("strict"))}
    if spec.get("preset"):
        options["preset"] = spec["preset"]
    avatar = Avatar.prepare(portrait, **options)
    _avatars[key] = avatar
    while len(_avatars) > BATCH_AVATARS_KEPT:
        _avatars.popitem(last=False)
    return avatar, time.perf_counter() - started


def _quiet(message: str) -> None:
    """Notices (a second face, audio not as declared) would break the batch's progress bar: jobs keep quiet."""


def __getattr__(name: str) -> Any:
    """The WebRTC sink's names and the live benchmark, imported on first use (aiortc costs a file render 0.3 s)."""
    if name in WEBRTC_NAMES:
        from stages import webrtc

        return getattr(webrtc, name)
    if name == "bench_live":
        from stages.live_bench import bench_live

        return bench_live
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
