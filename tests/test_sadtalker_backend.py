"""The SadTalker backend end to end, on random weights in the official layouts: the picture is noise, the structure
(frames, size, audio, paste-back) is what is checked. Rendered at 128 px (the networks are fully convolutional)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("torch")

from stages.audio import AudioReader  # noqa: E402
from stages.session import Avatar, render  # noqa: E402
from stages.sinks import open_sink  # noqa: E402
from stream.cli import run_async  # noqa: E402
from tests.conftest import PORTRAIT, SPEECH, run_cli, speech_clip  # noqa: E402

pytestmark = pytest.mark.slow  # SadTalker's networks on the CPU

SMALL = "sadtalker.render_px=128"


def _streams(path: Path) -> tuple[list[np.ndarray], float, int]:
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio = sum(frame.samples for frame in container.decode(audio=0))
        rate = container.streams.audio[0].rate
        fps = float(container.streams.video[0].average_rate)
    return frames, audio / rate, fps


def test_cli_renders_half_a_second_with_the_official_files(tmp_path: Path, sadtalker_dir: Path) -> None:
    speech = speech_clip(tmp_path / "half.wav", 8100)   # 12 whole 640-sample frames and 420 samples
    out = tmp_path / "talk.mp4"
    result = run_cli("render", PORTRAIT, speech, "-o", out, "--backend", "sadtalker", "--checkpoints", sadtalker_dir,
                     "--set", SMALL, "--set", "encode.crf=0", "--preset", "fast", timeout=900)
    assert result.returncode == 0, result.stderr.decode()
    frames, audio_s, fps = _streams(out)
    assert len(frames) == 12 and fps == 25
    assert abs(audio_s - 8100 / 16000) < 0.03
    portrait = frames[0].shape == (512, 512, 3)
    assert portrait
    # Full mode: the render is pasted into the portrait's face box; the rest of the picture is the portrait.
    import cv2

    original = cv2.imread(str(PORTRAIT))
    box = np.zeros(original.shape[:2], bool)
    box[10:205, 128:322] = True   # the tight crop on the astronaut: (133, 14)-(317, 199), and a margin
    replaced = np.abs(frames[5].astype(int) - original).max(axis=2) > 40
    assert replaced[box].mean() > 0.5
    # Lossless H.264: frame to frame, only the pasted box changes (outside it every frame is the same portrait).
    moved = np.abs(frames[5].astype(int) - frames[9]).max(axis=2) > 0
    assert moved[box].mean() > 0.3 and not moved[~box].any()


def test_crop_mode_with_offline_motion_is_the_face_video(tmp_path: Path, sadtalker_dir: Path) -> None:
    speech = speech_clip(tmp_path / "short.wav", 5 * 640)
    avatar = Avatar.prepare(PORTRAIT, preset="quality", backend="sadtalker", checkpoints=sadtalker_dir,
                            overrides=[SMALL, "sadtalker.preprocess=crop", "sadtalker.seed=5"])
    assert avatar.settings.motion == "offline" and avatar.image.shape[1] == 128
    out = tmp_path / "crop.mp4"
    written = run_async(render(avatar, AudioReader(speech),
                               lambda info: open_sink(out, "mp4", info, avatar.preset.encode)))
    frames, _, _ = _streams(out)
    assert written == len(frames) == 5
    assert frames[0].shape[1] == 128 and abs(frames[0].shape[0] - 128) <= 4


def test_a_preset_at_another_frame_rate_is_refused(sadtalker_dir: Path) -> None:
    result = run_cli("render", PORTRAIT, SPEECH, "-o", "x.mp4", "--backend", "sadtalker", "--checkpoints",
                     sadtalker_dir, "--set", "video.fps=30")
    assert result.returncode == 2
    assert b"the sadtalker backend fixes video.fps = 25" in result.stderr
