"""Shared fixtures: the example files, a private cache, and the CLI run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT = ROOT / "examples" / "astronaut.png"
SPEECH = ROOT / "examples" / "speech.wav"
VISEMES = ROOT / "tests" / "data" / "visemes.wav"
FACE_ROI = (128, 32, 318, 222)  # a 190 px square around the astronaut's face box (179, 83)-(266, 170)


def face_mask(size: int) -> np.ndarray:
    """Soft elliptical face mask: exactly 1 inside, a smoothstep edge, exactly 0 towards the crop border."""
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = np.hypot((columns - 0.50 * size) / (0.40 * size), (rows - 0.52 * size) / (0.46 * size))
    ramp = np.clip((1.0 - radius) / 0.25, 0.0, 1.0)
    return (ramp * ramp * (3.0 - 2.0 * ramp)).astype(np.float32)


def speech_clip(path: Path, samples_16k: int) -> Path:
    """A piece of the example speech as a 16 kHz WAV, `samples_16k` long (from 0.5 s in: speech, not silence)."""
    from scipy.signal import resample_poly

    with wave.open(str(SPEECH)) as reader:
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32)
    piece = resample_poly(pcm, 320, 441)[8000:8000 + samples_16k]
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(np.clip(piece, -32768, 32767).astype(np.int16).tobytes())
    return path


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    """The example portrait, BGR."""
    return cv2.imread(str(PORTRAIT), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    """`face_mask` sized for FACE_ROI."""
    return face_mask(FACE_ROI[2] - FACE_ROI[0])


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Face detections are cached per image; tests share one cache of their own, never the user's."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["TALKSTREAM_CACHE"] = str(cache)
    return cache


def run_cli(*args: str | Path, stdin: bytes | None = None, timeout: float = 300,
            cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`talkstream ARGS` in a fresh interpreter, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "stream.cli", *map(str, args)], input=stdin,
                          capture_output=True, timeout=timeout, cwd=cwd or ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="session")
def sadtalker_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint folder as a SadTalker user has it, with the spec's random weights in the official layouts."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from tests.sadtalker_files import write_official_files

    return write_official_files(tmp_path_factory.mktemp("sadtalker") / "checkpoints")


def environment_without(packages: tuple[str, ...], hidden: Path) -> dict[str, str]:
    """The environment of a talkstream process in which importing each of `packages` fails as it does when the
    package is not installed (stand-ins in `hidden`, first on the path)."""
    for package in packages:
        (hidden / package).mkdir(parents=True)
        (hidden / package / "__init__.py").write_text(
            f"raise ModuleNotFoundError({f'No module named {package!r}'!r}, name={package!r})\n")
    return {**os.environ, "PYTHONPATH": f"{hidden}{os.pathsep}{ROOT}"}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen) -> None:
    """End a process the test started, whatever state it is in: SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def talkstream_command() -> list[str]:
    """`talkstream` as the quick start installs it (the console script beside this interpreter)."""
    script = Path(sys.executable).parent / "talkstream"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stream.cli"]


class ServeProcess:
    """`talkstream serve ARGS` in a process of its own, waited for until it answers /healthz; stopped on exit."""

    def __init__(self, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process = subprocess.Popen([*talkstream_command(), "serve", *args, "--port", str(self.port)],
                                        cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        self.base = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"

    def __enter__(self) -> ServeProcess:
        import time
        import urllib.request

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stop(self.process)
                raise AssertionError(f"talkstream serve exited: {self.process.stderr.read()}")
            try:
                with urllib.request.urlopen(f"{self.base}/healthz", timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        stop(self.process)
        raise AssertionError("talkstream serve did not answer within 60 s")

    def __exit__(self, *exc: object) -> None:
        stop(self.process)

    def log(self) -> str:
        """What the server printed (after it stopped)."""
        stop(self.process)
        return self.process.stderr.read()
