"""The live avatar server on 127.0.0.1 with a real aiortc peer: the API, paced media with contiguous timestamps, the
mouth moving with the received voice, interruption, and bad requests answered without harm."""

from __future__ import annotations

import asyncio
import io
import re
import wave
from collections.abc import AsyncIterator
from fractions import Fraction

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from server import Limits, ServerSettings, make_app
from tests.conftest import PORTRAIT, SPEECH
from tests.quality import FaceMeasurer, mouth_geometry, stack_landmarks

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    settings = ServerSettings(preset="ultra_fast", limits=Limits(max_sessions=2, max_upload_bytes=2**20,
                                                                 vanished_after_s=3.0))
    test_server = TestServer(make_app(settings), host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


def speech_16k() -> np.ndarray:
    from scipy.signal import resample_poly

    with wave.open(str(SPEECH)) as reader:
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32)
        rate = reader.getframerate()
    return np.clip(resample_poly(pcm, 16000, rate), -32768, 32767).astype(np.int16)


async def create(http: aiohttp.ClientSession, base: str, **fields: str | bytes) -> aiohttp.ClientResponse:
    form = aiohttp.FormData()
    for key, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(key, value, filename=f"{key}.bin")
        else:
            form.add_field(key, value)
    return await http.post(f"{base}/api/sessions", data=form)


async def connect(http: aiohttp.ClientSession, base: str, session_id: str,
                  pc: RTCPeerConnection | None = None) -> RTCPeerConnection:
    """`pc` (default: one without STUN) offers to receive video and audio; the server's answer is applied."""
    pc = pc or RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    response = await http.post(f"{base}/api/sessions/{session_id}/offer",
                               json={"sdp": pc.localDescription.sdp, "type": "offer"})
    assert response.status == 200, await response.text()
    await pc.setRemoteDescription(RTCSessionDescription(**await response.json()))
    return pc


async def collect(track, until: float, into: list) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < until:
            frame = await asyncio.wait_for(track.recv(), 5)
            into.append((loop.time(), frame))
    except MediaStreamError:
        return


async def stream_speech(http: aiohttp.ClientSession, base: str, session_id: str, pcm: np.ndarray) -> None:
    """`pcm` (16 kHz) over the websocket in 20 ms chunks, in real time."""
    loop = asyncio.get_running_loop()
    socket = await http.ws_connect(f"{base}/api/sessions/{session_id}/audio?rate=16000")
    started = loop.time()
    for offset in range(0, len(pcm), 320):
        await socket.send_bytes(pcm[offset:offset + 320].tobytes())
        await asyncio.sleep(max(0.0, started + (offset + 320) / 16000 - loop.time()))
    await socket.close()


