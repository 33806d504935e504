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
import io
import logging
import os
import secrets
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
from aiohttp import WSMsgType, web

from stages.session import (
    LIVE_RATES_HZ,
    AudioReader,
    Avatar,
    BadOffer,
    LiveSession,
    WebRtcPeer,
    is_loopback,
    load_preset,
    restrict_ice_to,
    use_live_encoders,
)
from stream.arguments import Parser, existing_dir, port, positive
from stream.errors import TalkstreamError

LOG = logging.getLogger("talkstream.server")
SERVER_FILE = Path(__file__).resolve()
EXAMPLES = {"astronaut": SERVER_FILE.parent / "examples" / "astronaut.png"}
PAGE_DIR = SERVER_FILE.parent / "stages" / "page"   # the page's HTML, script, style and icon
MAX_SIDE_PX = 720    # live video stays within 720p: encoders keep up, and H.264's advertised level 3.1 holds
TOKEN_VARIABLE = "TALKSTREAM_TOKEN"
PCM_DEFAULT_RATE_HZ = 16000   # the speech websocket's rate when `?rate=` is not given: a microphone's


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request or session may use."""

    max_sessions: int = 4
    max_upload_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    max_speech_s: float = 120.0
    idle_timeout_s: float = 300.0      # a session nobody connects to or speaks to is closed
    vanished_after_s: float = 3.0      # a connected peer that sends nothing (RTP, RTCP, websocket) for this long


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
    limits: Limits = field(default_factory=Limits)


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
        self.last_activity = time.monotonic()
        self.last_packets = -1
        self.closed = False

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.peer is not None:
            await self.peer.close()
        await self.live.aclose()


class Server:
    """State of one server process: settings, sessions, counters; hung on the web.Application."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.sessions: dict[str, LiveAvatarSession] = {}
        self.preparing = 0
        self.prepare_pool = ThreadPoolExecutor(1, thread_name_prefix="talkstream-prepare")
        self.counters = {"sessions_created": 0, "sessions_closed": 0, "requests_refused": 0, "requests_failed": 0}

    async def create(self, portrait: bytes | Path, preset: str, name: str) -> LiveAvatarSession:
        limits = self.settings.limits
        if len(self.sessions) + self.preparing >= limits.max_sessions:
            raise ApiError(503, f"the server is full ({limits.max_sessions} sessions); try again later")
        self.preparing += 1
        try:
            loop = asyncio.get_running_loop()
            avatar = await loop.run_in_executor(self.prepare_pool, self._prepare, portrait, preset, name)
        finally:
            self.preparing -= 1
        session = LiveAvatarSession(secrets.token_urlsafe(12), avatar,
                                    avatar.open_live(latency_ms=self.settings.latency_ms))
        await session.live.start()
        self.sessions[session.id] = session
        self.counters["sessions_created"] += 1
        return session

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
    fields = await _form(request)
    upload = fields.get("audio")
    if not isinstance(upload, Upload) or not upload.data:
        raise ApiError(400, "send the speech as a multipart field 'audio' (any file ffmpeg reads)")
    loop = asyncio.get_running_loop()
    speech, rate = await loop.run_in_executor(None, _decode_speech, upload, server.settings.limits.max_speech_s)
    session.live.push(speech, rate)
    session.live.end_utterance()
    return web.json_response({"queued_s": round(len(speech) / rate, 3)})


