"""The live avatar server: the HTTP app (aiohttp) in front of WebRTC peers (`stages.webrtc`, on aiortc). One session
= one avatar + one live session + one peer connection.

    python server.py [--host 127.0.0.1] [--port 8080] [--token SECRET] [--preset fast]
    talkstream serve ...        (the same)

Speech comes in three ways: an uploaded audio file (`POST /api/sessions/{id}/speak`), raw s16le PCM over a
websocket as it is spoken (`GET /api/sessions/{id}/audio?rate=16000`), or the browser's microphone track. The face and
its voice go out on one video and one audio track, paced by the session's clock (`stages.session.LiveSession`).
Every error is JSON; a bad request never takes the server down; a session's tasks end with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import aiohttp
import cv2
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from stages.session import (
    LIVE_RATES_HZ,
    AudioReader,
    Avatar,
    BadOffer,
    LiveSession,
    WebRtcPeer,
    is_loopback,
    live_peer_connections,
    load_preset,
    restrict_ice_to,
    use_live_encoders,
)
from stream.arguments import Parser, existing_dir, port, positive
from stream.errors import TalkstreamError
from stream.workers import (
    ProcessWorker,
    Worker,
    WorkerPool,
    first_of,
    usable_cores,
    visible_gpus,
    worker_command,
)

LOG = logging.getLogger("talkstream.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SERVER_FILE = Path(__file__).resolve()
EXAMPLES = {"astronaut": SERVER_FILE.parent / "examples" / "astronaut.png"}
PAGE_DIR = SERVER_FILE.parent / "stages" / "page"   # the page's HTML, script, style and icon
MAX_SIDE_PX = 720    # live video stays within 720p: encoders keep up, and H.264's advertised level 3.1 holds
TOKEN_VARIABLE = "TALKSTREAM_TOKEN"
PCM_DEFAULT_RATE_HZ = 16000   # the speech websocket's rate when `?rate=` is not given: a microphone's
MAX_PCM_MESSAGE_BYTES = 2**20   # one websocket message of speech: 32 s at 16 kHz
MAX_SPEAK_DECODING = 2        # speak requests of one session decoded at once; more are refused (429)
MAX_SPEECH_SOCKETS = 4        # speech websockets open at once on one session


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request or session may use."""

    max_sessions: int = 4
    max_upload_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    max_speech_s: float = 120.0
    idle_timeout_s: float = 300.0      # a session nobody connects to or speaks to is closed
    vanished_after_s: float = 3.0      # a connected peer that sends nothing (RTP, RTCP, websocket) for this long
    # A connection that has not sent a whole request this long after it opened (or after its last answer) is
    # closed: slow-loris clients cannot hold the server's connections.
    request_header_timeout_s: float = 15.0
    upload_timeout_s: float = 60.0     # a request body (a portrait, speech) must arrive within this


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    preset: str = "fast"
    backend: str = "embedded"
    checkpoints: str | None = None
    latency_ms: float | None = None    # speech in -> its frame out (None: Avatar.live_latency_ms)
    video_codec: str = "VP8"           # VP8 first on a CPU (aiortc's H.264 runs x264 at its medium preset)
    ice_servers: tuple[str, ...] = ()  # none by default: no STUN lookups on a LAN, loopback or offline
    cors_origin: str | None = None
    limits: Limits = field(default_factory=Limits)   # max_sessions: per process (each worker's, behind a front)
    workers: int | None = None         # worker processes behind a front (None: auto; 0: sessions in this process)
    ray: str | None = None             # the workers as Ray actors: "local" (a runtime for this run), "auto" or ray://

    def to_json(self) -> str:
        """For a worker process (it rebuilds these with `from_json`)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        values = json.loads(text)
        return cls(**{**values, "ice_servers": tuple(values["ice_servers"]), "limits": Limits(**values["limits"])})

    def for_worker(self, token: str) -> ServerSettings:
        """What a worker behind a front runs with: its sessions in its own process, only the front let in."""
        return replace(self, token=token, workers=0, ray=None, cors_origin=None)


class ApiError(Exception):
    """A request the server refuses: the status and a one-line message, sent as JSON."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LiveAvatarSession:
    """One avatar, its live session and (once offered) its WebRTC peer; `close()` ends all of it."""

    def __init__(self, session_id: str, avatar: Avatar, live: LiveSession) -> None:
        self.id = session_id
        self.avatar = avatar
        self.live = live
        self.peer: WebRtcPeer | None = None
        self.sockets: set[web.WebSocketResponse] = set()   # speech websockets: closed with the session
        self.decoding = 0                                 # speak requests being decoded now
        self.last_activity = time.monotonic()
        self.last_packets = -1
        self.closed = False

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await asyncio.gather(*(socket.close(code=WSCloseCode.GOING_AWAY, message=b"the session ended")
                               for socket in list(self.sockets)), return_exceptions=True)
        if self.peer is not None:
            await self.peer.close()
        await self.live.aclose()


AVATARS_KEPT = 8   # portraits x presets kept prepared per process (an avatar is read-only: sessions share it)


class AvatarCache:
    """Avatars by (portrait's hash, preset), the `kept` most recently used: a portrait is prepared once per process,
    not once per session. Concurrent requests for one avatar share its preparation."""

    def __init__(self, kept: int) -> None:
        self.kept = kept
        self._avatars: OrderedDict[tuple[str, str], asyncio.Future[Avatar]] = OrderedDict()

    async def get(self, key: tuple[str, str], prepare: Callable[[], Awaitable[Avatar]]) -> Avatar:
        future = self._avatars.get(key)
        if future is None:
            future = self._avatars[key] = asyncio.ensure_future(prepare())
            while len(self._avatars) > self.kept:
                self._avatars.popitem(last=False)
        self._avatars.move_to_end(key)
        try:
            return await asyncio.shield(future)
        except Exception:
            if self._avatars.get(key) is future:   # a failed preparation is not kept: the next request tries again
                del self._avatars[key]
            raise


def _digest(portrait: bytes | Path) -> str:
    """What identifies a portrait in the cache: its bytes' hash (an example: its path)."""
    return hashlib.sha256(portrait).hexdigest() if isinstance(portrait, bytes) else str(portrait)


