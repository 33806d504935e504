"""Output containers chosen by the file's extension: each reopens as what its name says, with sound, tagged colours
(and the colours the tags promise), MP4 and MOV with their index first; NUT's audio says its channel layout."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests.conftest import PORTRAIT, ROOT, run_cli, speech_clip

pytestmark = pytest.mark.slow  # renders through the CLI

FPS = 25
CLIP_SAMPLES = 25600  # 1.6 s at 16 kHz: 40 frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return speech_clip(tmp_path_factory.mktemp("speech") / "clip.wav", CLIP_SAMPLES)


def render(clip: Path, out: Path, *args: str) -> Path:
    result = run_cli("render", PORTRAIT, clip, "-o", out, "--preset", "ultra_fast", *args)
    assert result.returncode == 0, result.stderr.decode()
    return out


def top_level_boxes(path: Path) -> list[bytes]:
    """The kinds of an ISO/QuickTime file's top-level boxes, in file order."""
    data, boxes, position = path.read_bytes(), [], 0
    while position + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[position: position + 8])
        if size == 1:
            size = struct.unpack(">Q", data[position + 8: position + 16])[0]
        boxes.append(kind)
        position += size or len(data)
    return boxes


@pytest.mark.parametrize(("extension", "signature", "video_codec", "audio_codec"), [
    (".mp4", b"ftypisom", "h264", "aac"),
    (".mov", b"ftypqt  ", "h264", "aac"),
    (".mkv", b"\x42\x82\x88matroska", "h264", "aac"),   # the EBML DocType
    (".webm", b"\x42\x82\x84webm", "vp9", "opus"),
])
def test_the_extension_picks_the_container(clip: Path, tmp_path: Path, extension: str, signature: bytes,
                                           video_codec: str, audio_codec: str):
    out = render(clip, tmp_path / f"talk{extension}")
    assert signature in out.read_bytes()[:64]
    with av.open(str(out)) as container:
        assert {stream.type for stream in container.streams} == {"video", "audio"}
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.name, audio.codec_context.name) == (video_codec, audio_codec)
        frames = sum(1 for _ in container.decode(video=0))
    assert abs(frames - CLIP_SAMPLES / 16000 * FPS) <= 1
    assert not list(tmp_path.glob(".talk*"))


@pytest.mark.parametrize("extension", [".mp4", ".mov"])
def test_mp4_and_mov_put_their_index_first(clip: Path, tmp_path: Path, extension: str):
    boxes = top_level_boxes(render(clip, tmp_path / f"talk{extension}"))
    assert b"moov" in boxes and b"mdat" in boxes and boxes.index(b"moov") < boxes.index(b"mdat"), boxes


@pytest.mark.parametrize("extension", [".mp4", ".webm"])
def test_colours_are_tagged_bt709_limited_and_are_what_the_tags_say(clip: Path, tmp_path: Path, extension: str):
    out = render(clip, tmp_path / f"talk{extension}")
    with av.open(str(out)) as container:
        context = container.streams.video[0].codec_context
        assert (context.color_primaries, context.color_trc, context.colorspace, context.color_range) == (
            av.video.reformatter.ColorPrimaries.BT709, av.video.reformatter.ColorTrc.BT709,
            av.video.reformatter.Colorspace.ITU709, av.video.reformatter.ColorRange.MPEG)
        first = next(container.decode(video=0)).to_ndarray(format="bgr24").astype(np.int16)
    portrait = cv2.imread(str(PORTRAIT)).astype(np.int16)
    # Saturated colours away from the face: BT.601 pixels under BT.709 tags are off by ~7 levels there, these by ~3.
    saturated = portrait.max(axis=2) - portrait.min(axis=2) > 80
    saturated[40:280, 100:340] = False
    assert np.abs(first[saturated] - portrait[saturated]).mean() < 5


@pytest.mark.skipif(not shutil.which("ffmpeg"), reason="needs the ffmpeg command")
def test_nut_on_a_pipe_carries_its_channel_layout_and_every_sample(clip: Path):
    render_cli = [sys.executable, "-m", "stream.cli", "render", str(PORTRAIT), str(clip), "-o", "-", "--format",
                  "nut", "--preset", "ultra_fast"]
    nut = subprocess.run(render_cli, capture_output=True, timeout=300, cwd=ROOT, check=True).stdout
    probe = subprocess.run(["ffmpeg", "-hide_banner", "-i", "-", "-f", "s16le", "-"], input=nut, capture_output=True,
                           timeout=60)
    assert probe.returncode == 0, probe.stderr.decode()
    assert "Guessed Channel Layout" not in probe.stderr.decode()
    with wave.open(str(clip)) as wav:
        assert probe.stdout == wav.readframes(wav.getnframes())  # lossless
