"""The README is a test: every shell command of its code blocks runs here as a user types it, and a command that no
test runs (or a test whose command left the README) fails the suite.

Only ports, the files a command names (made in a scratch folder: face.jpg, talk.wav, …) and the checkpoint folder
(random weights in the official layouts, in a scratch $HOME's ~/SadTalker) stand in for the user's own; `talkstream`,
`python` and `pip` are the quick start's environment, as the README says.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import wave
from collections.abc import Callable
from pathlib import Path

import aiohttp
import av
import cv2
import numpy as np
import pytest
from aiortc import RTCPeerConnection

from tests.conftest import PORTRAIT, ROOT, SPEECH, free_port, stop
from tests.test_server import connect

README = ROOT / "README.md"
FPS = 25
TALK_S = 0.2      # talk.wav: a few frames, so that the CPU-bound neural enhancers finish in seconds
SPEECH_S = 0.04   # speech.wav: one frame (SadTalker's renderer costs ~20 s a frame on this CPU)

pytestmark = pytest.mark.timeout(900)


def readme_commands(text: str) -> list[str]:
    """The shell commands of the README's ```sh blocks: one per line (backslash continuations joined), without the
    comment that follows two spaces and a '#'."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", line).strip()
            if command:
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def as_typed_here(command: str, port: int) -> str:
    """The README's placeholders and port with this test's: nothing else changes."""
    command = command.replace("PORTRAIT AUDIO", "face.jpg talk.wav").replace("--checkpoints DIR",
                                                                           "--checkpoints ~/SadTalker/checkpoints")
    if "talkstream serve" in command:
        command = command.replace("--port 8080", f"--port {port}") if "--port" in command else \
            f"{command} --port {port}"
    return command.replace("HEAD:", f"{_node_address()}:")   # a Ray head: this machine's (the cluster's node)


RAY_CLIENT_PORT = 10001


def _wait_for_port(host: str, port: int, seconds: float = 60) -> None:
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {host}:{port}"
            time.sleep(0.2)


