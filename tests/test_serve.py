"""`talkstream serve` as a user starts it (a process, default flags but a free port) and a plain aiortc client with
no configuration: sessions from the example and from an upload, the speech of a file, the face it makes, the
errors a user meets first."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import socket
import subprocess
from pathlib import Path

import aiohttp
import cv2
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from server import ServerSettings, build_parser, settings_from
from stages.portrait import DlibDetector
from tests.conftest import PORTRAIT, ROOT, SPEECH, ServeProcess, free_port, talkstream_command
from tests.quality import mouth_geometry, stack_landmarks
from tests.test_server import collect, connect

pytestmark = pytest.mark.timeout(240)
DETECTOR = DlibDetector()


async def plain_peer(http: aiohttp.ClientSession, base: str, session_id: str) -> RTCPeerConnection:
    """What a Python user writes: a peer with aiortc's defaults, receiving video and audio."""
    return await connect(http, base, session_id, RTCPeerConnection())


async def receive(pc: RTCPeerConnection, seconds: float) -> tuple[list, list]:
    tracks = {receiver.track.kind: receiver.track for receiver in pc.getReceivers()}
    until = asyncio.get_running_loop().time() + seconds
    video: list = []
    audio: list = []
    await asyncio.gather(collect(tracks["video"], until, video), collect(tracks["audio"], until, audio))
    return video, audio


def detected(image: np.ndarray) -> np.ndarray | None:
    """dlib's 68 points of the face found in this very frame (the tracked `FaceMeasurer` puts the inner lips of this
    smile on its teeth in some frames of the received stream)."""
    faces = DETECTOR.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return max(faces, key=lambda face: face.score).landmarks if faces else None


async def create(http: aiohttp.ClientSession, base: str, **fields: object) -> dict:
    form = aiohttp.FormData()
    for key, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(key, value, filename="face.png")
        else:
            form.add_field(key, str(value))
    answer = await http.post(f"{base}/api/sessions", data=form)
    assert answer.status == 201, await answer.text()
    return await answer.json()


