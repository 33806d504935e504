"""Worker processes behind a front: started, watched by their heartbeats, restarted when they die or stop answering.

A worker is any process that serves HTTP at a URL and answers `GET /healthz` with a JSON object. The front (in
`server.py`) places work on the live ones and forwards requests to them; this module knows nothing of what they do.
Two kinds: `ProcessWorker` (a child process on this machine) and, in `stream.ray_workers`, a Ray actor anywhere in a
cluster. The pool treats both alike: a worker that exits, or sends no heartbeat for `STALE_AFTER_S`, is lost (the
front is told, so that it can end what the worker held), killed, and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

LOG = logging.getLogger("talkstream.workers")
HEARTBEAT_S = 1.0          # how often the front asks each worker how it is
STALE_AFTER_S = 3.0        # a worker silent this long is stuck: treated as dead
START_TIMEOUT_S = 120.0    # from launch to the first heartbeat (imports, a model's weights on a GPU)
RESTART_DELAY_S = (0.5, 10.0)   # the first restart waits the least; one that keeps dying waits up to the most


class WorkerLost(Exception):
    """A worker died, or could not be started; the message says how."""


class Worker:
    """One worker: where it listens, its latest heartbeat, how often it was restarted. Subclasses launch, watch and
    kill the process itself."""

    kind = "worker"

    def __init__(self, index: int) -> None:
        self.index = index
        self.url = ""                  # http://HOST:PORT of its API, once launched
        self.pid: int | None = None
        self.generation = 0            # incremented at each launch: what was placed on an earlier one is gone
        self.alive = False             # launched, and heartbeating
        self.health: dict[str, Any] = {}
        self.last_beat = 0.0
        self.beat_asked = 0.0          # when the latest heartbeat answered was asked for
        self.refused = False           # its last heartbeat's connection was refused: nothing listens there now
        self.poked = asyncio.Event()   # a request to it failed: read its heartbeat now
        self.restarts = 0

    async def launch(self) -> None:
        """Start the process; set `url` and `pid`."""
        raise NotImplementedError

    async def died(self) -> str:
        """Return, with how, once the process is gone."""
        raise NotImplementedError

    async def kill(self) -> None:
        """End the process at once (it may be stuck)."""
        raise NotImplementedError

    async def stop(self, grace_s: float) -> None:
        """Ask the process to end (it closes what it holds), then kill it after `grace_s`."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What /healthz says of this worker."""
        return {"worker": self.index, "kind": self.kind, "alive": self.alive, "pid": self.pid,
                "restarts": self.restarts, "sessions": self.health.get("sessions", 0)}


