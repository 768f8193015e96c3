"""Audio helpers shared by the relay, the simulator and the benchmark.

This module owns the audio arithmetic of the Realtime API's formats and the test
signals everyone uses:

- byte rates: PCM16 at 24 kHz mono little-endian is 48 bytes per millisecond
  (:data:`PCM16_BYTES_PER_MS`); G.711 µ-law / A-law at 8 kHz is 8 bytes per
  millisecond (:data:`G711_BYTES_PER_MS`); :func:`bytes_per_ms` maps a GA format
  ``type`` (``audio/pcm``, ``audio/pcmu``, ``audio/pcma``) to its rate;
- duration <-> byte conversions and splitting audio into fixed-length chunks;
- deterministic signals: a pure :func:`tone` and a seeded :func:`speech_like`
  signal (voiced syllables with pitch movement and short pauses between words,
  so an energy VAD sees speech, not a constant hum);
- base64 helpers with strict decoding (what the Realtime API does with ``audio``);
- energy: :func:`rms_pcm16` (normalised RMS, C speed through ``math.hypot``), its
  G.711 twin :func:`rms_g711`, and :func:`dbfs`;
- G.711 encoding and decoding (ITU-T G.711, table driven), so format-aware code
  can produce and measure ``audio/pcmu`` and ``audio/pcma`` payloads.

No numpy, no ``audioop`` (removed in Python 3.13): ``array`` and ``math`` only.
Nothing here does I/O.
"""

from __future__ import annotations

import array
import base64
import binascii
import math
import random
import sys
from collections.abc import Iterator
from functools import lru_cache
from typing import Final, Literal

#: The only PCM rate the GA API accepts (``{"type": "audio/pcm", "rate": 24000}``).
PCM16_SAMPLE_RATE_HZ: Final = 24_000
PCM16_BYTES_PER_SAMPLE: Final = 2
#: 24,000 samples/s x 2 bytes / 1000 ms.
PCM16_BYTES_PER_MS: Final = PCM16_SAMPLE_RATE_HZ * PCM16_BYTES_PER_SAMPLE // 1000
#: G.711 (``audio/pcmu`` and ``audio/pcma``) is 8 kHz, one byte per sample.
G711_SAMPLE_RATE_HZ: Final = 8_000
G711_BYTES_PER_MS: Final = G711_SAMPLE_RATE_HZ // 1000
#: Bytes per millisecond for every GA audio format ``type``.
BYTES_PER_MS_BY_FORMAT: Final[dict[str, int]] = {
    "audio/pcm": PCM16_BYTES_PER_MS,
    "audio/pcmu": G711_BYTES_PER_MS,
    "audio/pcma": G711_BYTES_PER_MS,
}
#: Full scale of a signed 16-bit sample, the reference for normalised RMS and dBFS.
PCM16_FULL_SCALE: Final = 32768.0
#: ``dbfs`` of digital silence; any finite floor works, this one is below 16-bit noise.
SILENCE_DBFS: Final = -120.0
#: Samples passed to one ``math.hypot`` call: bounds the argument tuple for huge chunks.
_HYPOT_BLOCK_SAMPLES: Final = 8192

G711Law = Literal["ulaw", "alaw"]

# Speech-like signal shape. Values are typical of adult speech, not measurements.
#: Syllables per second in conversational speech.
SPEECH_SYLLABLES_PER_S: Final = 4.5
#: Syllables per word, on average, for the word/pause rhythm.
SPEECH_SYLLABLES_PER_WORD: Final = 2
#: Pause between words; shorter than any sensible VAD silence window (default 200 ms).
SPEECH_WORD_GAP_MS: Final = 60
SPEECH_PITCH_MIN_HZ: Final = 95.0
SPEECH_PITCH_MAX_HZ: Final = 210.0
#: Peak amplitude relative to full scale (about -10 dBFS peaks, -20 dBFS RMS).
SPEECH_PEAK_AMPLITUDE: Final = 0.3
#: Harmonic amplitudes of the voiced waveform (fundamental first): a vowel-ish buzz.
_SPEECH_HARMONICS: Final = (1.0, 0.6, 0.45, 0.3, 0.2, 0.12, 0.08)
_WAVETABLE_SIZE: Final = 2048


def bytes_per_ms(format_type: str) -> int:
    """Byte rate of a GA audio format ``type``; raises ``KeyError`` for unknown formats."""
    return BYTES_PER_MS_BY_FORMAT[format_type]


