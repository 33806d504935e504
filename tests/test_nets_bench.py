"""The networks-only benchmark runs on a bare torch machine: it imports nothing of the media stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow  # SadTalker's networks on the CPU


def test_the_networks_bench_times_both_paths_with_torch_alone(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    code = ("import sys; from stages.nets.bench import main; "
            f"code = main(['--sizes', '128', '--batches', '1', '2', '--iterations', '1', '--warmup', '1', "
            f"'--paths', 'render', 'forward', '--threads', '1', '--json', {str(report)!r}]); "
            "print(' '.join(sorted({name.split('.')[0] for name in sys.modules}))); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr.decode()
    loaded = set(result.stdout.decode().splitlines()[-1].split())
    assert "torch" in loaded and not loaded & {"av", "cv2", "dlib", "librosa", "gfpgan", "basicsr", "aiortc"}
    cases = json.loads(report.read_text())["cases"]
    assert [(case["path"], case["batch"]) for case in cases] == [("render", 1), ("render", 2), ("forward", 1),
                                                                ("forward", 2)]
    assert all(case["error"] is None and case["fps"] > 0 for case in cases)
