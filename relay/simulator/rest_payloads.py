"""What the simulator's REST endpoints answer, in OpenAI's shapes: sans-I/O, deterministic.

This module owns the bodies (:mod:`relay.simulator.rest` owns the HTTP around them):

- chat completions: the ``chat.completion`` object and the stream of
  ``chat.completion.chunk`` objects (role, one chunk per content piece, the
  ``finish_reason`` chunk, and with ``include_usage`` the usage chunk);
- responses: the ``response`` object and its stream events, ``response.created``
  to ``response.completed``, numbered by ``sequence_number``;
- speech: :class:`SpeechAudio`, the audio of a text in each ``response_format``
  (raw 24 kHz PCM16 for ``pcm``, a WAV header and that PCM for ``wav``, a format
  signature and filler bytes for the compressed ones), cut into chunks on demand;
- transcriptions: the text naming the upload's size and SHA-256 prefix, with the
  usage of ``gpt-4o-transcribe`` (``tokens``) or ``whisper-1`` (``duration``);
- embeddings: unit vectors derived from a hash of each input, as floats or base64;
- models: the ``list`` of ``model`` objects.

Determinism: the text, audio and vectors depend only on the request (tests compare
them); ids and ``created`` timestamps do not. Token counts: a prompt of ``n``
characters is ``ceil(n / 4)`` tokens (:data:`CHARS_PER_TOKEN`), an answer of ``k``
pieces is ``k`` tokens.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from relay.protocol.events import new_id

#: Characters per token in the simulator's usage numbers (OpenAI's rule of thumb).
CHARS_PER_TOKEN: Final = 4
#: The fingerprint every chat completion names.
SYSTEM_FINGERPRINT: Final = "fp_simulator"
#: ``created`` of the listed models (unix seconds): fixed, so the list is deterministic.
MODEL_CREATED_UNIX_S: Final = 1_700_000_000
#: ``GET /v1/models`` when ``SimulatorConfig.models`` is empty.
DEFAULT_REST_MODELS: Final = (
    "gpt-realtime",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "whisper-1",
    "gpt-4o-mini-tts",
    "tts-1",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
#: Speech: the simulated voice speaks this long per input character (milliseconds).
SPEECH_MS_PER_CHAR: Final = 50
SPEECH_SAMPLE_RATE_HZ: Final = 24_000
#: Speech: the PCM is a tone of this pitch (Hz; 24 kHz / 400 Hz = 60 samples a period).
SPEECH_TONE_HZ: Final = 400
SPEECH_TONE_AMPLITUDE: Final = 8000
#: Speech: bytes per millisecond of the compressed formats (their nominal bit rates:
#: mp3 128 kbit/s, opus 32, aac 96, flac about 384).
COMPRESSED_BYTES_PER_MS: Final = {"mp3": 16, "opus": 4, "aac": 12, "flac": 48}
#: OpenAI's ``input`` limit for ``/v1/audio/speech`` (characters).
SPEECH_MAX_INPUT_CHARS: Final = 4096
#: [assumed] The Content-Type of each format; OpenAI documents the formats, not these.
SPEECH_CONTENT_TYPES: Final = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
#: Transcriptions: uploads are taken as this many bytes per second of audio (16 kHz
#: PCM16), for ``whisper-1``'s ``duration`` usage and the audio tokens.
TRANSCRIBE_ASSUMED_BYTES_PER_S: Final = 32_000
#: Transcriptions: audio tokens per second of audio.
TRANSCRIBE_AUDIO_TOKENS_PER_S: Final = 10
#: Models that answer transcriptions with ``duration`` usage (and cannot stream).
DURATION_BILLED_TRANSCRIBE_MODELS: Final = frozenset({"whisper-1"})
#: Embedding width per model; others get :data:`DEFAULT_EMBEDDING_DIMENSIONS`.
EMBEDDING_DIMENSIONS: Final = {"text-embedding-3-large": 3072, "text-embedding-3-small": 1536}
DEFAULT_EMBEDDING_DIMENSIONS: Final = 1536

_SHA_PREFIX_CHARS: Final = 16
_WAV_HEADER_BYTES: Final = 44


def tokens_of(chars: int) -> int:
    """Tokens of a text of ``chars`` characters (at least 1 for any text)."""
    return math.ceil(chars / CHARS_PER_TOKEN)


def text_chars(value: object) -> int:
    """Characters of text in a message ``content`` or a ``responses`` ``input``:
    a string, or a list of parts/items whose ``text`` or ``content`` hold text."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(text_chars(item) for item in value)
    if isinstance(value, dict):
        return text_chars(value.get("text")) + text_chars(value.get("content"))
    return 0


