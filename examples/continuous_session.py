"""The unpaced live API, read the way a voice-agent framework reads it: speech pushed as a TTS streams it, frames
taken as fast as they finish, each with its voice, idle frames around the speech, into an MP4.

    python examples/continuous_session.py [speech.wav] [-o continuous.mp4]

Nothing here waits for a clock: the video is as long as the frames read (one second of idle, the speech, one second
of idle), and it is written faster than real time. A framework (LiveKit's AvatarRunner, a pipecat transport) paces the
same frames itself.
"""

from __future__ import annotations

import argparse
import asyncio
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from stages.session import Avatar

HERE = Path(__file__).resolve().parent
VOICE_RATE_HZ = 24000   # what a TTS might speak at; the frames carry the voice at this rate


async def main(speech: Path, output: Path) -> None:
    avatar = Avatar.prepare(HERE / "astronaut.png", preset="ultra_fast")
    fps = avatar.preset.video.frame_rate
    with wave.open(str(speech)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).reshape(-1, reader.getnchannels())
    mono = pcm.mean(axis=1).astype(np.int16)

    with av.open(str(output), "w") as container:
        video = container.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        video.width, video.height = avatar.image.shape[1], avatar.image.shape[0]
        video.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=VOICE_RATE_HZ, layout="mono")
        voice_samples = 0

        async with avatar.open_continuous(voice_rate_hz=VOICE_RATE_HZ) as stream:
            second = int(fps)
            spoken_until = None
            async for frame in stream:
                if frame.index == second:           # after a second of idle the TTS starts: 100 ms chunks, as
                    for offset in range(0, len(mono), rate // 10):   # fast as it makes them
                        stream.push(mono[offset:offset + rate // 10], rate)
                    stream.end_segment()
                picture = av.VideoFrame.from_ndarray(frame.image, format="bgr24")
                picture.pts, picture.time_base = frame.index, Fraction(1) / fps
                container.mux(video.encode(picture))
                voice = av.AudioFrame.from_ndarray(frame.voice[None, :], format="s16", layout="mono")
                voice.sample_rate, voice.pts = VOICE_RATE_HZ, voice_samples
                voice_samples += len(frame.voice)
                container.mux(audio.encode(voice))
                if frame.index % second == 0:
                    print(f"{frame.index // second:4d} s  {frame.kind}")
                if frame.ends_segment:
                    spoken_until = frame.index
                if spoken_until is not None and frame.index == spoken_until + second:
                    break
        container.mux(video.encode(None))
        container.mux(audio.encode(None))
    print(f"wrote {output}: {frame.index + 1} frames, {voice_samples / VOICE_RATE_HZ:.2f} s of voice")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("speech", nargs="?", type=Path, default=HERE / "speech.wav")
    parser.add_argument("-o", "--output", type=Path, default=Path("continuous.mp4"))
    arguments = parser.parse_args()
    asyncio.run(main(arguments.speech, arguments.output))