class WorkerPool:
    """Keeps `workers` running: each is launched, heartbeats are read every `HEARTBEAT_S`, and a lost one is reported
    to `on_lost(worker, why)` and started again. `headers` go with every request to a worker (its token)."""

    def __init__(self, workers: Sequence[Worker], on_lost: Callable[[Worker, str], None],
                 headers: dict[str, str]) -> None:
        self.workers = list(workers)
        self.on_lost = on_lost
        self.headers = headers
        self.stopping = False
        self._supervisors: list[asyncio.Task[None]] = []
        self._http: Any = None

    async def start(self) -> None:
        """Launch every worker; returns once each is live or has failed its first start (failures restart)."""
        import aiohttp

        self._http = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=STALE_AFTER_S))
        started = [asyncio.get_running_loop().create_future() for _ in self.workers]
        self._supervisors = [asyncio.create_task(self._supervise(worker, ready), name=f"talkstream-worker-{index}")
                             for index, (worker, ready) in enumerate(zip(self.workers, started))]
        await asyncio.gather(*started)

    def live(self) -> list[Worker]:
        return [worker for worker in self.workers if worker.alive]

    async def stop(self, grace_s: float) -> None:
        """Stop every worker: asked to end, killed after `grace_s`; then the supervisors."""
        self.stopping = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        await asyncio.gather(*(worker.stop(grace_s) for worker in self.workers), return_exceptions=True)
        for worker in self.workers:
            worker.alive = False
        if self._http is not None:
            await self._http.close()

    async def _supervise(self, worker: Worker, ready: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY_S[0]
        while not self.stopping:
            launched = loop.time()
            try:
                worker.generation += 1
                try:
                    async with asyncio.timeout(START_TIMEOUT_S):
                        await worker.launch()
                except TimeoutError:
                    raise WorkerLost(f"did not start within {START_TIMEOUT_S:g} s") from None
                await self._first_beat(worker)
                worker.alive = True
                LOG.info("%s %d: live at %s (pid %s)", worker.kind, worker.index, worker.url, worker.pid)
                if not ready.done():
                    ready.set_result(None)
                why = str(await first_of(worker.died(), self._heartbeats(worker)))
            except Exception as error:  # noqa: BLE001 - whatever ended it (a launch that failed too), restart it
                why = str(error) if isinstance(error, WorkerLost) else f"failed: {error!r}"
                if not ready.done():   # the front starts without it; it is restarted below
                    ready.set_result(None)
            worker.alive = False
            if self.stopping:
                return
            LOG.warning("%s %d %s; restarting it", worker.kind, worker.index, why)
            worker.restarts += 1
            self.on_lost(worker, why)
            with contextlib.suppress(Exception):   # a kill that fails leaves it to the next launch
                await worker.kill()
            # A worker that ran a while restarts at once; one that dies as it starts waits longer each time.
            delay = RESTART_DELAY_S[0] if loop.time() - launched > 30 else min(2 * delay, RESTART_DELAY_S[1])
            await asyncio.sleep(delay)

    async def _first_beat(self, worker: Worker) -> None:
        """Wait for the first heartbeat of a worker just launched (or its death)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        dying = asyncio.ensure_future(worker.died())
        try:
            while time.monotonic() < deadline:
                if dying.done():
                    raise WorkerLost(f"{dying.result()} as it started")
                if await self.beat(worker):
                    return
                await asyncio.sleep(0.1)
        finally:
            dying.cancel()
        raise WorkerLost(f"did not answer within {START_TIMEOUT_S:g} s of its start")

    async def _heartbeats(self, worker: Worker) -> str:
        """Returns (why) once the worker has been silent for `STALE_AFTER_S`, or refuses connections."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(worker.poked.wait(), HEARTBEAT_S)
            worker.poked.clear()
            if await self.beat(worker):
                continue
            if worker.refused:
                return "stopped listening"
            if time.monotonic() - worker.last_beat > STALE_AFTER_S:
                return f"sent no heartbeat for {STALE_AFTER_S:g} s"

    def poke(self, worker: Worker) -> None:
        """A request to `worker` failed: check it now rather than at its next heartbeat."""
        worker.poked.set()

    async def beat(self, worker: Worker) -> bool:
        """Ask the worker how it is; whether it answered."""
        import aiohttp

        worker.refused = False
        asked = time.monotonic()
        try:
            async with self._http.get(f"{worker.url}/healthz") as answer:
                if answer.status != 200:
                    return False
                worker.health = await answer.json()
        except aiohttp.ClientConnectorError:
            worker.refused = True
            return False
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False
        worker.last_beat, worker.beat_asked = time.monotonic(), asked
        return True


async def first_of(*waits: Awaitable[Any]) -> Any:
    """The result of whichever finishes first; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ProcessWorker(Worker):
    """A child process of this one: `command + [FD]`, where FD is a listening socket on 127.0.0.1 made here (so its
    address is known before it starts). It runs in a session of its own (a terminal's Ctrl-C reaches only the front,
    which stops the workers in order) and reads its stdin: a first line, then, at EOF, when the front is gone however
    it died, it ends."""

    kind = "worker"

    def __init__(self, index: int, command: Sequence[str], *, first_line: str = "",
                 env: dict[str, str] | None = None) -> None:
        """`first_line`: written to its stdin as it starts (what must not show on its command line)."""
        super().__init__(index)
        self.command = list(command)
        self.first_line = first_line
        self.env = env
        self.process: asyncio.subprocess.Process | None = None

    async def launch(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        try:
            self.process = await asyncio.create_subprocess_exec(
                *self.command, str(listener.fileno()), pass_fds=(listener.fileno(),), stdin=asyncio.subprocess.PIPE,
                start_new_session=True, env=None if self.env is None else {**os.environ, **self.env})
            self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            listener.close()
        self.pid = self.process.pid
        assert self.process.stdin is not None
        self.process.stdin.write(self.first_line.encode() + b"\n")

    async def died(self) -> str:
        assert self.process is not None
        status = await self.process.wait()
        if status < 0:
            return f"was killed by {signal.Signals(-status).name}"
        return f"exited with status {status}"

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    async def stop(self, grace_s: float) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), grace_s)
        except TimeoutError:
            await self.kill()


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The NVIDIA GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (read without importing torch)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [name for name in named.split(",") if name.strip() and name.strip() != "-1"]
    try:
        return [str(index) for index in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def worker_command(entry: str) -> list[str]:
    """The command that runs `entry` ("module:function", called with the arguments after it) in a new interpreter."""
    module, function = entry.split(":")
    return [sys.executable, "-c", f"import sys, {module}; sys.exit({module}.{function}(sys.argv[1:]))"]
