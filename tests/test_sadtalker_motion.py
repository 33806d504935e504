"""SadTalker motion: the offline path is upstream's function; streaming deviates only by its look-ahead knobs."""

from __future__ import annotations

import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly, savgol_filter

torch = pytest.importorskip("torch")

from stages.nets.checkpoints import find_checkpoints, load_sadtalker_networks  # noqa: E402
from stages.sadtalker.mel import mel_windows, sadtalker_mel  # noqa: E402
from stages.sadtalker.motion import (  # noqa: E402
    POSE_CHUNK,
    DrivingSettings,
    MotionNetworks,
    OfflineMotion,
    SadTalkerMotion,
    SourceMotion,
    blink_ratios,
    offline_coefficients,
    offline_keypoints,
    pose_latents,
    smooth_pose,
)
from stages.session import load_preset, speech_lead_ms  # noqa: E402
from stream.errors import InputError  # noqa: E402
from tests.conftest import SPEECH  # noqa: E402

pytestmark = pytest.mark.slow  # SadTalker's networks on the CPU

FULL = DrivingSettings()                        # upstream's look-ahead everywhere
FRAMES = 62                                     # 1 still frame + one whole pose chunk + a remainder of 29


def _speech_16k(seconds: float) -> np.ndarray:
    with wave.open(str(SPEECH)) as reader:
        pcm = np.frombuffer(reader.readframes(reader.getnframes()), np.int16).astype(np.float32) / 32768
        rate = reader.getframerate()
    assert rate == 22050
    return resample_poly(pcm, 320, 441).astype(np.float32)[: int(seconds * 16000)]


@pytest.fixture(scope="module")
def loaded(sadtalker_dir: Path):
    torch.set_num_threads(1)
    return load_sadtalker_networks(find_checkpoints(sadtalker_dir, 256, "crop"))


@pytest.fixture(scope="module")
def source() -> SourceMotion:
    rng = np.random.default_rng(7)
    coefficients = (0.2 * rng.standard_normal(70)).astype(np.float32)
    return SourceMotion(coefficients, torch.from_numpy((0.3 * rng.standard_normal((1, 15, 3))).astype(np.float32)))


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return _speech_16k(FRAMES * 0.04 + 0.025)   # 62 whole frames and a part frame that upstream drops


def _networks(loaded, source: SourceMotion, settings: DrivingSettings) -> MotionNetworks:
    return MotionNetworks(loaded.audio2exp, loaded.audio2pose, loaded.mapping, source, settings, "cpu")


def _stream(model, speech: np.ndarray, chunk: int) -> tuple[list[int], torch.Tensor]:
    """Push in `chunk`-sample pieces; returns how many frames had come out after each piece, and all keypoints."""
    frames, emitted = [], []
    for start in range(0, len(speech), chunk):
        frames += model.push(speech[start:start + chunk])
        emitted.append(len(frames))
    frames += model.finish()
    assert [frame.index for frame in frames] == list(range(len(frames)))
    return emitted, torch.stack([frame.keypoints for frame in frames])


@pytest.fixture(scope="module")
def offline(loaded, source, speech) -> tuple[np.ndarray, torch.Tensor]:
    networks = _networks(loaded, source, FULL)
    coefficients = offline_coefficients(networks, speech)
    return coefficients, offline_keypoints(networks, coefficients)


def test_offline_path_has_upstreams_frames_and_layout(offline, source) -> None:
    coefficients, keypoints = offline
    assert coefficients.shape == (FRAMES, 70) and keypoints.shape == (FRAMES, 15, 3)
    assert np.abs(np.diff(coefficients[:, 64:], axis=0)).max() > 1e-4  # the head moves
    assert np.isfinite(keypoints.numpy()).all()


def test_streaming_with_full_lookahead_equals_offline(loaded, source, speech, offline) -> None:
    emitted, keypoints = _stream(SadTalkerMotion(_networks(loaded, source, FULL)), speech, 320)
    np.testing.assert_allclose(keypoints.numpy(), offline[1].numpy(), atol=1e-5 * float(offline[1].abs().max()))
    # Before the end only frames t whose mapping window (t + 13) is smoothed (+6) inside the first whole pose
    # chunk (frames 1..32) are out: upstream's look-ahead.
    assert emitted[-1] == 32 - 13 - 6 + 1


