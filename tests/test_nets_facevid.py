"""The face-vid2vid renderer and MappingNet: official checkpoint layouts, parity with upstream's outputs, the
details that change numbers (spec §1.13), and the cached/batched render path against upstream's uncached call.

Weights are the spec's random official-layout weights (`tests/sadtalker_files.py`); `sadtalker_ref.npz` holds
upstream's outputs for them. The full-size generator runs once (~1 min on two shared vCPUs); everything else that
exercises the generator runs at 128x128, the smallest size its five 2x poolings of the S/4 volumes allow.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from stages.nets.facevid2vid import (  # noqa: E402
    KPDetector,
    OcclusionAwareSPADEGenerator,
    SpectralNormConv2d,
    use_channels_last,
)
from stages.nets.mapping import HeadMotion, MappingNet, keypoint_transformation  # noqa: E402
from tests.sadtalker_files import PREFIXES, REFERENCE, inventory, random_sections, unprefixed  # noqa: E402

pytestmark = pytest.mark.slow  # SadTalker's networks on the CPU

PARITY = 1e-4  # of the reference's largest magnitude (spec rule)
CACHING = 5e-5  # absolute, fp32 (1/80 of a grey level): caching and batching must not change the function; a
# batch of 3 sums in another order than 3 of 1 (1.6e-5 seen on this CPU)
# oneDNN picks its convolution kernels by batch size and memory layout: their 1-ulp differences, amplified by the
# random weights' warp and decoder, reach 2.4e-5 (batch 3 vs 1) and 7.7e-5 (channels_last) at 128x128. PyTorch's
# own kernels compute every frame alike whatever the batch, so the batching check runs on them (difference 0.0);
# the memory-format check allows oneDNN's rounding. A real bug moves pixels by > 1e-2.
MEMORY_FORMAT = 2.5e-4


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}


def assert_parity(ours: torch.Tensor, reference: np.ndarray, tolerance: float = PARITY) -> None:
    error = np.abs(ours.detach().numpy() - reference).max() / np.abs(reference).max()
    assert ours.shape == reference.shape
    assert error <= tolerance, f"max error {error:.2e} of the reference's largest magnitude"


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def sections() -> dict[str, dict[str, np.ndarray]]:
    return random_sections("ABFG")


@pytest.fixture(scope="session")
def states(sections) -> dict[str, dict[str, torch.Tensor]]:
    """Each section as the state dict its network loads (safetensors prefixes stripped)."""
    return {letter: tensors(unprefixed(section, PREFIXES.get(letter, ""))) for letter, section in sections.items()}


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as arrays:
        return {key: arrays[key] for key in arrays.files}


def loaded(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    module.load_state_dict(state, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def kp_detector(states) -> KPDetector:
    return loaded(KPDetector(), states["A"])


@pytest.fixture(scope="module")
def generator(states) -> OcclusionAwareSPADEGenerator:
    return loaded(OcclusionAwareSPADEGenerator(), states["B"])


@pytest.fixture(scope="module")
def mapping(states) -> MappingNet:
    return loaded(MappingNet(70), states["F"])


@pytest.fixture(scope="module")
def small_source(reference) -> torch.Tensor:
    """The reference portrait at 128x128."""
    return torch.nn.functional.avg_pool2d(torch.from_numpy(reference["src"]), 2)


@pytest.fixture(scope="module")
def driving(reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Source keypoints (1, 15, 3) and three driving sets: the reference's two and a shifted, turned one."""
    kp_source = torch.from_numpy(reference["kp_source"])
    kp_driving = torch.from_numpy(reference["kp_driving"])
    turned = kp_driving[1:] @ torch.tensor([[0.9, 0.0, 0.3], [0.0, 1.0, 0.0], [-0.3, 0.0, 0.9]]) + 0.05
    return kp_source, torch.cat([kp_driving, turned])


# ------------------------------------------------------------------------------------------- checkpoint layouts


@pytest.mark.parametrize("letter", ["A", "B", "F", "G"])
def test_state_dict_is_exactly_the_official_section(letter, states, kp_detector, generator, mapping):
    network = {"A": kp_detector, "B": generator, "F": mapping}.get(letter) or loaded(MappingNet(73), states["G"])
    prefix = PREFIXES.get(letter, "")
    official = {key.removeprefix(prefix): shape for key, shape, _ in inventory()[letter]}
    ours = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    assert ours == official


