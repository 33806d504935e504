"""The page in a real browser: headless Chromium (Debian's) against `talkstream serve` run as a user runs it. The page
takes its presets from the server, reports the server's errors, connects with a fake microphone that plays the example
speech (the avatar's video plays while the server hears the microphone), and off localhost connects without it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, SPEECH

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update",
         "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
         f"--use-file-for-fake-audio-capture={SPEECH}", "--autoplay-policy=no-user-gesture-required"]
PLAYING = ("() => { const v = document.querySelector('video');"
           " return v.currentTime > 3 && v.getVideoPlaybackQuality().totalVideoFrames > 50; }")
# what Chromium logs for every HTTP error a fetch gets: expected where the test makes the server fail
HTTP_ERROR = re.compile(r"Failed to load resource: the server responded with a status of 5\d\d")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                 "(./scripts/test.sh installs it when run as root)")]


def _serve(log: Path, address: str, *args: str) -> Iterator[str]:
    """`talkstream serve --preset balanced ARGS` on a free port until the test ends; yields its URL at `address`."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "stream.cli", "serve", "--port", str(port),
                                    "--preset", "balanced", *args], stdout=output, stderr=subprocess.STDOUT,
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    base = f"http://{address}:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/healthz", timeout=1):
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield base
    finally:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory.mktemp("server") / "server.log", "127.0.0.1")


@pytest.fixture
def lan_server(tmp_path: Path) -> Iterator[str]:
    """The server on every interface, at this machine's network address: no secure context for a page there."""
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no network address besides loopback")
    yield from _serve(tmp_path / "server.log", address, "--host", "0.0.0.0")


def _lan_address() -> str | None:
    """This machine's address on its network (no packet leaves: a UDP socket only picks its route), else None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 1))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@contextlib.asynccontextmanager
async def _chromium() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


def _console_errors(page: Any) -> list[str]:
    """Errors the page logs or throws from now on (a missing favicon would be one)."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    return errors


# Seconds of speech each session received, by the front's /metrics (every sample labelled with its worker).
HEARD = r'(?m)^talkstream_speech_received_seconds\{worker="\d+",session="[^"]+"\} (\S+)$'


async def _metric(page: Any, base: str, pattern: str) -> list[float]:
    text = await (await page.request.get(f"{base}/metrics")).text()
    return [float(value) for value in re.findall(pattern, text)]


async def _sessions_become_zero(page: Any, base: str) -> bool:
    for _ in range(20):
        if await _metric(page, base, r"(?m)^talkstream_front_sessions (\S+)$") == [0.0]:
            return True
        await asyncio.sleep(0.25)
    return False


async def _open(page: Any, url: str) -> None:
    await page.goto(url)
    await page.wait_for_function("() => document.querySelector('#status').textContent === 'not connected'")


async def test_the_page_takes_its_presets_from_the_server_and_shows_its_errors(server: str) -> None:
    async with _chromium() as browser:
        page = await browser.new_page()
        errors = _console_errors(page)
        await _open(page, server)
        config = await (await page.request.get(f"{server}/api/config")).json()
        presets = await page.eval_on_selector_all("#preset option", "options => options.map(o => o.value)")
        examples = await page.eval_on_selector_all("#example option", "options => options.map(o => o.value)")
        chosen = await page.input_value("#preset")
        assert await page.is_hidden("#mic-note")                   # 127.0.0.1 is a secure context

        await page.set_input_files("#speech", SPEECH)
        before_connect = await page.text_content("#error")
        assert await page.input_value("#speech") == ""            # the same file again is a change again

        await page.route("**/api/sessions", lambda route: route.fulfill(
            status=500, content_type="application/json", body=json.dumps({"error": "boom from the server"})))
        await page.click("#connect")
        await page.wait_for_selector("#connect:enabled")
        json_error = await page.text_content("#error")
        await page.unroute("**/api/sessions")
        await page.route("**/api/sessions", lambda route: route.fulfill(
            status=502, content_type="text/html", body="<html><body>Bad Gateway</body></html>"))
        await page.click("#connect")
        await page.wait_for_selector("#connect:enabled")
        html_error = await page.text_content("#error")
        await page.unroute("**/api/sessions")

        # a session made and then refused its offer is deleted: none is left half-made
        await page.route("**/offer", lambda route: route.fulfill(
            status=500, content_type="application/json", body=json.dumps({"error": "no offer today"})))
        await page.click("#connect")
        await page.wait_for_selector("#connect:enabled", timeout=90_000)
        offer_error = await page.text_content("#error")
        created = await _metric(page, server, r"(?m)^talkstream_front_sessions_created_total (\S+)$")
        left_none = await _sessions_become_zero(page, server)
        connect_enabled = await page.is_enabled("#connect")
        status = await page.text_content("#status")
    assert config["preset"] == "balanced" and chosen == "balanced"   # `serve --preset balanced`
    assert presets == config["presets"] and "ultra_fast" in presets
    assert examples == config["examples"] == ["astronaut"]
    assert before_connect == "connect first, then say a file"
    assert json_error == "boom from the server"
    assert html_error == "HTTP 502 Bad Gateway"
    assert offer_error == "no offer today"
    assert created == [1.0] and left_none
    assert connect_enabled and status == "not connected"
    # the three failures made above, each logged (so the page's other errors, a favicon's 404, would be seen)
    assert len(errors) == 3 and all(HTTP_ERROR.search(error) for error in errors), errors


