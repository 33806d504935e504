"""A pipecat pipeline that serves a talking face to a browser over WebRTC, offline: a local speaker (a WAV file, or
espeak-ng saying a line) in place of the LLM and the TTS, talkstream's video service, and pipecat's SmallWebRTC
transport (aiortc underneath).

    pip install -e '.[pipecat]'
    python examples/pipecat_avatar.py                       # then open http://127.0.0.1:7861/
    python examples/pipecat_avatar.py --say "Hello there." --every 4

Each browser that connects gets a pipeline of its own: speaker -> face -> transport.output(). The portrait is
prepared once for all of them. In a real agent the speaker is your STT -> LLM -> TTS chain, and the face goes right
after the TTS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
from aiohttp import web
from loguru import logger
from pipecat.frames.frames import Frame, StartFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner

from stages.integrations.pipecat import TalkstreamVideoService
from stages.session import Avatar, restrict_ice_to

HERE = Path(__file__).resolve().parent
CHUNK_MS = 20   # a streaming TTS's frames

PAGE = """<!doctype html><meta charset="utf-8"><title>talkstream x pipecat</title><link rel="icon" href="data:,">
<style>body{font:15px system-ui;margin:2em;background:#111;color:#ddd}
video{width:512px;height:512px;background:#000}</style>
<h1>talkstream in a pipecat pipeline</h1>
<video id="face" autoplay playsinline></video><p id="state">connecting…</p>
<script>
const pc = new RTCPeerConnection();
pc.addTransceiver("audio", {direction: "recvonly"});
pc.addTransceiver("video", {direction: "recvonly"});
const media = new MediaStream();
pc.ontrack = (event) => { media.addTrack(event.track); document.getElementById("face").srcObject = media; };
pc.onconnectionstatechange = () => { document.getElementById("state").textContent = pc.connectionState; };
(async () => {
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => { if (pc.iceGatheringState === "complete") done();
    else pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done(); });
  const answer = await fetch("/api/offer", {method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({sdp: pc.localDescription.sdp, type: pc.localDescription.type})});
  await pc.setRemoteDescription(await answer.json());
})();
</script>
"""


class Speaker(FrameProcessor):
    """Stands in for the LLM and the TTS: says the same speech every `every_s` seconds, as a TTS sends it (started,
    20 ms audio frames as fast as they are made, stopped)."""

    def __init__(self, pcm: np.ndarray, rate_hz: int, every_s: float) -> None:
        super().__init__()
        self.pcm, self.rate_hz, self.every_s = pcm, rate_hz, every_s
        self._talking: asyncio.Task[None] | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self._talking = self.create_task(self._talk())

    async def _talk(self) -> None:
        step = self.rate_hz * CHUNK_MS // 1000
        while True:
            await asyncio.sleep(1.0)
            await self.push_frame(TTSStartedFrame())
            for start in range(0, len(self.pcm), step):
                await self.push_frame(TTSAudioRawFrame(audio=self.pcm[start:start + step].tobytes(),
                                                       sample_rate=self.rate_hz, num_channels=1))
            await self.push_frame(TTSStoppedFrame())
            await asyncio.sleep(max(0.0, self.every_s - 1.0))

    async def cleanup(self) -> None:
        await super().cleanup()
        if self._talking is not None:
            await self.cancel_task(self._talking)


def speech(path: Path | None, line: str | None) -> tuple[np.ndarray, int]:
    """The speaker's speech: espeak-ng saying `line`, or a WAV file (mono int16, or its channels mixed)."""
    if line is not None:
        if shutil.which("espeak-ng") is None:
            sys.exit("pipecat_avatar: --say needs espeak-ng (apt-get install espeak-ng)")
        data = subprocess.run(["espeak-ng", "--stdout", line], capture_output=True, check=True).stdout
        source: io.BytesIO | str = io.BytesIO(data)
    else:
        source = str(path)
    with wave.open(source) as reader:
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).reshape(-1, reader.getnchannels())
        return pcm.mean(axis=1).astype(np.int16), reader.getframerate()


def make_app(avatar: Avatar, pcm: np.ndarray, rate_hz: int, every_s: float) -> web.Application:
    runs: set[asyncio.Task[None]] = set()

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def offer(request: web.Request) -> web.Response:
        """A browser's offer: a connection and a pipeline of its own, running until the browser leaves."""
        connection = SmallWebRTCConnection()
        try:
            body = await request.json()
            await connection.initialize(sdp=body["sdp"], type=body["type"])
        except (ValueError, KeyError, TypeError) as error:   # not an offer: said so, the connection closed
            await connection.disconnect()
            return web.json_response({"error": f"bad offer: {error}"}, status=400)
        face = TalkstreamVideoService(avatar=avatar)
        width, height = face.size
        transport = SmallWebRTCTransport(connection, TransportParams(
            audio_out_enabled=True, video_out_enabled=True, video_out_is_live=True, video_out_width=width,
            video_out_height=height, video_out_framerate=int(avatar.preset.video.frame_rate)))
        worker = PipelineWorker(Pipeline([Speaker(pcm, rate_hz, every_s), face, transport.output()]))

        @transport.event_handler("on_client_disconnected")
        async def left(transport: SmallWebRTCTransport, client: SmallWebRTCConnection) -> None:
            await worker.cancel()

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        run = asyncio.ensure_future(runner.run())
        runs.add(run)
        run.add_done_callback(runs.discard)
        return web.json_response(connection.get_answer())

    async def stop_all(_: web.Application) -> None:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_post("/api/offer", offer)
    app.on_shutdown.append(stop_all)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--portrait", type=Path, default=HERE / "astronaut.png")
    parser.add_argument("--speech", type=Path, default=HERE / "speech.wav", help="a WAV the speaker says")
    parser.add_argument("--say", metavar="TEXT", help="a line espeak-ng says instead of the WAV")
    parser.add_argument("--every", type=float, default=12.0, metavar="S", help="say it again every S seconds")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7861)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="INFO")   # pipecat's DEBUG lines are many per frame
    pcm, rate_hz = speech(args.speech, args.say)
    avatar = Avatar.prepare(args.portrait, preset="ultra_fast")
    restrict_ice_to(args.host)   # media on the address the page is served on (aioice skips loopback otherwise)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(make_app(avatar, pcm, rate_hz, args.every), args.host, args.port))


async def serve(app: web.Application, host: str, port: int) -> None:
    """The page and the offers until Ctrl-C; "serving on" once the port is open."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"pipecat_avatar: serving on http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    main()