def answer_pieces(prompt_chars: int, pieces: int) -> list[str]:
    """The deterministic answer, as ``pieces`` content pieces (one token each)."""
    first = f"Simulated answer to {prompt_chars} characters."
    return [first, *(f" Piece {index}." for index in range(2, pieces + 1))]


def sse_data(payload: dict[str, Any] | str) -> bytes:
    """One ``data:`` SSE event (chat completions, transcriptions)."""
    body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + body + b"\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``event: <type>`` SSE event (responses)."""
    kind = str(payload["type"]).encode()
    return b"event: " + kind + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


# --- chat completions ------------------------------------------------------------------


def chat_usage(prompt_chars: int, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = tokens_of(prompt_chars)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chat_prompt_chars(messages: list[Any]) -> int:
    return sum(text_chars(m.get("content")) for m in messages if isinstance(m, dict))


def chat_completion(model: str, prompt_chars: int, pieces: int) -> dict[str, Any]:
    """The non-streaming ``chat.completion``."""
    return {
        "id": new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "".join(answer_pieces(prompt_chars, pieces)),
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": chat_usage(prompt_chars, pieces),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_completion_stream(
    model: str, prompt_chars: int, pieces: int, *, include_usage: bool
) -> Iterator[bytes]:
    """The SSE events of a streamed chat completion, ``data: [DONE]`` last."""
    chunk_id = new_id("chatcmpl-")
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": chunk_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if include_usage:
            # With include_usage every chunk carries the field, null until the last.
            body["usage"] = usage
        return sse_data(body)

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    yield chunk([choice({"role": "assistant", "content": "", "refusal": None})])
    for piece in answer_pieces(prompt_chars, pieces):
        yield chunk([choice({"content": piece})])
    yield chunk([choice({}, "stop")])
    if include_usage:
        yield chunk([], chat_usage(prompt_chars, pieces))
    yield sse_data("[DONE]")


# --- responses -------------------------------------------------------------------------


def responses_prompt_chars(request: dict[str, Any]) -> int:
    return text_chars(request.get("input")) + text_chars(request.get("instructions"))


def response_usage(prompt_chars: int, output_tokens: int) -> dict[str, Any]:
    input_tokens = tokens_of(prompt_chars)
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(frozen=True, slots=True)
class _ResponseIds:
    response_id: str
    item_id: str
    created_at: int


def _response_object(
    request: dict[str, Any],
    model: str,
    ids: _ResponseIds,
    *,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": ids.response_id,
        "object": "response",
        "created_at": ids.created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": request.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": bool(request.get("store", True)),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": request.get("metadata") or {},
    }


def _message_item(item_id: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": "in_progress" if text is None else "completed",
        "role": "assistant",
        "content": content,
    }


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _new_ids() -> _ResponseIds:
    return _ResponseIds(new_id("resp_"), new_id("msg_"), int(time.time()))


def response(request: dict[str, Any], model: str, pieces: int) -> dict[str, Any]:
    """The non-streaming ``response``."""
    prompt_chars = responses_prompt_chars(request)
    ids = _new_ids()
    text = "".join(answer_pieces(prompt_chars, pieces))
    return _response_object(
        request,
        model,
        ids,
        status="completed",
        output=[_message_item(ids.item_id, text)],
        usage=response_usage(prompt_chars, pieces),
    )


def response_stream(request: dict[str, Any], model: str, pieces: int) -> Iterator[bytes]:
    """The SSE events of a streamed response, ``response.created`` to ``response.completed``."""
    prompt_chars = responses_prompt_chars(request)
    ids = _new_ids()
    parts = answer_pieces(prompt_chars, pieces)
    text = "".join(parts)
    sequence = 0

    def event(kind: str, **fields: Any) -> bytes:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return sse_event(payload)

    where = {"item_id": ids.item_id, "output_index": 0, "content_index": 0}
    in_progress = _response_object(request, model, ids, status="in_progress", output=[], usage=None)
    yield event("response.created", response=in_progress)
    yield event("response.in_progress", response=in_progress)
    yield event("response.output_item.added", output_index=0, item=_message_item(ids.item_id, None))
    yield event("response.content_part.added", **where, part=_output_text(""))
    for piece in parts:
        yield event("response.output_text.delta", **where, delta=piece, logprobs=[])
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_output_text(text))
    item = _message_item(ids.item_id, text)
    yield event("response.output_item.done", output_index=0, item=item)
    completed = _response_object(
        request,
        model,
        ids,
        status="completed",
        output=[item],
        usage=response_usage(prompt_chars, pieces),
    )
    yield event("response.completed", response=completed)


