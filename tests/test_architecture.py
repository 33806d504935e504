"""The layers hold: import-linter's contracts (pyproject.toml) and ruff's banned imports for the clients, run here so
the test command enforces them, and shown to fail when a client reaches past the public API; mypy, with every
definition typed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (the dev extra)")
    return str(path)


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("lint-imports"), "--no-cache"], cwd=tree, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(tree), "PATH": str(BIN)})


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_cli_reaching_past_the_public_api_breaks_a_contract(tmp_path: Path) -> None:
    for part in ("stream", "stages", "pyproject.toml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__", "page"))
        else:
            shutil.copy(source, tmp_path / part)
    cli = tmp_path / "stream" / "cli.py"
    cli.write_text(cli.read_text() + "\n\ndef _reader():\n    from stages.audio import AudioReader\n\n"
                   "    return AudioReader\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0
    assert "The runtime knows no stages" in result.stdout and "stream.cli -> stages.audio" in result.stdout


def test_ruff_is_clean_and_bans_stage_modules_in_the_server() -> None:
    ruff = tool("ruff")
    clean = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout
    reaching = "import cv2\nfrom stages.audio import AudioReader\n"
    server = (ROOT / "server.py").read_text().replace("import cv2\n", reaching, 1)
    banned = subprocess.run([ruff, "check", "--stdin-filename", "server.py", "-"], cwd=ROOT, input=server,
                            capture_output=True, text=True, timeout=120)
    assert banned.returncode != 0 and "TID251" in banned.stdout and "stages.session" in banned.stdout


@pytest.mark.slow   # a cold check takes about a minute on two cores
def test_mypy_finds_every_definition_typed_and_consistent() -> None:
    result = subprocess.run([tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
