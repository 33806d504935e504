"""`talkstream render` end to end on the example: files a player accepts, pipes that stream, identity kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from tests.conftest import PORTRAIT, ROOT, SPEECH, environment_without, run_cli, speech_clip, stop

FPS = 25


def speech_seconds(path: Path) -> float:
    with wave.open(str(path)) as wav:
        return wav.getnframes() / wav.getframerate()


@pytest.mark.slow
def test_mp4_has_h264_and_aac_and_lasts_as_long_as_the_speech(tmp_path: Path):
    out = tmp_path / "talk.mp4"
    result = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--preset", "fast")
    assert result.returncode == 0, result.stderr.decode()
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert (video.width, video.height) == (512, 512)
        assert audio.rate == 22050  # the speech's own rate, never the 16 kHz feature copy
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    with av.open(str(out)) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    seconds = speech_seconds(SPEECH)
    assert abs(len(frames) - seconds * FPS) <= 1
    assert abs(samples / 22050 - seconds) < 0.05
    # the face moves: mouth regions differ across frames, the background does not
    mouths = np.stack([f[130:165, 195:255].astype(np.float32) for f in frames])
    assert mouths.std(axis=0).mean() > 5
    assert not list(tmp_path.glob(".talk.mp4*"))


@pytest.mark.slow
def test_rawvideo_keeps_every_pixel_outside_the_face_crop(tmp_path: Path):
    portrait = cv2.imread(str(PORTRAIT))
    for blend in ("alpha", "feather", "pyramid"):
        out = tmp_path / f"{blend}.raw"
        result = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--format", "rawvideo", "--preset", "ultra_fast",
                         "--set", f"blend.mode={blend}")
        assert result.returncode == 0, result.stderr.decode()
        frames = np.frombuffer(out.read_bytes(), np.uint8).reshape(-1, 512, 512, 3)
        changed = np.any(frames != portrait, axis=(0, 3))
        ys, xs = np.nonzero(changed)
        # every change lies inside the face crop (about 190 px square around the face)
        assert xs.min() >= 100 and xs.max() <= 340 and ys.min() >= 40 and ys.max() <= 280
        outside = np.ones((512, 512), bool)
        outside[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] = False
        assert np.array_equal(frames[:, outside], np.broadcast_to(portrait[outside], frames[:, outside].shape))


@pytest.mark.slow
def test_silent_audio_renders_the_face_at_rest(tmp_path: Path):
    silence = tmp_path / "silence.wav"
    with wave.open(str(silence), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(16000)
        wav.writeframes(np.zeros(32000, np.int16).tobytes())
    out = tmp_path / "rest.y4m"
    result = run_cli("render", PORTRAIT, silence, "-o", out, "--still")
    assert result.returncode == 0, result.stderr.decode()
    with av.open(str(out)) as container:
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    assert len(frames) == 50
    mouths = np.stack([f[130:165, 195:255].astype(np.float32) for f in frames])
    assert mouths.std(axis=0).mean() < 1.0  # still and silent: the mouth does not move


@pytest.mark.slow
def test_several_faces_animate_the_largest_and_say_so(tmp_path: Path):
    portrait = cv2.imread(str(PORTRAIT))
    smaller = cv2.resize(portrait, (440, 440), interpolation=cv2.INTER_AREA)
    group = np.full((512, 960, 3), 200, np.uint8)
    group[:, :512] = portrait
    group[36:476, 520:] = smaller
    image = tmp_path / "two.png"
    cv2.imwrite(str(image), group)
    out = tmp_path / "two.mp4"
    result = run_cli("render", image, SPEECH, "-o", out, "--preset", "ultra_fast")
    assert result.returncode == 0, result.stderr.decode()
    assert "found 2 faces; animating the largest" in result.stderr.decode()
    with av.open(str(out)) as container:
        frames = np.stack([frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)])
    motion = frames.astype(np.float32).std(axis=0).mean(axis=2)
    assert motion[130:165, 195:255].mean() > 5          # the large face speaks
    assert motion[:, 520:].mean() < 1.0                  # the smaller one stays a photo


def _feed_in_real_time(pipe, data: bytes, rate: int, started: list[float]) -> None:
    header, pcm = data[:44], data[44:]
    started.append(time.monotonic())
    pipe.write(header)
    step = rate * 2 // 50  # 20 ms of 16-bit mono
    t0 = time.monotonic()
    for index, offset in enumerate(range(0, len(pcm), step)):
        pipe.write(pcm[offset: offset + step])
        pipe.flush()
        delay = t0 + (index + 1) * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    pipe.close()
    started.append(time.monotonic())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nut", "y4m"])
def test_frames_stream_out_while_speech_streams_in(fmt: str):
    data = SPEECH.read_bytes()
    with wave.open(str(SPEECH)) as wav:
        rate, total = wav.getframerate(), wav.getnframes()
    frame_bytes = 512 * 512 * 3 if fmt == "nut" else 512 * 512 * 3 // 2
    process = subprocess.Popen([sys.executable, "-m", "stream.cli", "render", str(PORTRAIT), "-", "-o", "-",
                                "--format", fmt, "--preset", "ultra_fast"], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"reading speech from standard input" in process.stderr.readline()  # avatar ready, waiting
        times: list[float] = []
        feeder = threading.Thread(target=_feed_in_real_time, args=(process.stdin, data, rate, times))
        feeder.start()
        received, arrivals = 0, []
        while chunk := process.stdout.read1(1 << 20):
            received += len(chunk)
            while received >= (len(arrivals) + 1) * frame_bytes:
                arrivals.append(time.monotonic())
        feeder.join()
        assert process.wait(30) == 0, process.stderr.read().decode()
    finally:
        process.kill()
    frames = round(total * FPS / rate + 0.5)
    assert abs(len(arrivals) - frames) <= 1
    first_audio, audio_end = times
    assert arrivals[0] - first_audio < 1.0, f"first frame after {arrivals[0] - first_audio:.2f} s"
    assert arrivals[-1] - audio_end < 1.0, f"last frame {arrivals[-1] - audio_end:.2f} s after the speech ended"


def test_converting_only_the_changed_region_gives_the_same_picture():
    from fractions import Fraction

    from stages.sinks import _I420, PipeSink, _bt709_i420
    from stream.frames import StreamInfo, VideoFrame

    portrait = cv2.imread(str(PORTRAIT))
    info = StreamInfo(512, 512, Fraction(25), 16000, 1)
    rng = np.random.default_rng(0)
    frames, boxes = [], [(131, 57, 317, 243), (140, 61, 301, 250), (131, 57, 317, 243)]
    for box in boxes:
        image = portrait.copy()
        x0, y0, x1, y1 = box
        image[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        frames.append(VideoFrame(len(frames), image, np.zeros((0, 1), np.int16), box))

    class Collect:
        def __init__(self) -> None:
            self.data = b""

        def write(self, data) -> None:
            self.data += bytes(data)

        def flush(self) -> None:
            pass

    damage, whole = Collect(), Collect()
    for target, keep_box in ((damage, True), (whole, False)):
        sink = PipeSink(target, info, "y4m")
        for frame in frames:
            sink.write(frame if keep_box else VideoFrame(frame.index, frame.image, frame.speech))
    assert damage.data == whole.data
    # the encoded files' BT.709 conversion too
    damage, whole = _I420(512, 512, _bt709_i420), _I420(512, 512, _bt709_i420)
    for frame in frames:
        assert np.array_equal(damage.convert(frame), whole.convert(VideoFrame(frame.index, frame.image, frame.speech)))


def stop_a_long_render(folder: Path, signum: int, *, sigint_ignored: bool = False,
                       without_uvloop: bool = False) -> tuple[int, str]:
    """Start a long render into `folder`, send `signum` once its temporary file is there: the exit status and what
    the render printed. `sigint_ignored`: started as a shell starts a background job, with SIGINT ignored;
    `without_uvloop`: on asyncio's own event loop."""
    long_speech = folder / "long.wav"
    samples, rate = np.frombuffer(SPEECH.read_bytes()[44:], "<i2"), 22050
    with wave.open(str(long_speech), "wb") as wav:
        wav.setnchannels(1), wav.setsampwidth(2), wav.setframerate(rate)
        wav.writeframes(np.tile(samples, 20).tobytes())
    ignore_sigint = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    environment = environment_without(("uvloop",), folder / "hidden") if without_uvloop else None
    process = subprocess.Popen([sys.executable, "-m", "stream.cli", "render", str(PORTRAIT), str(long_speech),
                                "-o", str(folder / "long.mp4"), "--preset", "quality"], cwd=ROOT,
                               stderr=subprocess.PIPE, env=environment, preexec_fn=ignore_sigint)
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob(".long.mp4.*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(folder.glob(".long.mp4.*")), "the render never started writing"
        time.sleep(0.5)
        process.send_signal(signum)
        status = process.wait(30)
        return status, process.stderr.read().decode()
    finally:
        stop(process)


@pytest.mark.slow
@pytest.mark.parametrize("signum, sigint_ignored, without_uvloop, status, word", [
    (signal.SIGINT, False, False, 130, "interrupted"),
    (signal.SIGINT, True, False, 130, "interrupted"),    # `sh -c 'talkstream render ... &'`: Ctrl-C must still work
    (signal.SIGTERM, False, False, 143, "stopped"),
    (signal.SIGTERM, False, True, 143, "stopped"),
], ids=["ctrl-c", "ctrl-c-in-a-background-job", "sigterm", "sigterm-on-asyncio"])
def test_a_stopped_render_leaves_no_output_behind(tmp_path: Path, signum: int, sigint_ignored: bool,
                                                  without_uvloop: bool, status: int, word: str):
    exit_status, stderr = stop_a_long_render(tmp_path, signum, sigint_ignored=sigint_ignored,
                                             without_uvloop=without_uvloop)
    assert exit_status == status and f"talkstream: {word}; no output was kept" in stderr, stderr
    assert not (tmp_path / "long.mp4").exists() and not list(tmp_path.glob(".long.mp4*"))


def test_help_answers_without_loading_media_libraries():
    script = ("import sys\nfrom stream.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(m for m in ('numpy', 'cv2', 'av', 'dlib', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, cwd=ROOT, timeout=60)
    assert result.stdout.decode().splitlines()[-1] == "[]"
    assert b"talkstream render examples/astronaut.png" in result.stdout


@pytest.mark.slow
def test_doctor_reports_the_landmark_licence_and_renders_a_second():
    result = run_cli("doctor")
    text = result.stdout.decode()
    assert result.returncode == 0, text
    assert "excludes commercial use" in text
    assert "1 s of speech -> 25 frames" in text


@pytest.mark.slow
def test_the_example_pipe_into_ffmpeg_makes_a_video_with_sound(tmp_path: Path):
    out = tmp_path / "piped.mkv"
    result = subprocess.run([str(ROOT / "examples" / "pipe_to_ffmpeg.sh"), str(PORTRAIT), str(SPEECH), str(out)],
                            capture_output=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert result.returncode == 0, result.stderr.decode()
    with av.open(str(out)) as container:
        assert {stream.type for stream in container.streams} == {"video", "audio"}
        frames = sum(1 for _ in container.decode(video=0))
    assert abs(frames - speech_seconds(SPEECH) * FPS) <= 1


@pytest.mark.slow
def test_a_wav_cut_short_renders_what_it_holds_and_says_so(tmp_path: Path):
    clip = speech_clip(tmp_path / "clip.wav", 32000)  # the header declares 2 s
    cut = tmp_path / "cut.wav"
    cut.write_bytes(clip.read_bytes()[: 44 + 16000 * 2])  # 1 s is left
    out = tmp_path / "cut.nut"
    result = run_cli("render", PORTRAIT, cut, "-o", out, "--preset", "ultra_fast")
    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    notices = [line for line in stderr.splitlines() if "cut.wav" in line and "header" in line]
    assert len(notices) == 1 and notices[0].startswith("talkstream: ") and "1.00 s" in notices[0] \
        and "2.00 s" in notices[0], stderr
    with av.open(str(out)) as container:
        assert sum(1 for _ in container.decode(video=0)) == FPS


@pytest.mark.slow
def test_an_odd_sized_portrait_is_padded_to_even_sides_never_cropped(tmp_path: Path):
    portrait = cv2.imread(str(PORTRAIT))[:383, :511]
    image = tmp_path / "odd.png"
    cv2.imwrite(str(image), portrait)
    out = tmp_path / "odd.nut"
    result = run_cli("render", image, speech_clip(tmp_path / "clip.wav", 16000), "-o", out, "--preset", "ultra_fast")
    assert result.returncode == 0, result.stderr.decode()
    with av.open(str(out)) as container:
        frames = np.stack([frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)])
    assert frames.shape[1:] == (384, 512, 3)
    outside = np.ones((383, 511), bool)
    outside[40:280, 100:340] = False  # the face crop, which moves
    for frame in frames:  # elsewhere the portrait's own pixels, its last row and column repeated into the padding
        assert np.array_equal(frame[:383, :511][outside], portrait[outside])
        assert np.array_equal(frame[383, :511], frame[382, :511]) and np.array_equal(frame[:, 511], frame[:, 510])