@pytest.mark.parametrize(("letter", "key", "mutation"), [
    ("A", "predictor.up_blocks.up2.norm.running_var", "rename"),
    ("A", "down.weight", "reshape"),
    ("B", "decoder.up_1.conv_s.weight_orig", "rename"),  # a plain conv's name instead of spectral norm's
    ("B", "decoder.G_middle_3.conv_1.weight_v", "reshape"),
    ("F", "fc_exp.weight", "reshape"),
])
def test_strict_load_rejects_a_renamed_or_reshaped_key(letter, key, mutation, states, kp_detector, generator,
                                                       mapping):
    network = copy.deepcopy({"A": kp_detector, "B": generator, "F": mapping}[letter])
    state = dict(states[letter])
    value = state.pop(key)
    if mutation == "rename":
        state[key.replace("weight_orig", "weight").replace("running_var", "running_variance")] = value
    else:
        state[key] = value.flatten()[:-1] if value.dim() == 1 else value[..., :-1]
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        network.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------ parity with upstream's outputs


def test_kp_detector_matches_upstream(kp_detector, reference):
    with torch.inference_mode():
        assert_parity(kp_detector(torch.from_numpy(reference["src"])), reference["kp_canonical"])


def test_mapping_net_matches_upstream(mapping, reference):
    with torch.inference_mode():
        motion = mapping(torch.from_numpy(reference["coeff_win"]))
    for name in ("yaw", "pitch", "roll", "exp"):
        assert_parity(getattr(motion, name), reference[f"he_{name}"])
    # upstream zeroes t's x and z in place before the reference stored it: only y is comparable
    assert_parity(motion.t[:, 1:2], reference["he_t"][:, 1:2])


def test_keypoint_transformation_matches_upstream(reference):
    """kp_source / kp_driving from the reference's canonical keypoints and MappingNet outputs."""
    motion = HeadMotion(*(torch.from_numpy(reference[f"he_{name}"]) for name in ("yaw", "pitch", "roll", "t", "exp")))
    kp_canonical = torch.from_numpy(reference["kp_canonical"])
    assert_parity(keypoint_transformation(kp_canonical, motion), reference["kp_driving"])
    first = HeadMotion(motion.yaw[:1], motion.pitch[:1], motion.roll[:1], motion.t[:1], motion.exp[:1])
    assert_parity(keypoint_transformation(kp_canonical, first), reference["kp_source"])


def test_generator_matches_upstream_on_every_pixel(generator, reference):
    """Two frames at 256 through the cached path: one source encoding shared by both driving keypoint sets."""
    with torch.inference_mode():
        encoding = generator.encode_source(torch.from_numpy(reference["src"]))
        frames = generator.render(encoding, torch.from_numpy(reference["kp_source"]),
                                  torch.from_numpy(reference["kp_driving"]))
    assert_parity(frames, reference["prediction"])


# ------------------------------------------------------------------ independent computations of the spec's formulas