class LoadMeter:
    """This process's CPU use between two readings (the front reads it with each heartbeat)."""

    def __init__(self) -> None:
        self._last = (time.monotonic(), time.process_time())

    def cores(self) -> float:
        """CPU cores busy on average since the previous call."""
        now, cpu = time.monotonic(), time.process_time()
        (then, cpu_then), self._last = self._last, (now, cpu)
        return round((cpu - cpu_then) / max(now - then, 1e-3), 3)


class Server:
    """State of one server process (or of one worker behind a front): settings, sessions, the avatars prepared for
    them, counters; hung on the web.Application."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: dict[str, LiveAvatarSession] = {}
        self.preparing = 0
        self.prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="talkstream-prepare")
        self.avatars = AvatarCache(AVATARS_KEPT)
        self.counters = {"sessions_created": 0, "sessions_closed": 0, "requests_refused": 0, "requests_failed": 0}
        self.load = LoadMeter()
        self._frames_seen = (time.process_time(), 0, 0.0)   # (CPU s, frames sent, ms per frame) at the last scrape

    def cpu_ms_per_frame(self, frames: int) -> float:
        """This process's CPU ms per frame its sessions sent since the previous call (`frames`: sent so far by the
        sessions open now); the previous figure while none were sent."""
        cpu, seen, figure = self._frames_seen
        now = time.process_time()
        if frames > seen:
            figure = (now - cpu) * 1000 / (frames - seen)
        self._frames_seen = (now, frames, figure)
        return figure

    async def create(self, portrait: bytes | Path, preset: str, name: str) -> LiveAvatarSession:
        limits = self.settings.limits
        if len(self.sessions) + self.preparing >= limits.max_sessions:
            raise ApiError(503, f"the server is full ({limits.max_sessions} sessions); try again later")
        self.preparing += 1
        try:
            digest = await asyncio.get_running_loop().run_in_executor(None, _digest, portrait)
            avatar = await self.avatars.get((digest, preset), lambda: self._run_prepare(portrait, preset, name))
        finally:
            self.preparing -= 1
        session = LiveAvatarSession(secrets.token_urlsafe(12), avatar,
                                    avatar.open_live(latency_ms=self.settings.latency_ms))
        await session.live.start()
        self.sessions[session.id] = session
        self.counters["sessions_created"] += 1
        return session

    async def _run_prepare(self, portrait: bytes | Path, preset: str, name: str) -> Avatar:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.prepare_pool, self._prepare, portrait, preset, name)

    def _prepare(self, portrait: bytes | Path, preset: str, name: str) -> Avatar:
        settings = self.settings
        return Avatar.prepare(portrait, preset=preset, backend=settings.backend, checkpoints=settings.checkpoints,
                              overrides=[f"video.max_side_px={MAX_SIDE_PX}"], name=name,
                              notice=lambda message: LOG.info("%s: %s", name, message))

    def get(self, session_id: str) -> LiveAvatarSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise ApiError(404, f"no session {session_id!r}")
        session.touch()
        return session

    async def close(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            await session.close()
            self.counters["sessions_closed"] += 1

    async def close_all(self) -> None:
        await asyncio.gather(*(self.close(session_id) for session_id in list(self.sessions)))
        self.prepare_pool.shutdown(wait=False, cancel_futures=True)

    async def janitor(self) -> None:
        """Close sessions nobody uses, peers that failed, and peers that vanished without a word."""
        while True:
            await asyncio.sleep(0.5)
            # gather, not a loop variable: nothing here keeps a closed session (and its peer) alive
            await asyncio.gather(*(self._look_after(session) for session in list(self.sessions.values())))

    async def _look_after(self, session: LiveAvatarSession) -> None:
        try:
            await self._check(session)
        except Exception:  # noqa: BLE001 - one session's failure must not stop the others' cleanup
            LOG.exception("session %s: closed after an error", session.id)
            await self.close(session.id)

    async def _check(self, session: LiveAvatarSession) -> None:
        limits = self.settings.limits
        now = time.monotonic()
        peer = session.peer
        if peer is not None and peer.state in ("failed", "closed"):
            await self.close(session.id)
        elif peer is not None and peer.state == "connected":
            packets = await peer.read_stats()
            if packets != session.last_packets:
                session.last_packets = packets
                session.touch()
            elif now - session.last_activity > limits.vanished_after_s:
                LOG.info("session %s: the peer vanished", session.id)
                await self.close(session.id)
        elif now - session.last_activity > limits.idle_timeout_s:
            await self.close(session.id)


SERVER = web.AppKey("server", Server)
SETTINGS = web.AppKey("settings", ServerSettings)
COUNTERS = web.AppKey("counters", dict[str, int])


# ------------------------------------------------------------------------------------------------------- handlers


async def create_session(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    fields = await _form(request)
    preset = _text(fields.get("preset")) or server.settings.preset
    upload = fields.get("portrait")
    if isinstance(upload, Upload):
        portrait: bytes | Path = upload.data
        _check_image_size(upload.data, server.settings.limits.max_image_pixels)
        name = upload.named("portrait")
    else:
        example = _text(fields.get("example")) or "astronaut"
        if example not in EXAMPLES:
            raise ApiError(400, f"unknown example {example!r}; valid: {', '.join(EXAMPLES)}")
        portrait, name = EXAMPLES[example], example
    try:
        session = await server.create(portrait, preset, name)
    except TalkstreamError as error:
        raise ApiError(400, str(error)) from None
    height, width = session.avatar.image.shape[:2]
    return web.json_response({"id": session.id, "width": width, "height": height, "preset": preset}, status=201)


async def offer(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    session = server.get(request.match_info["id"])
    if session.peer is not None:
        raise ApiError(409, "this session already has a peer connection; open a new session")
    try:
        body = await request.json()
        sdp, kind = str(body["sdp"]), str(body["type"])
    except (ValueError, KeyError, TypeError):
        raise ApiError(400, 'an offer is JSON: {"sdp": "...", "type": "offer"}') from None
    if kind != "offer" or "m=" not in sdp:
        raise ApiError(400, "not an SDP offer")
    settings = server.settings
    if session.closed:   # hung up while the offer was read: a peer made now would belong to nobody
        raise ApiError(404, f"no session {session.id!r}")
    session.peer = WebRtcPeer(session.live, video_codec=settings.video_codec, ice_servers=settings.ice_servers,
                              name=session.id)
    try:
        answer = await session.peer.answer(sdp, settings.host)
    except BadOffer as error:
        await server.close(session.id)
        raise ApiError(400, str(error)) from None
    except Exception:
        if session.closed:   # hung up while the answer was made: its close closed the peer under aiortc
            raise ApiError(404, f"no session {session.id!r}") from None
        raise
    if session.closed:
        raise ApiError(404, f"no session {session.id!r}")
    return web.json_response({"sdp": answer.sdp, "type": answer.type})


async def speak(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    session = server.get(request.match_info["id"])
    limits = server.settings.limits
    if session.decoding >= MAX_SPEAK_DECODING:
        raise ApiError(429, "this session is still decoding its last speech; wait for its answer")
    if session.live.queued_speech_s() > limits.max_speech_s:
        raise ApiError(429, f"this session has over {limits.max_speech_s:g} s of speech still to say; wait, or "
                       "interrupt it")
    session.decoding += 1
    try:
        fields = await _form(request)
        upload = fields.get("audio")
        if not isinstance(upload, Upload) or not upload.data:
            raise ApiError(400, "send the speech as a multipart field 'audio' (any file ffmpeg reads)")
        loop = asyncio.get_running_loop()
        speech, rate = await loop.run_in_executor(None, _decode_speech, upload, limits.max_speech_s)
    finally:
        session.decoding -= 1
    if session.closed:
        raise ApiError(404, f"no session {session.id!r}")
    session.live.push(speech, rate)
    session.live.end_utterance()
    return web.json_response({"queued_s": round(len(speech) / rate, 3)})


def pcm_rate(request: web.Request) -> int:
    """The speech websocket's `?rate=` (s16le mono PCM), checked."""
    try:
        rate = int(request.query.get("rate", PCM_DEFAULT_RATE_HZ))
    except ValueError:
        rate = 0
    if rate not in LIVE_RATES_HZ:
        raise ApiError(400, f"rate must be one of {', '.join(map(str, LIVE_RATES_HZ))} (s16le mono PCM)")
    return rate


