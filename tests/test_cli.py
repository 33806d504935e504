"""The command line's own promises: every subcommand describes itself, every option says its default, every default
is a real value, and the default preset is one name, the same everywhere."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream.cli import build_parser
from stream.presets import DEFAULT_PRESET, PresetBook
from tests.conftest import ROOT, run_cli

PLAIN = (str, int, float, bool, Path)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_every_subcommand_has_a_description_and_every_option_says_its_default():
    import server

    for name, parser in subcommands().items():
        assert parser.description, f"talkstream {name} has no description"
        options = server.build_parser() if name == "serve" else parser  # serve parses its own options
        for action in options._actions:
            if action.option_strings and action.nargs != 0:  # flags (nargs 0) are off unless given
                assert "default" in (action.help or ""), f"talkstream {name} {action.option_strings[-1]}"
        options.format_help()  # every %(default)s expands


@pytest.mark.parametrize("argv, optional", [
    (["render", "p.png", "a.wav"], {"format", "checkpoints", "enhancer", "seed", "rate"}),
    (["bench"], {"checkpoints", "live", "batch", "latency_ms", "cpu", "json"}),
    (["batch", "jobs.csv"], {"portraits", "audio", "output", "workers", "ray", "report", "checkpoints", "enhancer",
                             "seed"}),
    (["doctor"], {"checkpoints"}),
    (["presets"], set()),
], ids=["render", "bench", "batch", "doctor", "presets"])
def test_defaults_are_plain_values_and_none_only_where_leaving_the_option_out_means_something(
        argv: list[str], optional: set[str]):
    values = vars(build_parser().parse_args(argv))
    assert {name for name, value in values.items() if value is None} == optional
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        assert all(item is None or isinstance(item, PLAIN) for item in items), f"--{name}: {value!r}"


def test_the_default_preset_is_one_name_everywhere():
    from stages.session import Avatar, load_preset

    assert DEFAULT_PRESET in PresetBook().names
    assert build_parser().parse_args(["render", "p.png", "a.wav"]).preset == DEFAULT_PRESET
    assert load_preset()[0].name == DEFAULT_PRESET
    assert inspect.signature(Avatar.prepare).parameters["preset"].default == DEFAULT_PRESET


def test_presets_marks_the_default_once():
    result = run_cli("presets")
    assert result.returncode == 0, result.stderr.decode()
    marked = [line for line in result.stdout.decode().splitlines() if "default" in line]
    assert len(marked) == 1 and marked[0].split()[0] == DEFAULT_PRESET and marked[0].count("default") == 1, marked


def test_bench_counts_one_warm_run_in_the_singular():
    result = run_cli("bench", "--presets", "ultra_fast", "--seconds", "1", "--runs", "1")
    assert result.returncode == 0, result.stderr.decode()
    assert "ultra_fast, 1 warm run each" in result.stdout.decode()


@pytest.mark.slow  # doctor renders a second of speech
def test_doctor_checks_what_serve_needs_and_says_how_to_get_the_programs_the_pipes_use():
    path = Path(sys.executable).parent  # no ffmpeg, no ffplay
    result = subprocess.run([sys.executable, "-m", "stream.cli", "doctor"], capture_output=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PATH": str(path)})
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and lines[-1] == "talkstream doctor: all required checks passed", lines
    for package in ("aiohttp", "aiortc"):
        assert any(line.split()[:2] == ["ok", package] for line in lines), lines
    for program in ("ffmpeg", "ffplay"):
        check = next(index for index, line in enumerate(lines) if line.split()[1:2] == [program])
        assert lines[check].split()[0] == "--" and "apt install ffmpeg" in lines[check + 1], lines[check: check + 2]
