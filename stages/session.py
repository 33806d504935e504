"""The public API: prepare an avatar once, open sessions on it, push speech, iterate finished frames.

```python
avatar = Avatar.prepare("portrait.png", preset="balanced")
async with avatar.open_session(speech_rate_hz=16000) as session:
    await session.push(pcm_int16)      # as speech arrives; waits when the pipeline is full
    await session.end()                # no more speech
    async for frame in session.frames():
        ...                            # frame.image (BGR), frame.speech (int16), frame.index (pts in 1/fps)
```
`stream.cli` and `server.py` are clients of this module; nothing else of `stages/` is theirs to wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from stages.audio import AAC_RATES_HZ, FEATURE_RATE_HZ, AudioReader, FeatureChunker, SpeechFormat, output_format
from stages.blend import BLEND_MODES, Blender, ComposeStage
from stages.enhance import WISHES, Restorer, load_restorer, make_enhancer, resolve_enhancer
from stages.motion import EmbeddedMotion, MotionStage, SpeechBuffer
from stages.portrait import DlibDetector, Portrait, prepare_portrait
from stages.render import RenderStage, WarpRenderer
from stages.sinks import Sink
from stream.clock import FrameClock
from stream.errors import InputError, PresetError
from stream.frames import StreamInfo, VideoFrame
from stream.pipeline import DRAIN_MAX, Pipeline, Stage, run_together
from stream.presets import Preset, PresetBook, build_section, check_choice, check_fixed
from stream.profile import Profiler, StageTimes

BACKENDS = ("embedded", "sadtalker")
SADTALKER_CROP_MODES = ("crop", "extcrop", "resize", "full", "extfull")  # spec §1.1
SADTALKER_MOTION = ("streaming", "offline")


@dataclass(frozen=True, slots=True)
class EmbeddedSettings:
    """Knobs of the embedded backend ([backends.embedded] in presets.toml)."""

    seed: int
    still: bool


@dataclass(frozen=True, slots=True)
class SadTalkerSettings:
    """Knobs of the SadTalker backend ([backends.sadtalker]; a preset may tune them in presets.NAME.backends)."""

    checkpoints: str                 # the folder holding SadTalker's files (`--checkpoints DIR`)
    size: int                        # which checkpoint: 256 or 512
    preprocess: str                  # SadTalker's crop mode
    pose_style: int
    expression_scale: float
    still: bool
    blink: bool
    seed: int
    motion: str                      # streaming | offline (upstream's whole-utterance path, for file renders)
    mapping_future_frames: int
    pose_lookahead_frames: int
    pose_lag_frames: int
    device: str
    precision: str
    compile: bool
    threads: int                     # torch CPU threads (0: one per core this process may use)
    render_px: int                   # 0: the checkpoint's size; 128/256/...: render smaller (previews, tests)


SETTINGS_BY_BACKEND: dict[str, type] = {"embedded": EmbeddedSettings, "sadtalker": SadTalkerSettings}
SETTING_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "embedded": {},
    "sadtalker": {
        "size": (lambda v: v in (256, 512), "256 or 512"),
        "preprocess": (lambda v: v in SADTALKER_CROP_MODES, "one of " + ", ".join(SADTALKER_CROP_MODES)),
        "pose_style": (lambda v: 0 <= v <= 45, "an integer from 0 to 45"),
        "expression_scale": (lambda v: 0 <= v <= 4, "a number from 0 to 4"),
        "motion": (lambda v: v in SADTALKER_MOTION, "streaming or offline"),
        "mapping_future_frames": (lambda v: 0 <= v <= 13, "an integer from 0 to 13"),
        "pose_lookahead_frames": (lambda v: 0 <= v <= 31, "an integer from 0 to 31"),
        "pose_lag_frames": (lambda v: 0 <= v <= 12, "an integer from 0 to 12"),
        "device": (lambda v: v in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
        "precision": (lambda v: v in ("auto", "float32", "float16", "bfloat16"),
                      "auto, float32, float16 or bfloat16"),
        "threads": (lambda v: 0 <= v <= 256, "an integer from 0 to 256"),
        "render_px": (lambda v: v == 0 or (v % 128 == 0 and 128 <= v <= 1024), "0 or a multiple of 128 up to 1024"),
    },
}
# What each backend fixes in every preset (SadTalker: 25 fps, 640 samples a frame at 16 kHz; spec §1.3).
FIXED_BY_BACKEND: dict[str, dict[str, Any]] = {"embedded": {}, "sadtalker": {"video.fps": 25}}
BackendSettings = EmbeddedSettings | SadTalkerSettings


def load_preset(
    name: str = "balanced", overrides: Iterable[str] = (), backend: str = "embedded", book: PresetBook | None = None
) -> tuple[Preset, BackendSettings]:
    """A preset validated against the backend and the stages' own choices, with the backend's settings."""
    if backend not in BACKENDS:
        raise PresetError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    book = book or PresetBook()
    preset, backends = book.get(name, overrides)
    check_fixed(preset, FIXED_BY_BACKEND[backend], backend)
    check_choice(preset, "blend.mode", BLEND_MODES)
    check_choice(preset, "enhance.enhancer", WISHES)
    settings = build_section(SETTINGS_BY_BACKEND[backend], backends.get(backend, {}), backend, SETTING_CHECKS[backend])
    return preset, settings


def _notice_to_stderr(message: str) -> None:
    print(f"talkstream: {message}", file=sys.stderr)


class Avatar:
    """A portrait prepared for one preset and backend: the picture, where the face goes, the renderer, the
    paste-back mask and the enhancer's network, built once and only read by the sessions opened on it."""

    def __init__(self, portrait: Portrait, preset: Preset, settings: BackendSettings, *, face: Any = None,
                 enhancer: str | None = None, restorer: Restorer | None = None) -> None:
        """`enhancer` is what `resolve_enhancer` chose (default: the preset's own name, when it is one); a neural
        one comes with its loaded `restorer`."""
        self.portrait = portrait
        self.preset = preset
        self.settings = settings
        self.face = face
        if face is None:
            self.renderer: Any = WarpRenderer(portrait.crop, portrait.landmarks)
            self.image, self.roi = portrait.image, portrait.roi
            x0, y0, x1, y1 = portrait.roi
            self.mask = self.renderer.mask
            if portrait.scale != 1.0:
                self.mask = cv2.resize(self.mask, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
        else:
            self.renderer, self.image, self.roi, self.mask = face.renderer, face.image, face.roi, face.mask
        self.enhancer = enhancer or preset.enhance.enhancer
        self.restorer = restorer
        # A neural enhancer aligns each frame by its landmarks: SadTalker frames have them found in the known box.
        self.locate = face.landmark_locator(DlibDetector()) if face is not None and restorer is not None else None

    @property
    def backend(self) -> str:
        return "embedded" if self.face is None else "sadtalker"

    def compose_stage(self) -> ComposeStage:
        """Paste-back and enhancer keep scratch buffers: every session gets its own."""
        return ComposeStage(Blender(self.preset.blend.mode, self.image, self.roi, self.mask),
                            make_enhancer(self.enhancer, self.roi, self.mask, restorer=self.restorer,
                                          locate=self.locate))

    def motion_model(self) -> Any:
        """The motion model of one session (it keeps that session's state)."""
        settings = self.settings
        if isinstance(settings, SadTalkerSettings):
            from stages.sadtalker_motion import MotionSettings

            motion = MotionSettings(settings.pose_style, settings.expression_scale, settings.still, settings.blink,
                                    settings.seed, settings.mapping_future_frames, settings.pose_lookahead_frames,
                                    settings.pose_lag_frames)
            return self.face.motion_model(motion, offline=settings.motion == "offline")
        fps = self.preset.video.frame_rate
        return EmbeddedMotion(fps=fps, sample_rate_hz=FEATURE_RATE_HZ, lookahead_ms=self.preset.motion.lookahead_ms,
                              seed=settings.seed, still=settings.still)

    def render_stage(self) -> RenderStage:
        """The embedded renderer knows the 68 points each crop shows: a neural enhancer aligns faces by them."""
        landmarks = self.renderer.landmarks_for if self.restorer is not None and self.face is None else None
        render = self.preset.render
        return RenderStage(self.renderer, render.max_batch, render.max_wait_ms, landmarks=landmarks)

    @classmethod
    def prepare(
        cls,
        portrait: str | Path | bytes,
        *,
        preset: str = "balanced",
        overrides: Iterable[str] = (),
        backend: str = "embedded",
        checkpoints: str | Path | None = None,
        networks: Any = None,
        cache_dir: Path | None = None,
        name: str | None = None,
        notice: Callable[[str], None] = _notice_to_stderr,
        strict: bool = False,
    ) -> Avatar:
        """Load the portrait, find the face (cached), and build everything per-frame work will only read.

        `checkpoints` is the folder with the official model files (SadTalker's, and GFPGANv1.4.pth or
        RestoreFormer.pth for the neural enhancers); `networks` (from `load_sadtalker`) lets several avatars share
        one loaded set. `strict`: a missing enhancer file is an error instead of a fallback with a notice.
        """
        if checkpoints is not None:
            overrides = [*overrides, f"sadtalker.checkpoints={str(checkpoints)!r}"]
        resolved, settings = load_preset(preset, overrides, backend)
        if isinstance(settings, SadTalkerSettings):
            checkpoints = settings.checkpoints or None
        enhance = resolved.enhance
        choice = resolve_enhancer(enhance.enhancer, checkpoints, device=enhance.device, strict=strict, notice=notice)
        prepared = prepare_portrait(portrait, max_side_px=resolved.video.max_side_px,
                                    crop_size=resolved.render.crop_size, cache_dir=cache_dir, name=name)
        if prepared.faces_found > 1:
            notice(f"found {prepared.faces_found} faces; animating the largest")
        face = None
        if isinstance(settings, SadTalkerSettings):
            face = _prepare_sadtalker(prepared, resolved, settings, networks)
        restorer = load_restorer(choice, device=enhance.device, max_batch=enhance.max_batch, threads=enhance.threads,
                                 notice=notice)
        return cls(prepared, resolved, settings, face=face, enhancer=choice.name, restorer=restorer)

    def open_session(self, speech_rate_hz: int, speech_channels: int = 1, *,
                     profiler: Profiler | None = None) -> Session:
        """A session for speech pushed as int16 at `speech_rate_hz` (a rate AAC carries), mono or stereo."""
        speech = output_format(speech_rate_hz, speech_channels)
        if (speech.rate_hz, speech.channels) != (speech_rate_hz, speech_channels):
            raise InputError(f"a session takes mono or stereo speech at one of {', '.join(map(str, AAC_RATES_HZ))} "
                             f"Hz, not {speech_channels} channels at {speech_rate_hz} Hz")
        return Session(self, speech, profiler=profiler)


def load_sadtalker(settings: SadTalkerSettings) -> Any:
    """Find and load SadTalker's networks for these settings (seconds: share the result between avatars)."""
    from stages.nets.checkpoints import find_checkpoints, load_networks

    if not settings.checkpoints:
        raise InputError("the sadtalker backend needs SadTalker's checkpoint files: --checkpoints DIR")
    return load_networks(find_checkpoints(settings.checkpoints, settings.size, settings.preprocess))


def load_networks(backend: str, checkpoints: str | Path | None, overrides: Iterable[str] = ()) -> Any:
    """The loaded networks a backend's avatars can share (None for the embedded backend, which has none)."""
    if backend != "sadtalker":
        return None
    extra = [f"sadtalker.checkpoints={str(checkpoints)!r}"] if checkpoints is not None else []
    _, settings = load_preset(overrides=[*overrides, *extra], backend=backend)
    assert isinstance(settings, SadTalkerSettings)
    return load_sadtalker(settings)


def describe_checkpoints(directory: str | Path) -> list[tuple[str, bool, str, str]]:
    """(file set, usable, detail, fix) for what a checkpoint folder holds (for `talkstream doctor`): SadTalker's
    networks and the neural enhancers, each file loaded."""
    from stages.nets.checkpoints import describe_checkpoints as describe
    from stages.nets.restorers import describe_restorers

    return [*describe(directory), *describe_restorers(directory)]


def renderer_benchmark(avatar: Avatar, frames: int = 4) -> dict[str, Any]:
    """SadTalker's generator alone: ms per frame of our cached, batched path and of upstream's way (the source
    encoding recomputed for every frame, one frame at a time), on the same driving keypoints."""
    from stages.sadtalker_render import renderer_speed

    if avatar.face is None:
        raise InputError("the renderer benchmark is for the sadtalker backend")
    return renderer_speed(avatar.face.renderer, frames)


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
    if avatar.face is not None:
        landmarks = None  # found in each frame, as in a SadTalker session
    else:
        landmarks = avatar.portrait.landmarks / avatar.portrait.scale + np.array([x0, y0], np.float32)
    timings = {}
    for batch in batches:
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


def _prepare_sadtalker(portrait: Portrait, preset: Preset, settings: SadTalkerSettings, networks: Any) -> Any:
    from stages.sadtalker_render import RenderSettings, prepare_face
    from stream.device import choose_placement, set_cpu_threads

    placement = choose_placement(settings.device, settings.precision)
    if not placement.is_cuda:
        set_cpu_threads(settings.threads)
    networks = networks or load_sadtalker(settings)
    x0, y0 = portrait.roi[:2]
    landmarks = portrait.landmarks / portrait.scale + np.array([x0, y0], np.float32)
    # On a CPU a bigger batch costs more per frame (spec §3.2): batches are for GPUs.
    render = RenderSettings(max_batch=preset.render.max_batch if placement.is_cuda else 1, compile=settings.compile)
    face = prepare_face(networks, portrait.image, landmarks, crop_mode=settings.preprocess,
                        size=settings.render_px or settings.size, placement=placement, settings=render)
    face.renderer.measure_batch()
    return face


class Session:
    """One stream of speech in, frames out, on an avatar. Push from one task, iterate frames from another."""

    def __init__(self, avatar: Avatar, speech: SpeechFormat, *, profiler: Profiler | None = None) -> None:
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
        self._pipeline = Pipeline(stages, queue_depth=preset.stream.queue_depth, profiler=self.profiler)
        self._started = False

    async def __aenter__(self) -> Session:
        await self.start()
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        trace: TracebackType | None) -> None:
        await self.aclose()

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
