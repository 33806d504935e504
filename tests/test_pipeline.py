"""The runtime on its own: ordering, end of stream, errors, cancellation, flush, backpressure, batching."""

from __future__ import annotations

import asyncio

import pytest

from stream.pipeline import Chain, Inbox, Outbox, Pipeline, Stage, run_together


class Double(Stage):
    name = "double"

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for item in inbox:
            await outbox.put(await self.offload(lambda x: 2 * x, item))


class Repeat(Stage):
    """One item in, `times` items out; emits a trailer at end of stream."""

    name = "repeat"

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.flushed = 0

    def on_flush(self) -> None:
        self.flushed += 1

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for item in inbox:
            for _ in range(self.times):
                await outbox.put(item)
        await outbox.put("trailer")


class FailOn(Stage):
    name = "fail"

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for item in inbox:
            if item == self.bad:
                raise ValueError(f"cannot take {item}")
            await outbox.put(item)


class Gate(Stage):
    """Passes items only while its event is set: a stand-in for a slow renderer."""

    name = "gate"

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()
        self.taken: list[int] = []

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for item in inbox:
            self.taken.append(item)
            await self.open.wait()
            await outbox.put(item)


class Batcher(Stage):
    name = "batcher"

    def __init__(self, max_batch: int, max_wait_ms: float) -> None:
        super().__init__()
        self.max_batch, self.max_wait_ms = max_batch, max_wait_ms

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for batch in inbox.batches(self.max_batch, self.max_wait_ms):
            await outbox.put(batch)


async def collect(pipeline: Pipeline) -> list:
    return [item async for item in pipeline.results()]


async def feed(pipeline: Pipeline, items) -> None:
    for item in items:
        await pipeline.put(item)
    await pipeline.end()


async def test_items_come_out_in_order_through_every_stage():
    pipeline = Pipeline([Double(), Double(), Double()], queue_depth=2)
    await pipeline.start()
    results, _ = await asyncio.gather(collect(pipeline), feed(pipeline, range(100)))
    assert results == [8 * i for i in range(100)]


async def test_end_of_stream_reaches_the_end_after_trailing_items():
    pipeline = Pipeline([Repeat(2), Double()], queue_depth=1)
    await pipeline.start()
    results, _ = await asyncio.gather(collect(pipeline), feed(pipeline, [1, 2]))
    assert results == [2, 2, 4, 4, "trailertrailer"]


async def test_an_empty_stream_ends_cleanly():
    pipeline = Pipeline([Double(), Repeat(3)])
    await pipeline.start()
    results, _ = await asyncio.gather(collect(pipeline), feed(pipeline, []))
    assert results == ["trailer"]


async def test_the_first_error_stops_everything_and_is_raised_once_as_itself():
    pipeline = Pipeline([Double(), FailOn(10), Double()], queue_depth=2)
    await pipeline.start()
    producer = asyncio.ensure_future(feed(pipeline, range(1000)))
    seen = []
    with pytest.raises(ValueError, match="cannot take 10") as caught:
        async for item in pipeline.results():
            seen.append(item)
    assert [note for note in caught.value.__notes__ if "stage" in note] == ["(in the fail stage)"]
    assert seen == [4 * i for i in range(len(seen))] and len(seen) <= 5
    with pytest.raises(ValueError):  # the producer learns of it too, instead of waiting on a full queue
        await producer
    await pipeline.aclose()
    assert all(task.done() for task in asyncio.all_tasks() if task.get_name().startswith("stage-"))


async def test_a_failure_wakes_a_producer_blocked_on_a_full_pipeline():
    pipeline = Pipeline([FailOn(0)], queue_depth=1)
    await pipeline.start()
    with pytest.raises(ValueError):
        await run_together(feed(pipeline, range(50)), collect(pipeline))


async def test_a_slow_stage_holds_back_the_producer_with_bounded_queues():
    gate = Gate()
    pipeline = Pipeline([Double(), gate], queue_depth=2)
    await pipeline.start()
    producer = asyncio.ensure_future(feed(pipeline, range(100)))
    for _ in range(50):
        await asyncio.sleep(0)
    # gate holds 1, two queues of 2 and the double stage 1: the producer waits instead of queueing 100 items
    assert not producer.done()
    assert len(gate.taken) == 1
    gate.open.set()
    results = await collect(pipeline)
    await producer
    assert results == [2 * i for i in range(100)]


async def test_flush_drops_queued_work_and_later_input_flows_again():
    gate = Gate()
    repeat = Repeat(1)
    pipeline = Pipeline([repeat, gate], queue_depth=8)
    await pipeline.start()
    for item in range(6):
        await pipeline.put(item)
    for _ in range(20):
        await asyncio.sleep(0)
    pipeline.flush()
    assert repeat.flushed == 1
    gate.open.set()
    await feed(pipeline, [100, 101])
    results = await collect(pipeline)
    # the item the gate already held is stale and never comes out; everything queued is gone
    assert results == [100, 101, "trailer"]


