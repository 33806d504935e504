"""Neural face enhancement on the known face: gfpgan's own architectures with random weights saved in GFPGAN's
checkpoint layout (`params_ema`), loaded through our loader; the template warp; which enhancer a preset gets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
if importlib.util.find_spec("gfpgan") is None:  # found, not imported: that needs import_architectures' alias first
    pytest.skip("gfpgan is not installed", allow_module_level=True)

from stages.enhance import (  # noqa: E402
    TEMPLATE_512,
    FaceAligner,
    NeuralEnhancer,
    Restorer,
    resolve_enhancer,
)
from stages.nets.checkpoints import CheckpointError  # noqa: E402
from stages.nets.restorers import import_architectures, load_restorer  # noqa: E402
from stages.portrait import DlibDetector, five_points  # noqa: E402
from stream.device import Placement  # noqa: E402
from tests.conftest import PORTRAIT, run_cli, speech_clip  # noqa: E402

pytestmark = pytest.mark.slow  # the enhancers' networks on the CPU

PLACEMENT = Placement("cpu", "float32")


def random_gfpgan_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """GFPGANv1.4's state dict, made by gfpgan's own class, with every tensor random and non-zero: the stored noise
    maps, the noise strengths (zero when GFPGAN is built) and the style modulation all take part."""
    torch.manual_seed(seed)
    gfpgan_class, _ = import_architectures()
    network = gfpgan_class(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None,
                           fix_decoder=False, num_mlp=8, input_is_latent=True, different_w=True, narrow=1,
                           sft_half=True)
    state = network.state_dict()
    for key, value in state.items():
        if value.is_floating_point() and not value.any():
            state[key] = 0.1 * torch.randn_like(value)
    assert any(key.endswith("noises.noise0") for key in state)
    assert any("modulation" in key for key in state)
    return state


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SadTalker-style folder: checkpoints/ beside gfpgan/weights/GFPGANv1.4.pth (as its download script leaves
    them), with an `epoch` entry that the loader must ignore."""
    root = tmp_path_factory.mktemp("models")
    (root / "checkpoints").mkdir()
    (root / "gfpgan" / "weights").mkdir(parents=True)
    torch.save({"params_ema": random_gfpgan_state(), "epoch": 7}, root / "gfpgan" / "weights" / "GFPGANv1.4.pth")
    return root / "checkpoints"


@pytest.fixture(scope="module")
def gfpgan_file(weights_dir: Path) -> Path:
    return weights_dir.parent / "gfpgan" / "weights" / "GFPGANv1.4.pth"


@pytest.fixture(scope="module")
def restorer(gfpgan_file: Path) -> Restorer:
    return Restorer("gfpgan", load_restorer("gfpgan", gfpgan_file), PLACEMENT, max_batch=4)