def lan_address() -> str:
    """This machine's address on its network (the route to a non-routable address; nothing is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        return str(probe.getsockname()[0])


@pytest.mark.slow
@pytest.mark.parametrize("host", [None, "0.0.0.0", "lan"], ids=["default", "all-addresses", "lan-address"])
async def test_a_plain_aiortc_peer_sees_and_hears_the_avatar_speak_a_file(host: str | None) -> None:
    if host == "lan":
        host = lan_address()
        if ipaddress.ip_address(host).is_loopback:
            pytest.skip("this machine has no network address")
    with ServeProcess(*(["--host", host] if host else [])) as served:
        base = served.base
        async with aiohttp.ClientSession() as http:
            session = await create(http, base, example="astronaut")
            assert session["preset"] == ServerSettings().preset
            pc = await plain_peer(http, base, session["id"])
            loop = asyncio.get_running_loop()
            receiving = asyncio.create_task(receive(pc, 9.0))
            await asyncio.sleep(2.5)                                   # at rest first
            spoken = await http.post(f"{base}/api/sessions/{session['id']}/speak",
                                     data={"audio": SPEECH.open("rb")})
            assert spoken.status == 200, await spoken.text()
            said_at = loop.time()
            video, audio = await receiving
            await pc.close()
            assert (await http.delete(f"{base}/api/sessions/{session['id']}")).status == 200
            assert (await (await http.get(f"{base}/healthz")).json())["sessions"] == 0
    arrivals = np.array([arrival for arrival, _ in video])
    steady = arrivals[arrivals > arrivals[0] + 1.0]
    assert len(steady) > 100 and (len(steady) - 1) / (steady[-1] - steady[0]) >= 22
    # Media time from the tracks' own timestamps (both start at 0): the voice's first and last loud 20 ms.
    level = np.array([np.abs(frame.to_ndarray().astype(np.int32)).max() for _, frame in audio])
    voiced = np.flatnonzero(level > 500)
    assert len(voiced) * 0.02 > 3.0 and audio[voiced[0]][0] > said_at - 0.1     # the voice came, after the request
    voice_s = [(audio[index][1].pts - audio[0][1].pts) / 48000 for index in (voiced[0], voiced[-1])]
    video_s = np.array([(frame.pts - video[0][1].pts) / 90000 for _, frame in video])
    aperture = mouth_geometry(stack_landmarks([detected(frame.to_ndarray(format="bgr24")) for _, frame in video]))[
        "aperture"]
    before = aperture[video_s < voice_s[0] - 0.2]
    during = aperture[(video_s > voice_s[0]) & (video_s < voice_s[1])]
    assert len(before) > 20 and np.nanpercentile(before, 90) < 0.05     # at rest before the speech
    assert np.nanpercentile(during, 90) > 0.1                              # speaking: the mouth opens


@pytest.mark.slow
async def test_an_uploaded_portrait_becomes_the_streamed_face() -> None:
    portrait = cv2.imread(str(PORTRAIT))
    upload = cv2.imencode(".png", cv2.resize(portrait[:448, 32:480], (384, 384), interpolation=cv2.INTER_AREA))[1]
    with ServeProcess() as served:
        async with aiohttp.ClientSession() as http:
            session = await create(http, served.base, portrait=upload.tobytes())
            assert (session["width"], session["height"]) == (384, 384)
            pc = await plain_peer(http, served.base, session["id"])
            video, _ = await receive(pc, 3.0)
            await pc.close()
    assert len(video) > 40
    last = video[-1][1].to_ndarray(format="bgr24")
    expected = cv2.resize(portrait[:448, 32:480], (384, 384), interpolation=cv2.INTER_AREA)
    assert last.shape == expected.shape and np.abs(last[300:].astype(int) - expected[300:]).mean() < 8


async def test_errors_are_json_and_a_bad_upload_is_named() -> None:
    with ServeProcess() as served:
        async with aiohttp.ClientSession() as http:
            session = await create(http, served.base, example="astronaut")
            form = aiohttp.FormData()
            form.add_field("audio", io.BytesIO(b"\x00garbage" * 200), filename="hello.mp3")
            bad = await http.post(f"{served.base}/api/sessions/{session['id']}/speak", data=form)
            assert bad.status == 400
            message = (await bad.json())["error"]
            assert "hello.mp3" in message and "standard input" not in message
            unknown = await http.get(f"{served.base}/api/nothing-here")
            assert unknown.status == 404 and "error" in await unknown.json()
            config = await (await http.get(f"{served.base}/api/config")).json()
            assert config["preset"] == ServerSettings().preset and "balanced" in config["presets"]
            assert (await http.get(f"{served.base}/favicon.ico")).status == 200
        log = served.log()
    assert "serving on http://127.0.0.1:" in log
    assert "aioice" not in log and "GET /" not in log          # quiet by default: no ICE chatter, no access lines


def test_the_serve_parser_defaults_are_the_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TALKSTREAM_TOKEN", raising=False)
    assert settings_from(build_parser().parse_args([])) == ServerSettings()
    assert "(default: 4)" in " ".join(build_parser().format_help().split())


@pytest.mark.slow
def test_a_port_in_use_is_one_line_and_exit_2() -> None:
    with ServeProcess() as served:
        taken = subprocess.run([*talkstream_command(), "serve", "--port", str(served.port)], capture_output=True,
                               text=True, timeout=60, cwd=ROOT)
    assert taken.returncode == 2
    assert taken.stderr.strip().splitlines() == [
        f"talkstream: error: cannot listen on 127.0.0.1:{served.port}: Address already in use"]


def test_an_unknown_preset_stops_serve_before_it_listens() -> None:
    result = subprocess.run([*talkstream_command(), "serve", "--preset", "turbo"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "unknown preset 'turbo'" in result.stderr and "serving" not in result.stderr


@pytest.mark.parametrize("address", ["auto", "ray://127.0.0.1:9"], ids=["auto", "closed-port"])
def test_serve_with_no_ray_cluster_there_is_one_line_and_exit_2(address: str, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    command = [*talkstream_command(), "serve", "--ray", address, "--port", str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**environment, "PYTHONPATH": str(ROOT)})
    errors = [line for line in result.stderr.splitlines() if line.startswith("talkstream: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert errors == [errors[0]] and f"cannot reach the Ray cluster at {address}" in errors[0], result.stderr


def test_a_negative_worker_count_is_a_usage_error() -> None:
    result = subprocess.run([*talkstream_command(), "serve", "--workers", "-1"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "--workers" in result.stderr and "Traceback" not in result.stderr


async def test_an_unexpected_failure_is_a_json_500_and_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from server import make_app

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug in a handler")

    app = make_app(ServerSettings())
    app.router.add_get("/api/broken", broken)
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        async with aiohttp.ClientSession() as http:
            answer = await http.get(str(test_server.make_url("/api/broken")))
            assert answer.status == 500 and answer.content_type == "application/json"
            body = await answer.json()
            assert "GET /api/broken" in body["error"] and "Traceback" not in body["error"]
            assert (await http.get(str(test_server.make_url("/healthz")))).status == 200   # and it goes on
    finally:
        await test_server.close()
    assert any("a bug in a handler" in (record.exc_text or str(record.exc_info)) for record in caplog.records)


def test_the_printed_address_carries_any_token_intact() -> None:
    from urllib.parse import parse_qs

    from server import _page_url

    url = _page_url(ServerSettings(token="a+b&c=d#e%f"))
    assert url.startswith("http://127.0.0.1:8080/#token=")
    assert parse_qs(url.split("#", 1)[1])["token"] == ["a+b&c=d#e%f"]   # as the page's URLSearchParams reads it