def upstream_keypoints(kp_canonical: np.ndarray, yaw_bins: np.ndarray, pitch_bins: np.ndarray,
                       roll_bins: np.ndarray, t: np.ndarray, exp: np.ndarray, pi: float = 3.14,
                       angles: tuple[float, float, float] | None = None) -> np.ndarray:
    """Spec §1.8 in float64: degrees = softmax(bins) . idx * 3 - 99; radians = deg / 180 * 3.14;
    R = Rx(pitch) Ry(yaw) Rz(roll); kp = R kp_c + (0, t_y, 0) + exp."""
    def degrees(bins: np.ndarray) -> np.ndarray:
        weights = np.exp(bins - bins.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        return weights @ np.arange(bins.shape[1]) * 3 - 99

    frames = yaw_bins.shape[0]
    yaw, pitch, roll = ((np.full(frames, given) for given in angles) if angles
                        else (degrees(bins) for bins in (yaw_bins, pitch_bins, roll_bins)))
    out = np.empty((frames, kp_canonical.shape[1], 3))
    for b in range(frames):
        y, p, r = (angle[b] / 180 * pi for angle in (yaw, pitch, roll))
        about_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
        about_y = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
        about_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
        rotation = about_x @ about_y @ about_z
        out[b] = kp_canonical[0] @ rotation.T + np.array([0.0, t[b, 1], 0.0]) + exp[b].reshape(-1, 3)
    return out


@pytest.fixture(scope="module")
def strong_motion() -> dict[str, np.ndarray]:
    """Peaked bins (large angles, where 3.14 vs pi shows), large x/z translations that must be dropped."""
    rng = np.random.default_rng(7)
    frames = 4
    bins = {name: rng.normal(0, 1, (frames, 66)) for name in ("yaw", "pitch", "roll")}
    for row, peak in enumerate((5, 20, 45, 60)):
        bins["yaw"][row, peak] += 8
        bins["pitch"][row, 65 - peak] += 6
    return {**{f"{name}_bins": value.astype(np.float32) for name, value in bins.items()},
            "t": rng.normal(0, 0.5, (frames, 3)).astype(np.float32),
            "exp": rng.normal(0, 0.05, (frames, 45)).astype(np.float32),
            "kp_canonical": rng.uniform(-0.5, 0.5, (1, 15, 3)).astype(np.float32)}


def ours(motion: dict[str, np.ndarray], **angles: float) -> np.ndarray:
    head = HeadMotion(*(torch.from_numpy(motion[name]) for name in ("yaw_bins", "pitch_bins", "roll_bins", "t", "exp")))
    return keypoint_transformation(torch.from_numpy(motion["kp_canonical"]), head, **angles).numpy()


def test_keypoint_transformation_follows_the_spec_formula(strong_motion):
    expected = upstream_keypoints(**strong_motion)
    with_pi = upstream_keypoints(**strong_motion, pi=math.pi)
    tolerance = 2e-6
    assert np.abs(expected - with_pi).max() > 20 * tolerance  # the test can tell 3.14 from pi
    assert np.abs(ours(strong_motion) - expected).max() < tolerance


def test_angle_overrides_replace_the_predicted_pose(strong_motion):
    expected = upstream_keypoints(**strong_motion, angles=(30.0, -12.0, 5.0))
    assert np.abs(ours(strong_motion, yaw=30.0, pitch=-12.0, roll=5.0) - expected).max() < 2e-6
    assert np.abs(ours(strong_motion) - expected).max() > 1e-2


def test_spectral_norm_is_folded_from_the_stored_vectors(generator, states):
    spectral = {name: module for name, module in generator.named_modules() if isinstance(module, SpectralNormConv2d)}
    assert len(spectral) == 18
    state = states["B"]
    for name, module in spectral.items():
        matrix = state[f"{name}.weight_orig"].double().numpy()
        u, v = state[f"{name}.weight_u"].double().numpy(), state[f"{name}.weight_v"].double().numpy()
        sigma = u @ (matrix.reshape(matrix.shape[0], -1) @ v)
        assert abs(sigma - 1) > 1e-3  # a forgotten fold would show
        # rtol: sigma is a 4608-term fp32 dot product, folded in fp32 as upstream does every call
        np.testing.assert_allclose(module.weight.double().numpy(), matrix / sigma, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------- caching, batching, memory format


def test_cached_batched_render_equals_uncached_frames(generator, small_source, driving):
    kp_source, kp_driving = driving
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        encoding = generator.encode_source(small_source)
        batched = generator.render(encoding, kp_source, kp_driving)
        cached_first = generator.render(encoding, kp_source, kp_driving[:1])
        one_by_one = torch.cat([generator(small_source, kp_source, kp_driving[i:i + 1])
                                for i in range(kp_driving.shape[0])])
    assert batched.shape == (3, 3, 128, 128)
    assert (batched[0] - batched[2]).abs().max() > 1e-2  # the frames differ: the keypoints reach the pixels
    assert (cached_first - one_by_one[:1]).abs().max() <= CACHING
    assert (batched - one_by_one).abs().max() <= CACHING


def test_channels_last_gives_the_same_frames(generator, small_source, driving):
    kp_source, kp_driving = driving
    channels_last = use_channels_last(copy.deepcopy(generator))
    with torch.inference_mode():
        expected = generator(small_source, kp_source, kp_driving[2:])
        frames = channels_last(small_source.contiguous(memory_format=torch.channels_last), kp_source,
                               kp_driving[2:])
    assert (frames - expected).abs().max() <= MEMORY_FORMAT


def test_an_encoding_serves_one_frame_batch_or_all(generator, small_source, driving):
    kp_source, kp_driving = driving
    with torch.inference_mode():
        pair = generator.encode_source(small_source.expand(2, -1, -1, -1))
        with pytest.raises(ValueError, match="batch 2 cannot drive 3 frames"):
            generator.render(pair, kp_source, kp_driving)
