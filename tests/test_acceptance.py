"""The issue's acceptance on real renders: the mouth takes the shape of the sound, and the face stays the portrait.

Measured with dlib's 68 landmarks on the rendered frames (tests/quality.py), never on the renderer's own numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests import quality
from tests.conftest import PORTRAIT, ROOT, SPEECH, VISEMES, run_cli

pytestmark = pytest.mark.slow  # renders through the CLI, measured with dlib

FPS = 25


def render_raw(audio: Path, out: Path, *options: str) -> np.ndarray:
    result = run_cli("render", PORTRAIT, audio, "-o", out, "--format", "rawvideo", *options)
    assert result.returncode == 0, result.stderr.decode()
    return np.frombuffer(out.read_bytes(), np.uint8).reshape(-1, 512, 512, 3)


@pytest.fixture(scope="module")
def measurer() -> quality.FaceMeasurer:
    return quality.FaceMeasurer()


@pytest.fixture(scope="module")
def viseme_render(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return render_raw(VISEMES, tmp_path_factory.mktemp("visemes") / "visemes.raw")


def test_the_mouth_takes_the_shape_of_the_sound(viseme_render: np.ndarray, measurer: quality.FaceMeasurer):
    phonemes = json.loads(VISEMES.with_suffix(".phonemes.json").read_text())
    audio, rate = quality.read_audio(VISEMES)
    landmarks = quality.stack_landmarks([measurer.landmarks(frame) for frame in viseme_render])
    report = quality.lipsync_report(landmarks, phonemes, audio, rate, FPS)
    failures = quality.passes(report)
    assert not failures, f"{failures}\n{json.dumps(report, indent=1, default=str)}"


def test_identity_holds_without_jitter(viseme_render: np.ndarray, measurer: quality.FaceMeasurer):
    portrait = cv2.imread(str(PORTRAIT))
    measurer.reset()
    report = quality.identity_report(list(viseme_render), portrait, measurer, descriptor_stride=5)
    report.pop("landmarks")
    failures = quality.passes(report)
    assert report["face_in_every_frame"]
    assert not failures, f"{failures}\n{report}"


def test_lip_opening_follows_the_example_speech(tmp_path: Path, measurer: quality.FaceMeasurer):
    frames = render_raw(SPEECH, tmp_path / "example.raw", "--preset", "ultra_fast")
    measurer.reset()
    landmarks = quality.stack_landmarks([measurer.landmarks(frame) for frame in frames])
    phonemes = json.loads(SPEECH.with_suffix(".phonemes.json").read_text())
    audio, rate = quality.read_audio(SPEECH)
    report = quality.lipsync_report(landmarks, phonemes, audio, rate, FPS)
    assert report["envelope_correlation"] >= 0.5, report


def test_the_embedded_path_never_imports_torch(tmp_path: Path):
    script = (
        "import sys\n"
        "from stream.cli import main\n"
        f"code = main(['render', {str(PORTRAIT)!r}, {str(SPEECH)!r}, '-o', {str(tmp_path / 'a.mp4')!r}, '-q'])\n"
        "heavy = sorted(name for name in ('torch', 'torchvision', 'librosa', 'gfpgan', 'ray', 'livekit', 'pipecat')\n"
        "               if name in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=300)
    assert result.stdout.decode().split() == ["0", "[]"], result.stderr.decode()
