"""Audio in: decode anything ffmpeg reads (file, pipe, stdin), keep the speech as it came, and cut its 16 kHz mono
float copy into 20 ms chunks for the features.

Live input never waits on PyAV's probe buffer: a WAV header or raw PCM on a pipe is parsed here and passed on in
small reads (PyAV probing a piped WAV holds 1.5-5 s of audio before the first sample comes out).
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from stream.clock import resampled_length, samples_of_ms
from stream.errors import InputError
from stream.frames import AudioChunk
from stream.pipeline import Stage

FEATURE_RATE_HZ = 16000
# Sample rates AAC carries; speech at another rate goes out at 48 kHz.
AAC_RATES_HZ = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)
OPUS_RATE_HZ = 48000   # the one rate Opus codes at: WebM files and the live voice
FALLBACK_RATE_HZ = OPUS_RATE_HZ
_WAVE_FORMAT_PCM, _WAVE_FORMAT_FLOAT, _WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE
_LIVE_READ_MS = 20
_MAX_HOPS = 50  # a chunk from a file holds at most a second of hops: bounded memory and steady flow


@dataclass(frozen=True, slots=True)
class SpeechFormat:
    """The speech as it goes to the sinks: int16 at `rate_hz`, `channels` interleaved."""

    rate_hz: int
    channels: int


def output_format(rate_hz: int, channels: int) -> SpeechFormat:
    """Keep the input's own rate when AAC carries it (else 48 kHz); keep mono or stereo, fold more to mono
    (surround speech sits mostly in the centre channel: a stereo pick of two channels would lose it)."""
    return SpeechFormat(rate_hz if rate_hz in AAC_RATES_HZ else FALLBACK_RATE_HZ, 2 if channels == 2 else 1)


def layout_of(channels: int) -> str:
    return "stereo" if channels == 2 else "mono"


def notice_on_stderr(message: str) -> None:
    print(f"talkstream: {message}", file=sys.stderr)


class AudioReader:
    """Blocking source of speech blocks, int16 (n, channels) in `format`: run it on a worker thread.

    `source` is a path, or a binary stream such as stdin. On a stream a WAV header or raw PCM (`raw_rate_hz`) is read
    here in 20 ms pieces so live speech flows at once; anything else is probed by PyAV. Messages call it `name`
    (default: the path, or "standard input"); `notice` hears of audio that is usable but not as declared.
    """

    def __init__(self, source: str | Path | BinaryIO, *, raw_rate_hz: int | None = None, raw_channels: int = 1,
                 name: str | None = None, notice: Callable[[str], None] = notice_on_stderr):
        is_path = isinstance(source, (str, Path))
        self.name = name or (str(source) if is_path else "standard input")
        self._notice = notice
        # Raw PCM looks like nothing to a probe: standard input (unnamed: the command line's) says how to pass it.
        self._hint = "; for raw s16le PCM give --rate HZ" if name is None and not is_path else ""
        self._blocks: Iterator[SpeechFormat | np.ndarray]   # the format first, then int16 (samples, channels) blocks
        if isinstance(source, (str, Path)):
            self._blocks = self._from_container(source)
        elif raw_rate_hz is not None:
            if raw_rate_hz < 1000 or raw_channels < 1:
                raise InputError(f"raw input needs a rate of at least 1000 Hz and at least one channel, got "
                                 f"{raw_rate_hz} Hz and {raw_channels} channels")
            self._blocks = self._from_pcm(source, raw_rate_hz, raw_channels, "s16", None)
        else:
            head = _read_exactly(source, 12)
            if not head:
                raise InputError(f"{self.name} is empty{self._hint}")
            if _is_wav(head):
                self._blocks = self._from_wav(source)
            else:
                self._blocks = self._from_container(_Prefixed(head, source))
        self.duration_s: float | None = None  # known for files, None for live streams
        first = next(self._blocks)
        assert isinstance(first, SpeechFormat)
        self.format = first
        self.samples = 0

    def read(self) -> np.ndarray | None:
        """The next block of speech, or None at the end. Raises `InputError` for corrupt or empty audio."""
        block = next(self._blocks, None)
        if block is None:
            if self.samples == 0:
                raise InputError(f"{self.name} contains no audio samples")
            return None
        assert isinstance(block, np.ndarray)
        self.samples += len(block)
        return block

    def _from_container(self, source: str | Path | BinaryIO | _Prefixed) -> Iterator[SpeechFormat | np.ndarray]:
        try:
            container = av.open(source if not isinstance(source, Path) else str(source), "r")
        except FileNotFoundError as error:
            raise InputError(f"audio file not found: {self.name}") from error
        except (av.FFmpegError, OSError, UnicodeDecodeError) as error:
            raise InputError(f"cannot read {self.name} as audio ({_reason(error)}){self._hint}") from error
        with container:
            if not container.streams.audio:
                raise InputError(f"{self.name} has no audio stream")
            stream = container.streams.audio[0]
            speech = output_format(stream.rate or FALLBACK_RATE_HZ, stream.channels or 1)
            if isinstance(source, (str, Path)) and Path(source).is_file():   # a FIFO must not be read twice
                self._check_wav_length(Path(source))
                if container.duration:
                    self.duration_s = container.duration / av.time_base
            yield speech
            to_speech = av.AudioResampler("s16", layout_of(speech.channels), speech.rate_hz)
            try:
                for frame in container.decode(stream):
                    for out in to_speech.resample(frame):
                        yield out.to_ndarray().reshape(-1, speech.channels)
                for out in to_speech.resample(None):
                    yield out.to_ndarray().reshape(-1, speech.channels)
            except (av.FFmpegError, ValueError) as error:
                raise InputError(f"{self.name} is corrupt ({_reason(error)})") from error

    def _from_wav(self, stream: BinaryIO) -> Iterator[SpeechFormat | np.ndarray]:
        wav = _read_wav_header(stream, self.name)
        codec = _wav_codec(wav.tag, wav.bits)
        if codec is None or wav.channels < 1 or wav.rate_hz < 1000:
            raise InputError(f"{self.name}: unsupported WAV encoding (format {wav.tag}, {wav.bits} bits)")
        yield from self._from_pcm(stream, wav.rate_hz, wav.channels, codec, wav.data_bytes)

    def _check_wav_length(self, path: Path) -> None:
        """PyAV reads a WAV file cut short to its end without a word: say that it is shorter than declared."""
        with open(path, "rb") as file:
            if not _is_wav(_read_exactly(file, 12)):
                return
            try:
                wav = _read_wav_header(file, self.name)
            except InputError:
                return  # PyAV made sense of it
            held = os.fstat(file.fileno()).st_size - file.tell()
        if wav.data_bytes and wav.byte_rate and held < wav.data_bytes:
            self._cut_short(held, wav.data_bytes, wav.byte_rate)

    def _cut_short(self, held_bytes: int, declared_bytes: int, bytes_per_s: int) -> None:
        held_s = held_bytes / bytes_per_s
        self._notice(f"{self.name} holds {held_s:.2f} s of audio but its header declares "
                     f"{declared_bytes / bytes_per_s:.2f} s (a cut-off file?); rendering the {held_s:.2f} s it holds")

    def _from_pcm(
        self, stream: BinaryIO, rate_hz: int, channels: int, codec: str, limit: int | None
    ) -> Iterator[SpeechFormat | np.ndarray]:
        """PCM in 20 ms reads (`read1` returns what has arrived), up to `limit` bytes when the size is known."""
        speech = output_format(rate_hz, channels)
        yield speech
        sample_bytes = _PCM_BYTES[codec]
        frame_bytes = sample_bytes * channels
        read_bytes = max(frame_bytes, samples_of_ms(_LIVE_READ_MS, rate_hz) * frame_bytes)
        resample = None if speech.rate_hz == rate_hz else av.AudioResampler("s16", layout_of(speech.channels),
                                                                             speech.rate_hz)
        read1 = getattr(stream, "read1", stream.read)
        pending, remaining = b"", limit
        while (remaining is None or remaining > 0) and (data := read1(min(read_bytes, remaining or read_bytes))):
            if remaining is not None:
                remaining -= len(data)
            pending += data
            usable = len(pending) - len(pending) % frame_bytes
            if not usable:
                continue
            samples = _to_int16(pending[:usable], codec).reshape(-1, channels)
            pending = pending[usable:]
            yield from _fit(samples, speech, rate_hz, resample)
        if limit is not None and remaining:
            self._cut_short(limit - remaining, limit, rate_hz * frame_bytes)
        if resample is not None:
            for out in resample.resample(None):
                yield out.to_ndarray().reshape(-1, speech.channels)


_PCM_BYTES = {"u8": 1, "s16": 2, "s24": 3, "s32": 4, "f32": 4}


def wav_bytes(samples: np.ndarray, rate_hz: int) -> bytes:
    """int16 mono samples as a WAV file."""
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate_hz)
        writer.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return out.getvalue()


def _is_wav(head: bytes) -> bool:
    return head[:4] == b"RIFF" and head[8:12] == b"WAVE"


@dataclass(frozen=True, slots=True)
class _WavHeader:
    tag: int
    channels: int
    rate_hz: int
    byte_rate: int
    bits: int
    data_bytes: int | None = None  # None: the data runs to the end


def _read_wav_header(stream: BinaryIO, name: str) -> _WavHeader:
    """The chunks after "RIFF....WAVE" up to the data, which the stream is then at."""
    wav = None
    while True:
        header = _read_exactly(stream, 8)
        if len(header) < 8:
            raise InputError(f"{name}: WAV header ends before its data")
        chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
        if chunk_id == b"fmt ":
            fmt = _read_exactly(stream, size + (size & 1))
            if len(fmt) < 16:
                raise InputError(f"{name}: truncated WAV format chunk")
            tag, channels, rate, byte_rate, _, bits = struct.unpack("<HHIIHH", fmt[:16])
            if tag == _WAVE_FORMAT_EXTENSIBLE and len(fmt) >= 26:
                tag = struct.unpack("<H", fmt[24:26])[0]
            wav = _WavHeader(tag, channels, rate, byte_rate, bits)
        elif chunk_id == b"data":
            if wav is None:
                raise InputError(f"{name}: WAV data before its format chunk")
            # Streaming writers leave the size 0 or at its maximum: then the data runs to the end.
            return replace(wav, data_bytes=None if size in (0, 0xFFFFFFFF) else size)
        else:
            _read_exactly(stream, size + (size & 1))


def _wav_codec(tag: int, bits: int) -> str | None:
    if tag == _WAVE_FORMAT_PCM:
        return {8: "u8", 16: "s16", 24: "s24", 32: "s32"}.get(bits)
    if tag == _WAVE_FORMAT_FLOAT and bits == 32:
        return "f32"
    return None


def _to_int16(data: bytes, codec: str) -> np.ndarray:
    """Little-endian PCM bytes -> int16 samples (the top 16 bits of wider integers)."""
    if codec == "s16":
        return np.frombuffer(data, "<i2")
    if codec == "u8":
        return ((np.frombuffer(data, np.uint8).astype(np.int16) - 128) << 8).astype(np.int16)
    if codec == "s24":
        return np.ascontiguousarray(np.frombuffer(data, np.uint8).reshape(-1, 3)[:, 1:]).view("<i2").reshape(-1)
    if codec == "s32":
        return (np.frombuffer(data, "<i4") >> 16).astype(np.int16)
    return (np.clip(np.frombuffer(data, "<f4"), -1.0, 1.0) * 32767).astype(np.int16)


def _fit(samples: np.ndarray, speech: SpeechFormat, rate_hz: int,
         resample: av.AudioResampler | None) -> Iterator[np.ndarray]:
    """Fold channels to the output layout and resample when the input rate is not carried as it is."""
    if samples.shape[1] != speech.channels:
        samples = samples.mean(axis=1, keepdims=True).astype(np.int16)
    if resample is None:
        yield samples
        return
    packed = np.ascontiguousarray(samples).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(packed, format="s16", layout=layout_of(speech.channels))
    frame.sample_rate = rate_hz
    for out in resample.resample(frame):
        yield out.to_ndarray().reshape(-1, speech.channels)


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    data = b""
    while len(data) < size and (more := stream.read(size - len(data))):
        data += more
    return data


class _Prefixed:
    """A read-only stream that first replays bytes already taken from `rest` (PyAV probes from the start)."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def read(self, size: int = -1) -> bytes:
        if self._head:
            head, self._head = (self._head, b"") if size < 0 or size >= len(self._head) else (
                self._head[:size], self._head[size:])
            return head
        return self._rest.read(size)


