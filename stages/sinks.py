"""Where finished frames go: an encoded file (MP4, QuickTime, Matroska: H.264 + AAC; WebM: VP9 + Opus), or a pipe
(NUT with audio, Y4M or raw BGR video).

Sinks are synchronous (the caller runs `write` off the event loop). A file is written under a temporary name and
renamed only when complete, so an error or Ctrl-C never leaves a half-written file that looks finished.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO

import av
import cv2
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from stages.audio import OPUS_RATE_HZ, layout_of
from stream.errors import OutputError
from stream.frames import StreamInfo, VideoFrame
from stream.presets import EncodeSettings

PIPE_FORMATS = ("nut", "y4m", "rawvideo")


class Sink(Protocol):
    def write(self, frame: VideoFrame) -> None: ...

    def close(self) -> None:
        """Finish the output (flush encoders, rename into place)."""

    def abort(self) -> None:
        """Stop without presenting the output as good (delete a temporary file)."""


class _I420:
    """BGR -> planar YUV 4:2:0 (limited range) with cv2 (`to_i420`), 5x faster than letting swscale convert bgr24.

    When a frame says which region `changed` from the portrait, only that region (and the one changed before it,
    which must return to the portrait) is converted into the previous result: the face, not the whole frame.
    """

    def __init__(self, width: int, height: int, to_i420: Callable[[np.ndarray], np.ndarray]) -> None:
        self.width, self.height = width, height
        self._to_i420 = to_i420
        self.buffer: np.ndarray | None = None
        self._previous: tuple[int, int, int, int] | None = None

    def convert(self, frame: VideoFrame) -> np.ndarray:
        changed = frame.changed
        if self.buffer is None or changed is None or self._previous is None:
            self.buffer = self._to_i420(frame.image)
        else:
            x0, y0, x1, y1 = _even_union(changed, self._previous, self.width, self.height)
            part = self._to_i420(np.ascontiguousarray(frame.image[y0:y1, x0:x1]))
            planes = zip(_planes(self.buffer, self.height, self.width), _planes(part, y1 - y0, x1 - x0), (1, 2, 2))
            for whole, region, scale in planes:
                whole[y0 // scale: y1 // scale, x0 // scale: x1 // scale] = region
        self._previous = changed
        return self.buffer


def _bt601_i420(image: np.ndarray) -> np.ndarray:
    """cv2's conversion (BT.601): what readers of untagged Y4M assume."""
    return cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)


_KR, _KB = 0.2126, 0.0722
_LUMA = np.array([_KB, 1 - _KR - _KB, _KR])  # B, G, R weights
# BT.709 limited range, rows Y, Cb, Cr over (B, G, R, 1): Y in 16-235, Cb and Cr in 16-240.
_BT709 = np.array([[*(219 / 255 * _LUMA), 16],
                   [*(224 / 255 / (2 - 2 * _KB) * (np.array([1, 0, 0]) - _LUMA)), 128],
                   [*(224 / 255 / (2 - 2 * _KR) * (np.array([0, 0, 1]) - _LUMA)), 128]], np.float32)


