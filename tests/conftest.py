"""Shared fixtures: the example files, a private cache, and the CLI run as a user runs it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT = ROOT / "examples" / "astronaut.png"
SPEECH = ROOT / "examples" / "speech.wav"
VISEMES = ROOT / "tests" / "data" / "visemes.wav"


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
