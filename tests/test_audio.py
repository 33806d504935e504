"""Audio in: any container, WAV or raw PCM on a pipe, the speech kept as it came, chunks tiling it exactly."""

from __future__ import annotations

import io
import wave

import av
import numpy as np
import pytest

from stages.audio import FEATURE_RATE_HZ, AudioReader, FeatureChunker, output_format
from stream.errors import InputError
from tests.conftest import SPEECH


def read_all(reader: AudioReader) -> np.ndarray:
    blocks = []
    while (block := reader.read()) is not None:
        blocks.append(block)
    return np.concatenate(blocks)


def wav_samples(path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2"), wav.getframerate()


def test_a_wav_file_decodes_to_its_own_samples_at_its_own_rate():
    samples, rate = wav_samples(SPEECH)
    reader = AudioReader(SPEECH)
    assert reader.format == output_format(rate, 1) and reader.format.rate_hz == 22050
    assert np.array_equal(read_all(reader)[:, 0], samples)
    assert abs(reader.duration_s - len(samples) / rate) < 0.01


def test_a_piped_wav_is_parsed_here_and_matches_the_file():
    samples, _ = wav_samples(SPEECH)
    reader = AudioReader(io.BytesIO(SPEECH.read_bytes()))
    assert reader.format.rate_hz == 22050 and reader.duration_s is None
    assert np.array_equal(read_all(reader)[:, 0], samples)


def test_raw_pcm_needs_only_a_rate_and_odd_rates_go_out_at_48k():
    tone = (np.sin(np.arange(7000) / 7) * 9000).astype("<i2")
    reader = AudioReader(io.BytesIO(tone.tobytes()), raw_rate_hz=7000)
    assert reader.format.rate_hz == 48000
    assert abs(len(read_all(reader)) - 48000) < 100


def test_an_mp3_on_a_pipe_is_probed_by_pyav(tmp_path):
    samples, rate = wav_samples(SPEECH)
    path = tmp_path / "speech.mp3"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    reader = AudioReader(io.BytesIO(path.read_bytes()))
    decoded = read_all(reader)
    assert reader.format.rate_hz == rate and abs(len(decoded) - len(samples)) < 3000


def test_chunks_tile_the_feature_copy_in_hops_and_it_has_the_exact_length():
    samples, rate = wav_samples(SPEECH)
    speech = output_format(rate, 1)
    copies = []
    for block_size in (441, 20000):  # live-sized reads and file-sized blocks
        chunker = FeatureChunker(speech, chunk_ms=20)
        chunks = []
        for start in range(0, len(samples), block_size):
            chunks += chunker.push(samples[start: start + block_size].reshape(-1, 1))
        chunks += chunker.finish()
        assert sum(len(c.pcm) for c in chunks) == -(-len(samples) * FEATURE_RATE_HZ // rate)
        for chunk, following in zip(chunks, chunks[1:]):  # whole hops, numbered by hop
            assert len(chunk.pcm) % 320 == 0 and following.index == chunk.index + len(chunk.pcm) // 320
        assert chunks[0].index == 0
        if block_size == 441:
            assert max(len(c.pcm) for c in chunks) == 320  # live: one hop at a time, nothing held back
        copies.append(np.concatenate([c.pcm for c in chunks]))
    # The copy is the speech at 16 kHz, whatever the reads.
    reference = np.interp(np.arange(len(copies[0])) * rate / FEATURE_RATE_HZ, np.arange(len(samples)),
                          samples / 32768.0)
    assert np.corrcoef(copies[0][100:-100], reference[100:-100])[0, 1] > 0.99
    assert np.allclose(copies[0], copies[1], atol=1e-6)


def test_a_wav_cut_short_is_read_to_its_end_with_a_notice_of_both_lengths(tmp_path):
    samples, rate = wav_samples(SPEECH)
    data = SPEECH.read_bytes()
    cut = data[: 44 + rate]  # the header still declares the whole speech; half a second is left
    path = tmp_path / "cut.wav"
    path.write_bytes(cut)
    declared = f"{len(samples) / rate:.2f} s"
    for source in (path, io.BytesIO(cut)):
        notices: list[str] = []
        reader = AudioReader(source, notice=notices.append)
        assert np.array_equal(read_all(reader)[:, 0], samples[: rate // 2])
        assert len(notices) == 1 and "0.50 s" in notices[0] and declared in notices[0], notices
    notices = []
    read_all(AudioReader(SPEECH, notice=notices.append))
    read_all(AudioReader(io.BytesIO(data), notice=notices.append))
    assert notices == []  # whole files say nothing


def test_stdin_that_no_probe_reads_asks_for_a_rate():
    samples, _ = wav_samples(SPEECH)
    for data, words in ((samples.tobytes(), "cannot read standard input as audio"), (b"", "standard input is empty")):
        with pytest.raises(InputError, match="--rate") as raised:
            AudioReader(io.BytesIO(data))
        assert words in str(raised.value)


def test_a_name_stands_for_the_source_in_messages():
    name = "the uploaded audio 'talk.mp3'"
    for data in (b"this is not a sound " * 50, b"", SPEECH.read_bytes()[:30]):
        with pytest.raises(InputError) as raised:
            AudioReader(io.BytesIO(data), name=name)
        message = str(raised.value)
        assert name in message and "standard input" not in message and "--rate" not in message, message
    assert AudioReader(SPEECH, name=name).name == name
