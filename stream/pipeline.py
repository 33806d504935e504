"""Stages joined by bounded queues.

A `Stage` is one object with `async run(inbox, outbox)`. A `Pipeline` wires a list of them with bounded
`asyncio.Queue`s (backpressure: a slow sink slows the audio reader), runs them as tasks, reports the first error once
(cancelling the rest), and supports `flush()`: barge-in drops queued work without waiting behind it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

from stream.clock import seconds_of_ms
from stream.frames import EndOfStream
from stream.profile import Profiler, StageTimes

T = TypeVar("T")

_END = EndOfStream()
# Stages take whatever is already queued in one hop to their thread (never waiting for more): a file render
# amortises the hand-off over many items, a live stream still moves one item at a time.
DRAIN_MAX = 16


@dataclass(frozen=True, slots=True)
class _Entry:
    """A queued item stamped with the flush generation it belongs to."""

    generation: int
    item: Any


class Inbox:
    """The receiving end of a queue: iterate items until end of stream; stale items (before a flush) are skipped."""

    def __init__(self, queue: asyncio.Queue[_Entry], control: _Control, times: StageTimes) -> None:
        self._queue = queue
        self._control = control
        self._times = times
        self._ended = False
        self.generation = control.generation

    async def get(self) -> Any:
        """The next item, or an `EndOfStream` (returned once, then again on every later call)."""
        if self._ended:
            return _END
        while True:
            started = time.perf_counter_ns()
            entry = await self._queue.get()
            self._times.wait_ns += time.perf_counter_ns() - started
            if self._accept(entry):
                return entry.item

    def get_nowait(self) -> Any | None:
        """The next item if one is already queued, else None."""
        while not self._ended and not self._queue.empty():
            entry = self._queue.get_nowait()
            if self._accept(entry):
                return entry.item
        return None

    def _accept(self, entry: _Entry) -> bool:
        """False for an item made stale by a flush; notes the generation and the end of the stream."""
        ends = isinstance(entry.item, EndOfStream)
        if entry.generation < self._control.generation and not ends:
            return False
        self.generation = max(entry.generation, self.generation)
        self._ended = ends
        return True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        while not isinstance(item := await self.get(), EndOfStream):
            yield item

    async def batches(self, max_batch: int, max_wait_ms: float) -> AsyncIterator[list[Any]]:
        """Latency-bounded batches: the first item starts a batch, which closes when full or `max_wait_ms` later.

        A stage that is keeping up (it waited for this item) sends it at once with whatever else is queued: the
        first frame after silence never waits. A stage that is behind (items were already waiting) lets the batch
        fill for up to `max_wait_ms`: throughput where there is a backlog, latency where there is none.
        """
        loop = asyncio.get_running_loop()
        while True:
            behind = not self._queue.empty()
            if isinstance(first := await self.get(), EndOfStream):
                return
            batch = [first]
            deadline = loop.time() + (seconds_of_ms(max_wait_ms) if behind else 0.0)
            while len(batch) < max_batch:
                item = self.get_nowait()
                if item is None:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or self._ended:
                        break
                    try:
                        item = await asyncio.wait_for(self.get(), remaining)
                    except TimeoutError:
                        break
                if isinstance(item, EndOfStream):
                    break
                batch.append(item)
            yield batch
            if self._ended:
                return


class Outbox:
    """The sending end of a queue; items are stamped with the generation of the input they came from."""

    def __init__(self, queue: asyncio.Queue[_Entry], inbox: Inbox | None, control: _Control, times: StageTimes):
        self._queue = queue
        self._inbox = inbox
        self._control = control
        self._times = times

    async def put(self, item: Any) -> None:
        if isinstance(item, EndOfStream):
            generation = self._control.generation  # the end is never stale: a flush must not swallow it
        else:
            generation = self._inbox.generation if self._inbox is not None else self._control.generation
            if generation < self._control.generation:
                return
            self._times.items += 1
        started = time.perf_counter_ns()
        await self._queue.put(_Entry(generation, item))
        self._times.blocked_ns += time.perf_counter_ns() - started


class _Control:
    """State shared by every queue of one pipeline."""

    def __init__(self) -> None:
        self.generation = 0


class Stage:
    """Base of the stages: a name, and an executor of its own for blocking work (one worker keeps order).

    A stage either overrides `run`, or implements `process` (and `finish`): the default `run` takes batches of
    what is queued (`max_batch` items, waiting up to `max_wait_ms` for more only when behind) to `process` on the
    stage's thread, and `finish` at the end of the stream. Such stages can also run chained on one thread (`Chain`).
    """

    name = "stage"
    max_batch = DRAIN_MAX
    max_wait_ms = 0.0

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self.timing = StageTimes(self.name)

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for batch in inbox.batches(self.max_batch, self.max_wait_ms):
            for item in await self.offload(self.process, batch):
                await outbox.put(item)
        for item in await self.offload(self.finish):
            await outbox.put(item)

    def process(self, batch: list[Any]) -> list[Any]:
        """Items in -> items out, on the stage's thread."""
        raise NotImplementedError

    def finish(self) -> list[Any]:
        """The end of the stream: what the stage still holds, on the stage's thread."""
        return []

    @property
    def timings(self) -> list[StageTimes]:
        """What the profile shows for this stage."""
        return [self.timing]

    def on_flush(self) -> None:
        """Barge-in: drop internal state that belongs to the flushed speech.

        Runs on the stage's own thread, after the work in flight there, so it never races that work.
        """

    def flush(self) -> None:
        if self._pool is None:
            self.on_flush()
        else:
            self._pool.submit(self.on_flush)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on this stage's own thread, timing its CPU and wall time for the profile."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"talkstream-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.timing.timed, fn, *args)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


