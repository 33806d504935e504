"""`talkstream bench --live`, run as the README's "Measure it" says (one session, a short run): its report holds the
figures the README and the issues quote, and they say a healthy stream."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow  # a server, a peer and a speaker for 15 s
def test_the_live_benchmark_reports_a_steady_stream() -> None:
    result = run_cli("bench", "--live", "1", "--seconds", "15", timeout=180)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["sessions"] == 1 and report["received_fps"][0] >= 22
    sent = report["frames_sent"]
    assert sent["speech"] > 150 and sent["idle"] > 0 and sent["repeated"] <= 2   # 8 s of speech, then interrupted
    (start, end), = report["av_offset_ms_start_end"]
    assert abs(start) < 120 and abs(end - start) < 40          # the video plays with its voice, and stays there
    assert report["server_rss_mb_start_end"][0] > 50
    assert report["interrupt_to_closed_mouth_ms"] is not None and report["interrupt_to_closed_mouth_ms"] < 300
    assert abs(report["mouth_onset_after_voice_ms"]) <= 120