async def audio_socket(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    session = server.get(request.match_info["id"])
    rate = pcm_rate(request)
    if len(session.sockets) >= MAX_SPEECH_SOCKETS:
        raise ApiError(429, f"this session already has {MAX_SPEECH_SOCKETS} speech websockets open")
    socket = web.WebSocketResponse(max_msg_size=MAX_PCM_MESSAGE_BYTES)
    await socket.prepare(request)
    if session.closed:   # hung up while the socket opened
        await socket.close(code=WSCloseCode.GOING_AWAY, message=b"the session ended")
        return socket
    session.sockets.add(socket)
    limit_s = server.settings.limits.max_speech_s
    try:
        async for message in socket:
            session.touch()
            if session.live.queued_speech_s() > limit_s:
                await socket.send_json({"error": f"over {limit_s:g} s of speech is still to say; send it as it is "
                                        "spoken"})
                await socket.close(code=WSCloseCode.POLICY_VIOLATION)
                break
            if message.type == WSMsgType.BINARY and len(message.data) % 2 == 0:
                if message.data:   # an empty message is no speech (and nothing to resample)
                    session.live.push(np.frombuffer(message.data, "<i2"), rate)
            elif message.type == WSMsgType.TEXT and message.data.strip() == "end":
                session.live.end_utterance()
            else:
                await socket.send_json({"error": "send binary s16le mono PCM (an even number of bytes), or 'end'"})
                await socket.close(code=WSCloseCode.UNSUPPORTED_DATA)
                break
    finally:
        session.sockets.discard(socket)
    if not session.closed:
        session.live.end_utterance()
    return socket


async def interrupt(request: web.Request) -> web.Response:
    request.app[SERVER].get(request.match_info["id"]).live.interrupt()
    return web.json_response({"interrupted": True})


async def delete_session(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    server.get(request.match_info["id"])
    await server.close(request.match_info["id"])
    return web.json_response({"closed": True})


async def health(request: web.Request) -> web.Response:
    """Alive, and how loaded: what a front reads with each heartbeat to place new sessions."""
    server = request.app[SERVER]
    slack = [session.live.stats().least_frame_slack_s for session in server.sessions.values()]
    return web.json_response({"ok": True, "sessions": len(server.sessions), "preparing": server.preparing,
                              "session_ids": list(server.sessions), "pid": os.getpid(),
                              "cpu_cores": server.load.cores(), "least_frame_slack_s": min(slack, default=None),
                              "rss_mb": round(_rss_bytes() / 2**20, 1)})


async def metrics(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    lines = ["# TYPE talkstream_sessions gauge", f"talkstream_sessions {len(server.sessions)}"]
    for name, value in server.counters.items():
        lines += [f"# TYPE talkstream_{name}_total counter", f"talkstream_{name}_total {value}"]
    stats = {s.id: s.live.stats() for s in server.sessions.values()}
    per_session: dict[str, Callable[[LiveAvatarSession], float]] = {
        "frames_speech": lambda s: stats[s.id].speech_frames,
        "frames_idle": lambda s: stats[s.id].idle_frames,
        "frames_repeated": lambda s: stats[s.id].repeated_frames,
        "frames_dropped": lambda s: stats[s.id].dropped_frames,
        "clock_reanchors": lambda s: stats[s.id].clock_reanchors,
        "speech_received_seconds": lambda s: stats[s.id].speech_received_s,
        "video_fps": lambda s: round(s.peer.video.fps, 2) if s.peer else 0.0,
        "latency_target_seconds": lambda s: stats[s.id].latency_target_s,
        "speech_to_frame_seconds": lambda s: stats[s.id].speech_to_frame_s,
        "least_frame_slack_seconds": lambda s: stats[s.id].least_frame_slack_s,
        "packets_lost": lambda s: s.peer.packets_lost if s.peer else 0,
        "round_trip_seconds": lambda s: s.peer.round_trip_s if s.peer else 0.0,
    }
    for metric, read in per_session.items():
        lines.append(f"# TYPE talkstream_{metric} gauge")
        lines += [f'talkstream_{metric}{{session="{s.id}"}} {read(s)}' for s in server.sessions.values()]
    frames = sum(stats[s].speech_frames + stats[s].idle_frames + stats[s].repeated_frames for s in stats)
    process = {**_process_figures(), "peer_connections": live_peer_connections(),
               # what a frame costs while sessions send: the load of this process over the frames it sent
               "cpu_ms_per_session_frame": round(server.cpu_ms_per_frame(frames), 3)}
    for name, value in process.items():
        lines += [f"# TYPE talkstream_{name} gauge", f"talkstream_{name} {value}"]
    lines.append("# TYPE talkstream_stage_busy_ms_per_frame gauge")
    for session_id, snapshot in stats.items():
        lines += [f'talkstream_stage_busy_ms_per_frame{{session="{session_id}",stage="{stage}"}} {ms:.3f}'
                  for stage, ms in snapshot.stage_ms_per_frame.items()]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


async def page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE_DIR / "index.html")


async def favicon(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PAGE_DIR / "favicon.svg", headers={"Content-Type": "image/svg+xml"})


async def config(request: web.Request) -> web.Response:
    """What the page offers: the presets (the server's default selected), the examples, whether a token is needed."""
    from stream.presets import PresetBook

    settings = request.app[SETTINGS]
    return web.json_response({"presets": PresetBook().names, "preset": settings.preset,
                              "examples": list(EXAMPLES), "token_required": bool(settings.token)})


# ------------------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class Upload:
    """A file field of a form: its bytes and how to name it in an error."""

    data: bytes
    filename: str

    def named(self, what: str) -> str:
        return f"the uploaded {what} {self.filename!r}" if self.filename else f"the uploaded {what}"


async def _form(request: web.Request) -> dict[str, Upload | str]:
    """The multipart (or urlencoded) fields of a request: files as `Upload`s, text as str."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].limits.upload_timeout_s):
            form = await request.post()
    except TimeoutError:
        raise ApiError(408, "the upload was too slow") from None
    except ConnectionResetError:
        raise ApiError(400, "the upload was cut off") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the upload is over {request.app[SETTINGS].limits.max_upload_bytes // 2**20} "
                       "MiB") from None
    except ValueError as error:
        raise ApiError(400, f"cannot read the form: {error}") from None
    fields: dict[str, Upload | str] = {}
    for key, value in form.items():
        fields[key] = Upload(value.file.read(), value.filename) if isinstance(value, web.FileField) else str(value)
    return fields


def _text(value: Upload | str | None) -> str | None:
    return value.data.decode(errors="replace") if isinstance(value, Upload) else value


def _check_image_size(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header declares more pixels than allowed, before anything decodes it."""
    size = _declared_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ApiError(413, f"the image is {size[0]}x{size[1]}; at most {max_pixels // 1_000_000} megapixels")


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG or JPEG header (None for other formats: the decoder's own limits apply)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        position = 2
        while position + 9 < len(data) and data[position] == 0xFF:
            marker, length = data[position + 1], struct.unpack(">H", data[position + 2:position + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", data[position + 5:position + 9])
                return width, height
            position += 2 + length
    return None


def _process_figures() -> dict[str, float]:
    """This process's resident memory, CPU time, threads (native ones too), open HTTP connections and asyncio tasks
    (besides those connections' own): where a leak shows."""
    try:
        threads = len(os.listdir("/proc/self/task"))
    except OSError:
        threads = threading.active_count()
    tasks = asyncio.all_tasks()
    connections = sum(getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start" for task in tasks)
    return {"process_resident_memory_bytes": _rss_bytes(), "process_cpu_seconds": round(time.process_time(), 3),
            "process_threads": threads, "http_connections": connections,
            "asyncio_tasks": len(tasks) - connections}   # besides each open connection's own


def _rss_bytes() -> int:
    """This process's resident memory (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _decode_speech(upload: Upload, max_seconds: float) -> tuple[np.ndarray, int]:
    """Any audio file ffmpeg reads -> int16 mono and its rate; clear errors, naming the upload, for the rest."""
    name = upload.named("audio")
    try:
        reader = AudioReader(io.BytesIO(upload.data), name=name, notice=lambda message: LOG.info("%s", message))
        blocks = []
        while (block := reader.read()) is not None:
            blocks.append(block)
            if sum(len(part) for part in blocks) > max_seconds * reader.format.rate_hz:
                raise ApiError(413, f"the speech is longer than {max_seconds:g} s")
    except TalkstreamError as error:
        raise ApiError(400, str(error)) from None
    speech = np.concatenate(blocks).mean(axis=1).astype(np.int16) if blocks else np.zeros(0, np.int16)
    return speech, reader.format.rate_hz


@web.middleware
async def errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of 400 and above is `{"error": "..."}`; an unexpected failure is logged here (with its traceback)
    and answered 500 with one line, never a traceback."""
    settings, counters = request.app[SETTINGS], request.app[COUNTERS]
    origin = settings.cors_origin
    if origin and request.method == "OPTIONS" and request.path.startswith("/api/"):
        # A browser's preflight carries no token: it asks whether the real request (JSON, a bearer token) may go.
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"})
    try:
        token = settings.token
        public = request.path == "/api/config"   # the page learns from it that it needs the token
        if token and request.path.startswith("/api/") and not public and not _authorised(request, token):
            raise ApiError(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        response = await handler(request)
    except ApiError as error:
        counters["requests_refused"] += 1
        response = web.json_response({"error": str(error)}, status=error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = web.json_response({"error": error.reason}, status=error.status)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - one bad request never takes the server down
        LOG.exception("%s %s failed", request.method, request.path)
        counters["requests_failed"] += 1
        response = web.json_response({"error": f"the server failed on {request.method} {request.path}; its log "
                                      "says why"}, status=500)
    if origin:
        response.headers["Access-Control-Allow-Origin"] = origin
    return response


def _authorised(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    return secrets.compare_digest(given.encode(), token.encode())


# The API's routes, the same in one process and behind a front: (method, path) by what they do.
API_ROUTES = {"health": ("GET", "/healthz"), "metrics": ("GET", "/metrics"), "create": ("POST", "/api/sessions"),
              "offer": ("POST", "/api/sessions/{id}/offer"), "speak": ("POST", "/api/sessions/{id}/speak"),
              "audio": ("GET", "/api/sessions/{id}/audio"), "interrupt": ("POST", "/api/sessions/{id}/interrupt"),
              "delete": ("DELETE", "/api/sessions/{id}")}


def _base_app(settings: ServerSettings, counters: dict[str, int], handlers: dict[str, Handler]) -> web.Application:
    """What a server and a front share: errors as JSON, the token, CORS, the page and its settings, the API's
    routes (`handlers` by the names of `API_ROUTES`)."""
    app = web.Application(middlewares=[errors_as_json], client_max_size=settings.limits.max_upload_bytes)
    app[SETTINGS] = settings
    app[COUNTERS] = counters
    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/page/", PAGE_DIR)
    app.router.add_get("/api/config", config)
    for name, (method, path) in API_ROUTES.items():
        app.router.add_route(method, path, handlers[name])
    return app


def make_app(settings: ServerSettings) -> web.Application:
    """The server of one process: its sessions live here (`serve --workers 0`, and each worker behind a front)."""
    server = Server(settings)
    app = _base_app(settings, server.counters, {
        "health": health, "metrics": metrics, "create": create_session, "offer": offer, "speak": speak,
        "audio": audio_socket, "interrupt": interrupt, "delete": delete_session})
    app[SERVER] = server

    async def start(app: web.Application) -> None:
        restrict_ice_to(settings.host)
        use_live_encoders()
        janitor = asyncio.create_task(server.janitor(), name="talkstream-janitor")
        app[JANITOR] = janitor

    async def stop(app: web.Application) -> None:
        app[JANITOR].cancel()
        await asyncio.gather(app[JANITOR], return_exceptions=True)
        await server.close_all()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


JANITOR = web.AppKey("janitor", asyncio.Task)


# ------------------------------------------------------------------------------------------------------- the front


GONE_KEPT = 100_000          # sessions lost with their worker, remembered to answer 410 (not 404) for them
FORWARD_TIMEOUT_S = 120.0    # a forwarded request (a session's avatar is prepared within it)
DRAIN_GRACE_S = 3.0          # on SIGTERM, workers close their sessions within this, or are killed


@dataclass(slots=True)
class Placement:
    """Where a session lives: a worker, and which of its launches (a restart loses what an earlier one held)."""

    worker: Worker
    generation: int
    since: float = field(default_factory=time.monotonic)


class Front:
    """The process in front of the workers (`serve --workers N`, `serve --ray`): it serves the page and the same API,
    places each new session on the least-loaded live worker, and forwards that session's signalling to it; the media
    go between the worker and the peer, never through here. A session whose worker died answers 410."""

    def __init__(self, settings: ServerSettings, workers: Sequence[Worker], internal_token: str) -> None:
        """`internal_token`: what the workers require (only the front calls them)."""
        self.settings = settings
        self.pool = WorkerPool(workers, self.lost, {"Authorization": f"Bearer {internal_token}"})
        self.placements: dict[str, Placement] = {}
        self.gone: OrderedDict[str, str] = OrderedDict()
        # sessions hung up through the front, until a heartbeat asked after it no longer reports them
        self.hung_up: dict[str, tuple[Worker, float]] = {}
        self.pending: dict[int, int] = {}                 # sessions being created, by worker
        self.sockets: dict[str, set[web.WebSocketResponse]] = {}
        self.closing: set[asyncio.Future[bool]] = set()    # websockets being closed
        self.draining = False
        self.counters = {"sessions_created": 0, "sessions_lost": 0, "requests_refused": 0, "requests_failed": 0}
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # Connections to the workers are kept 5 s idle: a burst's connections (and their handlers in the worker)
        # do not outlive it by long.
        connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=5)
        self.http = aiohttp.ClientSession(headers=self.pool.headers, connector=connector,
                                          timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S, sock_connect=3))
        await self.pool.start()

    async def drain(self) -> None:
        """No new sessions; the speech websockets told and closed; the workers stopped (they close their peers)."""
        self.draining = True
        await asyncio.gather(*(socket.close(code=WSCloseCode.GOING_AWAY, message=b"the server is shutting down")
                               for sockets in self.sockets.values() for socket in list(sockets)),
                             return_exceptions=True)
        await self.pool.stop(DRAIN_GRACE_S)
        if self.http is not None:
            await self.http.close()

    def lost(self, worker: Worker, why: str) -> None:
        """A worker died: its sessions are gone (410 from now on; their websockets end with the worker's side)."""
        reason = f"its worker {worker.index} {why}; open a new session"
        for session_id, placement in list(self.placements.items()):
            if placement.worker is worker and placement.generation == worker.generation:
                del self.placements[session_id]
                self._forget(session_id, reason)
                self.counters["sessions_lost"] += 1
                for socket in self.sockets.pop(session_id, ()):   # a worker cut off (not dead) would not close them
                    closing = asyncio.ensure_future(socket.close(code=WSCloseCode.INTERNAL_ERROR,
                                                                 message=b"the session's worker stopped"))
                    self.closing.add(closing)
                    closing.add_done_callback(self.closing.discard)

    def _forget(self, session_id: str, reason: str) -> None:
        self.gone[session_id] = reason
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)

    def find(self, session_id: str) -> Placement:
        placement = self.placements.get(session_id)
        if placement is not None and (not placement.worker.alive
                                      or placement.generation != placement.worker.generation):
            placement = None   # died a moment ago; `lost` is on its way
        if placement is None:
            if session_id in self.gone:
                raise ApiError(410, f"session {session_id!r} ended: {self.gone[session_id]}")
            raise ApiError(404, f"no session {session_id!r}")
        return placement

    def held(self, worker: Worker) -> int:
        """Sessions on `worker`: those placed on it that it still reports, and those being created there."""
        for session_id, (ended_on, when) in list(self.hung_up.items()):
            if ended_on is worker and when < worker.beat_asked:   # the latest heartbeat knows it is gone
                del self.hung_up[session_id]
        reported = set(worker.health.get("session_ids", ())) - set(self.hung_up)
        for session_id, placement in list(self.placements.items()):
            # placed before the latest heartbeat was asked for, and not in it: it ended there (idle, its peer left)
            if placement.worker is worker and placement.since < worker.beat_asked and session_id not in reported:
                del self.placements[session_id]
        placed = {session_id for session_id, placement in self.placements.items() if placement.worker is worker}
        return len(placed | reported) + self.pending.get(worker.index, 0)

    def place(self) -> Worker:
        """The live worker with the most room: the fewest sessions, then the least CPU busy, a worker whose frames
        were late last counted as one session more."""
        if self.draining:
            raise ApiError(503, "the server is shutting down")
        room = [(self.held(worker), worker) for worker in self.pool.live()]
        room = [(held, worker) for held, worker in room if held < self.settings.limits.max_sessions]
        if not room:
            raise ApiError(503, f"the server is full ({self.settings.limits.max_sessions} sessions on each of "
                           f"{len(self.pool.live())} live workers); try again later")

        def load(entry: tuple[int, Worker]) -> float:
            held, worker = entry
            slack = worker.health.get("least_frame_slack_s")
            return held + float(worker.health.get("cpu_cores", 0.0)) + (1.0 if slack is not None and slack < 0 else 0)

        return min(room, key=load)[1]

    async def forward(self, request: web.Request, worker: Worker) -> tuple[int, bytes]:
        """The request, as it came, to `worker` (its body streamed through, never held here whole): its answer's
        status and body. An upload over the limit is 413, one slower than the upload timeout 408."""
        assert self.http is not None
        limits = self.settings.limits
        if (request.content_length or 0) > limits.max_upload_bytes:
            raise ApiError(413, f"the upload is over {limits.max_upload_bytes // 2**20} MiB")
        headers = {key: request.headers[key] for key in ("Content-Type", "Content-Length") if key in request.headers}
        body = RelayedBody(request, limits) if request.body_exists else None
        try:
            async with self.http.request(request.method, f"{worker.url}{request.rel_url.path_qs}", headers=headers,
                                         data=body.chunks() if body else None) as answer:
                return answer.status, await answer.read()
        except (aiohttp.ClientError, ApiError):
            if body is not None and body.refused is not None:
                raise body.refused from None
            raise

    async def unreachable(self, session_id: str | None, worker: Worker) -> ApiError:
        """What to answer when `worker` did not: 410 if it died (the pool, told, notices within a moment), else
        502."""
        self.pool.poke(worker)
        for _ in range(40):
            if not worker.alive:
                break
            await asyncio.sleep(0.05)
        if session_id is not None and session_id in self.gone:
            return ApiError(410, f"session {session_id!r} ended: {self.gone[session_id]}")
        return ApiError(502, f"worker {worker.index} did not answer; try again")


FRONT = web.AppKey("front", Front)
RELAYED_CLOSE_CODES = {WSCloseCode.OK, WSCloseCode.GOING_AWAY, WSCloseCode.UNSUPPORTED_DATA,
                       WSCloseCode.INVALID_TEXT, WSCloseCode.POLICY_VIOLATION, WSCloseCode.MESSAGE_TOO_BIG,
                       WSCloseCode.INTERNAL_ERROR}


def _relay(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


class RelayedBody:
    """A request's body as it arrives, to be sent on; it stops past the upload limit or deadline, and says why in
    `refused` (the client sending it fails, with its own error)."""

    def __init__(self, request: web.Request, limits: Limits) -> None:
        self.request = request
        self.limits = limits
        self.refused: ApiError | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        limits = self.limits
        deadline = asyncio.get_running_loop().time() + limits.upload_timeout_s
        seen = 0
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await self.request.content.readany()
            except TimeoutError:
                self.refused = ApiError(408, "the upload was too slow")
                raise self.refused from None
            if not chunk:
                return
            seen += len(chunk)
            if seen > limits.max_upload_bytes:
                self.refused = ApiError(413, f"the upload is over {limits.max_upload_bytes // 2**20} MiB")
                raise self.refused
            yield chunk


async def front_create(request: web.Request) -> web.Response:
    front = request.app[FRONT]
    worker = front.place()
    front.pending[worker.index] = front.pending.get(worker.index, 0) + 1
    generation = worker.generation
    try:
        status, answer = await front.forward(request, worker)
    except (aiohttp.ClientError, TimeoutError):
        raise await front.unreachable(None, worker) from None
    finally:
        front.pending[worker.index] -= 1
    if status != 201:
        return _relay(status, answer)
    created = json.loads(answer)
    if worker.generation != generation or not worker.alive:
        raise ApiError(503, "the worker died as the session was made; try again")
    front.placements[created["id"]] = Placement(worker, generation)
    front.counters["sessions_created"] += 1
    return web.json_response({**created, "worker": worker.index}, status=201)


async def front_forward(request: web.Request) -> web.Response:
    """offer, speak, interrupt, delete: to the session's worker, its answer back as it is."""
    front = request.app[FRONT]
    session_id = request.match_info["id"]
    placement = front.find(session_id)
    try:
        status, answer = await front.forward(request, placement.worker)
    except (aiohttp.ClientError, TimeoutError):
        raise await front.unreachable(session_id, placement.worker) from None
    if status == 404 or (request.method == "DELETE" and status == 200):
        front.placements.pop(session_id, None)
        front.hung_up[session_id] = (placement.worker, time.monotonic())
    return _relay(status, answer)


async def front_audio(request: web.Request) -> web.StreamResponse:
    """The speech websocket, relayed message by message to the session's worker (and its complaints back)."""
    front = request.app[FRONT]
    assert front.http is not None
    session_id = request.match_info["id"]
    placement = front.find(session_id)
    pcm_rate(request)
    try:
        upstream = await front.http.ws_connect(f"{placement.worker.url}{request.rel_url.path_qs}",
                                               max_msg_size=MAX_PCM_MESSAGE_BYTES)
    except aiohttp.WSServerHandshakeError as error:
        raise ApiError(404 if error.status == 404 else 502, f"no session {session_id!r}" if error.status == 404
                       else f"worker {placement.worker.index} refused the websocket ({error.status})") from None
    except (aiohttp.ClientError, TimeoutError):
        raise await front.unreachable(session_id, placement.worker) from None
    socket = web.WebSocketResponse(max_msg_size=MAX_PCM_MESSAGE_BYTES)
    front.sockets.setdefault(session_id, set()).add(socket)
    try:
        await socket.prepare(request)
        await first_of(_pipe(socket, upstream), _pipe(upstream, socket))
        if upstream.closed and upstream.close_code in RELAYED_CLOSE_CODES:
            await socket.close(code=upstream.close_code)
        else:   # the worker went away without a word
            await socket.close(code=WSCloseCode.INTERNAL_ERROR, message=b"the session's worker stopped")
    finally:
        await upstream.close()
        sockets = front.sockets.get(session_id, set())
        sockets.discard(socket)
        if not sockets:
            front.sockets.pop(session_id, None)
    return socket


async def _pipe(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    """Text and binary messages from `source` to `sink` until either closes."""
    with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):   # the other side went away mid-send
        async for message in source:
            if sink.closed:
                return
            if message.type == WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            elif message.type == WSMsgType.TEXT:
                await sink.send_str(message.data)


async def front_health(request: web.Request) -> web.Response:
    front = request.app[FRONT]
    return web.json_response({"ok": True, "sessions": len(front.placements), "draining": front.draining,
                              "workers": [worker.describe() for worker in front.pool.workers]})


async def front_metrics(request: web.Request) -> web.Response:
    """Every live worker's metrics, each sample labelled with its `worker`, and the front's own: one endpoint."""
    front = request.app[FRONT]
    assert front.http is not None
    http = front.http

    async def scrape(worker: Worker) -> str:
        try:
            async with http.get(f"{worker.url}/metrics", timeout=aiohttp.ClientTimeout(total=2)) as answer:
                return await answer.text() if answer.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError):
            return ""

    live = front.pool.live()
    families: dict[str, list[str]] = {}
    for worker, text in zip(live, await asyncio.gather(*(scrape(worker) for worker in live))):
        _merge_labelled(families, text, f'worker="{worker.index}"')
    own = {"talkstream_workers_live": [f"talkstream_workers_live {len(live)}"],
           "talkstream_worker_up": [f'talkstream_worker_up{{worker="{w.index}"}} {int(w.alive)}'
                                    for w in front.pool.workers],
           "talkstream_worker_restarts_total": [f'talkstream_worker_restarts_total{{worker="{w.index}"}} '
                                                f"{w.restarts}" for w in front.pool.workers],
           "talkstream_front_sessions": [f"talkstream_front_sessions {len(front.placements)}"]}
    own.update({f"talkstream_front_{name}_total": [f"talkstream_front_{name}_total {value}"]
                for name, value in front.counters.items()})
    own.update({f"talkstream_front_{name}": [f"talkstream_front_{name} {value}"]
                for name, value in _process_figures().items()})
    lines = []
    for name, samples in own.items():
        lines += [f"# TYPE {name} {'counter' if name.endswith('_total') else 'gauge'}", *samples]
    for samples in families.values():
        lines += samples
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def _merge_labelled(families: dict[str, list[str]], text: str, label: str) -> None:
    """Prometheus text `text` into `families` (name -> its TYPE line, then its samples), `label` added to each
    sample, so that one worker's samples join the others' under one TYPE line."""
    family = ""
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family = line.split()[2]
            families.setdefault(family, [line])
        elif line and not line.startswith("#") and family:
            series, value = line.rsplit(" ", 1)
            series = series.replace("{", f"{{{label},", 1) if series.endswith("}") else f"{series}{{{label}}}"
            families[family].append(f"{series} {value}")


def make_front_app(settings: ServerSettings, workers: Sequence[Worker], internal_token: str) -> web.Application:
    """The front of `serve --workers N` / `serve --ray`: the same URLs as `make_app`, sessions held by `workers`
    (which require `internal_token`)."""
    front = Front(settings, workers, internal_token)
    app = _base_app(settings, front.counters, {
        "health": front_health, "metrics": front_metrics, "create": front_create, "offer": front_forward,
        "speak": front_forward, "audio": front_audio, "interrupt": front_forward, "delete": front_forward})
    app[FRONT] = front

    async def start(app: web.Application) -> None:
        await front.start()

    async def stop(app: web.Application) -> None:
        await front.drain()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


SERVE_EXAMPLES = """examples:
  talkstream serve                        # http://127.0.0.1:8080/ on this machine only, a worker per core
  talkstream serve --workers 0            # one process: its sessions on its own event loop
  talkstream serve --ray auto             # the workers as Ray actors on every node of this machine's Ray cluster
  talkstream serve --host 0.0.0.0 --port 8080 --token "$(openssl rand -hex 16)" --preset balanced
  talkstream serve --codec H264 --max-sessions 8 --access-log
"""
LOG_LEVELS = ("debug", "info", "warning", "error")


def build_parser() -> argparse.ArgumentParser:
    """`talkstream serve`'s options; every default is the one `ServerSettings` holds (`settings_from` builds it)."""
    defaults = ServerSettings()
    parser = Parser(prog="talkstream serve", description="The live avatar server: open http://HOST:PORT/ in a "
                    "browser, or drive it through its JSON API.", epilog=SERVE_EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=defaults.host, help="address to bind; off loopback, browsers need HTTPS "
                        "for the microphone (default: %(default)s)")
    parser.add_argument("--port", type=port, default=defaults.port, help="(default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get(TOKEN_VARIABLE), help="require this bearer token on "
                        f"the API (default: ${TOKEN_VARIABLE}, else none)")
    parser.add_argument("--preset", default=defaults.preset, help="default preset of new sessions, the one the "
                        "page selects (default: %(default)s)")
    parser.add_argument("--backend", default=defaults.backend, help="embedded or sadtalker (default: %(default)s)")
    parser.add_argument("--checkpoints", type=existing_dir, metavar="DIR", help="model files (SadTalker, GFPGAN) "
                        "for the sadtalker backend and the neural enhancers (default: none)")
    parser.add_argument("--latency-ms", type=positive(float), help="from speech in to its frame out (default: "
                        "what the preset and backend need: 100 ms for the embedded backend at ultra_fast)")
    parser.add_argument("--codec", choices=("VP8", "H264"), default=defaults.video_codec,
                        help="preferred video codec (default: %(default)s)")
    parser.add_argument("--ice-server", action="append", default=list(defaults.ice_servers), metavar="URL",
                        help="a STUN/TURN server (repeatable; default: none)")
    parser.add_argument("--max-sessions", type=positive(int), default=defaults.limits.max_sessions, metavar="N",
                        help="sessions each worker holds at once; more are refused with 503 (default: "
                        "%(default)s)")
    parser.add_argument("--workers", type=worker_count, default="auto", metavar="N",
                        help="worker processes holding the sessions behind this one: auto (one per usable CPU "
                        "core, or per visible GPU for the sadtalker backend) or a number; 0 holds them in this "
                        "process (default: %(default)s)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="run the workers as Ray actors (pip install -e '.[cluster]'): ADDRESS is auto (the "
                        "cluster this machine is in) or ray://HOST:PORT; none starts a local Ray runtime for this "
                        "run (default: no Ray)")
    parser.add_argument("--cors-origin", default=defaults.cors_origin, help="allow this origin to call the API "
                        "(default: no CORS)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="debug adds aioice's and aiortc's "
                        "own lines (default: %(default)s)")
    parser.add_argument("--access-log", action="store_true", help="a line per HTTP request")
    return parser


def settings_from(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(host=args.host, port=args.port, token=args.token or None, preset=args.preset,
                          backend=args.backend, checkpoints=str(args.checkpoints) if args.checkpoints else None,
                          latency_ms=args.latency_ms, video_codec=args.codec, ice_servers=tuple(args.ice_server),
                          cors_origin=args.cors_origin, limits=replace(Limits(), max_sessions=args.max_sessions),
                          workers=args.workers, ray=args.ray)


def worker_count(text: str) -> int | None:
    """--workers: "auto" (None) or a count, 0 and up."""
    if text == "auto":
        return None
    count = int(text)
    if count < 0:
        raise ValueError(text)
    return count


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: packets, timers and executor hand-offs cost less on it than on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    cv2.setNumThreads(1)  # one thread per library; sessions run side by side on threads of their own
    _configure_logging(args.log_level)
    try:
        load_preset(settings.preset, backend=settings.backend)   # a mistyped preset fails here, not per session
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        listener = socket.create_server((settings.host, settings.port), family=family)
    except TalkstreamError as error:
        print(f"talkstream: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        reason = os.strerror(error.errno) if error.errno else str(error)
        print(f"talkstream: error: cannot listen on {settings.host}:{settings.port}: {reason}", file=sys.stderr)
        return 2
    try:
        app = make_app(settings) if settings.workers == 0 and settings.ray is None else _front_app(settings)
    except TalkstreamError as error:
        listener.close()
        print(f"talkstream: error: {error}", file=sys.stderr)
        return 2
    print(f"talkstream: serving on {_page_url(settings)} (Ctrl-C stops)", file=sys.stderr, flush=True)
    if not is_loopback(settings.host):
        print("talkstream: browsers open the microphone only over HTTPS or on localhost; elsewhere the page "
              "connects without it", file=sys.stderr, flush=True)
    web.run_app(app, sock=listener, print=None, loop=_new_loop(), shutdown_timeout=1.0,
                keepalive_timeout=settings.limits.request_header_timeout_s,
                access_log=logging.getLogger("aiohttp.access") if args.access_log else None)
    if settings.ray is not None:
        from stream.ray_workers import disconnect

        disconnect()
    return 0


def _front_app(settings: ServerSettings) -> web.Application:
    """The front and its workers: processes on this machine, or Ray actors (Ray is imported only then)."""
    internal_token = secrets.token_urlsafe(24)
    worker_settings = settings.for_worker(internal_token)
    workers: list[Worker]
    if settings.ray is not None:
        from stream.ray_workers import ray_workers

        workers = ray_workers(settings.workers or None, RAY_WORKER_ENTRY, worker_settings.to_json(), settings.ray,
                              gpus=settings.backend != "embedded")
    else:
        gpus = visible_gpus() if settings.backend != "embedded" else []
        count = settings.workers or len(gpus) or usable_cores()
        command = worker_command(WORKER_ENTRY)
        workers = [ProcessWorker(index, [*command, str(index)], first_line=worker_settings.to_json(),
                                 env={"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]} if gpus else None)
                   for index in range(count)]
    return make_front_app(settings, workers, internal_token)


WORKER_ENTRY = "server:worker_main"
RAY_WORKER_ENTRY = "server:start_worker_site"


def worker_main(argv: list[str]) -> int:
    """A worker process behind a front: INDEX FD, FD a socket listening on 127.0.0.1 made by the front, its settings
    the first line of stdin (they hold the front's token: not on a command line anyone can read). It ends on SIGTERM
    (its sessions closed first) and when its stdin ends (the front is gone)."""
    index, listener = int(argv[0]), socket.socket(fileno=int(argv[1]))
    settings = ServerSettings.from_json(sys.stdin.buffer.readline().decode())
    cv2.setNumThreads(1)
    _configure_logging("info", f"worker {index}: ")
    app = make_app(settings)

    async def watch_front(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def wait_for_eof() -> None:
            await reader.read()
            LOG.warning("the front is gone: stopping")
            os.kill(os.getpid(), signal.SIGTERM)

        app[FRONT_WATCH] = asyncio.create_task(wait_for_eof(), name="talkstream-front-watch")

    app.on_startup.append(watch_front)
    web.run_app(app, sock=listener, print=None, loop=_new_loop(), shutdown_timeout=1.0, access_log=None)
    return 0


FRONT_WATCH = web.AppKey("front_watch", asyncio.Task)


async def start_worker_site(settings_json: str, node_address: str) -> tuple[str, web.AppRunner]:
    """A worker's server on the running event loop (a Ray actor's): its URL, and the runner that stops it. It
    listens on `node_address` (loopback when the front is), on a port of its own."""
    settings = ServerSettings.from_json(settings_json)
    if not (is_loopback(settings.host) or settings.host in ("0.0.0.0", "::")):
        settings = replace(settings, host=node_address)   # peers reach this node at its own address
    listen = "127.0.0.1" if is_loopback(settings.host) else node_address
    cv2.setNumThreads(1)
    runner = web.AppRunner(make_app(settings), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, listen, 0)
    await site.start()
    host, bound = runner.addresses[0][:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{bound}", runner


def _configure_logging(level: str, prefix: str = "") -> None:
    """Our lines at `level`; aioice's and aiortc's chatter (every candidate, every check) only when debugging."""
    logging.basicConfig(level=level.upper(), format=f"talkstream: {prefix}%(name)s: %(message)s")
    if level != "debug":
        for chatty in ("aioice", "aiortc"):
            logging.getLogger(chatty).setLevel(logging.WARNING)


def _page_url(settings: ServerSettings) -> str:
    """The address to open: this machine's own address when bound to all of them, the token in the fragment (the
    page reads it from there; a fragment never reaches a server's log)."""
    host = _this_machine() if settings.host in ("0.0.0.0", "::", "") else settings.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{settings.port}/" + (f"#token={quote(settings.token, safe='')}" if settings.token else "")


def _this_machine() -> str:
    """The address other machines reach this one at (the route to a non-routable address; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


if __name__ == "__main__":
    sys.exit(main())