def _node_address() -> str:
    """The address Ray's services of this machine listen on: its own on the network."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("10.255.255.255", 1))
        return str(probe.getsockname()[0])


# ---------------------------------------------------------------------------------------------------- the scene


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(samples.astype("<i2").tobytes())


def _example_speech() -> tuple[np.ndarray, int]:
    with wave.open(str(SPEECH)) as reader:
        return np.frombuffer(reader.readframes(reader.getnframes()), np.int16), reader.getframerate()


def _write_mp3(path: Path, samples: np.ndarray, rate: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mp3", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


def _write_model_files(home: Path) -> None:
    """~/SadTalker as its download script leaves it: checkpoints/ and gfpgan/weights/, random weights."""
    import torch

    from stages.nets.restorers import build_restorer
    from tests.sadtalker_files import write_official_files

    write_official_files(home / "SadTalker" / "checkpoints")
    weights = home / "SadTalker" / "gfpgan" / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    for name, file, key in (("gfpgan", "GFPGANv1.4.pth", "params_ema"), ("restoreformer", "RestoreFormer.pth",
                                                                         "params")):
        state = build_restorer(name).state_dict()
        torch.save({key: {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in state.items()}}, weights / file)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder with the files the README's commands name and the environment they run in."""
    work = tmp_path_factory.mktemp("user")
    cv2.imwrite(str(work / "face.jpg"), cv2.imread(str(PORTRAIT)), [cv2.IMWRITE_JPEG_QUALITY, 92])
    samples, rate = _example_speech()
    _write_mp3(work / "talk.mp3", samples[: rate * 2], rate)
    _write_wav(work / "talk.wav", samples[rate // 2: rate // 2 + round(rate * TALK_S)], rate)
    _write_wav(work / "speech.wav", samples[rate // 2: rate // 2 + round(rate * SPEECH_S)], rate)
    from scipy.signal import resample_poly

    (work / "speech.s16le").write_bytes(resample_poly(samples[rate // 2: rate * 3 // 2], 16000, rate)
                                        .clip(-32768, 32767).astype("<i2").tobytes())
    (work / "examples").symlink_to(ROOT / "examples")
    home = work / "home"
    home.mkdir()
    if all(map(_has, ("torch", "gfpgan", "safetensors"))):
        _write_model_files(home)
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "SDL_VIDEODRIVER": "dummy", "SDL_AUDIODRIVER": "dummy"}   # ffplay without a screen or speakers
    return work, env


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _needs(*programs: str) -> None:
    missing = [program for program in programs if shutil.which(program) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (./scripts/test.sh installs them as root)")


def _run(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`command` in bash, as typed; its whole process group is stopped if it outlives `timeout`."""
    process = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    assert result.returncode == 0, f"{command}\n{stderr[-3000:]}"
    return result


def _frames(path: Path) -> tuple[int, set[str]]:
    """Decoded video frames and the kinds of stream a file holds."""
    with av.open(str(path)) as container:
        kinds = {stream.type for stream in container.streams}
        return sum(1 for _ in container.decode(video=0)), kinds


def _assert_video(path: Path, seconds: float) -> None:
    frames, kinds = _frames(path)
    assert kinds == {"video", "audio"} and abs(frames - seconds * FPS) <= 1, (path, frames, kinds)


# ---------------------------------------------------------------------------------------------------- each command


Check = Callable[[str, Path, dict[str, str]], None]


def renders(output: str, seconds: float, *tools: str) -> Check:
    """The command writes `output` (video and audio, as long as its speech)."""
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        _needs(*tools)
        (work / output).unlink(missing_ok=True)
        _run(command, work, env)
        _assert_video(work / output, seconds)

    return check


def prints(*needles: str, tools: tuple[str, ...] = (), extras: tuple[str, ...] = ()) -> Check:
    """The command succeeds and says each of `needles` on stdout or stderr."""
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        _needs(*tools)
        for extra in extras:
            if not _has(extra):
                pytest.skip(f"{extra} is not installed (an extra)")
        result = _run(command, work, env)
        for needle in needles:
            assert needle in result.stdout + result.stderr, (needle, result.stdout[-2000:], result.stderr[-2000:])

    return check


def quick_start(command: str, work: Path, env: dict[str, str]) -> None:
    """On a copy of the repository with no environment: it installs, renders the example, and brings no torch."""
    fresh = work / "fresh-clone"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (fresh / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, fresh / name)
    clean = {key: value for key, value in env.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    clean["PATH"] = os.environ["PATH"].replace(f"{Path(sys.executable).parent}:", "")
    _run(command, fresh, clean, timeout=1200)
    _assert_video(fresh / "talk.mp4", _example_speech()[0].size / _example_speech()[1])
    torch = subprocess.run([str(fresh / ".venv" / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert torch.returncode != 0, "the quick start installed torch"


def run_by_ci(command: str, work: Path, env: dict[str, str]) -> None:
    """The test command runs this suite: CI runs it, and nothing else (this test cannot run itself)."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line and not line.startswith(("#", "set ", "cd "))] == [f"exec {command}"]


EXTRA_MODULES = {"sadtalker": ("torch", "safetensors"), "enhance": ("torch", "torchvision", "gfpgan"),
                 "cluster": ("ray",), "livekit": ("livekit.agents",), "pipecat": ("pipecat",)}


def pip_installs(command: str, work: Path, env: dict[str, str]) -> None:
    """The extra installs into the quick start's environment (already there: pip only checks). Without it, skipped:
    the command would download gigabytes into the environment the tests run in, midway through them."""
    extra = re.search(r"\[(\w+)\]", command).group(1)
    if missing := [module for module in EXTRA_MODULES[extra] if not _has(module)]:
        pytest.skip(f"{', '.join(missing)} not installed (the {extra} extra)")
    _run(command, ROOT, env)
    assert subprocess.run([sys.executable, "-m", "pip", "show", "talkstream"], capture_output=True).returncode == 0


def serves(*, token: bool) -> Check:
    """The server starts as typed and the README's JSON API works against it with a plain aiortc peer."""
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        if token:
            _needs("openssl")
        process = subprocess.Popen(["bash", "-c", f"exec env {command}"], cwd=work, env=env,
                                   stderr=subprocess.PIPE, text=True)
        try:
            port = int(re.search(r"--port (\d+)", command).group(1))
            said = []
            for _ in range(50):   # Ray says a few things of its own first
                said.append(started := process.stderr.readline())
                if "serving on" in started or not started:
                    break
            assert f":{port}/" in started, "".join(said[-20:])
            secret = re.search(r"#token=(\w+)", started).group(1) if token else None
            asyncio.run(_json_api(f"http://127.0.0.1:{port}", secret))
        finally:
            stop(process)

    return check


async def _json_api(base: str, token: str | None) -> None:
    """The README's table, in order: a session, its offer, speech from a file and from the websocket, an
    interrupt, health and metrics, hang-up."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(headers=headers) as http:
        assert (await http.get(f"{base}/api/config")).status == 200
        created = await http.post(f"{base}/api/sessions", data={"example": "astronaut"})
        assert created.status == 201, await created.text()
        session_id = (await created.json())["id"]
        session = f"{base}/api/sessions/{session_id}"
        pc = await connect(http, base, session_id, RTCPeerConnection())   # aiortc's defaults, as a user writes it
        video = next(receiver.track for receiver in pc.getReceivers() if receiver.track.kind == "video")
        frames = [await asyncio.wait_for(video.recv(), 10) for _ in range(25)]
        spoken = await http.post(f"{session}/speak", data={"audio": SPEECH.open("rb")})
        assert spoken.status == 200 and (await spoken.json())["queued_s"] > 8
        socket = await http.ws_connect(f"{session}/audio?rate=16000")
        await socket.send_bytes(np.zeros(3200, "<i2").tobytes())
        await socket.send_str("end")
        await socket.close()
        assert (await http.post(f"{session}/interrupt")).status == 200
        assert (await (await http.get(f"{base}/healthz")).json())["sessions"] == 1
        assert "talkstream_frames_speech" in await (await http.get(f"{base}/metrics")).text()
        assert (await http.delete(f"{session}")).status == 200
        await pc.close()
    assert frames[-1].width == 512 and frames[-1].pts > frames[0].pts


def ray_head(command: str, work: Path, env: dict[str, str]) -> None:
    """A Ray cluster's head starts as typed; it is stopped after."""
    try:
        result = _run(command, work, env, timeout=180)
        assert "Ray runtime started" in result.stdout + result.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def on_a_ray_cluster(check: Check) -> Check:
    """The README's head first (the line before), then the command as typed; the cluster stopped after."""
    def run(command: str, work: Path, env: dict[str, str]) -> None:
        try:
            _run("ray start --head --num-cpus 2", work, env, timeout=180)
            _wait_for_port(_node_address(), RAY_CLIENT_PORT)   # `ray start` returns before its client port opens
            check(command, work, env)
        finally:
            subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)

    return run


def plays(*tools: str) -> Check:
    """A pipe into a player: the whole chain exits 0 (ffplay plays to SDL's dummy screen and speakers)."""
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        _needs(*tools)
        _run(command, work, env)

    return check


def writes_rawvideo(command: str, work: Path, env: dict[str, str]) -> None:
    result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert len(result.stdout) == 25 * 512 * 512 * 3 and b"512x512" in result.stderr   # 1 s, geometry on stderr


def writes_json(name: str, key: str) -> Check:
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        import json

        _run(command, work, env, timeout=900)
        assert json.loads((work / name).read_text())[key]

    return check


def needs_extra(module: str, check: Check) -> Check:
    def guarded(command: str, work: Path, env: dict[str, str]) -> None:
        if not _has(module):
            pytest.skip(f"{module} is not installed (an extra)")
        check(command, work, env)

    return guarded


def live_example(command: str, work: Path, env: dict[str, str]) -> None:
    _run(command, work, env)
    _assert_video(work / "live.mp4", 11.0)


def continuous_example(command: str, work: Path, env: dict[str, str]) -> None:
    _run(command, work, env)
    samples, rate = _example_speech()
    speech_frames = -(-samples.size * FPS // rate) + 2     # and the two frames of the tail that closes the mouth
    _assert_video(work / "continuous.mp4", 2 + speech_frames / FPS)   # a second of idle on each side


def face_report(command: str, work: Path, env: dict[str, str]) -> None:
    """Run from the repository's root, as the README says: the tests package is on the path there."""
    result = _run(command, work, {**env, "PYTHONPATH": str(ROOT)}, timeout=900)
    report = json.loads((work / "face-report" / "face_report.json").read_text())
    assert set(report) == {"example", "grey", "grey3", "rgba", "deep", "tilted", "large"}
    assert all((work / "face-report" / f"contact_{name}.png").stat().st_size > 10_000 for name in report)
    assert "all limits hold" in result.stdout


def pipe_example(command: str, work: Path, env: dict[str, str]) -> None:
    _needs("ffmpeg")
    _run(command, work, env)
    _assert_video(work / "talkstream.mkv", _example_speech()[0].size / _example_speech()[1])


def pipecat_example(command: str, work: Path, env: dict[str, str]) -> None:
    """The example as typed (its default port): a plain aiortc peer takes the page's path and sees a talking face."""
    from tests.test_pipecat import assert_a_talking_face, watch_the_example

    process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=work, env=env, stderr=subprocess.PIPE, text=True)
    try:
        for line in iter(process.stderr.readline, ""):
            if "serving on" in line:
                break
        else:
            pytest.fail("the example ended before it served")
        address = re.search(r"http://\S+?/", line).group(0)
        threading.Thread(target=process.stderr.read, daemon=True).start()   # its log never fills the pipe
        assert_a_talking_face(*asyncio.run(watch_the_example(address.rstrip("/"))))
    finally:
        stop(process)


def batch_runs(*files: str) -> Check:
    """The batch command as typed, in a folder with what it names: a manifest of two jobs (or the folders `faces` and
    `lessons`); every output complete, and for a report, every job in it."""
    def check(command: str, work: Path, env: dict[str, str]) -> None:
        import json

        scene = work / "batch"
        shutil.rmtree(scene, ignore_errors=True)
        (scene / "faces").mkdir(parents=True)
        (scene / "lessons").mkdir()
        shutil.copy(PORTRAIT, scene / "faces" / "anna.png")
        shutil.copy(SPEECH, scene / "lessons" / "intro.wav")
        (scene / "jobs.csv").write_text("portrait,audio,output,preset\nfaces/anna.png,lessons/intro.wav,videos/a.mp4,"
                                        "ultra_fast\nfaces/anna.png,lessons/intro.wav,videos/b.mkv,\n")
        (scene / "videos").mkdir()
        _run(command, scene, env, timeout=900)
        made = sorted(path.name for path in (scene / "videos").iterdir())
        assert made == (["a.mp4", "b.mkv"] if "jobs.csv" in files else ["anna-intro.mp4"]), made
        for name in made:
            _assert_video(scene / "videos" / name, _example_speech()[0].size / _example_speech()[1])
        if "--report report.json" in files:
            assert [job["status"] for job in json.loads((scene / "report.json").read_text())["jobs"]] == ["done"] * 2

    return check


RUNS: dict[str, Check] = {
    "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/talkstream render examples/astronaut.png "
    "examples/speech.wav -o talk.mp4": quick_start,
    "./scripts/test.sh": run_by_ci,
    "talkstream render PORTRAIT AUDIO -o out.mp4": renders("out.mp4", TALK_S),
    "talkstream render face.jpg talk.mp3 -o - --format nut | ffmpeg -i - out.mkv": renders("out.mkv", 2.0, "ffmpeg"),
    "talkstream render face.jpg talk.wav -o - --format y4m | ffplay -autoexit -": plays("ffplay"),
    'espeak-ng --stdout "Hello there" | talkstream render face.jpg - -o - --format nut | ffplay -autoexit -':
        plays("espeak-ng", "ffplay"),
    "talkstream render face.jpg - --rate 16000 -o - --format rawvideo < speech.s16le": writes_rawvideo,
    "talkstream presets": prints("ultra_fast", "quality", "(default)"),
    "talkstream render face.jpg talk.wav -o fast.mp4 --preset ultra_fast --set blend.mode=feather --seed 3 --still "
    "--profile": renders("fast.mp4", TALK_S),
    "talkstream bench --presets ultra_fast,balanced --json bench.json": writes_json("bench.json", "presets"),
    "talkstream doctor": prints("excludes commercial use", "1 s of speech -> 25 frames"),
    "talkstream render face.jpg talk.wav --enhancer gfpgan --checkpoints DIR -o hq.mp4":
        needs_extra("gfpgan", renders("hq.mp4", TALK_S)),
    "./examples/pipe_to_ffmpeg.sh": pipe_example,
    "pip install -e '.[sadtalker]'": pip_installs,
    "talkstream doctor --checkpoints ~/SadTalker/checkpoints": prints("SadTalker", extras=("torch",)),
    "talkstream render face.jpg speech.wav --backend sadtalker --checkpoints ~/SadTalker/checkpoints -o st.mp4":
        needs_extra("safetensors", renders("st.mp4", SPEECH_S)),
    "talkstream render face.jpg speech.wav --backend sadtalker --checkpoints DIR --set sadtalker.preprocess=crop "
    "--set sadtalker.pose_style=12 --set sadtalker.expression_scale=1.2 --still -o face-only.mp4":
        needs_extra("safetensors", renders("face-only.mp4", SPEECH_S)),
    "talkstream serve": serves(token=False),
    'talkstream serve --host 0.0.0.0 --port 8080 --token "$(openssl rand -hex 16)" --preset balanced':
        serves(token=True),
    "talkstream serve --workers 4 --max-sessions 4": serves(token=False),
    "talkstream serve --workers 0": serves(token=False),
    "pip install -e '.[cluster]'": pip_installs,
    "talkstream serve --ray": needs_extra("ray", serves(token=False)),
    "ray start --head --num-cpus 2": needs_extra("ray", ray_head),
    "talkstream serve --ray auto --host 0.0.0.0": needs_extra("ray", on_a_ray_cluster(serves(token=False))),
    "talkstream serve --ray ray://HEAD:10001":
        needs_extra("ray", on_a_ray_cluster(serves(token=False))),
    "python examples/live_session.py": live_example,
    "python examples/continuous_session.py": continuous_example,
    "python -m tests.face_report --out face-report": face_report,
    "pip install -e '.[enhance]'": pip_installs,
    "talkstream render face.jpg speech.wav --enhancer gfpgan --checkpoints ~/SadTalker -o restored.mp4":
        needs_extra("gfpgan", renders("restored.mp4", SPEECH_S)),
    "talkstream render face.jpg speech.wav --preset quality --checkpoints ~/SadTalker --strict -o best.mp4":
        needs_extra("gfpgan", renders("best.mp4", SPEECH_S)),
    "talkstream doctor --checkpoints ~/SadTalker": prints("GFPGANv1.4.pth", extras=("gfpgan",)),
    "talkstream batch jobs.csv --report report.json": batch_runs("jobs.csv", "--report report.json"),
    "talkstream batch --portraits faces --audio lessons -o videos --jobs 2": batch_runs(),
    "talkstream batch jobs.csv --ray": needs_extra("ray", batch_runs("jobs.csv")),
    "talkstream bench --batch 12": prints("--jobs 1", "--jobs 2", "2 workers over 1"),
    "pip install -e '.[livekit]'": pip_installs,
    "pip install -e '.[pipecat]'": pip_installs,
    "python examples/pipecat_avatar.py": needs_extra("pipecat", pipecat_example),
    "python examples/livekit_agent.py --help": needs_extra("livekit.agents", prints("console", "dev")),
    "talkstream bench --integrations": prints("livekit  +", "pipecat  +", extras=("livekit.agents", "pipecat")),
    "talkstream bench --presets '' --enhancers light,gfpgan --checkpoints ~/SadTalker":
        prints("enhancer gfpgan", "enhancer light", extras=("gfpgan",)),
}


def test_every_readme_command_is_run_by_a_test_and_every_test_by_a_command() -> None:
    commands = readme_commands(README.read_text())
    assert len(commands) == len(set(commands)), "a command appears twice in the README"
    untested = [command for command in commands if command not in RUNS]
    gone = [command for command in RUNS if command not in commands]
    assert not untested, f"README commands no test runs: {untested}"
    assert not gone, f"tests of commands the README no longer has: {gone}"


def test_comments_and_continuations_are_read_as_a_user_reads_them() -> None:
    text = "```sh\ntalkstream a  # a comment\ntalkstream b \\\n    --c d\n\n```\n```python\nignored()\n```\n"
    assert readme_commands(text) == ["talkstream a", "talkstream b --c d"]


@pytest.mark.slow
@pytest.mark.parametrize("command", readme_commands(README.read_text()), ids=lambda command: command[:60])
def test_the_readme_command_works_as_typed(command: str, scene: tuple[Path, dict[str, str]]) -> None:
    work, env = scene
    check = RUNS.get(command)
    if check is None:
        pytest.fail(f"no test runs this README command: {command}")
    check(as_typed_here(command, free_port()), work, env)