@pytest.fixture(scope="module")
def astronaut() -> tuple[np.ndarray, np.ndarray]:
    """The portrait (BGR) and its 68 landmarks."""
    image = cv2.imread(str(PORTRAIT))
    faces = DlibDetector().detect(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return image, max(faces, key=lambda face: face.score).landmarks


def face_roi_and_mask(landmarks: np.ndarray, shape: tuple[int, ...]) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """A box around the face with a soft elliptical mask, as an avatar has them."""
    (left, top), (right, bottom) = landmarks.min(axis=0), landmarks.max(axis=0)
    margin = 0.3 * (right - left)
    x0, y0 = int(max(0, left - margin)), int(max(0, top - 1.5 * margin))
    x1, y1 = int(min(shape[1], right + margin)), int(min(shape[0], bottom + margin))
    rows, columns = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2 - 0.2 * margin
    radius = np.hypot((columns - centre_x) / (0.6 * (right - left)), (rows - centre_y) / (0.62 * (bottom - top)))
    ramp = np.clip((1.0 - radius) / 0.2, 0.0, 1.0)
    return (x0, y0, x1, y1), (ramp * ramp * (3 - 2 * ramp)).astype(np.float32)


def moved_frames(image: np.ndarray, landmarks: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` frames with the face shifted a few pixels each, and their landmarks."""
    frames = []
    for step in range(count):
        shift = np.float32([[1, 0, 2 * step], [0, 1, -step]])
        frames.append((cv2.warpAffine(image, shift, image.shape[1::-1], borderMode=cv2.BORDER_REPLICATE),
                       landmarks + shift[:, 2]))
    return frames


def test_the_five_points_land_on_the_template(astronaut) -> None:
    image, landmarks = astronaut
    roi, mask = face_roi_and_mask(landmarks, image.shape)
    aligner = FaceAligner(roi, mask)
    affine = aligner.affine(landmarks)
    moved = five_points(landmarks) @ affine[:, :2].T + affine[:, 2]
    # A similarity cannot meet five points exactly: eyes and nose land within a few template pixels, the corners
    # of her smiling (wider than the template's) mouth a little further out.
    error = np.linalg.norm(moved - TEMPLATE_512, axis=1)
    assert error[:3].max() < 10 and error.max() < 20
    assert np.linalg.det(affine[:, :2]) > 0  # no mirror image


def test_the_template_warp_round_trips(astronaut) -> None:
    image, landmarks = astronaut
    roi, mask = face_roi_and_mask(landmarks, image.shape)
    aligner = FaceAligner(roi, mask)
    affine = aligner.affine(landmarks)
    frame = image.copy()
    aligner.paste_back(frame, aligner.to_template(image, affine), affine)
    x0, y0, x1, y1 = roi
    difference = np.abs(frame[y0:y1, x0:x1].astype(int) - image[y0:y1, x0:x1]).mean(axis=2)
    assert difference[mask > 0].mean() < 2.0
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(frame[outside], image[outside])


def test_batched_restoration_equals_one_face_at_a_time(restorer: Restorer, astronaut) -> None:
    image, landmarks = astronaut
    roi, mask = face_roi_and_mask(landmarks, image.shape)
    aligner = FaceAligner(roi, mask)
    faces = [aligner.to_template(frame, aligner.affine(points)) for frame, points in moved_frames(image, landmarks, 3)]
    together = restorer.forward(faces)
    alone = torch.cat([restorer.forward([face]) for face in faces])
    assert together.shape == (3, 3, 512, 512)
    assert float((together - alone).abs().max()) <= 1e-5
    assert float(together.std()) > 0.05  # random weights, yet a real, varied output


def test_enhanced_frames_do_not_depend_on_their_batch_or_the_run(restorer: Restorer, astronaut) -> None:
    image, landmarks = astronaut
    roi, mask = face_roi_and_mask(landmarks, image.shape)
    enhancer = NeuralEnhancer(restorer, roi, mask)
    inputs = moved_frames(image, landmarks, 2)
    batched = [frame.copy() for frame, _ in inputs]
    enhancer.enhance_batch(batched, [points for _, points in inputs])
    for run, ((frame, points), expected) in enumerate([*zip(inputs, batched), (inputs[0], batched[0])]):
        alone = frame.copy()
        enhancer.enhance_batch([alone], [points])
        assert np.abs(alone.astype(int) - expected).max() <= 1, run  # at most a rounding step
    x0, y0, x1, y1 = roi
    changed = np.abs(batched[0].astype(int) - inputs[0][0]).max(axis=2) > 8
    assert changed[y0:y1, x0:x1][mask > 0.9].mean() > 0.5   # the face was replaced ...
    outside = np.ones(image.shape[:2], bool)
    outside[y0:y1, x0:x1] = False
    assert not changed[outside].any()                        # ... and nothing outside the ROI


def test_sadtalker_frames_find_their_landmarks_in_the_known_box(astronaut) -> None:
    from stages.sadtalker.render import SadTalkerFace

    image, landmarks = astronaut
    face = SadTalkerFace(image, (0, 0, image.shape[1], image.shape[0]), np.ones(image.shape[:2], np.float32),
                         renderer=None, networks=None, landmarks=landmarks)
    locate = face.landmark_locator(DlibDetector())
    shifted = cv2.warpAffine(image, np.float32([[1, 0, 6], [0, 1, -4]]), image.shape[1::-1],
                             borderMode=cv2.BORDER_REPLICATE)
    interocular = np.linalg.norm(landmarks[36:42].mean(0) - landmarks[42:48].mean(0))
    error = np.linalg.norm(locate(shifted) - (landmarks + [6, -4]), axis=1)
    assert np.median(error) < 0.05 * interocular


def test_a_truncated_file_is_refused_naming_it(tmp_path: Path, gfpgan_file: Path) -> None:
    broken = tmp_path / "GFPGANv1.4.pth"
    broken.write_bytes(gfpgan_file.read_bytes()[: gfpgan_file.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"GFPGANv1\.4\.pth: cannot be read.*truncated"):
        load_restorer("gfpgan", broken)


def test_a_wrong_shape_or_a_foreign_file_is_refused(tmp_path: Path) -> None:
    state = random_gfpgan_state(seed=1)
    key = next(key for key in state if key.endswith("final_linear.weight"))
    state[key] = state[key][:, :-1].clone()
    torch.save({"params_ema": state}, tmp_path / "GFPGANv1.4.pth")
    with pytest.raises(CheckpointError, match=rf"1 with the wrong shape \({key}"):
        load_restorer("gfpgan", tmp_path / "GFPGANv1.4.pth")
    torch.save({"generator": {}}, tmp_path / "RestoreFormer.pth")
    with pytest.raises(CheckpointError, match="no 'params_ema' or 'params' state dict in it"):
        load_restorer("restoreformer", tmp_path / "RestoreFormer.pth")


def test_presets_get_the_enhancer_their_weights_allow(tmp_path: Path) -> None:
    notices: list[str] = []

    def choose(wish: str, folder: Path | None, strict: bool = False) -> tuple[str, str | None]:
        choice = resolve_enhancer(wish, folder, device="cpu", strict=strict, notice=notices.append)
        return choice.name, choice.weights.name if choice.weights else None

    empty, gfpgan_only, both = (tmp_path / name for name in ("empty", "gfpgan", "both"))
    for folder, files in ((empty, []), (gfpgan_only, ["GFPGANv1.4.pth"]),
                          (both, ["GFPGANv1.4.pth", "RestoreFormer.pth"])):
        folder.mkdir()
        for file in files:
            (folder / file).write_bytes(b"")
    assert choose("auto", both) == ("light", None) and not notices      # no CUDA: light, silently
    assert choose("none", both) == ("none", None)
    assert choose("best", both) == ("restoreformer", "RestoreFormer.pth") and not notices
    assert choose("best", gfpgan_only) == ("gfpgan", "GFPGANv1.4.pth")
    assert notices.pop() == f"RestoreFormer.pth is not in {gfpgan_only}: enhancing with gfpgan instead"
    assert choose("best", None) == ("light", None)
    assert "RestoreFormer.pth or GFPGANv1.4.pth" in notices.pop()
    assert choose("gfpgan", empty) == ("light", None) and "GFPGANv1.4.pth" in notices.pop()
    with pytest.raises(CheckpointError, match=r"^the restoreformer enhancer needs RestoreFormer\.pth, which is not in "
                       r"[^;]*GFPGAN's v1\.3\.4 release files\)$"):
        choose("best", gfpgan_only, strict=True)
    with pytest.raises(CheckpointError, match=r"GFPGANv1\.4\.pth"):
        choose("gfpgan", empty, strict=True)


def test_cli_enhances_half_a_second_with_gfpgan(tmp_path: Path, weights_dir: Path) -> None:
    speech = speech_clip(tmp_path / "half.wav", 8000)   # 12.5 frames of 640 samples
    out = tmp_path / "enhanced.mp4"
    plain = tmp_path / "plain.mp4"
    common = ["--preset", "fast", "--set", "encode.crf=0", "--seed", "1"]
    result = run_cli("render", PORTRAIT, speech, "-o", out, "--enhancer", "gfpgan", "--checkpoints", weights_dir,
                     *common, timeout=1200)
    assert result.returncode == 0, result.stderr.decode()
    assert run_cli("render", PORTRAIT, speech, "-o", plain, "--enhancer", "none", *common).returncode == 0
    with av.open(str(out)) as container:
        frames = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    with av.open(str(plain)) as container:
        reference = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    with av.open(str(out)) as container:
        audio_s = sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate
    assert len(frames) == len(reference) == 13 and abs(audio_s - 0.5) < 0.03
    changed = np.abs(frames[6].astype(int) - reference[6]).max(axis=2) > 8
    assert 0.01 < changed.mean() < 0.5   # the face is restored (noise, with random weights), the rest is not


def test_missing_weights_fall_back_with_a_notice_or_fail_when_strict(tmp_path: Path) -> None:
    speech = speech_clip(tmp_path / "short.wav", 3 * 640)
    out = tmp_path / "light.mp4"
    result = run_cli("render", PORTRAIT, speech, "-o", out, "--enhancer", "gfpgan", "--checkpoints", tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert f"GFPGANv1.4.pth is not in {tmp_path}: enhancing with light instead".encode() in result.stderr
    assert out.is_file()
    strict = tmp_path / "strict.mp4"
    result = run_cli("render", PORTRAIT, speech, "-o", strict, "--enhancer", "gfpgan", "--checkpoints", tmp_path,
                     "--strict")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "GFPGANv1.4.pth" in lines[0] and "Traceback" not in lines[0]
    assert not strict.exists() and not list(tmp_path.glob("strict*"))


def test_cli_names_a_truncated_weight_file_and_exits_2(tmp_path: Path, gfpgan_file: Path) -> None:
    (tmp_path / "GFPGANv1.4.pth").write_bytes(gfpgan_file.read_bytes()[:4096])
    speech = speech_clip(tmp_path / "short.wav", 3 * 640)
    out = tmp_path / "broken.mp4"
    result = run_cli("render", PORTRAIT, speech, "-o", out, "--enhancer", "gfpgan", "--checkpoints", tmp_path)
    assert result.returncode == 2
    assert b"GFPGANv1.4.pth: cannot be read as a torch checkpoint" in result.stderr
    assert not out.exists()


def test_doctor_loads_the_enhancer_files_it_finds(weights_dir: Path) -> None:
    result = run_cli("doctor", "--checkpoints", weights_dir)
    report = result.stdout.decode()
    assert result.returncode == 0, report
    assert "ok   gfpgan enhancer" in report and "GFPGANv1.4.pth: loads" in report
    assert "RestoreFormer.pth" in report and "ok   restoreformer" not in report


def test_restoreformer_loads_from_params_and_restores_a_batch_like_single_faces(tmp_path: Path, astronaut,
                                                                              capsys: pytest.CaptureFixture) -> None:
    _, restoreformer_class = import_architectures()
    torch.manual_seed(2)
    state = restoreformer_class().state_dict()
    torch.save({"params": state}, tmp_path / "RestoreFormer.pth")
    capsys.readouterr()
    restorer = Restorer("restoreformer", load_restorer("restoreformer", tmp_path / "RestoreFormer.pth"), PLACEMENT,
                        max_batch=2)
    assert capsys.readouterr().out == ""  # standard output may be the video pipe
    image, landmarks = astronaut
    roi, mask = face_roi_and_mask(landmarks, image.shape)
    aligner = FaceAligner(roi, mask)
    faces = [aligner.to_template(frame, aligner.affine(points)) for frame, points in moved_frames(image, landmarks, 2)]
    together = restorer.forward(faces)
    assert float((together[:1] - restorer.forward(faces[:1])).abs().max()) <= 1e-5
    assert float(together.std()) > 0.05


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="a GPU driver: torch is asked about CUDA")
def test_auto_with_the_weights_present_does_not_import_torch_without_a_gpu(weights_dir: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import sys; from stages.enhance import resolve_enhancer; "
            f"choice = resolve_enhancer('auto', {str(weights_dir)!r}, device='auto', strict=False, notice=print); "
            "print(choice.name, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, check=True)
    assert result.stdout.decode().split() == ["light", "False"]
