"""`talkstream bench`: fps, CPU ms per frame, real-time factor, streaming first-frame latency and per-stage ms.

Knows nothing about faces: the CLI hands it a `Backend` of callables built on the public API.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from stream.clock import ms_of_seconds, samples_of_ms, seconds_of_ms
from stream.profile import Profiler


@dataclass(frozen=True, slots=True)
class RenderRun:
    frames: int
    wall_s: float
    cpu_s: float
    profiler: Profiler


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    audio: Path
    seconds: float


@dataclass(frozen=True, slots=True)
class Backend:
    """What the bench drives, for one preset: a whole file render, and a session fed like a live stream."""

    render_file: Callable[[str, Path, Path], RenderRun]   # preset, audio, output -> run
    open_session: Callable[[str, int], Any]               # preset, rate -> session (async with; push/end/frames)
    speech: Any                                           # int16 mono speech for the live feed
    speech_rate_hz: int


async def first_frame_latency_s(session: Any, speech: Any, rate_hz: int, chunk_ms: int = 20) -> float:
    """Chunks pushed at the pace they would be spoken: seconds from the first chunk to the first frame out."""
    step = samples_of_ms(chunk_ms, rate_hz)
    first_frame = asyncio.get_running_loop().create_future()
    async with session:
        async def speak() -> None:
            started = time.perf_counter()
            for index, offset in enumerate(range(0, len(speech), step)):
                await session.push(speech[offset: offset + step])
                if first_frame.done():
                    break
                await asyncio.sleep(max(0.0, started + seconds_of_ms((index + 1) * chunk_ms) - time.perf_counter()))
            await session.end()

        async def watch() -> None:
            async for _ in session.frames():
                if not first_frame.done():
                    first_frame.set_result(time.perf_counter())
                    session.interrupt()  # the rest is not measured: a slow backend need not render it

        started = time.perf_counter()
        await asyncio.gather(speak(), watch())
    return first_frame.result() - started


def measure_render(render: Callable[[], tuple[int, Profiler]]) -> RenderRun:
    """Wall and whole-process CPU time of one render (every thread: decode, stages, encoder)."""
    wall, cpu = time.perf_counter(), time.process_time()
    frames, profiler = render()
    return RenderRun(frames, time.perf_counter() - wall, time.process_time() - cpu, profiler)


def bench_preset(backend: Backend, preset: str, workloads: list[Workload], runs: int, out_dir: Path,
                 log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {"preset": preset, "workloads": {}}
    backend.render_file(preset, workloads[0].audio, out_dir / "warmup.mp4")
    for workload in workloads:
        measured = [backend.render_file(preset, workload.audio, out_dir / f"{workload.name}.mp4") for _ in range(runs)]
        median = sorted(measured, key=lambda run: run.wall_s)[len(measured) // 2]
        fps = [run.frames / run.wall_s for run in measured]
        row = {
            "seconds_of_speech": workload.seconds,
            "frames": median.frames,
            "fps": statistics.median(fps),
            "fps_runs": fps,
            "cpu_ms_per_frame": statistics.median(ms_of_seconds(run.cpu_s) / run.frames for run in measured),
            "real_time_factor": statistics.median(run.wall_s / workload.seconds for run in measured),
            "stages": median.profiler.summary(median.frames),
        }
        results["workloads"][workload.name] = row
        log(f"{preset:<11} {workload.name:<8} {row['frames']:>6} frames  {row['fps']:8.1f} fps  "
            f"{row['cpu_ms_per_frame']:6.2f} CPU ms/frame  RTF {row['real_time_factor']:.3f}")
    latencies = [
        asyncio.run(first_frame_latency_s(backend.open_session(preset, backend.speech_rate_hz), backend.speech,
                                          backend.speech_rate_hz))
        for _ in range(max(3, runs))
    ]
    results["first_frame_latency_ms"] = ms_of_seconds(statistics.median(latencies))
    results["first_frame_latency_ms_runs"] = [ms_of_seconds(value) for value in latencies]
    log(f"{preset:<11} streaming first-frame latency {results['first_frame_latency_ms']:.1f} ms "
        "(20 ms chunks in real time)")
    return results


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: the platform string below still says what ran
    versions = {}
    for package in ("numpy", "scipy", "opencv-python", "av", "dlib-bin", "uvloop", "torch"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "versions": versions}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_stage_table(result: dict[str, Any], log: Callable[[str], None]) -> None:
    for name, row in result["workloads"].items():
        log(f"  per stage, {name} ({result['preset']}):")
        for stage in row["stages"]:
            log(f"    {stage['stage']:<9} {stage['ms_per_frame']:7.3f} ms/frame  {stage['cpu_ms_per_frame']:7.3f} "
                f"CPU ms/frame  {stage['share']:6.1%}")


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")
