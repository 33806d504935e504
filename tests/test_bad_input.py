"""Every mistake a user can make ends in one clear line on stderr, exit status 2, and no output file."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import wave
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import PORTRAIT, ROOT, SPEECH, environment_without, run_cli


def assert_user_error(result, output: Path, *words: str) -> None:
    stderr = result.stderr.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("talkstream: error: ")]
    assert result.returncode == 2, stderr
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for word in words:
        assert word in errors[0], errors[0]
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")], "temporary file left"


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.mp4"


def test_no_face(tmp_path: Path, out: Path):
    suit = cv2.imread(str(PORTRAIT))[300:512, 0:300]  # the astronaut's suit and the flag: no face
    image = tmp_path / "suit.png"
    cv2.imwrite(str(image), suit)
    assert_user_error(run_cli("render", image, SPEECH, "-o", out), out, "no face found in suit.png")


def test_face_too_small_says_its_size(tmp_path: Path, out: Path):
    small = cv2.resize(cv2.imread(str(PORTRAIT)), None, fx=0.35, fy=0.35, interpolation=cv2.INTER_AREA)
    image = tmp_path / "small.png"
    cv2.imwrite(str(image), small)
    result = run_cli("render", image, SPEECH, "-o", out)
    assert_user_error(result, out, "too small", "15 px apart", "at least 20")


def test_truncated_image(tmp_path: Path, out: Path):
    for suffix, encoded in ((".png", cv2.imencode(".png", cv2.imread(str(PORTRAIT)))[1]),
                            (".jpg", cv2.imencode(".jpg", cv2.imread(str(PORTRAIT)))[1])):
        image = tmp_path / f"cut{suffix}"
        image.write_bytes(encoded.tobytes()[: len(encoded) // 2])
        assert_user_error(run_cli("render", image, SPEECH, "-o", out), out, f"cut{suffix} is truncated")


def test_not_an_image(tmp_path: Path, out: Path):
    text = tmp_path / "notes.png"
    text.write_text("these are not pixels\n" * 20)
    assert_user_error(run_cli("render", text, SPEECH, "-o", out), out, "cannot read notes.png as an image")
    assert_user_error(run_cli("render", tmp_path / "missing.png", SPEECH, "-o", out), out, "portrait not found")


def test_corrupt_audio(tmp_path: Path, out: Path):
    noise = tmp_path / "speech.mp3"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 40000, dtype=np.uint8).tobytes())
    assert_user_error(run_cli("render", PORTRAIT, noise, "-o", out), out, "speech.mp3")


def test_empty_audio(tmp_path: Path, out: Path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert_user_error(run_cli("render", PORTRAIT, empty, "-o", out), out, "empty.wav")
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(SPEECH.read_bytes()[:44])
    assert_user_error(run_cli("render", PORTRAIT, header_only, "-o", out), out, "header.wav", "no audio samples")


def test_audio_that_is_not_audio(out: Path):
    assert_user_error(run_cli("render", PORTRAIT, PORTRAIT, "-o", out), out, "astronaut.png")


def test_audio_on_stdin_that_is_not_audio(out: Path):
    result = run_cli("render", PORTRAIT, "-", "-o", out, stdin=b"hello, this is text and not a sound\n" * 100)
    assert_user_error(result, out, "standard input")


def test_raw_pcm_or_nothing_on_stdin_without_a_rate_asks_for_one(out: Path):
    with wave.open(str(SPEECH)) as wav:
        pcm = wav.readframes(wav.getnframes())
    assert_user_error(run_cli("render", PORTRAIT, "-", "-o", out, stdin=pcm), out, "standard input", "--rate")
    assert_user_error(run_cli("render", PORTRAIT, "-", "-o", out, stdin=b""), out, "standard input is empty",
                      "--rate")


def test_an_output_extension_without_a_format_is_refused_with_the_ones_there_are(tmp_path: Path):
    for name in ("out.avi", "out.gif", "out"):
        out = tmp_path / name
        assert_user_error(run_cli("render", PORTRAIT, SPEECH, "-o", out), out, name, ".mp4", ".mkv", ".webm",
                          ".mov", "--format")


def test_output_that_cannot_be_written(tmp_path: Path):
    missing_dir = tmp_path / "no" / "such" / "dir" / "out.mp4"
    result = run_cli("render", PORTRAIT, SPEECH, "-o", missing_dir)
    assert result.returncode == 2 and "does not exist" in result.stderr.decode()
    result = run_cli("render", PORTRAIT, SPEECH, "-o", tmp_path)
    assert result.returncode == 2 and "is a directory" in result.stderr.decode()
    for fmt in ("mp4", "mkv"):
        result = run_cli("render", PORTRAIT, SPEECH, "-o", "-", "--format", fmt)
        assert result.returncode == 2 and "cannot be streamed" in result.stderr.decode()


def test_unknown_preset(out: Path):
    assert_user_error(run_cli("render", PORTRAIT, SPEECH, "-o", out, "--preset", "x"), out, "unknown preset 'x'")


def run_cli_without(packages: tuple[str, ...], hidden: Path, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """`talkstream ARGS` without `packages`."""
    return subprocess.run([sys.executable, "-m", "stream.cli", *map(str, args)], capture_output=True, timeout=300,
                          cwd=ROOT, env=environment_without(packages, hidden))


def requires(package: str) -> None:
    """Skip unless `package` is installed (hiding one package of an extra needs the others that import before it)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


