"""SadTalker's official files, written from the key inventory, through the real loaders; broken files, clear errors."""

from __future__ import annotations

import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from stages.nets.checkpoints import (  # noqa: E402 - after the skips
    CheckpointError,
    describe_sadtalker_files,
    find_checkpoints,
    load_sadtalker_networks,
    safetensors_name,
)
from tests.conftest import PORTRAIT, SPEECH, run_cli  # noqa: E402
from tests.sadtalker_files import PREFIXES, random_sections, write_official_files  # noqa: E402

pytestmark = pytest.mark.slow  # random SadTalker checkpoints written and loaded

BUNDLE = safetensors_name(256)


@pytest.fixture(scope="module")
def networks(sadtalker_dir: Path):
    return load_sadtalker_networks(find_checkpoints(sadtalker_dir, 256, "crop"))


def _bundle_state() -> dict[str, np.ndarray]:
    sections = random_sections("ABCDEFG")
    return {key: value for letter in "ABCDE" for key, value in sections[letter].items()}


def _folder_with(tmp_path: Path, source: Path, bundle: dict[str, np.ndarray] | None = None) -> Path:
    """A checkpoint folder: the official mapping files, and a bundle written from `bundle` (or the official one)."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("mapping_00229-model.pth.tar", "mapping_00109-model.pth.tar"):
        (folder / name).symlink_to(source / name)
    if bundle is None:
        (folder / BUNDLE).symlink_to(source / BUNDLE)
    else:
        safetensors_numpy.save_file(bundle, str(folder / BUNDLE))
    return folder


def test_every_network_gets_the_files_tensors(networks) -> None:
    sections = random_sections("ABCDEFG")
    for letter, part in (("A", "kp_extractor"), ("B", "generator"), ("C", "audio2exp"), ("E", "face_3drecon")):
        state = getattr(networks, part).state_dict()
        for key, value in sections[letter].items():
            np.testing.assert_array_equal(state[key.removeprefix(PREFIXES[letter])].numpy(), value, err_msg=key)
    pose_state = networks.audio2pose.state_dict()
    built = [key for key in sections["D"] if key.removeprefix("audio2pose.") in pose_state]
    skipped = set(sections["D"]) - set(built)
    assert skipped and all(key.startswith(("audio2pose.netG.encoder.", "audio2pose.netD_motion.")) for key in skipped)
    for key in built:
        np.testing.assert_array_equal(pose_state[key.removeprefix("audio2pose.")].numpy(), sections["D"][key])
    mapping = networks.mapping.state_dict()
    for key, value in sections["F"].items():
        np.testing.assert_array_equal(mapping[key].numpy(), value)
    assert not any(module.training for module in (networks.generator, networks.mapping, networks.audio2pose))


def test_full_modes_take_the_73_input_mapping_file(sadtalker_dir: Path) -> None:
    files = find_checkpoints(sadtalker_dir, 256, "full")
    assert files.mapping.name == "mapping_00109-model.pth.tar" and files.mapping_inputs == 73
    mapping = load_sadtalker_networks(files).mapping.state_dict()
    for key, value in random_sections("ABCDEFG")["G"].items():
        np.testing.assert_array_equal(mapping[key].numpy(), value)


def test_legacy_files_load_the_same_weights(tmp_path: Path, networks) -> None:
    legacy = load_sadtalker_networks(find_checkpoints(write_official_files(tmp_path / "old", legacy=True), 256, "crop"))
    assert legacy.files.bundle is None and "facevid2vid_00189-model.pth.tar" in {p.name for p in legacy.files.paths}
    for part in ("kp_extractor", "generator", "audio2exp", "audio2pose", "face_3drecon", "mapping"):
        ours, theirs = getattr(networks, part).state_dict(), getattr(legacy, part).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), part


def test_extra_entries_are_ignored_with_a_debug_line(tmp_path: Path, sadtalker_dir: Path, caplog) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / "mapping_00229-model.pth.tar").unlink()
    content = torch.load(sadtalker_dir / "mapping_00229-model.pth.tar", weights_only=True)
    optimizer = {"state": {}, "param_groups": []}
    torch.save({**content, "optimizer_mapping": optimizer}, folder / "mapping_00229-model.pth.tar")
    with caplog.at_level(logging.DEBUG, logger="talkstream.checkpoints"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))
    assert "epoch" in caplog.text and "optimizer_mapping" in caplog.text


def test_a_missing_file_names_it_and_where_it_comes_from(tmp_path: Path, sadtalker_dir: Path) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / "mapping_00109-model.pth.tar").unlink()
    with pytest.raises(CheckpointError, match=r"mapping_00109-model\.pth\.tar .*'full'.*download_models\.sh"):
        find_checkpoints(folder, 256, "full")
    with pytest.raises(CheckpointError, match=r"SadTalker_V0\.0\.2_512\.safetensors is not in"):
        find_checkpoints(folder, 512, "crop")


def test_a_truncated_bundle_is_refused(tmp_path: Path, sadtalker_dir: Path) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / BUNDLE).unlink()
    data = (sadtalker_dir / BUNDLE).read_bytes()
    (folder / BUNDLE).write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=rf"{BUNDLE}: .*truncated"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))


def test_a_truncated_mapping_file_is_refused(tmp_path: Path, sadtalker_dir: Path) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / "mapping_00229-model.pth.tar").unlink()
    data = (sadtalker_dir / "mapping_00229-model.pth.tar").read_bytes()
    (folder / "mapping_00229-model.pth.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"mapping_00229-model\.pth\.tar: .*truncated"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))


def test_one_tensor_of_the_wrong_shape_is_named(tmp_path: Path, sadtalker_dir: Path) -> None:
    state = dict(_bundle_state())
    key = "generator.decoder.G_middle_0.conv_0.weight_orig"
    assert key in state
    state[key] = np.zeros((state[key].shape[0] // 2, *state[key].shape[1:]), np.float32)
    folder = _folder_with(tmp_path, sadtalker_dir, state)
    with pytest.raises(CheckpointError, match=r"generator does not match.*1 with the wrong shape "
                                              r"\(decoder\.G_middle_0\.conv_0\.weight_orig \(256, 512, 3, 3\) instead"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))


def test_missing_and_unknown_tensors_are_named(tmp_path: Path, sadtalker_dir: Path) -> None:
    state = dict(_bundle_state())
    del state["kp_extractor.kp.weight"]
    state["audio2pose.netG.decoder.extra.weight"] = np.zeros(3, np.float32)
    folder = _folder_with(tmp_path, sadtalker_dir, state)
    with pytest.raises(CheckpointError, match=r"kp_extractor does not match.*1 missing tensors \(kp\.weight\)"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))
    state["kp_extractor.kp.weight"] = _bundle_state()["kp_extractor.kp.weight"]
    safetensors_numpy.save_file(state, str(folder / BUNDLE))
    with pytest.raises(CheckpointError, match=r"audio2pose does not match.*unknown tensors \(netG\.decoder\.extra"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))


def test_a_tensor_of_no_network_is_refused(tmp_path: Path, sadtalker_dir: Path) -> None:
    state = {**_bundle_state(), "he_estimator.fc_yaw.weight": np.zeros((66, 2048), np.float32)}
    folder = _folder_with(tmp_path, sadtalker_dir, state)
    with pytest.raises(CheckpointError, match=r"1 tensors belong to no SadTalker network \(he_estimator"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))


class _Payload:
    """Pickled code: unpickling it would create the file named in its state."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.path,))


