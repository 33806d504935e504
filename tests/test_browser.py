"""The page in a real browser: headless Chromium (Debian's) opens it, connects with a fake microphone that plays the
example speech, and the avatar's video plays while the server hears the microphone."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from server import ServerSettings, make_app
from tests.conftest import ROOT, SPEECH

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                 "(./scripts/test.sh installs it when run as root)")]


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    test_server = TestServer(make_app(ServerSettings(preset="ultra_fast")), host="127.0.0.1")
    await test_server.start_server()
    yield test_server
    await test_server.close()


async def test_the_page_plays_the_avatar_and_sends_the_microphone(server: TestServer) -> None:
    from playwright.async_api import async_playwright

    base = str(server.make_url("")).rstrip("/")
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update",
             "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
             "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
             f"--use-file-for-fake-audio-capture={SPEECH}", "--autoplay-policy=no-user-gesture-required"]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=flags)
        try:
            page = await browser.new_page()
            await page.goto(base)
            await page.select_option("#preset", "ultra_fast")
            await page.click("#connect")
            await page.wait_for_function(
                "() => { const v = document.querySelector('video');"
                " return v.currentTime > 3 && v.getVideoPlaybackQuality().totalVideoFrames > 50; }",
                timeout=60_000)
            playing = await page.evaluate("() => { const v = document.querySelector('video'); return "
                                          "[v.currentTime, v.getVideoPlaybackQuality().totalVideoFrames, "
                                          "v.videoWidth, v.videoHeight]; }")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "browser-live-avatar.png"))
            assert await page.text_content("#error") == ""
            heard = 0.0
            for _ in range(20):
                metrics = await (await page.request.get(f"{base}/metrics")).text()
                found = re.findall(r'talkstream_speech_received_seconds\{session="[^"]+"\} ([0-9.e+-]+)', metrics)
                heard = max([float(value) for value in found] or [0.0])
                if heard > 1.0:
                    break
                await asyncio.sleep(0.5)
            await page.click("#hangup")
        finally:
            await browser.close()
    current_time, frames, width, height = playing
    assert current_time > 3 and frames > 50 and (width, height) == (512, 512)
    assert heard > 1.0                                       # seconds of microphone speech the session received
