"""`talkstream batch` as a user runs it (a subprocess, default flags): six jobs of a manifest, two portraits and three
speeches, one job with a portrait that has no face and one with corrupt speech. Four complete videos as long as
their speech, two failures told with their reasons, exit 1; a re-run skips the four; a bad manifest exits 2 naming
its line. The same with `--ray` on a local Ray runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests.conftest import PORTRAIT, ROOT, SPEECH, stop, talkstream_command

FPS = 25
SPEECH_S = {"long.wav": 20.0, "short.wav": 15.0}   # long enough that a re-run is measured against real work

pytestmark = pytest.mark.slow


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two portraits (the example and its mirror image), a picture with no face, two speeches cut from the
    example's and a WAV with nothing readable after its header; the manifest of six jobs."""
    portrait = cv2.imread(str(PORTRAIT))
    cv2.imwrite(str(tmp_path / "anna.png"), portrait)
    cv2.imwrite(str(tmp_path / "bert.png"), cv2.flip(portrait, 1))
    cv2.imwrite(str(tmp_path / "wall.png"), np.full((320, 320, 3), (90, 120, 150), np.uint8))
    with wave.open(str(SPEECH)) as reader:
        rate = reader.getframerate()
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16)
    for name, seconds in SPEECH_S.items():
        looped = np.tile(pcm, 3)[:int(rate * seconds)]
        with wave.open(str(tmp_path / name), "wb") as writer:
            writer.setnchannels(1)
            writer.setsampwidth(2)
            writer.setframerate(rate)
            writer.writeframes(looped.tobytes())
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(400))
    (tmp_path / "videos").mkdir()
    (tmp_path / "jobs.csv").write_text(
        "portrait,audio,output\n"
        "anna.png,long.wav,videos/anna-long.mp4\n"
        "anna.png,short.wav,videos/anna-short.mp4\n"
        "bert.png,long.wav,videos/bert-long.mp4\n"
        "bert.png,short.wav,videos/bert-short.mp4\n"
        "wall.png,short.wav,videos/wall-short.mp4\n"
        "anna.png,broken.wav,videos/anna-broken.mp4\n")
    return tmp_path