async def audio_socket(request: web.Request) -> web.StreamResponse:
    server = request.app[SERVER]
    session = server.get(request.match_info["id"])
    try:
        rate = int(request.query.get("rate", PCM_DEFAULT_RATE_HZ))
    except ValueError:
        rate = 0
    if rate not in LIVE_RATES_HZ:
        raise ApiError(400, f"rate must be one of {', '.join(map(str, LIVE_RATES_HZ))} (s16le mono PCM)")
    socket = web.WebSocketResponse(max_msg_size=2**20)
    await socket.prepare(request)
    async for message in socket:
        session.touch()
        if message.type == WSMsgType.BINARY and len(message.data) % 2 == 0:
            if message.data:   # an empty message is no speech (and nothing to resample)
                session.live.push(np.frombuffer(message.data, "<i2"), rate)
        elif message.type == WSMsgType.TEXT and message.data.strip() == "end":
            session.live.end_utterance()
        else:
            await socket.send_json({"error": "send binary s16le mono PCM (an even number of bytes), or 'end'"})
            await socket.close(code=1003)
            break
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
    return web.json_response({"ok": True, "sessions": len(request.app[SERVER].sessions)})


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

    settings = request.app[SERVER].settings
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
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the upload is over {request.app[SERVER].settings.limits.max_upload_bytes // 2**20} "
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
async def errors_as_json(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """Every answer of 400 and above is `{"error": "..."}`; an unexpected failure is logged here (with its traceback)
    and answered 500 with one line, never a traceback."""
    server = request.app[SERVER]
    origin = server.settings.cors_origin
    if origin and request.method == "OPTIONS" and request.path.startswith("/api/"):
        # A browser's preflight carries no token: it asks whether the real request (JSON, a bearer token) may go.
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST, DELETE",
            "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600"})
    try:
        token = server.settings.token
        public = request.path == "/api/config"   # the page learns from it that it needs the token
        if token and request.path.startswith("/api/") and not public and not _authorised(request, token):
            raise ApiError(401, "missing or wrong token (Authorization: Bearer TOKEN)")
        response = await handler(request)
    except ApiError as error:
        server.counters["requests_refused"] += 1
        response = web.json_response({"error": str(error)}, status=error.status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        response = web.json_response({"error": error.reason}, status=error.status)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - one bad request never takes the server down
        LOG.exception("%s %s failed", request.method, request.path)
        server.counters["requests_failed"] += 1
        response = web.json_response({"error": f"the server failed on {request.method} {request.path}; its log "
                                      "says why"}, status=500)
    if server.settings.cors_origin:
        response.headers["Access-Control-Allow-Origin"] = server.settings.cors_origin
    return response


def _authorised(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    return secrets.compare_digest(given.encode(), token.encode())


def make_app(settings: ServerSettings) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=settings.limits.max_upload_bytes)
    server = Server(settings)
    app[SERVER] = server
    app.router.add_get("/", page)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_static("/page/", PAGE_DIR)
    app.router.add_get("/api/config", config)
    app.router.add_get("/healthz", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/api/sessions", create_session)
    app.router.add_post("/api/sessions/{id}/offer", offer)
    app.router.add_post("/api/sessions/{id}/speak", speak)
    app.router.add_get("/api/sessions/{id}/audio", audio_socket)
    app.router.add_post("/api/sessions/{id}/interrupt", interrupt)
    app.router.add_delete("/api/sessions/{id}", delete_session)

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


SERVE_EXAMPLES = """examples:
  talkstream serve                        # http://127.0.0.1:8080/ on this machine only
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
                        help="sessions held at once; more are refused with 503 (default: %(default)s)")
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
                          cors_origin=args.cors_origin, limits=replace(Limits(), max_sessions=args.max_sessions))


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
    print(f"talkstream: serving on {_page_url(settings)} (Ctrl-C stops)", file=sys.stderr, flush=True)
    if not is_loopback(settings.host):
        print("talkstream: browsers open the microphone only over HTTPS or on localhost; elsewhere the page "
              "connects without it", file=sys.stderr, flush=True)
    web.run_app(make_app(settings), sock=listener, print=None, loop=_new_loop(),
                access_log=logging.getLogger("aiohttp.access") if args.access_log else None)
    return 0


def _configure_logging(level: str) -> None:
    """Our lines at `level`; aioice's and aiortc's chatter (every candidate, every check) only when debugging."""
    logging.basicConfig(level=level.upper(), format="talkstream: %(name)s: %(message)s")
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