# Hiding safetensors, the render loads torch first: seconds.
@pytest.mark.parametrize("package", ["torch", pytest.param("safetensors", marks=pytest.mark.slow)])
def test_the_sadtalker_backend_without_its_extra_names_the_pip_command(tmp_path: Path, out: Path, package: str):
    from stages.nets.checkpoints import MAPPING_FILES, safetensors_name

    if package != "torch":
        requires("torch")
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for name in (*MAPPING_FILES.values(), safetensors_name(256)):  # found by name; never read without the extra
        (checkpoints / name).write_bytes(b"")
    result = run_cli_without((package,), tmp_path / "hidden", "render", PORTRAIT, SPEECH, "-o", out,
                             "--backend", "sadtalker", "--checkpoints", checkpoints)
    assert_user_error(result, out, "the sadtalker backend", f"No module named '{package}'",
                      "pip install -e '.[sadtalker]'")


@pytest.mark.parametrize("enhancer", ["gfpgan", "restoreformer"])
def test_a_neural_enhancer_without_torch_names_the_pip_command(tmp_path: Path, out: Path, enhancer: str):
    checkpoints = tmp_path / "weights"
    checkpoints.mkdir()
    for name in ("GFPGANv1.4.pth", "RestoreFormer.pth"):
        (checkpoints / name).write_bytes(b"")
    result = run_cli_without(("torch",), tmp_path / "hidden", "render", PORTRAIT, SPEECH, "-o", out,
                             "--enhancer", enhancer, "--checkpoints", checkpoints)
    assert_user_error(result, out, f"the {enhancer} enhancer", "No module named 'torch'", "pip install -e '.[enhance]'")


@pytest.mark.slow  # imports torch and torchvision
def test_gfpgan_without_the_gfpgan_package_names_the_pip_command(tmp_path: Path, out: Path):
    torch = pytest.importorskip("torch")
    requires("torchvision")
    checkpoints = tmp_path / "weights"
    checkpoints.mkdir()
    torch.save({"params_ema": {}}, checkpoints / "GFPGANv1.4.pth")  # read before the network is built from gfpgan
    result = run_cli_without(("gfpgan",), tmp_path / "hidden", "render", PORTRAIT, SPEECH, "-o", out,
                             "--enhancer", "gfpgan", "--checkpoints", checkpoints)
    assert_user_error(result, out, "the gfpgan enhancer", "No module named 'gfpgan'", "pip install -e '.[enhance]'")


@pytest.mark.parametrize("package", ["aiohttp", "aiortc"])
def test_serve_without_its_packages_names_the_pip_command(tmp_path: Path, package: str):
    result = run_cli_without((package,), tmp_path / "hidden", "serve", "--port", "0")
    assert_user_error(result, tmp_path / "nothing", f"needs {package}", "pip install -e .")


def test_checkpoints_that_do_not_exist_are_refused_before_any_work(tmp_path: Path, out: Path):
    missing = tmp_path / "no-such-folder"
    assert_user_error(run_cli("render", PORTRAIT, SPEECH, "-o", out, "--checkpoints", missing), out, "--checkpoints",
                      f"{missing} does not exist")
    for command in ("bench", "doctor"):
        result = run_cli(command, "--checkpoints", missing)
        assert_user_error(result, out, "--checkpoints", f"{missing} does not exist")
        assert b"all required checks passed" not in result.stdout


def test_strict_names_the_one_missing_enhancer_file_in_a_sentence(tmp_path: Path, out: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--enhancer", "gfpgan", "--strict", "--checkpoints", empty)
    assert_user_error(result, out, f"talkstream: error: the gfpgan enhancer needs GFPGANv1.4.pth, which is not in "
                      f"{empty} (")
    error = result.stderr.decode().strip()
    assert "RestoreFormer" not in error and ";" not in error, error
