"""The live API without a server: a WAV fed in 20 ms chunks as if spoken, paced frames written as they come.

    python examples/live_session.py [speech.wav] [-o live.mp4]

The same calls a WebRTC sink makes (`next_video`, `next_audio` at their deadlines) here feed an MP4 writer, so the
file shows what a viewer of the live stream would see: idle at first, the speech, idle again.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from stages.session import Avatar

HERE = Path(__file__).resolve().parent


async def main(speech: Path, output: Path, seconds: float) -> None:
    avatar = Avatar.prepare(HERE / "astronaut.png", preset="fast")
    with wave.open(str(speech)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).reshape(-1, reader.getnchannels())
    mono = pcm.mean(axis=1).astype(np.int16)
    chunk = rate // 50

    with av.open(str(output), "w") as container:
        video = container.add_stream("libx264", rate=25, options={"preset": "veryfast"})
        video.width, video.height = avatar.image.shape[1], avatar.image.shape[0]
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=48000, layout="mono")   # the live voice's rate (Opus' own)

        encoder = ThreadPoolExecutor(1)  # encoding stays off the event loop, which paces the media
        loop = asyncio.get_running_loop()

        def write(stream: av.stream.Stream, frame: av.frame.Frame | None) -> None:
            container.mux(stream.encode(frame))

        async with avatar.open_live() as live:
            async def speak() -> None:
                await asyncio.sleep(0.5)                      # half a second of idle first
                started = time.perf_counter()
                for index, offset in enumerate(range(0, len(mono), chunk)):
                    live.push(mono[offset:offset + chunk], rate)
                    await asyncio.sleep(max(0.0, started + (index + 1) / 50 - time.perf_counter()))

            async def show() -> None:
                for slot in range(round(seconds * 25)):
                    image, kind = await live.next_video(slot)
                    frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                    frame.pts, frame.time_base = slot, Fraction(1, 25)
                    await loop.run_in_executor(encoder, write, video, frame)
                    if slot % 25 == 0:
                        print(f"{slot / 25:4.0f} s  {kind}")

            async def play() -> None:
                for block in range(round(seconds * 50)):
                    samples = await live.next_audio(block)
                    frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
                    frame.sample_rate, frame.pts = live.timing.rate_hz, block * live.timing.block_samples
                    await loop.run_in_executor(encoder, write, audio, frame)

            await asyncio.gather(speak(), show(), play())
        write(video, None)
        write(audio, None)
    print(f"wrote {output}: {live.stats()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("speech", nargs="?", type=Path, default=HERE / "speech.wav")
    parser.add_argument("-o", "--output", type=Path, default=Path("live.mp4"))
    parser.add_argument("--seconds", type=float, default=11.0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.speech, arguments.output, arguments.seconds))