def duration_ms(byte_count: int, rate_bytes_per_ms: int = PCM16_BYTES_PER_MS) -> float:
    """Playback length of ``byte_count`` bytes of audio, in milliseconds."""
    return byte_count / rate_bytes_per_ms


def bytes_for_ms(milliseconds: float, rate_bytes_per_ms: int = PCM16_BYTES_PER_MS) -> int:
    """Bytes holding ``milliseconds`` of audio, rounded down to whole samples."""
    sample_bytes = PCM16_BYTES_PER_SAMPLE if rate_bytes_per_ms == PCM16_BYTES_PER_MS else 1
    whole = int(milliseconds * rate_bytes_per_ms)
    return whole - whole % sample_bytes


def split_chunks(
    data: bytes, chunk_ms: int, rate_bytes_per_ms: int = PCM16_BYTES_PER_MS
) -> list[bytes]:
    """Cut ``data`` into chunks of ``chunk_ms`` (the last one may be shorter)."""
    step = bytes_for_ms(chunk_ms, rate_bytes_per_ms)
    if step <= 0:
        raise ValueError(f"chunk_ms must hold at least one sample, got {chunk_ms}")
    return [data[offset : offset + step] for offset in range(0, len(data), step)]


def iter_chunks(
    data: bytes, chunk_ms: int, rate_bytes_per_ms: int = PCM16_BYTES_PER_MS
) -> Iterator[memoryview]:
    """Zero-copy variant of :func:`split_chunks` for large buffers."""
    step = bytes_for_ms(chunk_ms, rate_bytes_per_ms)
    if step <= 0:
        raise ValueError(f"chunk_ms must hold at least one sample, got {chunk_ms}")
    view = memoryview(data)
    for offset in range(0, len(data), step):
        yield view[offset : offset + step]


def b64encode(data: bytes | bytearray | memoryview) -> str:
    """Standard base64 (with padding) as ``str``, the encoding of every ``audio`` field."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str | bytes) -> bytes:
    """Strict base64 decode; raises ``ValueError`` on any non-alphabet character or bad padding."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


def b64_decoded_length(encoded_chars: int, padding_chars: int) -> int:
    """Decoded size of a base64 text of ``encoded_chars`` ending in ``padding_chars`` '='.

    Lets hot paths account for audio without decoding it.
    """
    return encoded_chars // 4 * 3 - padding_chars


def silence(milliseconds: int, rate_bytes_per_ms: int = PCM16_BYTES_PER_MS) -> bytes:
    """Digital silence (PCM16 zeros) of the given length."""
    return bytes(bytes_for_ms(milliseconds, rate_bytes_per_ms))


