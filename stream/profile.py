"""Per-stage timing, measured from outside the stages: busy time, CPU time, items, time spent waiting on queues."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from stream.clock import ms_of_ns

T = TypeVar("T")


@dataclass(slots=True)
class StageTimes:
    """Counters of one stage. `wait_ns`: starved (waiting for input); `blocked_ns`: backpressure (output full)."""

    name: str
    items: int = 0
    work_ns: int = 0      # wall time inside offloaded work
    cpu_ns: int = 0       # thread CPU time inside offloaded work
    calls: int = 0
    wait_ns: int = 0
    blocked_ns: int = 0
    started_ns: int = 0
    stopped_ns: int = 0

    def start(self) -> None:
        self.started_ns = time.perf_counter_ns()

    def stop(self) -> None:
        self.stopped_ns = time.perf_counter_ns()

    def timed(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (on the calling thread) and add its wall and CPU time."""
        wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return fn(*args)
        finally:
            self.cpu_ns += time.thread_time_ns() - cpu
            self.work_ns += time.perf_counter_ns() - wall
            self.calls += 1

    @property
    def busy_ns(self) -> int:
        """Time not spent waiting on either queue: offloaded work plus work done on the event loop."""
        lifetime = max(0, self.stopped_ns - self.started_ns)
        return max(self.work_ns, lifetime - self.wait_ns - self.blocked_ns)


@dataclass(slots=True)
class Profiler:
    """Collects `StageTimes` of a run and turns them into a table or a JSON-ready dict."""

    stages: list[StageTimes] = field(default_factory=list)

    def add(self, times: StageTimes) -> None:
        self.stages.append(times)

    def stage(self, name: str) -> StageTimes:
        """Counters for work timed by hand (e.g. the sink, driven by the caller)."""
        times = StageTimes(name)
        self.stages.append(times)
        return times

    def summary(self, frames: int) -> list[dict[str, Any]]:
        frames = max(frames, 1)
        total = sum(stage.busy_ns for stage in self.stages) or 1
        return [
            {
                "stage": stage.name,
                "ms_per_frame": ms_of_ns(stage.busy_ns) / frames,
                "cpu_ms_per_frame": ms_of_ns(stage.cpu_ns) / frames,
                "items": stage.items,
                "queue_wait_ms": ms_of_ns(stage.wait_ns),
                "blocked_ms": ms_of_ns(stage.blocked_ns),
                "share": stage.busy_ns / total,
            }
            for stage in self.stages
        ]

    def table(self, frames: int) -> str:
        """The per-stage performance summary printed by `--profile`."""
        rows = self.summary(frames)
        header = f"{'stage':<10} {'ms/frame':>9} {'cpu ms/fr':>9} {'items':>7} {'wait ms':>9} {'blocked ms':>10}"
        lines = [f"{header} {'share':>6}"]
        for row in rows:
            lines.append(
                f"{row['stage']:<10} {row['ms_per_frame']:>9.3f} {row['cpu_ms_per_frame']:>9.3f} {row['items']:>7d}"
                f" {row['queue_wait_ms']:>9.1f} {row['blocked_ms']:>10.1f} {row['share']:>6.1%}"
            )
        return "\n".join(lines)