def test_offline_motion_model_gives_the_offline_path(loaded, source, speech, offline) -> None:
    _, keypoints = _stream(OfflineMotion(_networks(loaded, source, FULL)), speech, 4000)
    np.testing.assert_allclose(keypoints.numpy(), offline[1].numpy(), atol=1e-6)


@pytest.mark.parametrize("chunk", [320, 1111])
def test_short_lookahead_streams_early_and_never_depends_on_chunking(loaded, source, speech, chunk) -> None:
    settings = replace(FULL, mapping_future_frames=2, pose_lookahead_frames=0, pose_lag_frames=2)
    emitted, keypoints = _stream(SadTalkerMotion(_networks(loaded, source, settings)), speech, chunk)
    reference = _stream(SadTalkerMotion(_networks(loaded, source, settings)), speech, 640)[1]
    # Equal up to float rounding of differently sized network batches.
    np.testing.assert_allclose(keypoints.numpy(), reference.numpy(), atol=1e-5 * float(reference.abs().max()))
    # Frame k's look-ahead: 2 + 0 + 2 frames of motion, plus the mel window (132 ms) and whole 40 ms frames.
    pushed_frames = np.arange(1, len(emitted) + 1) * chunk / 640
    assert all(count >= int(pushed) - 4 - 5 for count, pushed in zip(emitted, pushed_frames, strict=True))


@pytest.mark.parametrize("preset", ["ultra_fast", "fast", "balanced"])
def test_a_live_session_waits_for_exactly_the_speech_its_motion_needs(loaded, source, preset) -> None:
    resolved, backend = load_preset(preset, backend="sadtalker")
    knobs = replace(FULL, mapping_future_frames=backend.mapping_future_frames,
                    pose_lookahead_frames=backend.pose_lookahead_frames, pose_lag_frames=backend.pose_lag_frames)
    model = SadTalkerMotion(_networks(loaded, source, knobs))
    speech, step = _speech_16k(2.0), 40          # pushed 2.5 ms at a time
    needed = []                                  # speech past each frame's start when it came out (ms)
    for start in range(0, len(speech), step):
        needed += [(start + step) / 16 - frame.index * 40 for frame in model.push(speech[start:start + step])]
    assert len(needed) > 20
    assert speech_lead_ms(resolved, backend) - 2.5 < max(needed) <= speech_lead_ms(resolved, backend) + 2.5
    with pytest.raises(InputError, match="offline"):
        speech_lead_ms(*load_preset("quality", backend="sadtalker"))


def test_mapping_future_cut_edge_replicates_only_the_window(loaded, source, speech, offline) -> None:
    settings = replace(FULL, mapping_future_frames=3)
    networks = _networks(loaded, source, settings)
    _, keypoints = _stream(SadTalkerMotion(networks), speech, 640)
    coefficients = offline[0]
    last = len(coefficients) - 1
    windows = np.stack([coefficients[np.minimum(np.clip(np.arange(t - 13, t + 14), 0, last), t + 3)].T
                        for t in range(len(coefficients))])
    expected = networks.keypoints(windows)
    np.testing.assert_allclose(keypoints.numpy(), expected.numpy(), atol=1e-5 * float(expected.abs().max()))
    assert not np.allclose(keypoints.numpy(), offline[1].numpy(), atol=1e-4)


def test_pose_without_lookahead_decodes_the_window_ending_at_each_frame(loaded, source, speech) -> None:
    networks = _networks(loaded, source, replace(FULL, pose_lookahead_frames=0))
    model = SadTalkerMotion(networks)
    raw: dict[int, np.ndarray] = {}
    for start in range(0, len(speech), 640):
        model.push(speech[start:start + 640])
        raw.update(model.utterance.raw_pose)   # old entries are forgotten as the stream moves on
    model.finish()
    raw.update(model.utterance.raw_pose)
    embeddings = networks.pose_embeddings(mel_windows(sadtalker_mel(speech), 0, FRAMES)[1:])  # row i: frame i + 1
    for frame in (1, 5, 31, 32, 33, 50, FRAMES - 1):
        rows = embeddings[max(0, frame - POSE_CHUNK):frame]
        window = np.concatenate([np.repeat(rows[:1], POSE_CHUNK - len(rows), axis=0), rows])
        chunk = (frame - 1) // POSE_CHUNK
        motion = networks.pose_motion(pose_latents(0, range(chunk, chunk + 1)), window[None])[0, -1]
        np.testing.assert_allclose(raw[frame], source.pose + motion, atol=1e-5, err_msg=f"frame {frame}")


