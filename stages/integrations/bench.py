"""`talkstream bench --integrations`: what each framework's adapter adds to a frame of the bare continuous session
(the picture's conversion and the framework's frame objects), timed on real frames of the example speech."""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from typing import Any

from stages.live import LiveFrame
from stages.live_bench import example_speech
from stream.clock import ms_of_ns

RATE_HZ = 24000
FRAMES = 150


async def integration_benchmark(avatar: Any, log: Callable[[str], None]) -> dict[str, Any]:
    """ms per frame: the bare session's (reading a frame, for scale), then each installed integration's own."""
    speech = example_speech(RATE_HZ)
    async with avatar.open_continuous(voice_rate_hz=RATE_HZ) as stream:
        stream.push(speech, RATE_HZ)
        stream.end_segment()
        frames = [await stream.next_frame() for _ in range(FRAMES)]
        session_ms = sum(ms_of_ns(stage.busy_ns) / max(1, stage.items) for stage in stream.profiler.stages)
    fps = float(avatar.preset.video.frame_rate)
    report: dict[str, Any] = {"frames": len(frames), "speech_frames": sum(f.kind == "speech" for f in frames),
                              "session_ms_per_frame": session_ms}
    log(f"integrations: {len(frames)} frames of the example speech; the bare session makes a frame in "
        f"{session_ms:.2f} ms (its stages' busy time)")
    for name, extra, adapter in (("livekit", "livekit.agents", _livekit), ("pipecat", "pipecat", _pipecat)):
        if importlib.util.find_spec(extra) is None:
            log(f"  {name:8s} not installed (pip install -e '.[{name}]')")
            continue
        convert = adapter(fps)
        costs = []
        for frame in frames:
            started = time.perf_counter()
            convert(frame)
            costs.append(time.perf_counter() - started)
        figures = {"median_ms": 1000 * statistics.median(costs), "p95_ms": 1000 * sorted(costs)[len(costs) * 95 // 100]}
        report[name] = figures
        log(f"  {name:8s} +{figures['median_ms']:.3f} ms a frame over the bare session (p95 {figures['p95_ms']:.3f})")
    return report


def _livekit(fps: float) -> Callable[[LiveFrame], object]:
    from stages.integrations.livekit import audio_frame, video_frame

    return lambda frame: (video_frame(frame), audio_frame(frame, RATE_HZ) if frame.spoken else None)


def _pipecat(fps: float) -> Callable[[LiveFrame], object]:
    from stages.integrations.pipecat import pipecat_frames

    return lambda frame: pipecat_frames(frame, fps, RATE_HZ)