def _reason(error: BaseException) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return text.split(":")[-1].strip() or type(error).__name__


class FeatureCopy:
    """int16 speech at one rate (mono or more channels) -> the mono float32 16 kHz copy the motion models read,
    streaming: the one resampling the features take (the speech itself keeps its rate)."""

    def __init__(self, rate_hz: int, channels: int = 1) -> None:
        self.rate_hz = rate_hz
        self.channels = channels
        self._resampler = av.AudioResampler("flt", "mono", FEATURE_RATE_HZ)

    def push(self, block: np.ndarray) -> np.ndarray:
        """The copy of `block` (int16, (n, channels) or (n,) mono) as far as the resampler lets it out."""
        block = np.asarray(block, np.int16).reshape(-1, self.channels)
        if not len(block):
            return np.zeros(0, np.float32)
        mono = block if self.channels == 1 else block.mean(axis=1, dtype=np.float32).astype(np.int16)[:, None]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(mono).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate_hz
        return joined_samples(self._resampler.resample(frame), np.float32)

    def flush(self) -> np.ndarray:
        """What the resampler still holds; it starts afresh after."""
        rest = joined_samples(self._resampler.resample(None), np.float32)
        self._resampler = av.AudioResampler("flt", "mono", FEATURE_RATE_HZ)
        return rest