# --- speech ----------------------------------------------------------------------------


def _tone_period() -> bytes:
    samples = SPEECH_SAMPLE_RATE_HZ // SPEECH_TONE_HZ
    return b"".join(
        struct.pack("<h", round(SPEECH_TONE_AMPLITUDE * math.sin(2 * math.pi * index / samples)))
        for index in range(samples)
    )


_TONE_PERIOD: Final = _tone_period()
#: The compressed formats' filler: a fixed pseudo-random block, repeated.
_FILLER: Final = hashlib.shake_256(b"relay simulator speech").digest(4096)
#: The first bytes of each compressed format (an ID3v2 tag, an Ogg page, an ADTS
#: frame header, FLAC's marker): enough for a sniffer, not a playable file.
_SIGNATURES: Final = {
    "mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00",
    "opus": b"OggS\x00\x02",
    "aac": b"\xff\xf1\x50\x80",
    "flac": b"fLaC",
}


@dataclass(frozen=True, slots=True)
class SpeechAudio:
    """The audio of one ``/v1/audio/speech`` answer: ``header`` then ``pattern``
    repeated, ``total_bytes`` in all; :meth:`read` cuts it without building it."""

    content_type: str
    header: bytes
    pattern: bytes
    total_bytes: int

    def read(self, offset: int, length: int) -> bytes:
        end = min(self.total_bytes, offset + length)
        out = bytearray()
        if offset < len(self.header):
            out += self.header[offset:end]
            offset = len(self.header)
        if offset < end:
            start = (offset - len(self.header)) % len(self.pattern)
            count = end - offset
            repeats = (start + count) // len(self.pattern) + 1
            out += (self.pattern * repeats)[start : start + count]
        return bytes(out)

    def chunks(self, count: int) -> Iterator[bytes]:
        """The audio in ``count`` chunks (fewer when it is shorter than that)."""
        size = max(1, math.ceil(self.total_bytes / count))
        for offset in range(0, self.total_bytes, size):
            yield self.read(offset, size)


def speech_audio(text: str, response_format: str) -> SpeechAudio:
    """The audio of ``text``: :data:`SPEECH_MS_PER_CHAR` per character, at least one."""
    duration_ms = SPEECH_MS_PER_CHAR * max(1, len(text))
    content_type = SPEECH_CONTENT_TYPES[response_format]
    if response_format in ("pcm", "wav"):
        pcm_bytes = duration_ms * SPEECH_SAMPLE_RATE_HZ // 1000 * 2
        header = wav_header(pcm_bytes) if response_format == "wav" else b""
        return SpeechAudio(content_type, header, _TONE_PERIOD, len(header) + pcm_bytes)
    total = duration_ms * COMPRESSED_BYTES_PER_MS[response_format]
    return SpeechAudio(content_type, _SIGNATURES[response_format], _FILLER, total)


def wav_header(pcm_bytes: int) -> bytes:
    """A canonical 44-byte RIFF/WAVE header for mono 24 kHz PCM16 of ``pcm_bytes``."""
    byte_rate = SPEECH_SAMPLE_RATE_HZ * 2
    return (
        b"RIFF"
        + struct.pack("<I", _WAV_HEADER_BYTES - 8 + pcm_bytes)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, SPEECH_SAMPLE_RATE_HZ, byte_rate, 2, 16)
        + b"data"
        + struct.pack("<I", pcm_bytes)
    )


