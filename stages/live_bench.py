"""`talkstream bench --live`: WebRTC peers on loopback against a server process of their own, spoken to in real time.

A client of the server's HTTP API, like any other; in `stages/`, not `stream/`, because it measures mouths (dlib).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import cv2
import numpy as np
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from stages.audio import wav_bytes
from stages.webrtc import restrict_ice_to
from stream.clock import ms_of_seconds
from stream.errors import TalkstreamError

ROOT = Path(__file__).resolve().parent.parent   # where `python -m stream.cli` runs, and the examples are
BENCH_RATE_HZ = 16000   # what a microphone client sends


async def bench_live(sessions: int, seconds: float, preset: str, log: Callable[[str], None], *,
                     latency_ms: float | None = None, codec: str = "VP8", server_cpu: int | None = None,
                     workers: int = 0, ray: bool = False) -> dict[str, Any]:
    """`sessions` peers on loopback against a server process of their own, each session spoken to in real time over
    the websocket by a speaker process of its own (so that the peers' decoding never delays the speech). Measures
    what the server process spends per frame it sends, what each peer receives, the delays from speech sent to its
    frame and its voice received, and (on the first peer, with dlib on the decoded frames) the mouth's onset against
    the voice's and how soon an interrupt closes it. `workers`: the server's worker processes behind its front (0:
    the sessions in the server's own process); `ray`: those workers as Ray actors on a local runtime. The server's
    cost is its whole process tree's (front, workers, Ray's own processes)."""
    import aiohttp

    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "stream.cli", "serve", "--port", str(port), "--preset", preset, "--codec", codec,
        "--max-sessions", str(sessions), "--workers", str(workers), *(["--ray"] if ray else []),
        *(["--latency-ms", str(latency_ms)] if latency_ms else []),
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT)
    if server_cpu is not None:  # what one core sustains: the server on it, peers and speakers on the others
        try:
            os.sched_setaffinity(process.pid, {server_cpu})
            os.sched_setaffinity(0, os.sched_getaffinity(0) - {server_cpu} or {server_cpu})
        except (OSError, ValueError) as error:
            process.kill()
            raise TalkstreamError(f"cannot pin the server to CPU {server_cpu}: {error}") from None
    base = f"http://127.0.0.1:{port}"
    restrict_ice_to("127.0.0.1")
    speech = example_speech(BENCH_RATE_HZ)
    loop = asyncio.get_running_loop()
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):   # workers start (a Ray runtime too) before the front answers
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(f"{base}/healthz")).status == 200:
                        break
                await asyncio.sleep(0.1)
            signalling = await _signalling_ms(http, base, speech)
            peers = []
            for _ in range(sessions):
                form = aiohttp.FormData()
                form.add_field("example", "astronaut")
                created = await (await http.post(f"{base}/api/sessions", data=form)).json()
                if "id" not in created:
                    raise TalkstreamError(f"the server refused a session: {created.get('error')}")
                session_id = created["id"]
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                pc.addTransceiver("video", direction="recvonly")
                pc.addTransceiver("audio", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                answer = await (await http.post(f"{base}/api/sessions/{session_id}/offer", json={
                    "sdp": pc.localDescription.sdp, "type": "offer"})).json()
                await pc.setRemoteDescription(RTCSessionDescription(**answer))
                peers.append((session_id, pc))
            speakers = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "import sys, stages.live_bench as bench; bench.speak_main(sys.argv[1:])", base,
                str(seconds),
                *(session_id for session_id, _ in peers), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, cwd=ROOT)
            assert speakers.stdin is not None and speakers.stdout is not None
            await speakers.stdout.readline()           # imported and connected: ready to speak
            await asyncio.sleep(1.0)
            cpu_before, sent_before = _tree_cpu_s(process.pid), _frames_sent(await _metrics(http, base))
            peers_cpu_before = _process_cpu_s(os.getpid())
            started = loop.time()
            speakers.stdin.write(b"go\n")
            memory: list[tuple[float, float]] = []      # (seconds into the run, server RSS MB)
            watching = asyncio.create_task(_watch_memory(process.pid, started, memory))
            recordings = await asyncio.gather(*(_receive(pc, seconds) for _, pc in peers))
            watching.cancel()
            spoken = json.loads((await speakers.communicate())[0])
            elapsed = loop.time() - started
            cpu_after, metrics_after = _tree_cpu_s(process.pid), await _metrics(http, base)
            peers_cpu = _process_cpu_s(os.getpid()) - peers_cpu_before
            sent_after = _frames_sent(metrics_after)
            server_latency = _per_session(metrics_after, "speech_to_frame_seconds")
            slack = _per_session(metrics_after, "least_frame_slack_seconds")
            lost = _per_session(metrics_after, "packets_lost")
            for _, pc in peers:
                await pc.close()
    finally:
        process.terminate()
        await process.wait()
    for recording, (first_sent, interrupted, _) in zip(recordings, spoken, strict=True):
        recording.first_sent, recording.interrupted = first_sent, interrupted
    results = [_analyse(recording, speech, BENCH_RATE_HZ, measure=index == 0)
               for index, recording in enumerate(recordings)]
    sent = {key: sent_after[key] - sent_before.get(key, 0) for key in sent_after}
    frames = sent["speech"] + sent["idle"] + sent["repeated"]
    report = {
        "sessions": sessions, "workers": workers, "ray": ray, "preset": preset, "codec": codec,
        "server_cpu": server_cpu,
        "seconds": round(elapsed, 2),
        "server_cpu_ms_per_session_frame": round(ms_of_seconds(cpu_after - cpu_before) / max(1, frames), 2),
        "server_cpu_cores": round((cpu_after - cpu_before) / elapsed, 2),
        "peers_cpu_cores": round(peers_cpu / elapsed, 2),   # the receivers share this machine
        "speakers_latest_chunk_ms": round(ms_of_seconds(max(late for _, _, late in spoken)), 1),  # the speech's own lag
        "frames_sent": sent, "received_fps": [round(result["fps"], 1) for result in results],
        "speech_to_frame_sent_ms": [round(ms_of_seconds(server_latency.get(session_id, 0.0)), 1)
                                    for session_id, _ in peers],
        "least_frame_slack_ms": [round(ms_of_seconds(slack.get(session_id, 0.0)), 1) for session_id, _ in peers],
        "packets_lost": [int(lost.get(session_id, 0)) for session_id, _ in peers],
        "speech_to_frame_received_ms": [result["frame_latency_ms"] for result in results],
        "voice_latency_ms": [result["voice_latency_ms"] for result in results],
        "mouth_onset_after_voice_ms": results[0]["mouth_onset_after_voice_ms"],
        "interrupt_to_closed_mouth_ms": results[0]["interrupt_to_closed_mouth_ms"],
        # How much later video plays than audio by the RTP timestamps, in the first and the last 10 s of the run.
        "av_offset_ms_start_end": [result["av_offset_ms"] for result in results],
        **signalling,
        **_memory_growth(memory),
    }
    log(json.dumps(report))
    return report


SIGNALLING_REQUESTS = 50


async def _signalling_ms(http: Any, base: str, speech: np.ndarray) -> dict[str, float]:
    """Median time (ms) the server takes to answer an offer and a speak request (0.2 s of the example), over
    `SIGNALLING_REQUESTS` of each, before any media flows: through a front, what it adds shows here."""
    import aiohttp

    async def create() -> str:
        form = aiohttp.FormData()
        form.add_field("example", "astronaut")
        created = await (await http.post(f"{base}/api/sessions", data=form)).json()
        if "id" not in created:
            raise TalkstreamError(f"the server refused a session: {created.get('error')}")
        return str(created["id"])

    offers, speaks = [], []
    for _ in range(SIGNALLING_REQUESTS):
        session_id = await create()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTransceiver("audio", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        asked = time.monotonic()
        answer = await http.post(f"{base}/api/sessions/{session_id}/offer",
                                 json={"sdp": pc.localDescription.sdp, "type": "offer"})
        await answer.read()
        offers.append(time.monotonic() - asked)
        await pc.close()
        await http.delete(f"{base}/api/sessions/{session_id}")
    session_id = await create()
    clip = wav_bytes(speech[:BENCH_RATE_HZ // 5], BENCH_RATE_HZ)
    for _ in range(SIGNALLING_REQUESTS):
        form = aiohttp.FormData()
        form.add_field("audio", clip, filename="clip.wav")
        asked = time.monotonic()
        await (await http.post(f"{base}/api/sessions/{session_id}/speak", data=form)).read()
        speaks.append(time.monotonic() - asked)
    await http.delete(f"{base}/api/sessions/{session_id}")
    return {"offer_ms_median": round(ms_of_seconds(float(np.median(offers))), 1),
            "speak_ms_median": round(ms_of_seconds(float(np.median(speaks))), 1)}


def example_speech(rate: int) -> np.ndarray:
    """The example speech, mono int16 at `rate`."""
    from scipy.signal import resample_poly

    from stages.audio import AudioReader

    reader = AudioReader(ROOT / "examples" / "speech.wav")
    blocks = []
    while (block := reader.read()) is not None:
        blocks.append(block)
    speech = resample_poly(np.concatenate(blocks).mean(axis=1), rate, reader.format.rate_hz)
    return np.clip(speech, -32768, 32767).astype(np.int16)


def _talk(speech: np.ndarray, seconds: float) -> np.ndarray:
    """What each session hears: the example speech, then (on a run long enough) the example again after 2 s of
    silence, and so on, until 4 s before the end. The speakers send nothing in its pauses and say "end" where each
    begins."""
    total = int(BENCH_RATE_HZ * max(1.0, seconds - 4.0))
    once = np.concatenate([speech, np.zeros(2 * BENCH_RATE_HZ, np.int16)])
    return np.tile(once, -(-total // len(once)))[:total]


def speak_main(argv: list[str]) -> None:
    """The benchmark's speakers (a process of their own): BASE SECONDS SESSION... Each session hears the example
    speech in real time over its websocket, the first one interrupted 1 s before the end; prints [[first chunk
    sent, interrupt sent or null, the latest a chunk went out], ...] in monotonic seconds (the clock every process
    here shares)."""
    import aiohttp

    base, seconds, session_ids = argv[0], float(argv[1]), argv[2:]
    speech = example_speech(BENCH_RATE_HZ)
    talk = _talk(speech, seconds)
    first_utterance_s = min(len(talk), len(speech)) / BENCH_RATE_HZ
    chunk = BENCH_RATE_HZ // 50

    async def speak(http: aiohttp.ClientSession, socket: aiohttp.ClientWebSocketResponse, session_id: str,
                    interrupt: bool) -> list[float | None]:
        first_sent, interrupted, late, speaking = time.monotonic(), None, 0.0, False
        interrupt_at = first_sent + first_utterance_s - 1.0 if interrupt else None
        for index, offset in enumerate(range(0, len(talk), chunk)):
            if interrupt_at is not None and time.monotonic() >= interrupt_at:
                await http.post(f"{base}/api/sessions/{session_id}/interrupt")
                interrupted, interrupt_at = time.monotonic(), None
                if len(talk) <= first_utterance_s * BENCH_RATE_HZ:
                    break
            late = max(late, time.monotonic() - first_sent - index / 50)
            # A pause is not sent, and its start is said ("end"), as a TTS that knows where its sentences end does.
            if talk[offset:offset + chunk].any():
                await socket.send_bytes(talk[offset:offset + chunk].tobytes())
                speaking = True
            elif speaking:
                await socket.send_str("end")
                speaking = False
            await asyncio.sleep(max(0.0, first_sent + (index + 1) / 50 - time.monotonic()))
        await socket.close()
        return [first_sent, interrupted, late]

    async def speak_all() -> list[list[float | None]]:
        async with aiohttp.ClientSession() as http:
            sockets = [await http.ws_connect(f"{base}/api/sessions/{session_id}/audio?rate={BENCH_RATE_HZ}")
                       for session_id in session_ids]
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            return await asyncio.gather(*(speak(http, socket, session_id, index == 0)
                                          for index, (socket, session_id) in enumerate(zip(sockets, session_ids))))

    print(json.dumps(asyncio.run(speak_all())))


KEPT_S = 20.0   # decoded frames are kept (for dlib and the voice's level) this long; then only their timing


@dataclass(slots=True)
class _Recording:
    video: list[tuple[float, av.VideoFrame]]   # (arrival, frame), the first KEPT_S seconds
    audio: list[tuple[float, av.AudioFrame]]
    # (arrival, media seconds) of every frame, as the RTP timestamps say: what the A/V offset is read from
    video_times: list[tuple[float, float]]
    audio_times: list[tuple[float, float]]
    first_sent: float = 0.0                    # when the first speech chunk went out
    interrupted: float | None = None           # when the interrupt went out


async def _receive(pc: RTCPeerConnection, seconds: float) -> _Recording:
    """Both tracks of one peer for `seconds`, each frame with its arrival time (monotonic)."""
    loop = asyncio.get_running_loop()
    tracks = {receiver.track.kind: receiver.track for receiver in pc.getReceivers()}
    recording = _Recording([], [], [], [])
    started = loop.time()
    until = started + seconds

    async def receive(track: MediaStreamTrack, frames: list[Any], times: list[tuple[float, float]]) -> None:
        first: av.frame.Frame | None = None
        with contextlib.suppress(MediaStreamError, TimeoutError):
            while (now := loop.time()) < until:
                frame = cast(av.frame.Frame, await asyncio.wait_for(track.recv(), 5))
                now = loop.time()
                first = first or frame
                times.append((now, _since(frame, first, frame.time_base)))
                if now - started < KEPT_S:
                    frames.append((now, frame))

    await asyncio.gather(receive(tracks["video"], recording.video, recording.video_times),
                         receive(tracks["audio"], recording.audio, recording.audio_times))
    return recording


def av_offset_ms(recording: _Recording, window_s: float = 10.0) -> tuple[float, float] | None:
    """How much later the video plays than the audio (ms), at the start and at the end of the run: the median
    (arrival - media time) of the video's frames less the audio's, over the first and the last `window_s` seconds.
    Both tracks start at media time 0, so a receiver that plays by their timestamps sees this offset."""
    video, audio = np.array(recording.video_times), np.array(recording.audio_times)
    if len(video) < 2 or len(audio) < 2:
        return None

    def lag(times: np.ndarray, low: float, high: float) -> float:
        inside = times[(times[:, 1] >= low) & (times[:, 1] < high)]
        return float(np.median(inside[:, 0] - inside[:, 1])) if len(inside) else math.nan

    end = min(video[-1, 1], audio[-1, 1])
    start, final = 2.0, max(2.0 + window_s, end - window_s)  # past the frames queued while connecting
    return (round(ms_of_seconds(lag(video, start, start + window_s) - lag(audio, start, start + window_s)), 1),
            round(ms_of_seconds(lag(video, final, final + window_s) - lag(audio, final, final + window_s)), 1))


def _since(frame: av.frame.Frame, start: av.frame.Frame, time_base: Fraction | None) -> float:
    """Media seconds from `start` to `frame`. PyAV types pts and time_base as optional; aiortc sets both on every
    frame it receives."""
    assert frame.pts is not None and start.pts is not None and time_base is not None
    return float((frame.pts - start.pts) * time_base)


def _analyse(recording: _Recording, speech: np.ndarray, rate: int, *, measure: bool) -> dict[str, Any]:
    """Received fps span, the delays from the speech's onset sent to its voice and to the frame of that instant
    received, and (when `measure`) the mouth against the voice, with dlib."""
    video, audio = recording.video, recording.audio
    level = np.array([np.abs(frame.to_ndarray().astype(np.int32)).max() for _, frame in audio])
    voiced = np.flatnonzero(level > 500)
    arrivals = np.array([arrival for arrival, _ in video])
    every = np.array([arrival for arrival, _ in recording.video_times])
    steady = every[every >= every[0] + 1.0] if len(every) else every  # past the frames queued on connect
    span = steady[-1] - steady[0] if len(steady) > 1 else 0.0
    result: dict[str, Any] = {"fps": (len(steady) - 1) / span if span else 0.0, "voice_latency_ms": None,
                              "frame_latency_ms": None, "mouth_onset_after_voice_ms": None,
                              "interrupt_to_closed_mouth_ms": None, "av_offset_ms": av_offset_ms(recording)}
    spoken = np.flatnonzero(np.abs(speech.astype(np.int32)) > 500)
    if not (len(voiced) and len(spoken) and video):
        return result
    onset_sent = recording.first_sent + spoken[0] / rate   # when the first loud sample went out
    result["voice_latency_ms"] = round(ms_of_seconds(audio[voiced[0]][0] - onset_sent), 1)
    # Both tracks start at media time 0: the frame whose slot holds the voice's onset shows it.
    video_s = np.array([_since(frame, video[0][1], frame.time_base) for _, frame in video])
    voice_s = _since(audio[voiced[0]][1], audio[0][1], audio[0][1].time_base)
    onset_frame = np.flatnonzero(video_s <= voice_s)
    if len(onset_frame):
        result["frame_latency_ms"] = round(ms_of_seconds(video[onset_frame[-1]][0] - onset_sent), 1)
    if measure:
        aperture = _apertures([frame.to_ndarray(format="bgr24") for _, frame in video])
        opened = np.flatnonzero((aperture > 0.08) & (video_s > voice_s - 0.5))
        if len(opened):
            result["mouth_onset_after_voice_ms"] = round(ms_of_seconds(video_s[opened[0]] - voice_s), 1)
        if recording.interrupted is not None:
            closed = np.flatnonzero((arrivals > recording.interrupted) & (aperture < 0.05))
            if len(closed):
                closing_s = arrivals[closed[0]] - recording.interrupted
                result["interrupt_to_closed_mouth_ms"] = round(ms_of_seconds(closing_s), 1)
    return result


def _apertures(images: list[np.ndarray]) -> np.ndarray:
    """Inner-lip opening per frame in inter-ocular distances (dlib's 68 points; NaN without a face)."""
    from stages.portrait import DlibDetector

    detector = DlibDetector()
    values = []
    for image in images:
        faces = detector.detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if not faces:
            values.append(np.nan)
            continue
        points = max(faces, key=lambda face: face.score).landmarks
        iod = np.linalg.norm(points[36] - points[45])
        gaps = [np.linalg.norm(points[upper] - points[lower]) for upper, lower in ((61, 67), (62, 66), (63, 65))]
        values.append(float(np.mean(gaps) / iod))
    return np.array(values)


async def _metrics(http: Any, base: str) -> str:
    return await (await http.get(f"{base}/metrics")).text()


def _frames_sent(metrics: str) -> dict[str, float]:
    """Frames of each kind the server sent, all sessions together."""
    return {kind: sum(_per_session(metrics, f"frames_{kind}").values())
            for kind in ("speech", "idle", "repeated", "dropped")}


def _per_session(metrics: str, metric: str) -> dict[str, float]:
    """{session id: value} of one of the server's per-session metrics, from its /metrics text."""
    return {session: float(value) for session, value
            in re.findall(rf'^talkstream_{metric}{{(?:[^}}]*,)?session="([^"]*)"[^}}]*}} (\S+)$', metrics, re.M)}


async def _watch_memory(pid: int, started: float, samples: list[tuple[float, float]]) -> None:
    """The server's resident memory every 10 s of the run."""
    loop = asyncio.get_running_loop()
    while True:
        samples.append((loop.time() - started, _rss_mb(pid)))
        await asyncio.sleep(10.0)


def _memory_growth(samples: list[tuple[float, float]]) -> dict[str, Any]:
    """The server's RSS at the start and the end, and its growth per hour after the first quarter of the run (the
    first minutes fill caches and pools; a leak keeps growing after)."""
    if len(samples) < 4:
        return {"server_rss_mb_start_end": [samples[0][1], samples[-1][1]] if samples else None,
                "server_rss_growth_mb_per_hour": None}
    settled = [sample for sample in samples if sample[0] >= samples[-1][0] / 4]
    (t0, m0), (t1, m1) = settled[0], settled[-1]
    return {"server_rss_mb_start_end": [samples[0][1], samples[-1][1]],
            "server_rss_growth_mb_per_hour": round((m1 - m0) * 3600 / (t1 - t0), 1) if t1 > t0 else None}


def _rss_mb(pid: int) -> float:
    """Resident memory of process `pid` and its descendants (Linux), MB."""
    total = 0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            kilobytes = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{member}/status").read_text())
            total += int(kilobytes.group(1)) if kilobytes else 0
    return round(total / 1024, 1) if total else math.nan


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of process `pid` and its descendants (a front's workers, Ray's processes) so far (Linux)."""
    total = 0.0
    for member in _tree(pid):
        with contextlib.suppress(OSError):
            total += _process_cpu_s(member)
    return total


def _tree(pid: int) -> list[int]:
    """`pid` and every process descended from it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        member = todo.pop()
        tree.append(member)
        todo += children.get(member, [])
    return tree


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
