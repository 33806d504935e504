"""presets.toml: every tier loads, overrides apply, bad keys and values fail naming the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from stages.session import load_preset
from stream.errors import PresetError
from stream.presets import PresetBook, check_fixed
from tests.conftest import PORTRAIT, SPEECH, run_cli

TIERS = ["ultra_fast", "fast", "balanced", "quality"]


def test_every_speed_tier_loads_with_its_blend_and_enhancer():
    book = PresetBook()
    assert book.names == TIERS
    blends = {name: book.get(name)[0].blend.mode for name in TIERS}
    assert blends == {"ultra_fast": "alpha", "fast": "feather", "balanced": "pyramid", "quality": "seamless"}
    enhancers = {name: book.get(name)[0].enhance.enhancer for name in TIERS}
    assert enhancers == {"ultra_fast": "none", "fast": "auto", "balanced": "auto", "quality": "best"}


def test_overrides_change_one_value_and_backend_knobs():
    preset, settings = load_preset("fast", ["blend.mode=alpha", "render.max_wait_ms=2", "embedded.seed=7"])
    assert preset.blend.mode == "alpha" and preset.render.max_wait_ms == 2.0
    assert settings.seed == 7 and settings.still is False
    assert load_preset("fast")[0].blend.mode == "feather"


@pytest.mark.parametrize("override, message", [
    ("blend.mode=poisson", "expected one of alpha, feather, pyramid, seamless"),
    ("render.crop=12", "valid keys: crop_size, max_batch, max_wait_ms"),
    ("colour.x=1", "valid sections: video, stream"),
    ("video.fps=zero", "expected an integer"),
    ("video.fps=0", "from 1 to 120"),
    ("embedded.seed=one", "expected an integer"),
    ("blend.mode", "expected section.key=value"),
])
def test_bad_overrides_name_the_valid_choices(override, message):
    with pytest.raises(PresetError, match=message):
        load_preset("balanced", [override])


def test_unknown_preset_and_backend_name_the_valid_ones():
    with pytest.raises(PresetError, match="valid presets: ultra_fast, fast, balanced, quality"):
        load_preset("turbo")
    with pytest.raises(PresetError, match="valid backends: embedded"):
        load_preset("balanced", backend="wav2lip")


def test_a_backend_refuses_presets_that_contradict_what_it_fixes():
    preset = load_preset("balanced", ["video.fps=30"])[0]
    with pytest.raises(PresetError, match="fixes video.fps = 25"):
        check_fixed(preset, {"video.fps": 25}, "sadtalker")
    check_fixed(load_preset("balanced")[0], {"video.fps": 25}, "sadtalker")


def test_a_presets_file_with_an_unknown_key_is_refused(tmp_path: Path):
    text = (Path(__file__).parent.parent / "presets.toml").read_text()
    broken = tmp_path / "presets.toml"
    broken.write_text(text.replace("[presets.fast]\n", "[presets.fast]\nvideo = { frame_px = 3 }\n", 1))
    with pytest.raises(PresetError, match="unknown key video.frame_px"):
        PresetBook(broken).get("fast")


def test_cli_lists_presets_and_exits_2_on_a_bad_one(tmp_path: Path):
    listing = run_cli("presets")
    assert listing.returncode == 0
    lines = listing.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == TIERS
    out = tmp_path / "x.mp4"
    bad = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--preset", "turbo")
    assert bad.returncode == 2
    assert bad.stderr.decode().strip().splitlines() == [
        "talkstream: error: unknown preset 'turbo'; valid presets: ultra_fast, fast, balanced, quality"]
    assert not out.exists()
    bad = run_cli("render", PORTRAIT, SPEECH, "-o", out, "--set", "blend.mode=x")
    assert bad.returncode == 2 and "alpha, feather, pyramid, seamless" in bad.stderr.decode()