def batch(folder: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run([*talkstream_command(), "batch", *args], cwd=folder, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result, time.monotonic() - started


def frames_of(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def assert_the_first_run(folder: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stderr
    assert "traceback" not in result.stderr.lower()
    for name in ("anna-long", "anna-short", "bert-long", "bert-short"):
        speech = name.split("-")[1] + ".wav"
        assert abs(frames_of(folder / "videos" / f"{name}.mp4") - SPEECH_S[speech] * FPS) <= 1, name
    assert sorted(path.name for path in (folder / "videos").iterdir()) == [
        "anna-long.mp4", "anna-short.mp4", "bert-long.mp4", "bert-short.mp4"]   # nothing half-written
    summary = result.stderr[result.stderr.index("talkstream batch: 4 done, 2 failed, 0 skipped of 6 jobs"):]
    assert "failed (line 6): videos/wall-short.mp4: no face found" in summary.replace(f"{folder}/", "")
    assert "failed (line 7): videos/anna-broken.mp4: cannot read" in summary.replace(f"{folder}/", "")
    report = json.loads((folder / "report.json").read_text())
    statuses = {Path(job["output"]).name: (job["status"], job["frames"], job["error"]) for job in report["jobs"]}
    assert statuses["anna-long.mp4"] == ("done", round(SPEECH_S["long.wav"] * FPS), None)
    assert statuses["wall-short.mp4"][0] == "failed" and "no face found" in statuses["wall-short.mp4"][2]
    assert statuses["anna-broken.mp4"][0] == "failed" and "broken.wav" in statuses["anna-broken.mp4"][2]


def test_a_manifest_renders_in_parallel_fails_per_job_and_resumes(folder: Path) -> None:
    first, first_s = batch(folder, "jobs.csv", "--jobs", "2", "--report", "report.json")
    print(first.stderr)
    assert_the_first_run(folder, first)
    before = {path.name: path.stat().st_mtime_ns for path in (folder / "videos").iterdir()}
    again, again_s = batch(folder, "jobs.csv", "--jobs", "2")
    print(f"first run {first_s:.1f} s, re-run {again_s:.1f} s")
    assert again.returncode == 1 and "0 done, 2 failed, 4 skipped of 6 jobs" in again.stderr
    assert {path.name: path.stat().st_mtime_ns for path in (folder / "videos").iterdir()} == before
    assert again_s < 0.1 * first_s
    forced, _ = batch(folder, "jobs.csv", "--jobs", "2", "--force")
    assert "4 done, 2 failed, 0 skipped" in forced.stderr


def test_a_manifest_runs_as_ray_tasks_on_a_local_runtime(folder: Path) -> None:
    pytest.importorskip("ray", reason="the cluster extra")
    result, _ = batch(folder, "jobs.csv", "--ray", "--report", "report.json")
    print(result.stderr[-2000:])
    assert "6 jobs on Ray (local)" in result.stderr
    assert_the_first_run(folder, result)


@pytest.mark.parametrize(("manifest", "says"), [
    ("portrait,output\nanna.png,videos/a.mp4\n", "jobs.csv line 1: no 'audio' column"),
    ("portrait,audio,output\nanna.png,long.wav,videos/a.mp4\nanna.png,gone.wav,videos/b.mp4\n",
     "jobs.csv line 3: cannot read the audio"),
    ("portrait,audio,output\nanna.png,long.wav,videos/a.mp4\nbert.png,short.wav,videos/b.mp4\n"
     "bert.png,long.wav,videos/a.mp4\n", "jobs.csv line 4: writes"),
    ("portrait,audio,output,colour\nanna.png,long.wav,videos/a.mp4,red\n", "jobs.csv line 2: unknown column 'colour'"),
])
def test_a_bad_manifest_exits_2_naming_its_line(folder: Path, manifest: str, says: str) -> None:
    (folder / "jobs.csv").write_text(manifest)
    result, _ = batch(folder, "jobs.csv")
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not any((folder / "videos").iterdir())


def test_json_lines_with_a_preset_and_keys(folder: Path) -> None:
    (folder / "jobs.jsonl").write_text(
        '{"portrait": "anna.png", "audio": "short.wav", "output": "videos/fast.mkv", "preset": "ultra_fast", '
        '"blend.mode": "feather"}\n\n'
        '{"portrait": "bert.png", "audio": "short.wav", "output": "videos/slow.mp4", "preset": "quality"}\n')
    result, _ = batch(folder, "jobs.jsonl", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    assert "batch 1/2:" in result.stderr   # one plain line per job when not on a terminal
    assert abs(frames_of(folder / "videos" / "fast.mkv") - SPEECH_S["short.wav"] * FPS) <= 1


def test_two_folders_pair_every_portrait_with_every_speech_or_by_name(folder: Path) -> None:
    faces, speech = folder / "faces", folder / "speech"
    faces.mkdir()
    speech.mkdir()
    for name in ("anna.png", "bert.png"):
        os.link(folder / name, faces / name)
    os.link(folder / "short.wav", speech / "anna.wav")
    os.link(folder / "short.wav", speech / "intro.wav")
    result, _ = batch(folder, "--portraits", "faces", "--audio", "speech", "-o", "every", "--preset", "ultra_fast")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in (folder / "every").iterdir()) == [
        "anna-anna.mp4", "anna-intro.mp4", "bert-anna.mp4", "bert-intro.mp4"]
    result, _ = batch(folder, "--portraits", "faces", "--audio", "speech", "-o", "named", "--pairs",
                      "--preset", "ultra_fast")
    assert result.returncode == 0, result.stderr
    assert [path.name for path in (folder / "named").iterdir()] == ["anna.mp4"]


def test_ctrl_c_keeps_finished_outputs_and_leaves_none_half_written(folder: Path) -> None:
    lines = ["portrait,audio,output"] + [f"anna.png,long.wav,videos/take{n}.mp4" for n in range(8)]
    (folder / "jobs.csv").write_text("\n".join(lines) + "\n")
    process = subprocess.Popen([*talkstream_command(), "batch", "jobs.csv", "--jobs", "2"], cwd=folder,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in process.stderr:
            if " done (" in line:   # one finished, others under way
                break
        process.send_signal(signal.SIGINT)
        said = process.stderr.read()
        assert process.wait(30) == 130
    finally:
        stop(process)
    assert "outputs finished and kept, none half-written" in said and "Traceback" not in said
    kept = list((folder / "videos").iterdir())
    assert kept and all(path.suffix == ".mp4" for path in kept)   # no .part file left
    for path in kept:
        assert abs(frames_of(path) - SPEECH_S["long.wav"] * FPS) <= 1