def joined_samples(frames: list[av.AudioFrame], dtype: type) -> np.ndarray:
    """A resampler's output frames (mono) as one array of `dtype` samples."""
    parts = [out.to_ndarray().reshape(-1) for out in frames]
    return np.concatenate(parts) if len(parts) > 1 else parts[0] if parts else np.zeros(0, dtype)


class FeatureChunker(Stage):
    """Speech blocks (int16 (n, channels), any length) -> `AudioChunk`s of `chunk_ms` of its 16 kHz mono copy.

    At the end the copy is padded or trimmed to the exact length of the speech, so the motion stage counts the same
    number of frames as the sinks.
    """

    name = "audio"

    def __init__(self, speech: SpeechFormat, chunk_ms: int) -> None:
        super().__init__()
        self.speech = speech
        self._hop = samples_of_ms(chunk_ms, FEATURE_RATE_HZ)
        self._reset()

    def _reset(self) -> None:
        self._copy = FeatureCopy(self.speech.rate_hz, self.speech.channels)
        self._pcm = np.zeros(0, np.float32)
        self._speech_total = 0
        self._pcm_total = 0
        self._index = 0

    def on_flush(self) -> None:
        self._reset()

    def process(self, blocks: list[np.ndarray]) -> list[AudioChunk]:
        return [chunk for block in blocks for chunk in self.push(block)]

    def push(self, block: np.ndarray) -> list[AudioChunk]:
        self._speech_total += len(np.asarray(block).reshape(-1, self.speech.channels))
        self._append(self._copy.push(block))
        return self._cut(final=False)

    def finish(self) -> list[AudioChunk]:
        self._append(self._copy.flush())
        exact = resampled_length(self._speech_total, self.speech.rate_hz, FEATURE_RATE_HZ)
        surplus = self._pcm_total - exact
        if surplus > 0:
            self._pcm = self._pcm[: len(self._pcm) - surplus]
        elif surplus < 0:
            self._pcm = np.concatenate([self._pcm, np.zeros(-surplus, np.float32)])
        self._pcm_total = exact
        return self._cut(final=True)

    def _append(self, pcm: np.ndarray) -> None:
        if len(pcm):
            self._pcm = np.concatenate([self._pcm, pcm])
            self._pcm_total += len(pcm)

    def _cut(self, *, final: bool) -> list[AudioChunk]:
        """Every whole hop ready, in chunks of at most `_MAX_HOPS` (live input makes one hop at a time); at the end
        the partial hop left over too."""
        chunks: list[AudioChunk] = []
        while (hops := min(len(self._pcm) // self._hop, _MAX_HOPS)) or (final and len(self._pcm)):
            size = hops * self._hop if hops else len(self._pcm)
            chunks.append(AudioChunk(self._index, self._pcm[:size]))
            self._pcm = self._pcm[size:]
            self._index += max(hops, 1)
        return chunks