async def test_the_page_plays_the_avatar_and_sends_the_microphone(server: str) -> None:
    async with _chromium() as browser:
        page = await browser.new_page()
        errors = _console_errors(page)
        await _open(page, server)
        # every status the page shows, with whether Connect could be clicked then
        await page.evaluate("""() => {
            window.seen = [];
            new MutationObserver(() => window.seen.push([document.querySelector('#status').textContent,
                                                         document.querySelector('#connect').disabled]))
                .observe(document.querySelector('#status'), {childList: true, characterData: true, subtree: true});
        }""")
        await page.click("#connect")
        await page.wait_for_function(PLAYING, timeout=90_000)
        await page.wait_for_function("() => document.querySelector('#status').textContent === 'connected'")
        playing = await page.evaluate("() => { const v = document.querySelector('video'); return "
                                      "[v.currentTime, v.getVideoPlaybackQuality().totalVideoFrames, "
                                      "v.videoWidth, v.videoHeight]; }")
        seen = await page.evaluate("() => window.seen")
        error_shown = await page.text_content("#error")
        heard = 0.0
        for _ in range(20):
            heard = max(await _metric(page, server, HEARD) or [0.0])
            if heard > 1.0:
                break
            await asyncio.sleep(0.5)
        said = []
        for _ in range(2):                                          # the same file twice: two requests
            async with page.expect_response(lambda response: response.url.endswith("/speak")) as answer:
                await page.set_input_files("#speech", SPEECH)
            said.append((await answer.value).status)
        await page.click("#mute")
        muted = await page.evaluate("() => document.querySelector('video').muted")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-live-avatar.png"), full_page=True)
        await page.click("#hangup")
        left_none = await _sessions_become_zero(page, server)
        connect_enabled = await page.is_enabled("#connect")
    current_time, frames, width, height = playing
    assert current_time > 3 and frames > 50 and (width, height) == (512, 512)
    assert heard > 1.0                                       # seconds of microphone speech the session received
    statuses = [text for text, _ in seen]
    assert statuses[:3] == ["opening the microphone…", "preparing the avatar…", "connecting…"]
    assert "connected" in statuses and all(disabled for _, disabled in seen)
    assert error_shown == ""
    assert said == [200, 200] and muted
    assert left_none and connect_enabled
    assert errors == []


async def test_off_localhost_the_page_connects_without_the_microphone(lan_server: str) -> None:
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    async with _chromium() as browser:
        page = await browser.new_page()
        errors = _console_errors(page)
        await _open(page, lan_server)
        secure = await page.evaluate("() => window.isSecureContext")
        note = await page.text_content("#mic-note") if await page.is_visible("#mic-note") else None
        microphone_offered = await page.is_enabled("#mic")
        await page.click("#connect")
        try:
            await page.wait_for_function(PLAYING, timeout=90_000)
        except PlaywrightTimeout:
            pytest.fail(f"no video off localhost: the page says {await page.text_content('#status')!r}, "
                        f"{await page.text_content('#error')!r}")
        status, error_shown = await page.text_content("#status"), await page.text_content("#error")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-off-localhost.png"), full_page=True)
        heard = await _metric(page, lan_server, HEARD)
        await page.goto("about:blank")                      # leaving the page hangs up too (pagehide)
        left_none = await _sessions_become_zero(page, lan_server)
    assert not secure and not microphone_offered
    assert note == "the microphone needs HTTPS or localhost; connecting without it"
    assert status == "connected" and error_shown == ""
    assert heard == [0.0]                                   # no microphone track: recvonly audio
    assert left_none
    assert errors == []



@pytest.fixture
def pipecat_example(tmp_path: Path) -> Iterator[str]:
    """examples/pipecat_avatar.py on a free port, saying its line every 3 s; its URL."""
    pytest.importorskip("pipecat", reason="the pipecat extra")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "example.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "examples/pipecat_avatar.py", "--port", str(port), "--every", "3"],
                                   stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the example did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.kill()
        process.wait()


async def test_the_pipecat_examples_page_plays_the_face(pipecat_example: str) -> None:
    """The page the example serves, in Chromium, plays the face that pipecat's SmallWebRTC transport sends, with
    its voice."""
    async with _chromium() as browser:
        page = await browser.new_page()
        errors = _console_errors(page)
        await page.goto(pipecat_example)
        await page.wait_for_function(PLAYING, timeout=90_000)
        state = await page.text_content("#state")
        playing = await page.evaluate("""() => { const v = document.querySelector('video');
            return [v.videoWidth, v.videoHeight, v.srcObject.getAudioTracks().length]; }""")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "pipecat_example.png"))
    assert state == "connected" and playing == [512, 512, 1]
    assert not errors, errors
