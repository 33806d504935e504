"""A LiveKit agent with a talkstream face, in the agent's own process: the agent's speech goes to the face, and the
face and the voice are published to the room together, in sync.

    pip install -e '.[livekit]'
    LIVEKIT_URL=wss://… LIVEKIT_API_KEY=… LIVEKIT_API_SECRET=… python examples/livekit_agent.py dev

`dev` is LiveKit's CLI: the agent joins each room it is dispatched to. So that it runs with no STT, LLM or TTS
account, this agent says one line (the example WAV, or `TALKSTREAM_SAY` spoken by espeak-ng) every few seconds; give
the `AgentSession` your own `stt=`, `llm=`, `tts=` and `vad=` and it talks back instead. No LiveKit server exists
where talkstream is tested, so this file is the one place a room is joined; the face itself is tested offline with
LiveKit's real `rtc` objects (tests/test_livekit.py).

A face on a machine of its own instead: the agent calls `send_speech_to(session, room, "talkstream-face", 24000)`,
and a worker joins the room with `avatar_worker_token(...)` and runs `run_avatar_worker(room, face)`.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import subprocess
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from livekit import rtc
from livekit.agents import Agent, AgentServer, AgentSession, JobContext, cli, room_io

from stages.integrations.livekit import TalkstreamVideoGenerator, start_in_process
from stages.session import Avatar

HERE = Path(__file__).resolve().parent
SAY_EVERY_S = 8.0

server = AgentServer()


@functools.cache
def avatar() -> Avatar:
    """Prepared once per process, shared by every room's face."""
    return Avatar.prepare(HERE / "astronaut.png", preset="ultra_fast")


@functools.cache
def line() -> tuple[bytes, int]:
    """What the agent says: `TALKSTREAM_SAY` through espeak-ng, or the example WAV (mono int16)."""
    text = os.environ.get("TALKSTREAM_SAY")
    source = io.BytesIO(subprocess.run(["espeak-ng", "--stdout", text], capture_output=True, check=True).stdout) \
        if text else str(HERE / "speech.wav")
    with wave.open(source) as reader:
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).reshape(-1, reader.getnchannels())
        return pcm.mean(axis=1).astype(np.int16).tobytes(), reader.getframerate()


async def spoken(pcm: bytes, rate_hz: int) -> AsyncIterator[rtc.AudioFrame]:
    step = rate_hz // 50 * 2   # 20 ms frames, as a TTS streams them
    for start in range(0, len(pcm), step):
        chunk = pcm[start:start + step]
        yield rtc.AudioFrame(chunk, rate_hz, 1, len(chunk) // 2)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    face = TalkstreamVideoGenerator(avatar=avatar())
    session = AgentSession()                           # your stt=, llm=, tts=, vad= here
    runner = await start_in_process(session, ctx.room, face)
    ctx.add_shutdown_callback(runner.aclose)
    ctx.add_shutdown_callback(face.aclose)
    await session.start(agent=Agent(instructions="You are a friendly astronaut."), room=ctx.room,
                        room_options=room_io.RoomOptions(audio_output=False))   # the runner publishes the voice
    pcm, rate_hz = line()
    while True:
        await session.say("(the example line)", audio=spoken(pcm, rate_hz)).wait_for_playout()
        await asyncio.sleep(SAY_EVERY_S)


if __name__ == "__main__":
    cli.run_app(server)
