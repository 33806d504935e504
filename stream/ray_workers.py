"""Ray for `serve --ray` and `batch --ray`: the serve workers as Ray actors (Ray's scheduler places them on the nodes
of a cluster, a GPU each for a GPU backend, a CPU each otherwise, and restarts one that dies; the front watches them
like its own processes), and the connection both use.

Imported only with `--ray`: Ray is in the `cluster` extra, and nothing else here needs it.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stream.errors import TalkstreamError
from stream.workers import Worker

if importlib.util.find_spec("ray") is None:
    raise TalkstreamError("--ray needs Ray, which is not installed: pip install -e '.[cluster]'")
# Ray itself is imported by `ray_workers`, after `_send_the_token` (Ray reads its environment as it is imported).

LOG = logging.getLogger("talkstream.ray")
CLIENT_TRIES = 3            # starts of a client server on the head (see `_join`)
UNAVAILABLE_RETRY_S = 0.2   # while Ray restarts an actor, its calls fail at once: try again this often


class WorkerActor:
    """One worker inside a Ray actor's process: `entry` ("module:function", an async function of the settings and
    the node's address that starts a server on the actor's event loop and returns its URL and runner)."""

    def __init__(self, entry: str, settings_json: str) -> None:
        self.entry = entry
        self.settings_json = settings_json
        self.url: str | None = None
        self.runner: Any = None

    async def start(self) -> tuple[str, int]:
        """Its server's URL and the process id, the server started on the first call (after a restart too)."""
        if self.url is None:
            module, function = self.entry.split(":")
            start: Callable[[str, str], Awaitable[tuple[str, Any]]] = getattr(importlib.import_module(module),
                                                                               function)
            import ray

            self.url, self.runner = await start(self.settings_json, ray.util.get_node_ip_address())
        return self.url, os.getpid()

    async def wait_forever(self) -> None:
        """Never returns: the caller's wait on it fails when this actor dies (Ray tells at once)."""
        await asyncio.Event().wait()

    async def stop(self) -> None:
        """Close the sessions (their peers are told) and the server."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner, self.url = None, None


class RayWorker(Worker):
    """A worker that is a Ray actor: launched by asking it to start, lost when Ray says it died or it stops
    heartbeating; Ray itself restarts it (`max_restarts=-1`)."""

    kind = "ray actor"

    def __init__(self, index: int, actor: Any) -> None:
        super().__init__(index)
        self.actor = actor
        self._dead = False

    async def launch(self) -> None:
        """(The pool gives up after its start timeout.)"""
        from ray.exceptions import ActorUnavailableError

        self._dead = False
        while True:
            try:
                self.url, self.pid = await self.actor.start.remote()
                return
            except ActorUnavailableError:   # being restarted
                await asyncio.sleep(UNAVAILABLE_RETRY_S)

    async def died(self) -> str:
        from ray.exceptions import ActorUnavailableError, RayActorError

        # Shielded: cancelling a wait on Ray's future makes Ray's client thread fail as it later settles it.
        waiting = asyncio.wrap_future(self.actor.wait_forever.remote().future())
        waiting.add_done_callback(_settled)
        try:
            await asyncio.shield(waiting)
        except ActorUnavailableError as error:   # it may come back as it was: killed, so that it restarts clean
            return f"became unavailable ({_reason(error)})"
        except RayActorError as error:
            self._dead = True
            return f"died ({_reason(error)})"
        return "returned"   # wait_forever never does

    async def kill(self) -> None:
        """A stuck or unreachable actor is killed for Ray to restart; a dead one is already being restarted."""
        import ray

        if not self._dead:
            ray.kill(self.actor, no_restart=False)

    async def stop(self, grace_s: float) -> None:
        import ray
        from ray.exceptions import RayError

        stopping = asyncio.wrap_future(self.actor.stop.remote().future())
        stopping.add_done_callback(_settled)
        try:
            await asyncio.wait_for(asyncio.shield(stopping), grace_s)
        except (TimeoutError, RayError):
            pass
        finally:
            ray.kill(self.actor, no_restart=True)


def connect(address: str) -> Any:
    """Ray, connected: "local" starts a runtime for this run (even where a cluster was started with `ray start`);
    "auto" or ray://HOST:PORT joins a cluster. A cluster that cannot be reached is one line (TalkstreamError)."""
    if address != "local":
        _reachable(address)
        _send_the_token(address)
    import ray
    from ray.exceptions import RayError

    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                     # a dead actor is reported in 0.1-0.5 s rather than 1.2-1.7 s
                     _system_config={"timeout_ms_task_wait_for_death_info": 100})
        else:
            _join(address)
    except (ConnectionError, RuntimeError, ValueError, RayError) as error:   # no cluster, or not let in
        reason = _reason(error)
        hint = " (a cluster that requires Ray's token: put it in ~/.ray/auth_token or $RAY_AUTH_TOKEN)" \
            if address.startswith("ray://") and ("auth" in reason.lower() or "token" in reason.lower()) else ""
        raise TalkstreamError(f"cannot reach the Ray cluster at {address}: {reason}{hint}") from None
    return ray


