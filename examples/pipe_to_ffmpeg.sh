#!/usr/bin/env bash
# Frames go down the pipe as they finish: ffmpeg (or ffplay) starts showing/encoding before the speech has ended.
#   ./examples/pipe_to_ffmpeg.sh [PORTRAIT] [SPEECH] [OUT.mkv]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
portrait=${1:-$here/astronaut.png}
speech=${2:-$here/speech.wav}
out=${3:-talkstream.mkv}
talkstream=$(command -v talkstream || echo "$here/../.venv/bin/talkstream")  # installed, or the quick start's venv

# NUT carries the raw frames and the speech together; ffmpeg encodes both into one file.
"$talkstream" render "$portrait" "$speech" --preset fast -o - --format nut \
    | ffmpeg -hide_banner -loglevel error -y -i - -c:v libx264 -preset veryfast -crf 20 -c:a aac "$out"
echo "wrote $out"

# Live input works the same way: a WAV arriving on standard input is read 20 ms at a time, e.g.
#   some-tts --wav - | talkstream render face.png - -o - --format y4m | ffplay -nodisp -autoexit -