@pytest.mark.parametrize("total", [3, 8, 12, 13, 40])
def test_smoothing_is_savitzky_golay_13_2_over_the_whole_sequence(total: int) -> None:
    pose = np.random.default_rng(total).standard_normal((total, 6))
    window = min(13, total if total % 2 else total - 1)
    np.testing.assert_allclose(smooth_pose(pose), savgol_filter(pose, window, 2, axis=0), atol=1e-10)


def test_blinks_are_seeded_five_frame_shapes(source) -> None:
    ratios = blink_ratios(0, 400, seed=3)[:, 0]
    starts = np.flatnonzero((ratios == 0.5) & (np.roll(ratios, -1) == 0.9))
    assert len(starts) >= 400 // 70 and np.all(np.diff(starts) >= 10) and np.all(np.diff(starts) < 70)
    np.testing.assert_array_equal(ratios[starts[0]:starts[0] + 5], np.float32([0.5, 0.9, 1.0, 0.9, 0.5]))
    np.testing.assert_array_equal(blink_ratios(100, 50, seed=3)[:, 0], ratios[100:150])
    assert not np.array_equal(blink_ratios(0, 400, seed=4)[:, 0], ratios)


def test_still_keeps_the_portraits_pose_and_style_changes_the_motion(loaded, source, speech, offline) -> None:
    still = offline_coefficients(_networks(loaded, source, replace(FULL, still=True)), speech)
    np.testing.assert_array_equal(still[:, 64:70], np.broadcast_to(source.pose, (FRAMES, 6)))
    np.testing.assert_allclose(still[:, :64], offline[0][:, :64], atol=1e-6)
    styled = offline_coefficients(_networks(loaded, source, replace(FULL, pose_style=17)), speech)
    assert np.abs(styled[:, 64:70] - offline[0][:, 64:70]).max() > 1e-3
    scaled = offline_coefficients(_networks(loaded, source, replace(FULL, expression_scale=2.0)), speech)
    np.testing.assert_allclose(scaled[:, :64], 2 * offline[0][:, :64], rtol=1e-5, atol=1e-6)
    # The preset's head knob scales the pose's motion away from the portrait's (0: still, as `still` keeps it).
    calmer = offline_coefficients(_networks(loaded, source, replace(FULL, head_scale=0.5)), speech)
    np.testing.assert_allclose(calmer[:, 64:70] - source.pose, 0.5 * (offline[0][:, 64:70] - source.pose),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(offline_coefficients(_networks(loaded, source, replace(FULL, head_scale=0.0)),
                                                    speech)[:, 64:70], still[:, 64:70], atol=1e-6)


def test_interrupt_starts_a_new_utterance_at_the_next_frame(loaded, source, speech) -> None:
    settings = replace(FULL, mapping_future_frames=2, pose_lookahead_frames=0, pose_lag_frames=2)
    model = SadTalkerMotion(_networks(loaded, source, settings))
    first = model.push(speech[:16000])
    model.interrupt()
    second = model.push(speech[:16000]) + model.finish()
    assert [f.index for f in second] == list(range(len(first), len(first) + 25))
    fresh = SadTalkerMotion(_networks(loaded, source, settings))
    expected = fresh.push(speech[:16000]) + fresh.finish()
    np.testing.assert_allclose(torch.stack([f.keypoints for f in second]).numpy(),
                               torch.stack([f.keypoints for f in expected]).numpy(), atol=2e-5)


def test_a_long_stream_keeps_a_few_seconds_of_state(loaded, source) -> None:
    settings = replace(FULL, mapping_future_frames=2, pose_lookahead_frames=0, pose_lag_frames=2)
    model = SadTalkerMotion(_networks(loaded, source, settings))
    speech = np.tile(_speech_16k(4.0), 3)
    frames = sum(len(model.push(speech[start:start + 1600])) for start in range(0, len(speech), 1600))
    state = model.utterance
    assert frames > 280
    assert len(state.mel.data) < 40 and len(state.exp.data) < 20 and len(state.coefficients.data) < 40
    assert len(state.embeddings.data) <= 3 * POSE_CHUNK and len(state.raw_pose) < 30 and len(state.chunks) <= 2
