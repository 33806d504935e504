"""Load and abuse against `talkstream serve` as a user starts it (a front and a worker per core), on loopback only and
bounded in count and time: 1,000 sessions made, connected by a plain aiortc peer and deleted; slow-loris clients;
oversized requests; malformed websocket frames; a client flooding `speak`. Each is refused with the right status,
the server keeps answering, and its tasks, threads, peer connections and memory come back to where they were."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import struct
import time
from collections.abc import Iterator

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from tests.conftest import SPEECH, ServeProcess
from tests.test_serve import create
from tests.test_server import connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
CYCLES = 1000
AT_ONCE = 4              # cycles in flight together (the server holds 4 sessions per worker)
HEADER_TIMEOUT_S = 15.0  # the server's request_header_timeout_s


@pytest.fixture(scope="module")
def served() -> Iterator[ServeProcess]:
    """The server, warmed up: every worker has prepared the example, connected peers, decoded speech (its pools,
    caches and encoders' first allocations are what a leak is measured against)."""
    with ServeProcess() as server:
        asyncio.run(warm_up(server.base))
        yield server


async def warm_up(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            await asyncio.gather(*(cycle(http, base, speak=True) for _ in range(AT_ONCE)))


async def figures(base: str) -> dict[str, float]:
    """Every process's tasks, threads, open peer connections and resident memory, by the front's /metrics (read on
    a connection of its own, closed after)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        text = await (await http.get(f"{base}/metrics")).text()
    found = {}
    for name, labels, value in re.findall(r"^talkstream_(front_process_threads|front_asyncio_tasks|"
                                          r"front_process_resident_memory_bytes|process_threads|asyncio_tasks|"
                                          r"peer_connections|process_resident_memory_bytes|sessions)"
                                          r"(\{[^}]*\})? (\S+)$", text, re.MULTILINE):
        found[name + labels] = float(value)
    return found


async def settled(base: str) -> dict[str, float]:
    """The figures once no session is left and two readings a second apart agree on tasks and threads."""
    previous: dict[str, float] = {}
    for _ in range(60):
        now = await figures(base)
        sessions = [value for key, value in now.items() if key.startswith("sessions{")]
        counts = {key: value for key, value in now.items() if "memory" not in key}
        if not any(sessions) and counts == {key: value for key, value in previous.items() if "memory" not in key}:
            return now
        previous = now
        await asyncio.sleep(1.0)
    return previous


async def back_to(before: dict[str, float], base: str) -> list[str]:
    """What has not come back to `before` within 60 s (a burst's idle keep-alive connections, and their handlers,
    close within 15 s at the front, 5-10 s more between the front and a worker)."""
    problems: list[str] = []
    for _ in range(60):
        if not (problems := compare(before, await figures(base))):
            break
        await asyncio.sleep(1.0)
    return problems


def compare(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """What did not come back: counts exactly, memory within 5 %."""
    problems = []
    for key, value in before.items():
        if key.startswith("sessions{"):
            continue
        later = after.get(key)
        if later is None:
            problems.append(f"{key} is gone")
        elif "memory" in key:
            if abs(later - value) > 0.05 * value:
                problems.append(f"{key}: {value / 2**20:.0f} -> {later / 2**20:.0f} MiB")
        elif later > value:
            problems.append(f"{key}: {value:g} -> {later:g}")
    return problems


async def cycle(http: aiohttp.ClientSession, base: str, *, speak: bool = False) -> None:
    """A session made, connected by a plain aiortc peer (and spoken to), and deleted."""
    session = await create(http, base, example="astronaut")
    pc = await connect(http, base, session["id"], RTCPeerConnection(RTCConfiguration(iceServers=[])))
    try:
        for _ in range(200):
            if pc.connectionState == "connected":
                break
            await asyncio.sleep(0.05)
        assert pc.connectionState == "connected", pc.connectionState
        if speak:
            form = aiohttp.FormData()
            form.add_field("audio", SPEECH.read_bytes(), filename="speech.wav")
            assert (await http.post(f"{base}/api/sessions/{session['id']}/speak", data=form)).status == 200
            await asyncio.sleep(1.0)
        answer = await http.delete(f"{base}/api/sessions/{session['id']}")
        assert answer.status == 200, await answer.text()
    finally:
        await pc.close()


async def test_a_thousand_sessions_made_connected_and_deleted_leave_nothing_behind(served: ServeProcess) -> None:
    base = served.base
    async with aiohttp.ClientSession() as http:

        async def cycles(count: int) -> float:
            """`count` cycles, `AT_ONCE` at a time; how long they took (s)."""
            remaining = iter(range(count))

            async def run() -> None:
                for _ in remaining:
                    await cycle(http, base)

            started = time.monotonic()
            await asyncio.gather(*(run() for _ in range(AT_ONCE)))
            return time.monotonic() - started

        await cycles(500)   # memory's high-water mark for this load is reached here (within 400 cycles)
        before = await settled(base)
        took = await cycles(CYCLES)
        health = await (await http.get(f"{base}/healthz")).json()
    assert [worker["restarts"] for worker in health["workers"]] == [0] * len(health["workers"])
    assert not (problems := await back_to(before, base)), (problems, f"{CYCLES} cycles in {took:.0f} s")


# ------------------------------------------------------------------------------------------------ raw clients


async def raw_request(base: str, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def test_slow_loris_clients_are_cut_off_and_others_are_served_meanwhile(served: ServeProcess) -> None:
    base = served.base
    async with aiohttp.ClientSession() as http:
        before = await settled(base)
        clients = [await raw_request(base, b"GET /healthz HTTP/1.1\r\nHost: talkstream\r\n") for _ in range(100)]
        opened = time.monotonic()
        served_meanwhile = []
        closed = [False] * len(clients)
        while time.monotonic() - opened < HEADER_TIMEOUT_S + 5 and not all(closed):
            asked = time.monotonic()
            answer = await http.get(f"{base}/healthz")
            served_meanwhile.append((answer.status, time.monotonic() - asked))
            for index, (reader, writer) in enumerate(clients):
                if closed[index]:
                    continue
                try:   # one more header line a second, never the end of the headers
                    writer.write(b"X-Slow: %d\r\n" % int(time.monotonic()))
                    await writer.drain()
                    closed[index] = reader.at_eof() or bool(await asyncio.wait_for(reader.read(1024), 0.001))
                except TimeoutError:
                    pass
                except (ConnectionError, OSError):
                    closed[index] = True
            await asyncio.sleep(1.0)
        cut_off_after = time.monotonic() - opened
        for _, writer in clients:
            writer.close()
    assert all(closed), f"{closed.count(False)} slow clients still connected after {cut_off_after:.0f} s"
    assert HEADER_TIMEOUT_S - 2 < cut_off_after < HEADER_TIMEOUT_S + 5
    assert all(status == 200 and took < 1.0 for status, took in served_meanwhile), served_meanwhile
    assert not (problems := await back_to(before, base)), problems


async def test_oversized_requests_are_refused_with_their_status(served: ServeProcess) -> None:
    base = served.base
    async with aiohttp.ClientSession() as http:
        before = await settled(base)
        huge = os.urandom(17 * 2**20)   # over the 16 MiB upload limit
        form = aiohttp.FormData()
        form.add_field("portrait", huge, filename="face.png")
        answer = await http.post(f"{base}/api/sessions", data=form)
        assert answer.status == 413 and "error" in await answer.json()
        session = await create(http, base, example="astronaut")
        form = aiohttp.FormData()
        form.add_field("audio", huge, filename="speech.wav")
        answer = await http.post(f"{base}/api/sessions/{session['id']}/speak", data=form)
        assert answer.status == 413 and "error" in await answer.json()
        # A header line longer than the parser takes: 400 before any handler runs.
        reader, writer = await raw_request(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000
                                           + b"\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.split()[1] in (b"400", b"431"), status_line
        # A portrait whose header declares 100 megapixels: refused before it is decoded.
        png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + struct.pack(">II", 10_000, 10_000) + b"\x08\x02\x00\x00\x00"
        form = aiohttp.FormData()
        form.add_field("portrait", png, filename="huge.png")
        answer = await http.post(f"{base}/api/sessions", data=form)
        assert answer.status == 413 and "megapixels" in (await answer.json())["error"]
        assert (await http.delete(f"{base}/api/sessions/{session['id']}")).status == 200
        assert (await http.get(f"{base}/healthz")).status == 200
    assert not (problems := await back_to(before, base)), problems


def frame(opcode: int, payload: bytes, *, fin: bool = True, length: int | None = None) -> bytes:
    """One websocket frame as a client sends it (masked), its length field as given."""
    length = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    if length < 126:
        head += bytes([0x80 | length])
    elif length < 2**16:
        head += bytes([0x80 | 126]) + struct.pack(">H", length)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", length)
    key = os.urandom(4)
    return head + key + bytes(byte ^ key[index % 4] for index, byte in enumerate(payload))


# (aiohttp takes a client's unmasked frame as it is, against RFC 6455: not listed)
MALFORMED = {
    "a reserved opcode": frame(0x3, b"hello"),
    "text that is not UTF-8": frame(0x1, b"\xff\xfe\xfd"),
    "a frame declaring 1 TiB": frame(0x2, b"", length=2**40),
    "a fragmented control frame": frame(0x9, b"ping", fin=False),
    "PCM of an odd byte count": frame(0x2, b"\x00\x01\x02"),
}


def close_code(received: bytes) -> int | None:
    """The code of the close frame among the server's frames so far (0: closed without one), None before it."""
    position = 0
    while position + 2 <= len(received):
        opcode, length = received[position] & 0x0F, received[position + 1] & 0x7F
        start = position + 2 + (2 if length == 126 else 8 if length == 127 else 0)
        if length >= 126:
            if start > len(received):
                return None
            length = int.from_bytes(received[position + 2:start], "big")
        if opcode == 0x8:
            return struct.unpack(">H", received[start:start + 2])[0] if length >= 2 else 0
        position = start + length
    return None


async def websocket(base: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    key = base64.b64encode(os.urandom(16))
    reader, writer = await raw_request(base, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket"
                                       b"\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
                                       + key + b"\r\n\r\n")
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


async def test_malformed_websocket_frames_close_only_that_socket(served: ServeProcess) -> None:
    base = served.base
    async with aiohttp.ClientSession() as http:
        before = await settled(base)
        session = await create(http, base, example="astronaut")
        path = f"/api/sessions/{session['id']}/audio?rate=16000"
        for what, data in MALFORMED.items():
            reader, writer = await websocket(base, path)
            writer.write(data)
            await writer.drain()
            received = b""
            try:   # the server answers with a close frame (or just closes) within a moment
                async with asyncio.timeout(5):
                    while (code := close_code(received)) is None and (chunk := await reader.read(4096)):
                        received += chunk
            finally:
                writer.close()
            assert code in (0, 1002, 1003, 1007, 1009), (what, code, received[:40])
        # The session took no harm: real speech still goes in.
        socket = await http.ws_connect(f"{base}{path}")
        await socket.send_bytes(b"\x00\x10" * 16000)
        await socket.send_str("end")
        await socket.close()
        text = ""
        for _ in range(50):
            text = await (await http.get(f"{base}/metrics")).text()
            if re.search(rf'speech_received_seconds\{{[^}}]*session="{session["id"]}"}} 1\.0', text):
                break
            await asyncio.sleep(0.1)
        assert re.search(rf'speech_received_seconds\{{[^}}]*session="{session["id"]}"}} 1\.0', text)
        assert (await http.delete(f"{base}/api/sessions/{session['id']}")).status == 200
    assert not (problems := await back_to(before, base)), problems


async def test_a_client_flooding_speak_is_told_to_wait(served: ServeProcess) -> None:
    base = served.base
    speech = SPEECH.read_bytes()   # 8.9 s

    async def speak(http: aiohttp.ClientSession, session_id: str) -> tuple[int, dict]:
        form = aiohttp.FormData()
        form.add_field("audio", speech, filename="speech.wav")
        answer = await http.post(f"{base}/api/sessions/{session_id}/speak", data=form)
        return answer.status, await answer.json()

    async def flood(http: aiohttp.ClientSession, session_id: str) -> None:
        at_once = await asyncio.gather(*(speak(http, session_id) for _ in range(20)))
        statuses = [status for status, _ in at_once]
        assert set(statuses) == {200, 429}, statuses   # two are decoded at a time; the rest are told to wait
        assert all("error" in body for status, body in at_once if status == 429)
        one_by_one = []
        for _ in range(20):   # 120 s of speech queued is the most a session takes
            status, body = await speak(http, session_id)
            one_by_one.append(status)
            if status == 429:
                assert "still to say" in body["error"]
                break
        assert one_by_one[-1] == 429 and 200 in one_by_one, one_by_one
        assert (await http.post(f"{base}/api/sessions/{session_id}/interrupt")).status == 200
        assert (await speak(http, session_id))[0] == 200   # the queue emptied: speech is taken again

    async def flood_every_worker(http: aiohttp.ClientSession) -> None:
        """A session on each worker (held at once, they land on different ones), each flooded in turn."""
        workers = len((await (await http.get(f"{base}/healthz")).json())["workers"])
        sessions: dict[int, dict] = {}
        held = []
        while len(sessions) < workers and len(held) < 4 * workers:   # placed by load: until each worker has one
            held.append(await create(http, base, example="astronaut"))
            sessions.setdefault(held[-1]["worker"], held[-1])
        assert len(sessions) == workers, held
        for session in sessions.values():
            await flood(http, session["id"])
        for session in held:
            assert (await http.delete(f"{base}/api/sessions/{session['id']}")).status == 200

    async with aiohttp.ClientSession() as http:
        for _ in range(2):   # the first floods set memory's high-water mark: the next cost no more
            await flood_every_worker(http)
        before = await settled(base)
        await flood_every_worker(http)
    assert not (problems := await back_to(before, base)), problems