def test_pickled_code_is_never_run(tmp_path: Path, sadtalker_dir: Path) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / "mapping_00229-model.pth.tar").unlink()
    planted = tmp_path / "code-ran"
    mapping = torch.load(sadtalker_dir / "mapping_00229-model.pth.tar", weights_only=True)
    torch.save({**mapping, "payload": _Payload(planted)}, folder / "mapping_00229-model.pth.tar",
               pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError, match=r"mapping_00229-model\.pth\.tar: cannot be read"):
        load_sadtalker_networks(find_checkpoints(folder, 256, "crop"))
    assert not planted.exists()


def test_doctor_reports_what_the_folder_holds(sadtalker_dir: Path, tmp_path: Path) -> None:
    result = run_cli("doctor", "--checkpoints", sadtalker_dir)
    report = result.stdout.decode()
    assert result.returncode == 0, report
    assert "ok   sadtalker 256 px (crop, extcrop, resize)" in report
    assert "ok   sadtalker 256 px (full, extfull)" in report
    assert "mapping_00109-model.pth.tar" in report and "sadtalker 512 px" not in report
    assert describe_sadtalker_files(tmp_path)[-1][1] is False


def test_cli_exits_2_naming_the_broken_file(tmp_path: Path, sadtalker_dir: Path) -> None:
    folder = _folder_with(tmp_path, sadtalker_dir)
    (folder / BUNDLE).unlink()
    shutil.copyfile(SPEECH, folder / BUNDLE)  # a file by the right name holding something else
    out = tmp_path / "out.mp4"
    result = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--backend", "sadtalker", "--checkpoints", folder)
    assert result.returncode == 2, result.stderr
    error = result.stderr.decode().strip().splitlines()
    assert error[-1].startswith(f"talkstream: error: {BUNDLE}: cannot be read as safetensors")
    assert "Traceback" not in result.stderr.decode() and not out.exists()
    missing = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--backend", "sadtalker")
    assert missing.returncode == 2 and b"--checkpoints DIR" in missing.stderr