def _bt709_i420(image: np.ndarray) -> np.ndarray:
    """BT.709, as the encoded files are tagged (cv2 has no BT.709 I420): chroma from 2x2 averages."""
    height, width = image.shape[:2]
    i420 = np.empty((height * 3 // 2, width), np.uint8)
    luma, cb, cr = _planes(i420, height, width)
    cv2.transform(image, _BT709[:1], dst=luma)
    half = cv2.resize(image, (width // 2, height // 2), interpolation=cv2.INTER_AREA)
    cv2.transform(half, _BT709[1:2], dst=cb)
    cv2.transform(half, _BT709[2:], dst=cr)
    return i420


def _even_union(a: tuple[int, int, int, int], b: tuple[int, int, int, int], width: int,
                height: int) -> tuple[int, int, int, int]:
    """The union of two boxes grown to even coordinates (4:2:0 chroma covers 2x2 pixels)."""
    x0, y0 = min(a[0], b[0]) & ~1, min(a[1], b[1]) & ~1
    x1, y1 = min(max(a[2], b[2]) + 1 & ~1, width), min(max(a[3], b[3]) + 1 & ~1, height)
    return x0, y0, x1, y1


def _planes(i420: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V views of cv2's packed I420 layout."""
    flat = i420.reshape(-1)
    luma, quarter = height * width, height * width // 4
    return (flat[:luma].reshape(height, width), flat[luma: luma + quarter].reshape(height // 2, width // 2),
            flat[luma + quarter: luma + 2 * quarter].reshape(height // 2, width // 2))


def _audio_frame(speech: np.ndarray, info: StreamInfo, pts: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(speech).reshape(1, -1), format="s16",
                                       layout=layout_of(info.speech_channels))
    frame.sample_rate = info.speech_rate_hz
    frame.pts = pts
    return frame


@dataclass(frozen=True, slots=True)
class _Codecs:
    """What a muxer's two encoders are given."""

    video: str
    pix_fmt: str
    audio: str
    video_options: dict[str, str] = field(default_factory=dict)
    audio_options: dict[str, str] = field(default_factory=dict)
    audio_bitrate: int | None = None
    audio_rate_hz: int | None = None  # None: the speech's own rate
    audio_format: str | None = None  # None: the encoder's first


def _h264_aac(encode: EncodeSettings) -> _Codecs:
    return _Codecs(encode.video_codec, "yuv420p", encode.audio_codec,
                   {"preset": encode.x264_preset, "tune": encode.x264_tune, "crf": str(encode.crf),
                    "g": str(encode.gop_frames)},
                   {"aac_coder": encode.aac_coder}, encode.audio_bitrate_kbps * 1000)


def _vp9_opus(encode: EncodeSettings) -> _Codecs:
    """libvpx at its realtime speed (about x264's ultrafast); the preset's CRF carried from x264's 0-51 scale to
    VP9's 0-63 (constant quality: no bitrate). Opus takes 48 kHz (the speech is resampled)."""
    return _Codecs("libvpx-vp9", "yuv420p", "libopus",
                   {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                    "crf": str(round(encode.crf * 63 / 51)), "b": "0", "g": str(encode.gop_frames)},
                   audio_bitrate=encode.audio_bitrate_kbps * 1000, audio_rate_hz=OPUS_RATE_HZ)


@dataclass(frozen=True, slots=True)
class _FileFormat:
    muxer: str  # ffmpeg's name
    codecs: Callable[[EncodeSettings], _Codecs]
    options: dict[str, str] = field(default_factory=dict)


# The index before the media (faststart): players and browsers start an MP4 or MOV before all of it has arrived.
_FASTSTART = {"movflags": "+faststart"}
ENCODED_FORMATS = {"mp4": _FileFormat("mp4", _h264_aac, _FASTSTART), "mov": _FileFormat("mov", _h264_aac, _FASTSTART),
                "mkv": _FileFormat("matroska", _h264_aac), "webm": _FileFormat("webm", _vp9_opus)}


class _Muxer:
    """A PyAV container with one video and one audio stream, fed frame by frame with the frame's speech.

    YUV video is converted and tagged BT.709, limited range (players guess BT.601 for untagged SD video)."""

    def __init__(self, container: av.container.OutputContainer, info: StreamInfo, codecs: _Codecs) -> None:
        self.container = container
        self.info = info
        # The codec names are plain strings, so PyAV's stubs return a union: narrow each stream to its kind.
        video = container.add_stream(codecs.video, rate=info.fps, options=codecs.video_options)
        if not isinstance(video, av.VideoStream):
            raise OutputError(f"{codecs.video} is not a video encoder")
        self.video = video
        self.video.width, self.video.height = info.width, info.height
        self.video.pix_fmt = codecs.pix_fmt
        context = self.video.codec_context
        context.thread_count = 1  # one thread per library: parallelism comes from pipelining
        context.time_base = 1 / info.fps
        audio = container.add_stream(codecs.audio, rate=codecs.audio_rate_hz or info.speech_rate_hz,
                                     options=codecs.audio_options)
        if not isinstance(audio, av.AudioStream):
            raise OutputError(f"{codecs.audio} is not an audio encoder")
        self.audio = audio
        self.audio.layout = layout_of(info.speech_channels)
        if codecs.audio_format:
            self.audio.format = codecs.audio_format
        if codecs.audio_bitrate:
            self.audio.bit_rate = codecs.audio_bitrate
        self._audio_pts = 0
        self._i420 = None
        if codecs.pix_fmt == "yuv420p":
            self._i420 = _I420(info.width, info.height, _bt709_i420)
            context.color_primaries, context.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
            context.colorspace, context.color_range = Colorspace.ITU709, ColorRange.MPEG

    def write(self, frame: VideoFrame) -> None:
        if self._i420 is not None:
            picture = av.VideoFrame.from_ndarray(self._i420.convert(frame), format="yuv420p")
        else:
            picture = av.VideoFrame.from_ndarray(frame.image, format="bgr24")
        picture.pts = frame.index
        self.container.mux(self.video.encode(picture))
        if len(frame.speech):
            self.container.mux(self.audio.encode(_audio_frame(frame.speech, self.info, self._audio_pts)))
            self._audio_pts += len(frame.speech)

    def finish(self) -> None:
        self.container.mux(self.video.encode(None))
        self.container.mux(self.audio.encode(None))
        self.container.close()


def discard_partial(path: str | Path) -> None:
    """Remove what an output's stopped writer left (its temporary files), for a writer killed before it could."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.*{PARTIAL_SUFFIX}"):
        leftover.unlink(missing_ok=True)


PARTIAL_SUFFIX = ".part"


class _Temporary:
    """A file beside `path`, renamed onto it by `publish()` (with the usual permissions), deleted by `discard()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent)
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from error
        os.close(handle)
        self.name = Path(name)

    def publish(self) -> None:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.name, 0o666 & ~umask)  # mkstemp makes it private; the output is an ordinary file
        os.replace(self.name, self.path)

    def discard(self) -> None:
        self.name.unlink(missing_ok=True)


class EncodedFileSink:
    """An encoded file (`ENCODED_FORMATS`), written to a temporary file beside `path` and renamed on success."""

    def __init__(self, path: Path, fmt: str, info: StreamInfo, encode: EncodeSettings) -> None:
        self.path = path
        self._temporary = _Temporary(path)
        file_format = ENCODED_FORMATS[fmt]
        try:
            container = av.open(str(self._temporary.name), "w", format=file_format.muxer,
                                options=file_format.options)
            self._muxer = _Muxer(container, info, file_format.codecs(encode))
        except BaseException:
            self._temporary.discard()
            raise
        self.frames = 0

    def write(self, frame: VideoFrame) -> None:
        self._muxer.write(frame)
        self.frames += 1

    def close(self) -> None:
        try:
            self._muxer.finish()
            self._temporary.publish()
        except OSError as error:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {error.strerror or error}") from error

    def abort(self) -> None:
        try:
            self._muxer.container.close()
        except (av.FFmpegError, OSError, ValueError):
            pass  # the file is deleted either way
        self._temporary.discard()


class PipeSink:
    """Frames to a byte stream as they finish, each one flushed: `nut` (raw video + WavPack audio), `y4m`, `rawvideo`.

    NUT has no field for a channel layout: its audio is WavPack, lossless, whose decoder reports the layout (readers of
    PCM in NUT guess it, and ffmpeg warns). One block a frame keeps the audio beside its frame.
    """

    def __init__(self, stream: BinaryIO, info: StreamInfo, fmt: str, *, log: TextIO | None = None) -> None:
        if fmt not in PIPE_FORMATS:
            raise OutputError(f"unknown pipe format {fmt!r}; valid formats: {', '.join(PIPE_FORMATS)}")
        self.stream = stream
        self.info = info
        self.format = fmt
        self.frames = 0
        self._muxer: _Muxer | None = None
        self._i420 = _I420(info.width, info.height, _bt601_i420) if fmt == "y4m" else None
        if fmt == "nut":
            # flush_packets: every packet goes down the pipe at once instead of waiting for a full buffer.
            container = av.open(stream, "w", format="nut", options={"flush_packets": "1"})
            block = str(max(1, round(info.speech_rate_hz / info.fps)))
            self._muxer = _Muxer(container, info, _Codecs("rawvideo", "bgr24", "wavpack", audio_format="s16p",
                                                          audio_options={"frame_size": block}))
        elif fmt == "y4m":
            rate = info.fps
            self._write(f"YUV4MPEG2 W{info.width} H{info.height} F{rate.numerator}:{rate.denominator} Ip A1:1 "
                        "C420jpeg\n".encode())
        else:
            print(f"rawvideo: bgr24 {info.width}x{info.height} at {info.fps} fps "
                  f"(ffmpeg -f rawvideo -pix_fmt bgr24 -s {info.width}x{info.height} -r {info.fps} -i -)",
                  file=log or sys.stderr, flush=True)

    def _write(self, data: bytes | memoryview) -> None:
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError as error:
            raise OutputError("the reading end of the pipe was closed") from error

    def write(self, frame: VideoFrame) -> None:
        if self._muxer is not None:
            try:
                self._muxer.write(frame)
                self.stream.flush()
            except BrokenPipeError as error:
                raise OutputError("the reading end of the pipe was closed") from error
        elif self._i420 is not None:
            self._write(b"FRAME\n" + self._i420.convert(frame).tobytes())
        else:
            # memoryview(array) is the same, but numpy's stubs give arrays the buffer protocol only on Python 3.12+.
            self._write(np.ascontiguousarray(frame.image).data.cast("B"))
        self.frames += 1

    def close(self) -> None:
        try:
            if self._muxer is not None:
                self._muxer.finish()
            self.stream.flush()
        except BrokenPipeError as error:
            raise OutputError("the reading end of the pipe was closed") from error

    def abort(self) -> None:
        """A pipe cannot be taken back; the reader sees the stream end early."""
        if self._muxer is not None:
            try:
                self._muxer.container.close()
            except (av.FFmpegError, OSError, ValueError):
                pass  # the reader may already be gone


def check_writable(path: Path) -> None:
    """Fail before any work when the output cannot be created."""
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"cannot write {path}: permission denied")


class _AtomicStreamFile:
    """A pipe format written to a file: a PipeSink over a temporary file renamed into place on success."""

    def __init__(self, path: Path, info: StreamInfo, fmt: str) -> None:
        self._temporary = _Temporary(path)
        self._file = open(self._temporary.name, "wb")  # noqa: SIM115 - closed by close() or abort()
        try:
            self._sink = PipeSink(self._file, info, fmt)
        except BaseException:
            self.abort_file()
            raise

    def write(self, frame: VideoFrame) -> None:
        self._sink.write(frame)

    def close(self) -> None:
        self._sink.close()
        self._file.close()
        self._temporary.publish()

    def abort(self) -> None:
        self._sink.abort()
        self.abort_file()

    def abort_file(self) -> None:
        self._file.close()
        self._temporary.discard()


def open_sink(target: Path | BinaryIO, fmt: str, info: StreamInfo, encode: EncodeSettings) -> Sink:
    """The sink for `-o`: an encoded file or a pipe format, to a file (atomically) or to a stream such as stdout."""
    if not isinstance(target, Path):
        return PipeSink(target, info, fmt)
    if fmt in ENCODED_FORMATS:
        return EncodedFileSink(target, fmt, info, encode)
    return _AtomicStreamFile(target, info, fmt)