# --- transcriptions --------------------------------------------------------------------


def transcript_text(size_bytes: int, sha256_hex: str) -> str:
    """What the simulator "heard": the upload's size and the start of its SHA-256."""
    return f"Received {size_bytes} bytes with SHA-256 {sha256_hex[:_SHA_PREFIX_CHARS]}."


def audio_seconds(size_bytes: int) -> int:
    """How long an upload of ``size_bytes`` is taken to be (whole seconds, at least 1)."""
    return max(1, math.ceil(size_bytes / TRANSCRIBE_ASSUMED_BYTES_PER_S))


def transcription_usage(model: str, size_bytes: int, text: str) -> dict[str, Any]:
    seconds = audio_seconds(size_bytes)
    if model in DURATION_BILLED_TRANSCRIBE_MODELS:
        return {"type": "duration", "seconds": seconds}
    audio_tokens = seconds * TRANSCRIBE_AUDIO_TOKENS_PER_S
    output_tokens = tokens_of(len(text))
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
        "output_tokens": output_tokens,
        "total_tokens": audio_tokens + output_tokens,
    }


def transcription(model: str, size_bytes: int, sha256_hex: str, response_format: str) -> bytes:
    """The body of a non-streaming transcription in ``response_format``."""
    text = transcript_text(size_bytes, sha256_hex)
    usage = transcription_usage(model, size_bytes, text)
    if response_format == "text":
        return text.encode() + b"\n"
    seconds = audio_seconds(size_bytes)
    if response_format in ("srt", "vtt"):
        sep = "," if response_format == "srt" else "."
        cue = f"00:00:00{sep}000 --> {_clock(float(seconds), sep)}"
        prefix = "1\n" if response_format == "srt" else "WEBVTT\n\n"
        return f"{prefix}{cue}\n{text}\n\n".encode()
    if response_format == "verbose_json":
        return orjson.dumps(
            {
                "task": "transcribe",
                "language": "english",
                "duration": float(seconds),
                "text": text,
                "segments": [],
                "usage": usage,
            }
        )
    return orjson.dumps({"text": text, "usage": usage})


def transcription_stream(model: str, size_bytes: int, sha256_hex: str) -> Iterator[bytes]:
    """``transcript.text.delta`` per word, then ``transcript.text.done`` with the usage."""
    text = transcript_text(size_bytes, sha256_hex)
    words = text.split(" ")
    for index, word in enumerate(words):
        delta = word if index == 0 else " " + word
        yield sse_data({"type": "transcript.text.delta", "delta": delta, "logprobs": None})
    usage = transcription_usage(model, size_bytes, text)
    yield sse_data({"type": "transcript.text.done", "text": text, "logprobs": None, "usage": usage})


def _clock(seconds: float, separator: str) -> str:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}{separator}{millis:03d}"


# --- embeddings ------------------------------------------------------------------------


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from the text's hash (the same text, the same vector)."""
    raw = hashlib.shake_256(text.encode("utf-8", "surrogatepass")).digest(2 * dimensions)
    values = [value / 32767.5 - 1.0 for value in struct.unpack(f"<{dimensions}H", raw)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def embeddings(
    model: str, inputs: list[str], *, dimensions: int, encoding_format: str, token_count: int
) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dimensions)
        encoded: list[float] | str = vector
        if encoding_format == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": token_count, "total_tokens": token_count},
    }


# --- models ----------------------------------------------------------------------------


def model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED_UNIX_S, "owned_by": "system"}


def model_list(models: tuple[str, ...]) -> dict[str, Any]:
    return {"object": "list", "data": [model_object(m) for m in models]}


__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_REST_MODELS",
    "SPEECH_CONTENT_TYPES",
    "SPEECH_MAX_INPUT_CHARS",
    "SpeechAudio",
    "answer_pieces",
    "chat_completion",
    "chat_completion_stream",
    "embedding_vector",
    "embeddings",
    "model_list",
    "model_object",
    "response",
    "response_stream",
    "speech_audio",
    "transcript_text",
    "transcription",
    "transcription_stream",
    "wav_header",
]