def _to_pcm16_bytes(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        samples.byteswap()
    return samples.tobytes()


def _pcm16_samples(chunk: bytes | bytearray | memoryview) -> array.array[int]:
    samples = array.array("h")
    usable = len(chunk) - len(chunk) % PCM16_BYTES_PER_SAMPLE
    samples.frombytes(memoryview(chunk)[:usable])
    if sys.byteorder == "big":
        samples.byteswap()
    return samples


def tone(
    milliseconds: int,
    frequency_hz: float = 440.0,
    *,
    amplitude: float = 0.3,
    sample_rate_hz: int = PCM16_SAMPLE_RATE_HZ,
) -> bytes:
    """A sine tone as PCM16 little-endian; ``amplitude`` is relative to full scale."""
    count = sample_rate_hz * milliseconds // 1000
    peak = amplitude * (PCM16_FULL_SCALE - 1)
    step = 2 * math.pi * frequency_hz / sample_rate_hz
    samples = array.array("h", (int(peak * math.sin(step * i)) for i in range(count)))
    return _to_pcm16_bytes(samples)


@lru_cache(maxsize=1)
def _voiced_wavetable() -> tuple[float, ...]:
    """One period of a harmonic-rich waveform, normalised to peak 1.0."""
    raw = [
        sum(
            weight * math.sin(2 * math.pi * (harmonic + 1) * i / _WAVETABLE_SIZE)
            for harmonic, weight in enumerate(_SPEECH_HARMONICS)
        )
        for i in range(_WAVETABLE_SIZE)
    ]
    peak = max(abs(value) for value in raw)
    return tuple(value / peak for value in raw)


@lru_cache(maxsize=32)
def speech_like(
    milliseconds: int, seed: int = 0, *, sample_rate_hz: int = PCM16_SAMPLE_RATE_HZ
) -> bytes:
    """A deterministic speech-like PCM16 signal: syllables, pitch movement, word gaps.

    Each word is a few syllables (raised-cosine bursts of a voiced harmonic
    waveform whose pitch glides between :data:`SPEECH_PITCH_MIN_HZ` and
    :data:`SPEECH_PITCH_MAX_HZ`), followed by :data:`SPEECH_WORD_GAP_MS` of silence.
    The same ``(milliseconds, seed, sample_rate_hz)`` always gives the same bytes.
    """
    rng = random.Random(seed)
    table = _voiced_wavetable()
    total = sample_rate_hz * milliseconds // 1000
    syllable_samples = int(sample_rate_hz / SPEECH_SYLLABLES_PER_S)
    gap_samples = sample_rate_hz * SPEECH_WORD_GAP_MS // 1000
    peak = SPEECH_PEAK_AMPLITUDE * (PCM16_FULL_SCALE - 1)
    out = array.array("h", bytes(total * PCM16_BYTES_PER_SAMPLE))
    position = 0
    phase = 0.0
    while position < total:
        syllables = max(1, SPEECH_SYLLABLES_PER_WORD + rng.randint(-1, 1))
        for _ in range(syllables):
            length = int(syllable_samples * rng.uniform(0.7, 1.3))
            start_hz = rng.uniform(SPEECH_PITCH_MIN_HZ, SPEECH_PITCH_MAX_HZ)
            end_hz = rng.uniform(SPEECH_PITCH_MIN_HZ, SPEECH_PITCH_MAX_HZ)
            loudness = peak * rng.uniform(0.6, 1.0)
            end = min(total, position + length)
            for i in range(end - position):
                fraction = i / length
                frequency = start_hz + (end_hz - start_hz) * fraction
                phase = (phase + frequency * _WAVETABLE_SIZE / sample_rate_hz) % _WAVETABLE_SIZE
                # Raised cosine with a floor: syllables within a word stay above a VAD floor.
                envelope = 0.25 + 0.75 * math.sin(math.pi * fraction)
                out[position + i] = int(loudness * envelope * table[int(phase)])
            position = end
            if position >= total:
                break
        position += gap_samples  # silence: the array is already zero there
    return _to_pcm16_bytes(out)


def rms_pcm16(chunk: bytes | bytearray | memoryview) -> float:
    """RMS of a PCM16 little-endian chunk, normalised to full scale (0.0 .. 1.0).

    ``math.hypot`` computes the root of the sum of squares in C, about three
    times faster than a Python-level sum; a trailing odd byte is ignored.
    """
    samples = _pcm16_samples(chunk)
    count = len(samples)
    if count == 0:
        return 0.0
    if count <= _HYPOT_BLOCK_SAMPLES:
        norm = math.hypot(*samples)
    else:
        norm = math.hypot(
            *(
                math.hypot(*samples[offset : offset + _HYPOT_BLOCK_SAMPLES])
                for offset in range(0, count, _HYPOT_BLOCK_SAMPLES)
            )
        )
    return norm / math.sqrt(count) / PCM16_FULL_SCALE


def dbfs(rms: float) -> float:
    """Decibels relative to full scale for a normalised RMS value."""
    return SILENCE_DBFS if rms <= 0.0 else max(SILENCE_DBFS, 20.0 * math.log10(rms))


# --- G.711 -------------------------------------------------------------------------

_ULAW_BIAS: Final = 0x84
_ULAW_BIAS_14BIT: Final = _ULAW_BIAS >> 2
_ULAW_CLIP_14BIT: Final = 8159
_ALAW_CLIP: Final = 32767


def _ulaw_decode_byte(code: int) -> int:
    code = ~code & 0xFF
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = ((mantissa << 3) + _ULAW_BIAS) << exponent
    magnitude -= _ULAW_BIAS
    return -magnitude if sign else magnitude


def _alaw_decode_byte(code: int) -> int:
    code ^= 0x55
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    # Segment 0 is linear; the others double per segment, with the implicit leading bit.
    magnitude = (
        (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return magnitude if sign else -magnitude


#: Linear value of every G.711 code, ITU-T G.711 decoding.
ULAW_TO_PCM16: Final = tuple(_ulaw_decode_byte(code) for code in range(256))
ALAW_TO_PCM16: Final = tuple(_alaw_decode_byte(code) for code in range(256))
_ULAW_SQUARES: Final = tuple(value * value for value in ULAW_TO_PCM16)
_ALAW_SQUARES: Final = tuple(value * value for value in ALAW_TO_PCM16)


def _ulaw_encode_sample(sample: int) -> int:
    # The classic Sun/CCITT routine (also CPython's audioop): 14-bit magnitude, biased.
    value = sample >> 2
    if value < 0:
        value, mask = -value, 0x7F
    else:
        mask = 0xFF
    value = min(value, _ULAW_CLIP_14BIT) + _ULAW_BIAS_14BIT
    segment = max(0, value.bit_length() - 6)
    if segment >= 8:
        return 0x7F ^ mask
    return ((segment << 4) | ((value >> (segment + 1)) & 0x0F)) ^ mask


def _alaw_encode_sample(sample: int) -> int:
    sign = 0x80 if sample >= 0 else 0
    magnitude = min(-sample - 1 if sample < 0 else sample, _ALAW_CLIP)
    if magnitude < 256:
        code = magnitude >> 4
    else:
        exponent = magnitude.bit_length() - 8
        code = (exponent << 4) | ((magnitude >> (exponent + 3)) & 0x0F)
    return (sign | code) ^ 0x55


def pcm16_to_g711(pcm: bytes | bytearray | memoryview, law: G711Law) -> bytes:
    """Encode PCM16 samples (any rate: no resampling here) as G.711 µ-law or A-law."""
    encode = _ulaw_encode_sample if law == "ulaw" else _alaw_encode_sample
    return bytes(encode(sample) for sample in _pcm16_samples(pcm))


def g711_to_pcm16(data: bytes | bytearray | memoryview, law: G711Law) -> bytes:
    """Decode G.711 µ-law or A-law bytes to PCM16 little-endian at the same rate."""
    table = ULAW_TO_PCM16 if law == "ulaw" else ALAW_TO_PCM16
    return _to_pcm16_bytes(array.array("h", map(table.__getitem__, bytes(data))))


def rms_g711(chunk: bytes | bytearray | memoryview, law: G711Law) -> float:
    """RMS of a G.711 chunk, normalised to full scale, without decoding to a buffer."""
    count = len(chunk)
    if count == 0:
        return 0.0
    squares = _ULAW_SQUARES if law == "ulaw" else _ALAW_SQUARES
    return math.sqrt(sum(map(squares.__getitem__, bytes(chunk))) / count) / PCM16_FULL_SCALE


def g711_law(format_type: str) -> G711Law | None:
    """``"ulaw"`` for ``audio/pcmu``, ``"alaw"`` for ``audio/pcma``, ``None`` for PCM16."""
    if format_type == "audio/pcmu":
        return "ulaw"
    if format_type == "audio/pcma":
        return "alaw"
    return None


def speech_like_in_format(milliseconds: int, seed: int, format_type: str) -> bytes:
    """:func:`speech_like` in a GA format: PCM16 24 kHz, or G.711 8 kHz."""
    law = g711_law(format_type)
    if law is None:
        return speech_like(milliseconds, seed)
    return pcm16_to_g711(speech_like(milliseconds, seed, sample_rate_hz=G711_SAMPLE_RATE_HZ), law)


def rms_in_format(chunk: bytes | bytearray | memoryview, format_type: str) -> float:
    """Normalised RMS of a chunk in any GA format."""
    law = g711_law(format_type)
    return rms_pcm16(chunk) if law is None else rms_g711(chunk, law)


__all__ = [
    "ALAW_TO_PCM16",
    "BYTES_PER_MS_BY_FORMAT",
    "G711_BYTES_PER_MS",
    "G711_SAMPLE_RATE_HZ",
    "PCM16_BYTES_PER_MS",
    "PCM16_BYTES_PER_SAMPLE",
    "PCM16_FULL_SCALE",
    "PCM16_SAMPLE_RATE_HZ",
    "SILENCE_DBFS",
    "ULAW_TO_PCM16",
    "G711Law",
    "b64_decoded_length",
    "b64decode",
    "b64encode",
    "bytes_for_ms",
    "bytes_per_ms",
    "dbfs",
    "duration_ms",
    "g711_law",
    "g711_to_pcm16",
    "iter_chunks",
    "pcm16_to_g711",
    "rms_g711",
    "rms_in_format",
    "rms_pcm16",
    "silence",
    "speech_like",
    "speech_like_in_format",
    "split_chunks",
    "tone",
]
