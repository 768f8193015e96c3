"""Audio helpers: byte rates, conversions, deterministic signals, base64, energy, G.711."""

from __future__ import annotations

import array
import itertools
import math
import sys
import types
import warnings

import pytest

from relay.protocol import audio


def test_byte_rates_are_the_realtime_formats() -> None:
    assert audio.PCM16_BYTES_PER_MS == 48
    assert audio.G711_BYTES_PER_MS == 8
    assert audio.bytes_per_ms("audio/pcm") == 48
    assert audio.bytes_per_ms("audio/pcmu") == 8
    assert audio.bytes_per_ms("audio/pcma") == 8
    with pytest.raises(KeyError):
        audio.bytes_per_ms("pcm16")  # beta names are not formats any more


def test_duration_and_bytes_convert_both_ways() -> None:
    assert audio.bytes_for_ms(20) == 960
    assert audio.bytes_for_ms(100) == 4800
    assert audio.duration_ms(4800) == 100.0
    assert audio.bytes_for_ms(20, audio.G711_BYTES_PER_MS) == 160
    assert audio.duration_ms(160, audio.G711_BYTES_PER_MS) == 20.0
    # Fractions of a sample round down to whole PCM16 samples.
    assert audio.bytes_for_ms(0.03) == 0
    assert audio.bytes_for_ms(0.05) == 2


def test_split_chunks_cuts_at_chunk_boundaries() -> None:
    data = audio.silence(110)
    chunks = audio.split_chunks(data, 20)
    assert [len(c) for c in chunks] == [960] * 5 + [480]
    assert b"".join(chunks) == data
    views = list(audio.iter_chunks(data, 50))
    assert [len(v) for v in views] == [2400, 2400, 480]
    with pytest.raises(ValueError, match="chunk_ms"):
        audio.split_chunks(data, 0)


def test_tone_has_the_requested_length_level_and_pitch() -> None:
    pcm = audio.tone(100, 1000.0, amplitude=0.5)
    assert len(pcm) == 100 * 48
    assert audio.rms_pcm16(pcm) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)
    samples = array.array("h", pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    crossings = sum(1 for a, b in itertools.pairwise(samples) if a < 0 <= b)
    assert crossings == pytest.approx(100, abs=1)  # 1 kHz for 100 ms


def test_speech_like_is_deterministic_per_seed() -> None:
    first = audio.speech_like(500, seed=7)
    assert first == audio.speech_like(500, seed=7)
    assert first != audio.speech_like(500, seed=8)
    assert len(first) == 500 * 48


def test_speech_like_sounds_like_speech_to_an_energy_detector() -> None:
    pcm = audio.speech_like(2000, seed=1)
    levels = [audio.dbfs(audio.rms_pcm16(c)) for c in audio.split_chunks(pcm, 10)]
    loud = sum(level > -40 for level in levels)
    silent = sum(level <= -100 for level in levels)
    # Mostly voiced, with short word gaps, and about -20 dBFS overall.
    assert loud > 0.7 * len(levels)
    assert silent > 0
    assert -26 < audio.dbfs(audio.rms_pcm16(pcm)) < -14
    # No gap is long enough to end a turn under the default 200 ms VAD silence.
    run = longest = 0
    for level in levels:
        run = run + 1 if level <= -40 else 0
        longest = max(longest, run)
    assert longest * 10 < 200


def test_base64_helpers_are_strict() -> None:
    data = bytes(range(256))
    text = audio.b64encode(data)
    assert isinstance(text, str)
    assert audio.b64decode(text) == data
    assert audio.b64decode(text.encode()) == data
    for bad in ("abc", "ab!d", "====", "YWJj\n"):
        with pytest.raises(ValueError, match="invalid base64"):
            audio.b64decode(bad)


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 958, 959, 960])
def test_b64_decoded_length_matches_decoding(size: int) -> None:
    text = audio.b64encode(bytes(size))
    assert audio.b64_decoded_length(len(text), text.count("=")) == size


def test_rms_and_dbfs() -> None:
    assert audio.rms_pcm16(b"") == 0.0
    assert audio.rms_pcm16(audio.silence(20)) == 0.0
    assert audio.dbfs(0.0) == audio.SILENCE_DBFS
    full = array.array("h", [32767, -32768] * 480)
    if sys.byteorder == "big":
        full.byteswap()
    assert audio.rms_pcm16(full.tobytes()) == pytest.approx(1.0, abs=1e-4)
    assert audio.dbfs(1.0) == 0.0
    assert audio.dbfs(0.1) == pytest.approx(-20.0)
    # An odd trailing byte is ignored rather than misread.
    assert audio.rms_pcm16(full.tobytes() + b"\x7f") == pytest.approx(1.0, abs=1e-4)


def test_rms_of_a_long_chunk_matches_the_short_path() -> None:
    pcm = audio.speech_like(1000, seed=3)  # 24,000 samples: the blocked hypot path
    short = [audio.rms_pcm16(c) for c in audio.split_chunks(pcm, 100)]
    combined = math.sqrt(sum(value * value for value in short) / len(short))
    assert audio.rms_pcm16(pcm) == pytest.approx(combined, rel=1e-9)


def _audioop() -> types.ModuleType:
    """CPython's deprecated G.711 codec, as an independent reference."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:  # removed in Python 3.13
            pytest.skip("audioop is not available")
    return audioop


def test_g711_matches_the_reference_codec_over_the_full_range() -> None:
    reference = _audioop()
    every_sample = array.array("h", range(-32768, 32768))
    if sys.byteorder == "big":
        every_sample.byteswap()
    pcm = every_sample.tobytes()
    assert audio.pcm16_to_g711(pcm, "ulaw") == reference.lin2ulaw(pcm, 2)
    assert audio.pcm16_to_g711(pcm, "alaw") == reference.lin2alaw(pcm, 2)
    codes = bytes(range(256))
    assert audio.g711_to_pcm16(codes, "ulaw") == reference.ulaw2lin(codes, 2)
    assert audio.g711_to_pcm16(codes, "alaw") == reference.alaw2lin(codes, 2)


def test_g711_energy_and_formats() -> None:
    pcm = audio.speech_like(200, seed=2, sample_rate_hz=audio.G711_SAMPLE_RATE_HZ)
    laws: tuple[audio.G711Law, ...] = ("ulaw", "alaw")
    for law in laws:
        encoded = audio.pcm16_to_g711(pcm, law)
        assert len(encoded) == 200 * audio.G711_BYTES_PER_MS
        decoded = audio.g711_to_pcm16(encoded, law)
        assert audio.rms_g711(encoded, law) == pytest.approx(audio.rms_pcm16(decoded), rel=1e-9)
        # G.711 keeps the level within a fraction of a dB.
        assert audio.dbfs(audio.rms_pcm16(decoded)) == pytest.approx(
            audio.dbfs(audio.rms_pcm16(pcm)), abs=0.5
        )
    assert audio.g711_law("audio/pcmu") == "ulaw"
    assert audio.g711_law("audio/pcma") == "alaw"
    assert audio.g711_law("audio/pcm") is None
    assert len(audio.speech_like_in_format(100, 0, "audio/pcmu")) == 800
    assert len(audio.speech_like_in_format(100, 0, "audio/pcm")) == 4800
    assert audio.rms_in_format(audio.speech_like_in_format(100, 0, "audio/pcma"), "audio/pcma") > 0
    assert audio.rms_g711(b"", "ulaw") == 0.0