@pytest.mark.slow
async def test_a_peer_receives_paced_speech_and_idle_and_interrupt_closes_the_mouth(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    speech = speech_16k()
    async with aiohttp.ClientSession() as http:
        created = await create(http, base, example="astronaut", preset="ultra_fast")
        assert created.status == 201, await created.text()
        session_id = (await created.json())["id"]
        pc = await connect(http, base, session_id)
        tracks = {receiver.track.kind: receiver.track for receiver in pc.getReceivers()}
        video: list = []
        audio: list = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        receiving = [asyncio.create_task(collect(tracks["video"], started + 9.5, video)),
                     asyncio.create_task(collect(tracks["audio"], started + 9.5, audio))]
        await asyncio.sleep(1.0)                              # idle first
        first_sent = loop.time()
        await stream_speech(http, base, session_id, speech[: 16000 * 4])   # a 4 s utterance
        await asyncio.sleep(1.2)                              # the silence after it: idle again
        second_sent = loop.time()
        talking = asyncio.create_task(stream_speech(http, base, session_id, speech[16000 * 4: 16000 * 7]))
        await asyncio.sleep(1.3)
        talking.cancel()                                      # barge-in: the client stops and interrupts
        await asyncio.gather(talking, return_exceptions=True)
        await http.post(f"{base}/api/sessions/{session_id}/interrupt")
        interrupted = loop.time()
        await asyncio.gather(*receiving)
        metrics = await (await http.get(f"{base}/metrics")).text()
        await pc.close()
        deleted = await http.delete(f"{base}/api/sessions/{session_id}")
        assert deleted.status == 200

    # Contiguous timestamps: +3600 at 90 kHz per video frame, +960 per 20 ms of audio at 48 kHz.
    video_pts = [frame.pts for _, frame in video]
    assert len(video) > 200 and set(np.diff(video_pts)) == {3600}
    assert video[0][1].time_base == Fraction(1, 90000)
    audio_pts = np.array([frame.pts for _, frame in audio])
    assert {frame.samples for _, frame in audio} == {960} and set(np.diff(audio_pts)) == {960}
    assert 'talkstream_speech_received_seconds{session="' in metrics

    # The voice: silence, the first utterance (as long as what was sent), silence, the second until the interrupt.
    level = np.array([np.abs(frame.to_ndarray().astype(np.int32)).max() for _, frame in audio])
    heard = np.array([arrival for arrival, _ in audio])
    first = np.flatnonzero((level > 500) & (heard < second_sent))
    assert len(first) and heard[first[0]] > first_sent        # nothing in the first idle second
    assert (first[-1] - first[0]) * 0.02 == pytest.approx(4.0, abs=0.6)
    assert level[first[-1] + 10:][heard[first[-1] + 10:] < second_sent].max() < 500   # silent after it
    assert (level[(heard > second_sent) & (heard < interrupted)] > 500).any()         # the second utterance ...
    assert (level[heard > interrupted + 0.2] < 500).all()                              # ... cut by the interrupt

    # The mouth: open while the voice speaks, at rest in the silences and after the interrupt (dlib, decoded frames).
    measurer = FaceMeasurer()
    aperture = mouth_geometry(stack_landmarks(
        [measurer.landmarks(frame.to_ndarray(format="bgr24")) for _, frame in video]))["aperture"]
    assert not np.isnan(aperture).any()
    video_s = (np.array(video_pts) - video_pts[0]) / 90000
    voiced_s = (audio_pts[first] - audio_pts[0]) / 48000
    speaking = (video_s > voiced_s[0]) & (video_s < voiced_s[-1])
    silent = (video_s < voiced_s[0] - 0.2) | ((video_s > voiced_s[-1] + 0.3) &
                                              (np.array([arrival for arrival, _ in video]) < second_sent))
    assert np.percentile(aperture[speaking], 90) > 0.1
    assert np.percentile(aperture[silent], 90) < 0.05
    after_interrupt = np.array([arrival for arrival, _ in video]) > interrupted + 0.2
    assert after_interrupt.sum() > 10 and np.percentile(aperture[after_interrupt], 90) < 0.05


async def test_bad_requests_get_their_status_and_the_server_goes_on(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        not_image = await create(http, base, portrait=b"this is not an image")
        assert not_image.status == 400 and "image" in (await not_image.json())["error"]
        unknown = await http.post(f"{base}/api/sessions/nope/interrupt")
        assert unknown.status == 404 and "nope" in (await unknown.json())["error"]
        big = await create(http, base, portrait=b"\0" * (2**20 + 10))
        assert big.status == 413
        huge_png = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (30000).to_bytes(4, "big") * 2 + b"\0" * 64
        assert (await create(http, base, portrait=huge_png)).status == 413

        created = await create(http, base, example="astronaut")
        session_id = (await created.json())["id"]
        malformed = await http.post(f"{base}/api/sessions/{session_id}/offer", json={"sdp": "v=0 garbage",
                                                                                      "type": "offer"})
        assert malformed.status == 400 and "error" in await malformed.json()
        created = await create(http, base, example="astronaut")
        session_id = (await created.json())["id"]
        socket = await http.ws_connect(f"{base}/api/sessions/{session_id}/audio")
        await socket.send_bytes(b"")                          # no speech: ignored
        await socket.send_bytes(b"\x01\x02\x03")              # not 16-bit PCM
        reply = await socket.receive_json(timeout=5)
        assert "s16le" in reply["error"]
        await socket.close()
        wav = io.BytesIO()
        speech = await http.post(f"{base}/api/sessions/{session_id}/speak",
                                 data={"audio": io.BytesIO(b"\x00garbage" * 100)})
        assert speech.status == 400 and "error" in await speech.json()
        with wave.open(wav, "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(16000)
            writer.writeframes(speech_16k()[:8000].tobytes())
        good = await http.post(f"{base}/api/sessions/{session_id}/speak", data={"audio": io.BytesIO(wav.getvalue())})
        assert good.status == 200 and (await good.json())["queued_s"] == pytest.approx(0.5, abs=0.01)
        full = await create(http, base, example="astronaut")
        assert full.status == 503                             # two sessions live: the limit
        health = await http.get(f"{base}/healthz")
        assert health.status == 200 and (await health.json())["sessions"] == 2


@pytest.mark.slow
async def test_h264_when_configured_and_opus_required() -> None:
    test_server = TestServer(make_app(ServerSettings(preset="ultra_fast", video_codec="H264")), host="127.0.0.1")
    await test_server.start_server()
    base = str(test_server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            session_id = (await (await create(http, base, example="astronaut")).json())["id"]
            pc = await connect(http, base, session_id)                # the peer offers VP8 first, then H.264
            video = next(r for r in pc.getReceivers() if r.track.kind == "video").track
            frames: list = []
            await collect(video, asyncio.get_running_loop().time() + 2.0, frames)
            answer = pc.remoteDescription.sdp
            video_line = next(line for line in answer.splitlines() if line.startswith("m=video"))
            first = video_line.split()[3]
            assert f"a=rtpmap:{first} H264/90000" in answer
            assert len(frames) >= 30
            steps = {b.pts - a.pts for (_, a), (_, b) in zip(frames, frames[1:], strict=False)}
            assert steps == {3600}
            image = frames[-1][1].to_ndarray(format="bgr24")
            portrait = cv2.imread(str(PORTRAIT))
            assert image.shape == portrait.shape
            assert np.abs(image.astype(np.int16) - portrait).mean() < 12   # the portrait, decoded from H.264
            await pc.close()

            other = (await (await create(http, base, example="astronaut")).json())["id"]
            peer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            peer.addTransceiver("audio", direction="recvonly")
            await peer.setLocalDescription(await peer.createOffer())
            no_opus = "\r\n".join(line for line in peer.localDescription.sdp.splitlines()
                                   if "opus" not in line.lower()) + "\r\n"
            no_opus = re.sub(r"^(m=audio .*?) 96\b", r"\1", no_opus, flags=re.MULTILINE)
            refused = await http.post(f"{base}/api/sessions/{other}/offer", json={"sdp": no_opus, "type": "offer"})
            assert refused.status == 400 and "negotiate" in (await refused.json())["error"]
            await peer.close()
    finally:
        await test_server.close()


async def test_a_token_guards_the_api() -> None:
    test_server = TestServer(make_app(ServerSettings(token="s3cret")), host="127.0.0.1")
    await test_server.start_server()
    base = str(test_server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            refused = await create(http, base, example="astronaut")
            assert refused.status == 401 and "token" in (await refused.json())["error"]
            wrong = await http.post(f"{base}/api/sessions", headers={"Authorization": "Bearer nope"})
            assert wrong.status == 401
            assert (await http.get(f"{base}/healthz")).status == 200
            page = await http.get(f"{base}/")
            assert page.status == 200 and "<video" in await page.text()
    finally:
        await test_server.close()


def live_objects() -> tuple[int, int, int]:
    """(asyncio tasks, RTCPeerConnections, threads) alive now. The loop's default executor (aiortc encodes there)
    keeps its threads and starts more on demand, up to its fixed bound: those are not counted."""
    import gc
    import threading

    gc.collect()
    peers = sum(1 for item in gc.get_objects() if type(item) is RTCPeerConnection)  # no proxy dereferenced
    threads = sum(1 for thread in threading.enumerate() if not thread.name.startswith("asyncio_"))
    return len(asyncio.all_tasks()), peers, threads


def within(now: tuple[int, int, int], baseline: tuple[int, int, int]) -> bool:
    return all(value <= limit for value, limit in zip(now, baseline))


async def settled(baseline: tuple[int, int, int], seconds: float = 10.0) -> tuple[int, int, int]:
    """What is alive once closing tasks and exiting threads have had up to `seconds` to finish."""
    for _ in range(int(seconds * 10)):
        if within(now := live_objects(), baseline):
            return now
        await asyncio.sleep(0.1)
    return live_objects()


@pytest.mark.slow
async def test_a_hundred_sessions_come_and_go_without_leaving_anything(server: TestServer) -> None:
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as http:
        async def cycle() -> None:
            created = await create(http, base, example="astronaut")
            assert created.status == 201, await created.text()
            session_id = (await created.json())["id"]
            pc = await connect(http, base, session_id)
            video = next(r.track for r in pc.getReceivers() if r.track.kind == "video")
            await asyncio.wait_for(video.recv(), 10)      # connected: media flows
            assert (await http.delete(f"{base}/api/sessions/{session_id}")).status == 200
            await pc.close()

        for _ in range(3):                                # warm-up: executor threads that persist start here
            await cycle()
        await asyncio.sleep(1.0)
        baseline = live_objects()
        for _ in range(100):
            await cycle()
        after = await settled(baseline)
        health = await (await http.get(f"{base}/healthz")).json()
    assert health["sessions"] == 0
    assert within(after, baseline), f"(tasks, peer connections, threads) {after} after 100 cycles, {baseline} before"


VANISHING_CLIENT = """
import asyncio, sys
import aiohttp
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

async def main(base):
    import aioice.ice
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]  # loopback only, as the server
    async with aiohttp.ClientSession() as http:
        form = aiohttp.FormData()
        form.add_field("example", "astronaut")
        session_id = (await (await http.post(base + "/api/sessions", data=form)).json())["id"]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        answer = await (await http.post(base + "/api/sessions/" + session_id + "/offer",
                                         json={"sdp": pc.localDescription.sdp, "type": "offer"})).json()
        await pc.setRemoteDescription(RTCSessionDescription(**answer))
        video = next(r.track for r in pc.getReceivers() if r.track.kind == "video")
        for _ in range(10):
            await video.recv()
        print("watching", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
async def test_a_peer_that_vanishes_is_cleaned_up_within_five_seconds(server: TestServer) -> None:
    """A client killed mid-stream (SIGKILL: no RTP, RTCP, DTLS close or websocket goodbye; ICE consent alone would
    take 30 s) is noticed and its session closed within 5 s."""
    import sys

    base = str(server.make_url("")).rstrip("/")
    client = await asyncio.create_subprocess_exec(sys.executable, "-c", VANISHING_CLIENT, base,
                                                  stdout=asyncio.subprocess.PIPE)
    try:
        assert await asyncio.wait_for(client.stdout.readline(), 60) == b"watching\n"
    finally:
        client.kill()
        await client.wait()
    loop = asyncio.get_running_loop()
    vanished = loop.time()
    async with aiohttp.ClientSession() as http:
        for _ in range(80):
            if (await (await http.get(f"{base}/healthz")).json())["sessions"] == 0:
                break
            await asyncio.sleep(0.1)
    assert loop.time() - vanished < 5.0


async def test_an_unused_session_times_out_and_cors_is_off_unless_asked() -> None:
    settings = ServerSettings(limits=Limits(idle_timeout_s=1.0), cors_origin="https://app.example", token="t0")
    test_server = TestServer(make_app(settings), host="127.0.0.1")
    await test_server.start_server()
    base = str(test_server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer t0"}) as http, \
                aiohttp.ClientSession() as browser:   # a preflight carries no token
            created = await create(http, base, example="astronaut")
            assert created.headers["Access-Control-Allow-Origin"] == "https://app.example"
            preflight = await browser.options(f"{base}/api/sessions/{(await created.json())['id']}/offer", headers={
                "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert preflight.status == 204
            assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
            for _ in range(40):
                if (await (await http.get(f"{base}/healthz")).json())["sessions"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert (await (await http.get(f"{base}/healthz")).json())["sessions"] == 0
    finally:
        await test_server.close()


async def test_no_cors_header_by_default(server: TestServer) -> None:
    async with aiohttp.ClientSession() as http:
        response = await http.get(str(server.make_url("/healthz")))
        assert response.status == 200 and "Access-Control-Allow-Origin" not in response.headers