async def test_cancelling_the_consumer_leaves_no_stage_task_running():
    pipeline = Pipeline([Double(), Gate()])
    await pipeline.start()
    consumer = asyncio.ensure_future(collect(pipeline))
    await pipeline.put(1)
    await asyncio.sleep(0.01)
    consumer.cancel()
    await pipeline.aclose()
    assert all(task.done() for task in asyncio.all_tasks() if task.get_name().startswith("stage-"))


async def test_batches_fill_when_items_wait_and_stay_small_when_they_trickle():
    pipeline = Pipeline([Batcher(max_batch=4, max_wait_ms=5)], queue_depth=16)
    await pipeline.start()
    for item in range(10):
        await pipeline.put(item)
    await pipeline.end()
    assert await collect(pipeline) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    pipeline = Pipeline([Batcher(max_batch=4, max_wait_ms=1)], queue_depth=16)
    await pipeline.start()

    async def trickle() -> None:
        for item in range(3):
            await pipeline.put(item)
            await asyncio.sleep(0.02)
        await pipeline.end()

    results, _ = await asyncio.gather(collect(pipeline), trickle())
    assert results == [[0], [1], [2]]


async def test_profile_counts_items_and_offloaded_work():
    stage = Double()
    pipeline = Pipeline([stage])
    await pipeline.start()
    await asyncio.gather(collect(pipeline), feed(pipeline, range(10)))
    row = pipeline.profiler.summary(frames=10)[0]
    assert row["stage"] == "double" and row["items"] == 10
    assert stage.timing.calls == 10 and stage.timing.work_ns > 0
    assert "double" in pipeline.profiler.table(10)


async def test_a_flush_after_the_end_still_ends_the_stream():
    pipeline = Pipeline([Double(), Double()], queue_depth=4)
    await pipeline.start()
    await pipeline.put(1)
    await pipeline.end()
    pipeline.flush()
    assert await asyncio.wait_for(collect(pipeline), 5) in ([], [4])


async def test_the_first_item_after_silence_never_waits_for_a_batch():
    pipeline = Pipeline([Batcher(max_batch=8, max_wait_ms=500)], queue_depth=16)
    await pipeline.start()
    results = pipeline.results()
    for _ in range(5):
        await asyncio.sleep(0)  # the stage is idle, waiting for input
    await pipeline.put("hello")
    # it comes out alone, well inside the 500 ms a batch may wait to fill when the stage is behind
    assert await asyncio.wait_for(results.__anext__(), 0.3) == ["hello"]
    await pipeline.end()
    assert [batch async for batch in results] == []


class Sums(Stage):
    """Running sums in groups of `size`, the rest at the end: state across calls, a batch limit, a tail."""

    name = "sums"

    def __init__(self, size: int, max_batch: int = 16) -> None:
        super().__init__()
        self.size, self.max_batch = size, max_batch
        self.pending: list[int] = []
        self.batches: list[int] = []
        self.flushes = 0

    def process(self, batch: list[int]) -> list[int]:
        assert len(batch) <= self.max_batch
        self.batches.append(len(batch))
        self.pending += batch
        out = []
        while len(self.pending) >= self.size:
            out.append(sum(self.pending[:self.size]))
            del self.pending[:self.size]
        return out

    def finish(self) -> list[int]:
        return [sum(self.pending)] if self.pending else []

    def on_flush(self) -> None:
        self.pending.clear()
        self.flushes += 1


async def test_a_chain_on_one_thread_gives_what_the_stages_give_on_their_own():
    separate = Pipeline([Sums(2), Sums(3, max_batch=2)], queue_depth=2)
    chained_stages = [Sums(2), Sums(3, max_batch=2)]
    chained = Pipeline([Chain(chained_stages)], queue_depth=2)
    outputs = []
    for pipeline in (separate, chained):
        await pipeline.start()
        results, _ = await asyncio.gather(collect(pipeline), feed(pipeline, range(1, 24)))
        outputs.append(results)
    assert outputs[0] == outputs[1] and sum(outputs[1]) == sum(range(1, 24)) and len(outputs[1]) == 4
    assert max(chained_stages[1].batches) <= 2                       # each stage's own batch limit holds
    assert [times.name for times in chained.profiler.stages] == ["sums", "sums"]
    assert [times.items for times in chained.profiler.stages] == [12, 4]


async def test_a_chain_flushes_every_stage_on_its_thread():
    stages = [Sums(2), Sums(2)]
    pipeline = Pipeline([Chain(stages)])
    await pipeline.start()
    await pipeline.put(1)
    await asyncio.sleep(0.05)
    pipeline.flush()
    await feed(pipeline, [5, 6])
    assert await collect(pipeline) == [11]
    assert [stage.flushes for stage in stages] == [1, 1]
