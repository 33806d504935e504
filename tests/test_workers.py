"""`talkstream serve --workers 2` and `talkstream serve --ray` as a user starts them, driven by plain aiortc peers:
sessions land on both workers, their signalling and speech go through the front, a worker killed with SIGKILL loses
only its own sessions (410), is restarted and counted, and SIGTERM drains the whole server (Ray's runtime too)
within 5 s."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import aiohttp
import pytest
from aiortc import RTCPeerConnection

from stages.live_bench import _tree, example_speech
from tests.conftest import ServeProcess
from tests.test_serve import create, receive
from tests.test_server import connect, stream_speech

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


async def health(http: aiohttp.ClientSession, base: str) -> dict:
    return await (await http.get(f"{base}/healthz")).json()


def metric(text: str, name: str, **labels: str) -> list[float]:
    """The values of `name`'s samples whose labels include `labels`."""
    values = []
    for series, value in re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.MULTILINE):
        if all(f'{key}="{wanted}"' in series for key, wanted in labels.items()):
            values.append(float(value))
    return values


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:   # a zombie is gone for our purposes
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def loaded_libraries(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as maps:
        return maps.read()


@pytest.mark.parametrize("kind", ["processes", "ray"])
async def test_sessions_spread_over_two_workers_survive_a_killed_one_and_drain_on_sigterm(kind: str) -> None:
    if kind == "ray":
        pytest.importorskip("ray", reason="the cluster extra: pip install -e '.[cluster]'")
    speech = example_speech(16000)
    with ServeProcess(*(["--workers", "2"] if kind == "processes" else ["--ray"])) as served:
        base = served.base
        peers: list[RTCPeerConnection] = []
        async with aiohttp.ClientSession() as http:
            workers = (await health(http, base))["workers"]
            assert [worker["alive"] for worker in workers] == [True, True]
            pids = {worker["worker"]: worker["pid"] for worker in workers}

            first = await create(http, base, example="astronaut")
            second = await create(http, base, example="astronaut")
            assert {first["worker"], second["worker"]} == {0, 1}   # the least-loaded worker takes each
            try:
                for session in (first, second):
                    peers.append(await connect(http, base, session["id"], RTCPeerConnection()))
                doomed, survivor = peers
                # Both speak, through the front's websocket relay; both faces arrive.
                speaking = [asyncio.create_task(stream_speech(http, base, session["id"], speech[:16000 * 3]))
                            for session in (first, second)]
                (video_a, audio_a), (video_b, audio_b) = await asyncio.gather(receive(doomed, 4.0),
                                                                               receive(survivor, 4.0))
                await asyncio.gather(*speaking)
                assert len(video_a) > 50 and len(video_b) > 50 and audio_a and audio_b
                metrics = await (await http.get(f"{base}/metrics")).text()
                for session in (first, second):
                    worker = str(session["worker"])
                    assert metric(metrics, "talkstream_frames_speech", worker=worker, session=session["id"])[0] > 0
                repeated_before = metric(metrics, "talkstream_frames_repeated", session=second["id"])[0]

                # SIGKILL the first session's worker: its session is gone (410), the other streams on.
                os.kill(pids[first["worker"]], signal.SIGKILL)
                killed_at = time.monotonic()
                watching = asyncio.create_task(receive(survivor, 4.0))
                while time.monotonic() - killed_at < 3:
                    answer = await http.post(f"{base}/api/sessions/{first['id']}/interrupt")
                    if answer.status == 410:
                        break
                    await asyncio.sleep(0.05)
                assert answer.status == 410, await answer.text()
                assert "worker" in (await answer.json())["error"]
                for method, path in (("POST", "/speak"), ("POST", "/offer"), ("DELETE", ""), ("GET", "/audio")):
                    answer = await http.request(method, f"{base}/api/sessions/{first['id']}{path}")
                    assert answer.status == 410 and "error" in await answer.json(), (method, path)

                third = await create(http, base, example="astronaut")   # placed on the live worker meanwhile
                video_b, _ = await watching
                fps = (len(video_b) - 1) / (video_b[-1][0] - video_b[0][0])
                assert fps > 22, fps
                metrics = await (await http.get(f"{base}/metrics")).text()
                assert metric(metrics, "talkstream_frames_repeated", session=second["id"])[0] == repeated_before

                # The killed worker comes back, with a new process, and is counted.
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    restarted = (await health(http, base))["workers"][first["worker"]]
                    if restarted["alive"]:
                        break
                    await asyncio.sleep(0.2)
                assert restarted["alive"] and restarted["restarts"] == 1 and restarted["pid"] != pids[first["worker"]]
                metrics = await (await http.get(f"{base}/metrics")).text()
                assert metric(metrics, "talkstream_worker_restarts_total", worker=str(first["worker"])) == [1.0]
                assert metric(metrics, "talkstream_front_sessions_lost_total") == [1.0]
                assert third["id"] not in (first["id"], second["id"])
                pids = {worker["worker"]: worker["pid"] for worker in (await health(http, base))["workers"]}
                everything = _tree(served.process.pid)[1:]   # its descendants
                assert set(pids.values()) <= set(everything)
                if kind == "processes":   # plain serve never loads Ray (its native library would be mapped)
                    for pid in (served.process.pid, *pids.values()):
                        assert "_raylet" not in loaded_libraries(pid)
            finally:
                # SIGTERM: the front drains (its workers close their peers) and exits within 5 s.
                served.process.send_signal(signal.SIGTERM)
                started = time.monotonic()
                await asyncio.to_thread(served.process.wait, 10)
                stopped_in = time.monotonic() - started
                for _ in range(50):
                    if not peers or peers[-1].connectionState in ("closed", "failed"):
                        break
                    await asyncio.sleep(0.1)
                told = peers[-1].connectionState if peers else None
                for pc in peers:
                    await pc.close()
        assert stopped_in < 5.0, stopped_in
        assert told == "closed", told   # the worker closed its peer, and said so
        assert served.process.returncode == 0, served.log()
        assert not [pid for pid in everything if alive(pid)]   # workers (and Ray's runtime) ended with it