class Chain(Stage):
    """Stages run one after another on one thread: one hand-off per batch instead of one per stage.

    For many sessions side by side (a live server), where parallelism comes from the sessions and every hand-off
    between threads costs event-loop time and a turn of the GIL. Each stage keeps its own timing and batch size.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.name = "+".join(stage.name for stage in stages)
        super().__init__()
        self.stages = list(stages)

    def process(self, batch: list[Any]) -> list[Any]:
        for stage in self.stages:
            batch = self._through(stage, batch)
        return batch

    def finish(self) -> list[Any]:
        items: list[Any] = []
        for stage in self.stages:  # what the stages before let out, then what this one holds
            items = self._through(stage, items)
            held = stage.timing.timed(stage.finish)
            stage.timing.items += len(held)
            items += held
        return items

    @staticmethod
    def _through(stage: Stage, items: list[Any]) -> list[Any]:
        out: list[Any] = []
        for start in range(0, len(items), stage.max_batch):
            out += stage.timing.timed(stage.process, items[start:start + stage.max_batch])
        stage.timing.items += len(out)
        return out

    @property
    def timings(self) -> list[StageTimes]:
        return [stage.timing for stage in self.stages]

    def on_flush(self) -> None:
        for stage in self.stages:
            stage.on_flush()


class Pipeline:
    """A list of stages over bounded queues: `put()` feeds the first, `results()` drains the last."""

    def __init__(self, stages: Sequence[Stage], *, queue_depth: int = 4, profiler: Profiler | None = None) -> None:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)
        self.profiler = profiler or Profiler()
        self._control = _Control()
        self._queues: list[asyncio.Queue[_Entry]] = [asyncio.Queue(queue_depth) for _ in range(len(stages) + 1)]
        self._source_times = StageTimes("source")
        self._source = Outbox(self._queues[0], None, self._control, self._source_times)
        self._output = Inbox(self._queues[-1], self._control, StageTimes("output"))
        self._tasks: list[asyncio.Task[None]] = []
        self._error: BaseException | None = None
        self._closed = False

    async def start(self) -> None:
        """Start every stage as a task; the first to fail cancels the others."""
        for position, stage in enumerate(self.stages):
            inbox = Inbox(self._queues[position], self._control, stage.timing)
            outbox = Outbox(self._queues[position + 1], inbox, self._control, stage.timing)
            for timing in stage.timings:
                self.profiler.add(timing)
            task = asyncio.create_task(self._run_stage(stage, inbox, outbox), name=f"stage-{stage.name}")
            self._tasks.append(task)

    async def _run_stage(self, stage: Stage, inbox: Inbox, outbox: Outbox) -> None:
        stage.timing.start()
        try:
            await stage.run(inbox, outbox)
            await outbox.put(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # noqa: BLE001 - any stage failure must stop the whole pipeline
            self._fail(error, stage)
        finally:
            stage.timing.stop()
            stage.close()

    def _fail(self, error: BaseException, stage: Stage) -> None:
        if self._error is None:
            self._error = error
            error.add_note(f"(in the {stage.name} stage)")
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            # Empty every queue: a producer blocked on a full one wakes (its next put raises), and the consumer
            # finds an end of stream and the error instead of waiting for frames that never come.
            for queue in self._queues:
                while not queue.empty():
                    queue.get_nowait()
            self._queues[-1].put_nowait(_Entry(self._control.generation, _END))

    async def put(self, item: Any) -> None:
        """Feed the first stage; waits while the pipeline is full (backpressure)."""
        self._raise_if_failed()
        await self._source.put(item)

    async def end(self) -> None:
        """No more input: the end of stream flows through every stage."""
        self._raise_if_failed()
        await self._source.put(_END)

    async def results(self, max_batch: int | None = None) -> AsyncIterator[Any]:
        """Items out of the last stage, in order (or lists of up to `max_batch` that were ready together).

        Raises the first stage failure.
        """
        if max_batch is None:
            while not isinstance(item := await self._output.get(), EndOfStream):
                self._raise_if_failed()
                yield item
        else:
            async for batch in self._output.batches(max_batch, 0):
                self._raise_if_failed()
                yield batch
        await self.join()

    def _raise_if_failed(self) -> None:
        """Re-raise the first stage failure itself (a note names the stage), so typed user errors stay typed."""
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Barge-in: drop everything queued or in flight; stages reset their state. Clocks keep running."""
        self._control.generation += 1
        for queue in self._queues:
            kept = []
            while not queue.empty():
                entry = queue.get_nowait()
                if isinstance(entry.item, EndOfStream):
                    kept.append(entry)
            for entry in kept:
                queue.put_nowait(entry)
        for stage in self.stages:
            stage.flush()

    async def join(self) -> None:
        """Wait for every stage to finish; re-raise the first failure."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._raise_if_failed()

    async def aclose(self) -> None:
        """Cancel whatever still runs and wait for it: no task outlives the pipeline."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Closing:
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


async def run_together(*coroutines: Coroutine[Any, Any, Any]) -> None:
    """Run coroutines as tasks until all finish; the first failure cancels the others and is raised as it is."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            error = task.exception() if task in done and not task.cancelled() else None
            if error is not None:
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
