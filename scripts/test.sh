#!/usr/bin/env bash
# Installs everything (Debian tools when root, the core, every extra, the test tools) into .venv and runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    # ffmpeg/ffplay for the pipe tests, espeak-ng to regenerate the example speech, chromium for the page's test.
    missing=$(for p in ffmpeg espeak-ng chromium; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
    if [ -n "$missing" ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first, then basicsr (gfpgan's dependency, sdist only) without build isolation: its isolated build would
# install a second torch (minutes).
"${pip[@]}" "torch>=2.4,<=2.14.1" "torchvision>=0.19,<=0.29.1" numpy cython
"${pip[@]}" --no-build-isolation "basicsr==1.4.2"
"${pip[@]}" -e ".[all,dev]"
exec .venv/bin/python -m pytest "$@"