def ray_workers(count: int | None, entry: str, settings_json: str, address: str, *, gpus: bool) -> list[Worker]:
    """Connect to Ray (see `connect`) and make `count` worker actors (None: one per GPU of the cluster for a GPU
    backend, else one per CPU)."""
    ray = connect(address)
    resources = ray.cluster_resources()
    per_worker = {"num_gpus": 1} if gpus and resources.get("GPU") else {"num_cpus": 1}
    if count is None:
        count = max(1, int(resources.get("GPU", 0) if "num_gpus" in per_worker else resources.get("CPU", 1)))
    remote: Any = ray.remote   # (its typed overloads take no ** of options)
    actor_class = remote(max_restarts=-1, max_task_retries=0, **per_worker)(WorkerActor)
    LOG.info("ray: %d worker actors (%s each) on %d node(s)", count, per_worker, len(ray.nodes()))
    return [RayWorker(index, actor_class.remote(entry, settings_json)) for index in range(count)]


def _join(address: str) -> None:
    """Join a running cluster. Through the client port, the head starts a server process for each client, and on a
    busy head that start now and then fails at once ("Initialization failure from server"): asked again."""
    import ray

    for attempt in range(1, CLIENT_TRIES + 1):
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
            return
        except ConnectionAbortedError as error:   # the client is disconnected again: a fresh try starts clean
            if attempt == CLIENT_TRIES:
                raise
            LOG.warning("ray: the head could not start a client server (%s); trying again", _reason(error))


def _reachable(address: str) -> None:
    """A named head that nothing answers at fails in 3 s with one line, not after Ray's 30 s (or longer) of
    retries."""
    if address == "auto":   # Ray itself fails at once when this machine is in no cluster
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except (OSError, ValueError) as error:
        raise TalkstreamError(f"cannot reach the Ray cluster at {address}: {error}") from None


def _send_the_token(address: str) -> None:
    """A Ray client sends a cluster's authentication token only when told to (`RAY_AUTH_MODE=token`), and a cluster
    whose head found one requires it: told so here wherever a token is at hand."""
    at_hand = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") \
        or (Path.home() / ".ray" / "auth_token").exists()
    if address.startswith("ray://") and at_hand:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def disconnect() -> None:
    """Leave the cluster (a local runtime ends with it)."""
    import ray

    ray.shutdown()


def _settled(future: asyncio.Future[Any]) -> None:
    """Reads how a wait nobody awaits any more ended (so that asyncio does not report it as never retrieved)."""
    if not future.cancelled():
        future.exception()


def _reason(error: BaseException) -> str:
    """Ray's error in one line: its first, or, where the head sent its traceback, the traceback's last."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) > 1 and lines[1].startswith("Traceback"):
        return f"{lines[0].rstrip(':')}: {lines[-1]}"
    return lines[0]
