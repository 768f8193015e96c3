"""The sans-I/O core of the simulator: one Realtime session's protocol state machine.

This module owns everything a GA Realtime server decides for one WebSocket
session, with no clock, socket or event loop of its own:

- the session configuration as ``session.update`` changes it (OpenAI's schema,
  wording and merge rules are :mod:`relay.protocol.session_config`'s, the client
  events' :mod:`relay.protocol.client_events`');
- the conversation (items, their order, retrieve/delete/truncate), the input audio
  buffer, an energy-based server VAD, and responses: a deterministic spoken (or
  text) answer streamed as the events and in the order OpenAI's server sends them,
  paced at real time when configured, cancellable, with a usage object whose
  numbers add up;
- the echo mode's hot path: each ``input_audio_buffer.append`` becomes one
  ``response.output_audio.delta`` with the same ``event_id`` and ``audio`` text,
  built by byte concatenation around slices of the input.

The Trio shell (:mod:`relay.simulator.server`) feeds client text messages to
:meth:`SimulatedSession.receive`, asks :meth:`SimulatedSession.pop_due` for the
server events due by a time it passes in, and sleeps until
:meth:`SimulatedSession.next_due`. Pending events live in a heap of
``(due_time, sequence, payload, marker)``; whatever is due is moved, in order, to a
ready deque, so an event generated "now" can never overtake one that fell due
earlier. Given the times passed in, a ``seed`` and an ``id_factory``, the output is
deterministic.

Wire facts follow live captures of OpenAI's GA server (2025-12 and 2026-09), the
official SDK's types and the spec; where a detail could not be confirmed, the
comment next to it says so.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple

import msgspec
import orjson

from relay.config import DEFAULT_MAX_SESSION_S, SimulatorConfig
from relay.protocol import audio
from relay.protocol import validation as v
from relay.protocol.client_events import (
    ITEM,
    RESPONSE_PARAMS,
    SUPPORTED_CLIENT_EVENT_TYPES,
    check_event_fields,
    required_item_id,
)
from relay.protocol.events import (
    ID_BODY_CHARS,
    MAX_CLIENT_EVENT_ID_CHARS,
    EventDecodeError,
    IdFactory,
    decode_envelope,
    error_event,
    new_id,
)
from relay.protocol.session_config import (
    SessionType,
    apply_session_update,
    default_session_object,
    normalized_format,
    validate_session_config,
)
from relay.protocol.validation import ClientEventError, invalid_value

JSON = dict[str, Any]

# --- Session ------------------------------------------------------------------------

#: Session lifetime; ``session.expires_at`` is ``created + this``.
SESSION_MAX_DURATION_S: Final = DEFAULT_MAX_SESSION_S

# --- Limits ---------------------------------------------------------------------------

#: A commit needs this much audio ("Expected at least 100ms of audio").
COMMIT_MIN_AUDIO_MS: Final = 100
#: Uncommitted input audio kept at most (VAD off, no commit): older audio is dropped.
INPUT_AUDIO_BUFFER_MAX_MS: Final = 15 * 60 * 1000
#: Committed user audio kept for ``conversation.item.retrieve``; items past this keep none.
RETAINED_ITEM_AUDIO_MAX_BYTES: Final = 64 * 1024 * 1024

# --- VAD ------------------------------------------------------------------------------

#: Analysis frame of the energy detector.
VAD_FRAME_MS: Final = 10
#: ``turn_detection.threshold`` 0.0 .. 1.0 maps linearly onto this dBFS range, so the
#: default 0.5 means -40 dBFS: speech (about -20 dBFS) passes, room noise does not.
VAD_DBFS_AT_THRESHOLD_0: Final = -70.0
VAD_DBFS_AT_THRESHOLD_1: Final = -10.0
#: Silence that ends a turn for semantic VAD, by eagerness (an energy stand-in for
#: OpenAI's turn model, whose low/medium/high maximum waits are 8 s, 4 s and 2 s).
SEMANTIC_VAD_SILENCE_MS: Final[dict[str, int]] = {
    "low": 1500,
    "medium": 800,
    "auto": 800,
    "high": 400,
}
SEMANTIC_VAD_PREFIX_PADDING_MS: Final = 300
SEMANTIC_VAD_THRESHOLD: Final = 0.5

# --- Generated answers and usage --------------------------------------------------------

#: Speaking rate of the generated answer: its transcript has this many words per second.
ANSWER_WORDS_PER_S: Final = 2.5
#: Rough text tokenisation used for usage numbers.
CHARS_PER_TEXT_TOKEN: Final = 4
#: Realtime audio tokens: user audio is about 10 tokens/s, assistant audio about 20/s.
INPUT_AUDIO_MS_PER_TOKEN: Final = 100
OUTPUT_AUDIO_MS_PER_TOKEN: Final = 50
#: Per-item framing tokens in the model context.
ITEM_OVERHEAD_TOKENS: Final = 4
#: Prompt caching works in blocks of this many tokens (cached counts are multiples of 64).
PROMPT_CACHE_BLOCK_TOKENS: Final = 64
#: What ``rate_limits.updated`` reports as the per-minute token limit (seen live).
RATE_LIMIT_TOKENS_PER_MIN: Final = 15_000_000
#: Transcript and text deltas carry ``obfuscation`` padding up to a multiple of this.
OBFUSCATION_BLOCK_CHARS: Final = 16

#: Seed of the spoken answer when a session is given none (one cached signal for all).
DEFAULT_AUDIO_SEED: Final = 0
CANNED_ANSWER_SENTENCES: Final = (
    "Loud and clear!",
    "I can hear you perfectly.",
    "Sure, I'd be happy to help with that.",
    "Here is a quick summary of what we discussed.",
    "That sounds like a great plan to me.",
    "Let me think about that for a second.",
    "The weather today looks sunny with a light breeze.",
    "Thanks for asking, I'm doing well.",
)
CANNED_USER_SENTENCES: Final = (
    "Hello there.",
    "Can you hear me?",
    "What's the weather like today?",
    "Tell me something interesting.",
    "Thanks, that's all for now.",
)

#: The alphabet of OpenAI ids (as in relay.protocol.events), as bytes for ``translate``.
_ID_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: Maps every byte onto the id alphabet; a slight modulo bias is harmless for ids.
_ID_TRANSLATION: Final = bytes.maketrans(
    bytes(range(256)), bytes(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in range(256))
)


@lru_cache(maxsize=16)
def _answer_audio_chunks(
    total_ms: int, chunk_ms: int, seed: int, format_type: str
) -> tuple[tuple[bytes, str], ...]:
    """The spoken answer as ``(raw, base64)`` chunks; computed once per shape and seed."""
    rate = audio.bytes_per_ms(format_type)
    signal = audio.speech_like_in_format(total_ms, seed, format_type)
    return tuple(
        (chunk, audio.b64encode(chunk)) for chunk in audio.split_chunks(signal, chunk_ms, rate)
    )


def _canned_words(sentences: tuple[str, ...], word_count: int, start: int) -> list[str]:
    """``word_count`` words from the canned sentences, ending in punctuation."""
    words: list[str] = []
    index = start
    while len(words) < word_count:
        words.extend(sentences[index % len(sentences)].split())
        index += 1
    words = words[:word_count]
    if words[-1][-1] not in ".!?":
        words[-1] += "."
    # Deltas carry their leading space, as OpenAI's do (" there", " friend").
    return [words[0]] + [" " + word for word in words[1:]]


def _text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TEXT_TOKEN)


class _FastIds:
    """Event ids in OpenAI's shape (``event_`` + 21 alphanumerics), cheap and seedable.

    :func:`relay.protocol.events.new_id` draws each character from ``secrets``
    (about 30 us per id); event ids need no secrecy and a response carries dozens.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def __call__(self, prefix: str = "event_") -> str:
        return prefix + self._rng.randbytes(ID_BODY_CHARS).translate(_ID_TRANSLATION).decode()

    def obfuscation(self, delta: str) -> str:
        """Padding that rounds a delta up to a multiple of 16 characters, as seen live."""
        pad = OBFUSCATION_BLOCK_CHARS - len(delta) % OBFUSCATION_BLOCK_CHARS
        return self._rng.randbytes(pad).translate(_ID_TRANSLATION).decode()


# =====================================================================================
# Conversation state
# =====================================================================================

ItemKind = Literal[
    "user_audio",
    "user_text",
    "assistant",
    "system",
    "function_call",
    "function_call_output",
    "other",
]


@dataclass(slots=True)
class _Item:
    """One conversation item: its wire form plus what usage and retrieval need."""

    item_id: str
    kind: ItemKind
    wire: JSON
    audio_ms: float = 0.0
    #: Retained audio bytes (user audio, assistant audio) for conversation.item.retrieve.
    audio_bytes: bytes | None = None
    audio_format: str = "audio/pcm"

    def context_tokens(self) -> tuple[int, int]:
        """(text tokens, audio tokens) this item adds to a model context."""
        text = ITEM_OVERHEAD_TOKENS
        audio_tokens = 0
        if self.kind == "user_audio":
            audio_tokens = math.ceil(self.audio_ms / INPUT_AUDIO_MS_PER_TOKEN)
        elif self.kind == "assistant" and self.audio_ms:
            audio_tokens = math.ceil(self.audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN)
        else:
            text += _text_tokens(_item_text(self.wire))
        return text, audio_tokens


def _item_text(wire: JSON) -> str:
    """The words an item puts in the context: texts, transcripts, call outputs."""
    parts = [str(wire.get(name) or "") for name in ("output", "arguments")]
    parts.extend(
        str(part.get("text") or part.get("transcript") or "") for part in wire.get("content") or []
    )
    return " ".join(part for part in parts if part)


class _Marker(NamedTuple):
    """What to record when a scheduled event falls due (sent, from the session's view)."""

    run: _ResponseRun | None
    kind: int
    amount: int


class _Scheduled(NamedTuple):
    due: float
    seq: int
    payload: bytes
    marker: _Marker | None


#: Marker kinds. Every event of a response carries its run, so a cancel can find them.
_MARK_NONE: Final = 0
_MARK_AUDIO: Final = 1
_MARK_WORD: Final = 2
_MARK_FINISHED: Final = 3
_MARK_EXPIRED: Final = 4


@dataclass(slots=True)
class _ResponseRun:
    """A response being streamed: its plan and how much of it has fallen due."""

    response_id: str
    item_id: str
    conversation_id: str | None
    previous_item_id: str | None
    modality: Literal["audio", "text"]
    output_format: JSON
    voice: Any
    max_output_tokens: Any
    metadata: Any
    words: list[str]
    audio_chunks: tuple[tuple[bytes, str], ...]
    input_text_tokens: int
    input_audio_tokens: int
    cached_tokens: int
    item: _Item
    words_due: int = 0
    chunks_due: int = 0
    audio_bytes_due: int = 0
    #: The status the plan ends with if not cancelled ("completed" or "incomplete").
    final_status: str = "completed"
    final_reason: str | None = None

    def note(self, kind: int, amount: int) -> None:
        if kind == _MARK_AUDIO:
            self.chunks_due += 1
            self.audio_bytes_due += amount
        elif kind == _MARK_WORD:
            self.words_due += 1


@dataclass(slots=True)
class _VadState:
    """The energy detector's position and the turn it is tracking (absolute byte offsets)."""

    scanned_to: int = 0
    in_speech: bool = False
    speech_start: int = 0
    quiet_bytes: int = 0
    item_id: str | None = None


@dataclass(slots=True)
class _InputAudio:
    """The input audio buffer: uncommitted bytes and where they sit in the session's audio."""

    buffer: bytearray = field(default_factory=bytearray)
    #: Absolute offset (bytes since session start) of ``buffer[0]``.
    start: int = 0
    #: Bytes ever appended in this session.
    total: int = 0
    #: Echo mode counts appended audio without keeping it.
    counted_only: int = 0


class _AppendEvent(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    audio: str
    event_id: str | None = None


class _EchoProbe(msgspec.Struct):
    """The echo hot path reads only these, as raw JSON text (no string decoding)."""

    type: str
    audio: msgspec.Raw = msgspec.Raw(b"")
    event_id: msgspec.Raw = msgspec.Raw(b"")


class _LooseEnvelope(msgspec.Struct):
    type: object = None
    event_id: object = None


_APPEND_DECODER: Final = msgspec.json.Decoder(_AppendEvent)
_ECHO_DECODER: Final = msgspec.json.Decoder(_EchoProbe)
_LOOSE_DECODER: Final = msgspec.json.Decoder(_LooseEnvelope)
_APPEND_TYPE: Final = "input_audio_buffer.append"
_QUOTE: Final = ord('"')
_EQUALS: Final = ord("=")

# =====================================================================================
# The session
# =====================================================================================


class SimulatedSession:
    """One Realtime session's protocol state machine (no I/O, time passed in).

    ``seed`` makes generated audio, answers, event ids and ``obfuscation`` padding
    reproducible (``None``: event ids differ per session, like OpenAI's);
    ``id_factory`` makes object ids (``sess_``, ``resp_``, ``item_``, ``conv_``)
    reproducible too (default: :func:`relay.protocol.events.new_id`).
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        model: str,
        now: float,
        initial_session: dict[str, object] | None = None,
        seed: int | None = None,
        id_factory: IdFactory = new_id,
    ) -> None:
        self.config = config
        #: Set when the server must close (code, reason) after sending what is due.
        self.close_request: tuple[int, str] | None = None
        self._model = model
        # Without a seed, event ids and obfuscation differ per session, as OpenAI's do,
        # while the spoken answer stays the cached default signal.
        self._audio_seed = DEFAULT_AUDIO_SEED if seed is None else seed
        self._rng = random.Random(seed)  # None: seeded from the OS
        self._ids = _FastIds(self._rng)
        self._new_id = id_factory
        self._now = now
        self._expires_at = int(now + SESSION_MAX_DURATION_S)
        self._conversation_id = id_factory("conv_")
        session_type: SessionType = "realtime"
        if initial_session is not None and initial_session.get("type") == "transcription":
            session_type = "transcription"
        self._session = default_session_object(
            session_type, model=model, session_id=id_factory("sess_"), expires_at=self._expires_at
        )
        if initial_session:
            # The client secret's config; the ?model= of the connection wins over its
            # model (apply_session_update skips "model"). The store validated it when the
            # secret was minted, so a failure here is a programming error.
            try:
                validate_session_config(initial_session)
            except ClientEventError as exc:
                raise ValueError(f"invalid initial_session: {exc.message}") from None
            self._session = apply_session_update(self._session, initial_session)
        self._heap: list[_Scheduled] = []
        self._ready: deque[bytes] = deque()
        self._seq = itertools.count()
        self._items: list[_Item] = []
        self._items_by_id: dict[str, _Item] = {}
        self._retained_audio_bytes = 0
        self._input = _InputAudio()
        self._vad = _VadState()
        self._active: _ResponseRun | None = None
        self._assistant_audio_started = False
        self._previous_prompt_tokens = 0
        self._answers_given = 0
        self._started = False
        self._echo = config.mode == "echo"
        # Echo deltas all belong to one long-lived response/item, fixed at start.
        echo_response_id = id_factory("resp_")
        echo_item_id = id_factory("item_")
        self._echo_head = b'{"type":"response.output_audio.delta","event_id":'
        self._echo_middle = (
            f',"response_id":"{echo_response_id}","item_id":"{echo_item_id}",'
            '"output_index":0,"content_index":0,"delta":'
        ).encode()
        self._handlers: dict[str, Callable[[JSON, str | None], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._on_item_retrieve,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.truncate": self._on_item_truncate,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "session.close": self._on_translation_only,
            "session.input_audio_buffer.append": self._on_translation_only,
        }

    # --- the shell's interface -----------------------------------------------------

    def start(self, now: float) -> None:
        """Queue ``session.created`` (due at once) and the 60-minute expiry."""
        if self._started:
            return
        self._started = True
        self._advance(now)
        self._emit("session.created", {"session": self._session})
        expiry = error_event(
            message=f"Your session hit the maximum duration of "
            f"{int(SESSION_MAX_DURATION_S // 60)} minutes.",
            code="session_expired",
        )
        self._schedule(float(self._expires_at), expiry, _Marker(None, _MARK_EXPIRED, 0))

    def receive(self, data: bytes, now: float) -> None:
        """Handle one client text message (raw JSON bytes)."""
        self._advance(now)
        if self.close_request is not None:
            return  # the session is ending; OpenAI reads nothing more either
        if self._echo and self._echo_append(data):
            return
        try:
            envelope = decode_envelope(data)
        except EventDecodeError as exc:
            self._answer_undecodable(data, exc)
            return
        event_id = envelope.event_id
        try:
            if event_id is not None and len(event_id) > MAX_CLIENT_EVENT_ID_CHARS:
                v.string(MAX_CLIENT_EVENT_ID_CHARS)(event_id, "event_id")
            if envelope.type == _APPEND_TYPE:
                self._on_append(data, event_id)
                return
            handler = self._handlers.get(envelope.type)
            if handler is None:
                raise invalid_value(envelope.type, SUPPORTED_CLIENT_EVENT_TYPES, "type")
            event = orjson.loads(data)
            check_event_fields(event, envelope.type)
            handler(event, event_id)
        except ClientEventError as exc:
            self._emit_error(exc, event_id)

    def pop_due(self, now: float) -> list[bytes]:
        """Server events due by ``now``, in order; each returned once."""
        self._advance(now)
        due = list(self._ready)
        self._ready.clear()
        return due

    def next_due(self) -> float | None:
        """When the next event falls due (now, if some already have), else ``None``."""
        if self._ready:
            return self._now
        if self._heap:
            return self._heap[0].due
        return None

    # --- scheduling ------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        """Move the clock (never backwards) and everything now due to the ready queue."""
        if now > self._now:
            self._now = now
        heap = self._heap
        while heap and heap[0].due <= self._now:
            entry = heapq.heappop(heap)
            self._ready.append(entry.payload)
            if entry.marker is not None:
                self._mark(entry.marker)

    def _mark(self, marker: _Marker) -> None:
        if marker.kind == _MARK_EXPIRED:
            self.close_request = (4000, "invalid_request_error.session_expired")
        elif marker.run is not None:
            run = marker.run
            if marker.kind == _MARK_FINISHED:
                self._finish_run(run, run.words_due, run.chunks_due, run.final_status)
            else:
                run.note(marker.kind, marker.amount)

    def _schedule(self, due: float, payload: bytes, marker: _Marker | None = None) -> None:
        if due <= self._now:
            self._ready.append(payload)
            if marker is not None:
                self._mark(marker)
        else:
            heapq.heappush(self._heap, _Scheduled(due, next(self._seq), payload, marker))

    def _event(self, event_type: str, fields: JSON) -> bytes:
        return orjson.dumps({"type": event_type, "event_id": self._ids(), **fields})

    def _emit(self, event_type: str, fields: JSON) -> None:
        self._ready.append(self._event(event_type, fields))

    def _emit_error(self, exc: ClientEventError, caused_by: str | None) -> None:
        self._ready.append(
            error_event(
                message=exc.message,
                error_type=exc.error_type,
                code=exc.code,
                param=exc.param,
                caused_by_event_id=caused_by,
            )
        )

    def _answer_undecodable(self, data: bytes, exc: EventDecodeError) -> None:
        """Errors for frames with no usable envelope; echo event_id when one is readable."""
        loose: _LooseEnvelope | None
        try:
            loose = _LOOSE_DECODER.decode(data)
        except msgspec.MsgspecError:
            loose = None
        caused_by = (
            loose.event_id if loose is not None and isinstance(loose.event_id, str) else None
        )
        if (
            loose is not None
            and isinstance(loose.type, str)
            and not isinstance(loose.event_id, str)
        ):
            # The envelope failed on event_id (not a string), not on type.
            err = v.wrong_type("event_id", "a string", loose.event_id)
            self._emit_error(err, None)
            return
        self._emit_error(ClientEventError(exc.message, code=exc.code, param=exc.param), caused_by)

    # --- echo mode -------------------------------------------------------------------

    def _echo_append(self, data: bytes) -> bool:
        """The benchmark's hot path; ``False`` hands the message to the normal path."""
        try:
            probe = _ECHO_DECODER.decode(data)
        except msgspec.MsgspecError:
            return False
        if probe.type != _APPEND_TYPE:
            return False
        audio_text = memoryview(probe.audio)
        if len(audio_text) < 2 or audio_text[0] != _QUOTE:
            return False  # missing or not a string: the normal path words the error
        raw_event_id = memoryview(probe.event_id)
        event_id: bytes | memoryview = raw_event_id
        if len(raw_event_id) == 0 or raw_event_id.tobytes() == b"null":
            event_id = b'"' + self._ids().encode() + b'"'
        elif raw_event_id[0] != _QUOTE:
            return False  # not a string: the normal path words the error
        self._ready.append(
            b"".join((self._echo_head, event_id, self._echo_middle, audio_text, b"}"))
        )
        # Account for the audio without decoding it, so commit/clear behave as usual.
        encoded_chars = len(audio_text) - 2
        padding = 0
        if encoded_chars >= 2 and audio_text[-2] == _EQUALS:
            padding = 2 if audio_text[-3] == _EQUALS else 1
        self._input.counted_only += audio.b64_decoded_length(encoded_chars, padding)
        return True

    # --- input audio ---------------------------------------------------------------

    def _input_format(self) -> str:
        return str(self._session["audio"]["input"]["format"]["type"])

    def _input_rate(self) -> int:
        return audio.bytes_per_ms(self._input_format())

    def _buffered_bytes(self) -> int:
        return len(self._input.buffer) + self._input.counted_only

    def _on_append(self, data: bytes, event_id: str | None) -> None:
        try:
            event = _APPEND_DECODER.decode(data)
        except msgspec.ValidationError:
            # Slow path, only for bad events: find the precise problem.
            loose = orjson.loads(data)
            check_event_fields(loose, _APPEND_TYPE)
            if "audio" not in loose:
                raise v.missing("audio") from None
            raise v.wrong_type("audio", "a string", loose.get("audio")) from None
        try:
            pcm = audio.b64decode(event.audio)
        except ValueError:
            raise ClientEventError(
                "Invalid 'audio'. Expected base64-encoded audio bytes.",
                code="invalid_value",
                param="audio",
            ) from None
        inp = self._input
        inp.buffer += pcm
        inp.total += len(pcm)
        max_bytes = INPUT_AUDIO_BUFFER_MAX_MS * self._input_rate()
        if len(inp.buffer) > max_bytes:
            # Bounded memory: the oldest uncommitted audio goes first.
            drop = len(inp.buffer) - max_bytes
            del inp.buffer[:drop]
            inp.start += drop
        if self._turn_detection() is not None:
            self._run_vad()

    def _turn_detection(self) -> JSON | None:
        detection: JSON | None = self._session["audio"]["input"]["turn_detection"]
        return detection

    def _vad_settings(self, detection: JSON) -> tuple[float, int, int]:
        """(RMS threshold, prefix padding bytes, silence bytes) for the current config."""
        rate = self._input_rate()
        if detection["type"] == "semantic_vad":
            threshold = SEMANTIC_VAD_THRESHOLD
            prefix_ms = SEMANTIC_VAD_PREFIX_PADDING_MS
            silence_ms = SEMANTIC_VAD_SILENCE_MS[detection.get("eagerness") or "auto"]
        else:
            threshold = float(detection.get("threshold", 0.5))
            prefix_ms = int(detection.get("prefix_padding_ms", 300))
            silence_ms = int(detection.get("silence_duration_ms", 200))
        threshold_dbfs = VAD_DBFS_AT_THRESHOLD_0 + threshold * (
            VAD_DBFS_AT_THRESHOLD_1 - VAD_DBFS_AT_THRESHOLD_0
        )
        return 10 ** (threshold_dbfs / 20), prefix_ms * rate, silence_ms * rate

    def _run_vad(self) -> None:
        detection = self._turn_detection()
        if detection is None:
            return
        rms_threshold, prefix_bytes, silence_bytes = self._vad_settings(detection)
        format_type = self._input_format()
        rate = self._input_rate()
        frame_bytes = VAD_FRAME_MS * rate
        inp, vad = self._input, self._vad
        vad.scanned_to = max(vad.scanned_to, inp.start)
        while inp.total - vad.scanned_to >= frame_bytes:
            offset = vad.scanned_to - inp.start
            frame = memoryview(inp.buffer)[offset : offset + frame_bytes]
            loud = audio.rms_in_format(frame, format_type) >= rms_threshold
            frame.release()
            frame_end = vad.scanned_to + frame_bytes
            if not vad.in_speech:
                if loud:
                    self._speech_started(detection, prefix_bytes, rate)
                else:
                    # Keep only the prefix padding before the detector: bounded memory.
                    keep_from = frame_end - prefix_bytes
                    if keep_from > inp.start:
                        del inp.buffer[: keep_from - inp.start]
                        inp.start = keep_from
            elif loud:
                vad.quiet_bytes = 0
            else:
                vad.quiet_bytes += frame_bytes
                if vad.quiet_bytes >= silence_bytes:
                    vad.scanned_to = frame_end
                    self._speech_stopped(detection, frame_end, rate)
                    continue
            vad.scanned_to = frame_end

    def _speech_started(self, detection: JSON, prefix_bytes: int, rate: int) -> None:
        vad, inp = self._vad, self._input
        vad.in_speech = True
        vad.quiet_bytes = 0
        vad.speech_start = max(inp.start, vad.scanned_to - prefix_bytes)
        vad.item_id = self._new_id("item_")
        self._emit(
            "input_audio_buffer.speech_started",
            {"audio_start_ms": vad.speech_start // rate, "item_id": vad.item_id},
        )
        run = self._active
        if (
            run is not None
            and run.conversation_id is not None
            and detection.get("interrupt_response", True)
        ):
            self._cancel_run(run, reason="turn_detected")

    def _speech_stopped(self, detection: JSON, end: int, rate: int) -> None:
        vad, inp = self._vad, self._input
        item_id = vad.item_id or self._new_id("item_")
        self._emit(
            "input_audio_buffer.speech_stopped", {"audio_end_ms": end // rate, "item_id": item_id}
        )
        start = max(vad.speech_start, inp.start)
        segment = bytes(inp.buffer[start - inp.start : end - inp.start])
        del inp.buffer[: end - inp.start]
        inp.start = end
        vad.in_speech = False
        vad.quiet_bytes = 0
        vad.item_id = None
        self._commit_user_audio(item_id, segment, len(segment) / rate, None)
        if (
            self._session["type"] == "realtime"
            and detection.get("create_response", True)
            and self._active is None
        ):
            self._start_response(None)

    def _on_commit(self, event: JSON, event_id: str | None) -> None:
        rate = self._input_rate()
        buffered_ms = self._buffered_bytes() / rate
        if buffered_ms < COMMIT_MIN_AUDIO_MS:
            raise ClientEventError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{COMMIT_MIN_AUDIO_MS}ms of audio, but buffer only has {buffered_ms:.2f}ms of "
                "audio.",
                code="input_audio_buffer_commit_empty",
            )
        vad, inp = self._vad, self._input
        # A manual commit during a VAD turn keeps the item id speech_started announced.
        item_id = vad.item_id if vad.in_speech and vad.item_id else self._new_id("item_")
        segment = bytes(inp.buffer)
        self._reset_input()
        self._commit_user_audio(item_id, segment, buffered_ms, None)

    def _reset_input(self) -> None:
        inp = self._input
        inp.start += len(inp.buffer)
        inp.buffer.clear()
        inp.counted_only = 0
        self._vad = _VadState(scanned_to=inp.total)

    def _on_clear(self, event: JSON, event_id: str | None) -> None:
        self._reset_input()
        self._emit("input_audio_buffer.cleared", {})

    def _commit_user_audio(
        self, item_id: str, segment: bytes, duration: float, transcript: str | None
    ) -> None:
        previous = self._items[-1].item_id if self._items else None
        self._emit(
            "input_audio_buffer.committed", {"previous_item_id": previous, "item_id": item_id}
        )
        wire: JSON = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": transcript}],
        }
        keep = (
            segment
            if self._retained_audio_bytes + len(segment) <= RETAINED_ITEM_AUDIO_MAX_BYTES
            else None
        )
        if keep is not None:
            self._retained_audio_bytes += len(keep)
        item = _Item(
            item_id,
            "user_audio",
            wire,
            audio_ms=duration,
            audio_bytes=keep or None,
            audio_format=self._input_format(),
        )
        self._insert_item(item, len(self._items))
        self._emit("conversation.item.added", {"previous_item_id": previous, "item": wire})
        self._emit("conversation.item.done", {"previous_item_id": previous, "item": wire})
        transcription = self._session["audio"]["input"].get("transcription")
        if transcription is not None:
            self._transcribe(item, transcription)

    def _transcribe(self, item: _Item, transcription: JSON) -> None:
        """Input transcription events: deltas, then completed with usage (canned words)."""
        word_count = max(1, round(item.audio_ms / 1000 * ANSWER_WORDS_PER_S))
        words = _canned_words(CANNED_USER_SENTENCES, word_count, self._rng.randrange(100))
        for word in words:
            self._emit(
                "conversation.item.input_audio_transcription.delta",
                {
                    "item_id": item.item_id,
                    "content_index": 0,
                    "delta": word,
                    "obfuscation": self._ids.obfuscation(word),
                },
            )
        transcript = "".join(words)
        usage: JSON
        if transcription.get("model") == "whisper-1":
            usage = {"type": "duration", "seconds": round(item.audio_ms / 1000, 3)}
        else:
            audio_tokens = math.ceil(item.audio_ms / INPUT_AUDIO_MS_PER_TOKEN)
            output_tokens = _text_tokens(transcript)
            usage = {
                "type": "tokens",
                "total_tokens": audio_tokens + output_tokens,
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": output_tokens,
            }
        item.wire["content"][0]["transcript"] = transcript
        self._emit(
            "conversation.item.input_audio_transcription.completed",
            {"item_id": item.item_id, "content_index": 0, "transcript": transcript, "usage": usage},
        )

    # --- session.update ----------------------------------------------------------------

    def _on_session_update(self, event: JSON, event_id: str | None) -> None:
        if "session" not in event:
            raise v.missing("session")
        update = event["session"]
        kind = validate_session_config(update)
        current_kind = self._session["type"]
        if kind != current_kind:
            raise ClientEventError(
                f"Passing a {kind} session update event to a {current_kind} session is not "
                "allowed.",
                code="invalid_value",
                param="session.type",
            )
        if "model" in update and update["model"] != self._model:
            # [unconfirmed wording] The SDK documents that model cannot change.
            raise ClientEventError(
                f"Invalid value: '{update['model']}'. The session's model cannot be changed "
                f"once the session has started; it is '{self._model}'.",
                code="invalid_value",
                param="session.model",
            )
        new_voice = update.get("audio", {}).get("output", {}).get("voice")
        current_voice = self._session.get("audio", {}).get("output", {}).get("voice")
        if new_voice is not None and new_voice != current_voice and self._assistant_audio_started:
            raise ClientEventError(
                "Cannot update a conversation's voice if assistant audio is present.",
                code="cannot_update_voice",
            )
        before = self._turn_detection()
        self._session = apply_session_update(self._session, update)
        if self._turn_detection() != before:
            # A new detector starts from the current position, outside any turn.
            self._vad = _VadState(scanned_to=self._input.total)
        self._emit("session.updated", {"session": self._session})

    def _on_translation_only(self, event: JSON, event_id: str | None) -> None:
        # [unconfirmed wording] Listed as supported by OpenAI, but meant for translation
        # sessions; a realtime session has no use for them.
        raise ClientEventError(
            f"The event type '{event['type']}' is only supported in translation sessions.",
            code="invalid_value",
            param="type",
        )

    # --- conversation items ------------------------------------------------------------

    def _insert_item(self, item: _Item, index: int) -> None:
        self._items.insert(index, item)
        self._items_by_id[item.item_id] = item

    def _on_item_create(self, event: JSON, event_id: str | None) -> None:
        if "item" not in event:
            raise v.missing("item")
        raw = event["item"]
        ITEM(raw, "item")
        previous_id = event.get("previous_item_id")
        if previous_id is not None:
            v.string()(previous_id, "previous_item_id")
        if previous_id == "root":
            index, previous = 0, None
        elif previous_id:
            target = self._items_by_id.get(previous_id)
            if target is None:
                # [unconfirmed wording] OpenAI refuses unknown previous_item_id values.
                raise ClientEventError(
                    f"Error adding item: the previous item with id '{previous_id}' does not exist.",
                    code="item_create_invalid_previous_item_id",
                    param="previous_item_id",
                )
            index, previous = self._items.index(target) + 1, previous_id
        else:
            index = len(self._items)
            previous = self._items[-1].item_id if self._items else None
        item = self._item_from_client(raw)
        self._insert_item(item, index)
        self._emit("conversation.item.added", {"previous_item_id": previous, "item": item.wire})
        self._emit("conversation.item.done", {"previous_item_id": previous, "item": item.wire})

    def _item_from_client(self, raw: JSON) -> _Item:
        """The server's representation of a client item (ids and status filled in)."""
        item_id = raw.get("id") or self._new_id("item_")
        kind_name = raw["type"]
        if kind_name == "message":
            role = raw["role"]
            content: list[JSON] = []
            audio_ms = 0.0
            audio_bytes: bytes | None = None
            for part in raw["content"]:
                part_type = part["type"]
                if part_type == "input_audio":
                    decoded = _decode_item_audio(part.get("audio"))
                    audio_ms += len(decoded) / self._input_rate()
                    audio_bytes = (audio_bytes or b"") + decoded
                    content.append({"type": "input_audio", "transcript": part.get("transcript")})
                elif part_type == "output_audio":
                    content.append({"type": "output_audio", "transcript": part.get("transcript")})
                else:
                    content.append(copy.deepcopy(part))
            wire: JSON = {
                "id": item_id,
                "type": "message",
                "status": "completed",
                "role": role,
                "content": content,
            }
            kind: ItemKind
            if role == "user":
                kind = "user_audio" if audio_ms else "user_text"
            elif role == "assistant":
                kind = "assistant"
            else:
                kind = "system"
            return _Item(
                item_id,
                kind,
                wire,
                audio_ms=audio_ms,
                audio_bytes=audio_bytes,
                audio_format=self._input_format(),
            )
        wire = {"id": item_id, **{k: copy.deepcopy(v) for k, v in raw.items() if k != "id"}}
        wire.setdefault("status", "completed")
        kind = kind_name if kind_name in ("function_call", "function_call_output") else "other"
        return _Item(item_id, kind, wire)

    def _on_item_retrieve(self, event: JSON, event_id: str | None) -> None:
        item_id = required_item_id(event)
        item = self._items_by_id.get(item_id)
        if item is None:
            raise ClientEventError(
                f"Error retrieving item: the item with id '{item_id}' does not exist.",
                code="item_retrieve_invalid_item_id",
            )
        wire = copy.deepcopy(item.wire)
        if item.audio_bytes is not None:
            # Retrieval includes the audio bytes, unlike item.added/done.
            for part in wire.get("content", []):
                if part.get("type") in ("input_audio", "output_audio"):
                    part["audio"] = audio.b64encode(item.audio_bytes)
                    break
        self._emit("conversation.item.retrieved", {"item": wire})

    def _on_item_delete(self, event: JSON, event_id: str | None) -> None:
        item_id = required_item_id(event)
        item = self._items_by_id.pop(item_id, None)
        if item is None:
            raise ClientEventError(
                f"Error deleting item: the item with id '{item_id}' does not exist.",
                code="item_delete_invalid_item_id",
            )
        self._items = [kept for kept in self._items if kept.item_id != item_id]
        if item.audio_bytes is not None:
            self._retained_audio_bytes -= len(item.audio_bytes)
        self._emit("conversation.item.deleted", {"item_id": item_id})

    def _on_item_truncate(self, event: JSON, event_id: str | None) -> None:
        item_id = required_item_id(event)
        for name in ("content_index", "audio_end_ms"):
            if name not in event:
                raise v.missing(name)
            v.integer(0)(event[name], name)
        content_index: int = event["content_index"]
        audio_end_ms: int = event["audio_end_ms"]
        item = self._items_by_id.get(item_id)
        if item is None:
            # [unconfirmed wording] The code is the one clients see live.
            raise ClientEventError(
                f"Error truncating item: the item with id '{item_id}' does not exist.",
                code="item_truncate_invalid_item_id",
            )
        content = item.wire.get("content") or []
        if (
            item.kind != "assistant"
            or content_index >= len(content)
            or content[content_index].get("type") != "output_audio"
        ):
            raise ClientEventError(
                "Only the audio content of assistant message items can be truncated.",
                code="invalid_value",
                param="content_index",
            )
        if audio_end_ms > item.audio_ms:
            raise ClientEventError(
                f"Audio content of {item.audio_ms:.0f}ms is already shorter than {audio_end_ms}ms",
                code="invalid_value",
                param="audio_end_ms",
            )
        item.audio_ms = float(audio_end_ms)
        if item.audio_bytes is not None:
            rate = audio.bytes_per_ms(item.audio_format)
            item.audio_bytes = item.audio_bytes[: audio_end_ms * rate]
        # OpenAI drops the transcript so the context holds no text the user never heard.
        content[content_index]["transcript"] = ""
        self._emit(
            "conversation.item.truncated",
            {"item_id": item_id, "content_index": content_index, "audio_end_ms": audio_end_ms},
        )

    # --- responses -----------------------------------------------------------------

    def _on_response_create(self, event: JSON, event_id: str | None) -> None:
        params = event.get("response")
        if params is not None:
            RESPONSE_PARAMS(params, "response")
        if self._session["type"] != "realtime":
            # [unconfirmed wording]
            raise ClientEventError(
                "Responses cannot be created in a transcription session.",
                code="invalid_value",
                param="type",
            )
        if self._active is not None:
            raise ClientEventError(
                "Conversation already has an active response in progress: "
                f"{self._active.response_id}. Wait until the response is finished before "
                "creating a new one.",
                code="conversation_already_has_active_response",
            )
        self._start_response(params)

    def _on_response_cancel(self, event: JSON, event_id: str | None) -> None:
        response_id = event.get("response_id")
        if response_id is not None:
            v.string()(response_id, "response_id")
        run = self._active
        if run is None or (response_id and response_id != run.response_id):
            raise ClientEventError(
                "Cancellation failed: no active response found", code="response_cancel_not_active"
            )
        self._cancel_run(run, reason="client_cancelled")

    def _context_items(self, params: JSON) -> list[_Item]:
        if "input" not in params:
            return list(self._items)
        items: list[_Item] = []
        for raw in params["input"]:
            if raw["type"] == "item_reference":
                found = self._items_by_id.get(raw["id"])
                if found is not None:
                    items.append(found)
            else:
                items.append(self._item_from_client(raw))
        return items

    def _start_response(self, params: JSON | None) -> None:
        """Plan a response and schedule every event of it (paced or all at once)."""
        params = params or {}
        session = self._session
        modality: Literal["audio", "text"] = (
            "text"
            if (params.get("output_modalities") or session["output_modalities"]) == ["text"]
            else "audio"
        )
        output_audio = params.get("audio", {}).get("output", {})
        output_format = (
            normalized_format(output_audio["format"])
            if "format" in output_audio
            else copy.deepcopy(session["audio"]["output"]["format"])
        )
        voice = output_audio.get("voice", session["audio"]["output"]["voice"])
        max_tokens: int | str = session["max_output_tokens"]
        if "max_output_tokens" in params:
            max_tokens = params["max_output_tokens"]
        instructions = str(params.get("instructions", session["instructions"]))
        tools = params.get("tools", session["tools"])
        conversation = params.get("conversation") or "auto"
        in_conversation = conversation != "none"

        # Usage of the context this response reads.
        context = self._context_items(params)
        text_tokens = _text_tokens(instructions) + (
            _text_tokens(orjson.dumps(tools).decode()) if tools else 0
        )
        audio_tokens = 0
        for item in context:
            item_text, item_audio = item.context_tokens()
            text_tokens += item_text
            audio_tokens += item_audio
        prompt_tokens = text_tokens + audio_tokens
        cacheable = min(
            prompt_tokens, max(self._previous_prompt_tokens, _text_tokens(instructions))
        )
        cached = cacheable // PROMPT_CACHE_BLOCK_TOKENS * PROMPT_CACHE_BLOCK_TOKENS
        if in_conversation:
            self._previous_prompt_tokens = prompt_tokens

        # The answer: words paced like speech over the configured audio length.
        total_ms = self.config.response_audio_ms
        word_count = max(1, round(total_ms / 1000 * ANSWER_WORDS_PER_S))
        words = _canned_words(CANNED_ANSWER_SENTENCES, word_count, self._answers_given)
        self._answers_given += 1
        chunks: tuple[tuple[bytes, str], ...] = ()
        if modality == "audio":
            chunks = _answer_audio_chunks(
                total_ms, self.config.delta_audio_ms, self._audio_seed, output_format["type"]
            )
        final_status, final_reason = "completed", None
        if max_tokens != "inf":
            words, chunks, truncated = _fit_output_budget(
                words, chunks, int(max_tokens), audio.bytes_per_ms(output_format["type"])
            )
            if truncated:
                final_status, final_reason = "incomplete", "max_output_tokens"

        response_id = self._new_id("resp_")
        item_id = self._new_id("item_")
        previous = self._items[-1].item_id if self._items and in_conversation else None
        item_wire: JSON = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        item = _Item(item_id, "assistant", item_wire, audio_format=output_format["type"])
        run = _ResponseRun(
            response_id=response_id,
            item_id=item_id,
            conversation_id=self._conversation_id if in_conversation else None,
            previous_item_id=previous,
            modality=modality,
            output_format=output_format,
            voice=voice,
            max_output_tokens=max_tokens,
            metadata=params.get("metadata"),
            words=words,
            audio_chunks=chunks,
            input_text_tokens=text_tokens,
            input_audio_tokens=audio_tokens,
            cached_tokens=cached,
            item=item,
            final_status=final_status,
            final_reason=final_reason,
        )
        self._active = run
        if in_conversation:
            self._insert_item(item, len(self._items))
        if modality == "audio":
            self._assistant_audio_started = True
        self._schedule_run(run)

    def _schedule_run(self, run: _ResponseRun) -> None:
        """Every event of a response, in OpenAI's order; deltas paced if configured."""
        start = self._now
        plain = _Marker(run, _MARK_NONE, 0)

        def at(due: float, event_type: str, fields: JSON, marker: _Marker = plain) -> None:
            self._schedule(due, self._event(event_type, fields), marker)

        opened = dict(run.item.wire, content=[])
        at(
            start,
            "response.created",
            {"response": self._response_object(run, "in_progress", None, [], None)},
        )
        at(
            start,
            "response.output_item.added",
            {"response_id": run.response_id, "output_index": 0, "item": opened},
        )
        if run.conversation_id is not None:
            at(
                start,
                "conversation.item.added",
                {"previous_item_id": run.previous_item_id, "item": opened},
            )
        ids = self._part_ids(run)
        # The part type stays "audio"/"text" on the wire (GA items say output_audio/output_text).
        part: JSON = (
            {"type": "audio", "transcript": ""}
            if run.modality == "audio"
            else {"type": "text", "text": ""}
        )
        at(start, "response.content_part.added", {**ids, "part": part})
        words, chunks = run.words, run.audio_chunks
        word_delta = (
            "response.output_audio_transcript.delta"
            if run.modality == "audio"
            else "response.output_text.delta"
        )

        def word_event(due: float, word: str) -> None:
            fields = {**ids, "delta": word, "obfuscation": self._ids.obfuscation(word)}
            at(due, word_delta, fields, _Marker(run, _MARK_WORD, 0))

        end = start
        if chunks:
            step_s = self.config.delta_audio_ms / 1000 if self.config.realtime_pacing else 0.0
            for index, (raw, b64) in enumerate(chunks):
                due = start + index * step_s
                # Words spread over the chunks; a chunk's words precede its audio, as
                # OpenAI's transcript runs slightly ahead of the audio.
                first = -(-index * len(words) // len(chunks))  # ceiling division
                last = -(-(index + 1) * len(words) // len(chunks))
                for word in words[first:last]:
                    word_event(due, word)
                at(
                    due,
                    "response.output_audio.delta",
                    {**ids, "delta": b64},
                    _Marker(run, _MARK_AUDIO, len(raw)),
                )
            end = start + (len(chunks) - 1) * step_s
        else:
            for word in words:
                word_event(start, word)
        for payload, finishes in self._tail_events(
            run, len(words), len(chunks), run.final_status, run.final_reason
        ):
            self._schedule(end, payload, _Marker(run, _MARK_FINISHED, 0) if finishes else plain)

    def _part_ids(self, run: _ResponseRun) -> JSON:
        return {
            "response_id": run.response_id,
            "item_id": run.item_id,
            "output_index": 0,
            "content_index": 0,
        }

    def _response_object(
        self,
        run: _ResponseRun,
        status: str,
        status_details: JSON | None,
        output: list[JSON],
        usage: JSON | None,
    ) -> JSON:
        return {
            "object": "realtime.response",
            "id": run.response_id,
            "status": status,
            "status_details": status_details,
            "output": output,
            "conversation_id": run.conversation_id,
            "output_modalities": [run.modality],
            "max_output_tokens": run.max_output_tokens,
            "audio": {"output": {"format": run.output_format, "voice": run.voice}},
            "usage": usage,
            "metadata": run.metadata,
        }

    def _final_content(self, run: _ResponseRun, words_sent: int) -> tuple[JSON, JSON]:
        """(item content, content part) for what the client received."""
        text = "".join(run.words[:words_sent])
        if run.modality == "audio":
            return {"type": "output_audio", "transcript": text}, {
                "type": "audio",
                "transcript": text,
            }
        return {"type": "output_text", "text": text}, {"type": "text", "text": text}

    def _usage(self, run: _ResponseRun, words_sent: int, chunks_sent: int) -> JSON:
        """A usage object whose totals add up: total = input + output, details sum."""
        audio_ms = self._sent_audio_ms(run, chunks_sent)
        output_audio_tokens = math.ceil(audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN)
        output_text_tokens = _text_tokens("".join(run.words[:words_sent]))
        input_tokens = run.input_text_tokens + run.input_audio_tokens
        output_tokens = output_text_tokens + output_audio_tokens
        # Cached tokens are a prefix of the input: text first (instructions), then audio.
        cached_text = min(run.cached_tokens, run.input_text_tokens)
        cached_audio = min(run.cached_tokens - cached_text, run.input_audio_tokens)
        return {
            "total_tokens": input_tokens + output_tokens,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "input_token_details": {
                "text_tokens": run.input_text_tokens,
                "audio_tokens": run.input_audio_tokens,
                "image_tokens": 0,
                "cached_tokens": cached_text + cached_audio,
                "cached_tokens_details": {
                    "text_tokens": cached_text,
                    "audio_tokens": cached_audio,
                    "image_tokens": 0,
                },
            },
            "output_token_details": {
                "text_tokens": output_text_tokens,
                "audio_tokens": output_audio_tokens,
            },
        }

    @staticmethod
    def _sent_audio_ms(run: _ResponseRun, chunks_sent: int) -> float:
        sent = sum(len(raw) for raw, _ in run.audio_chunks[:chunks_sent])
        return sent / audio.bytes_per_ms(run.output_format["type"])

    def _tail_events(
        self,
        run: _ResponseRun,
        words_sent: int,
        chunks_sent: int,
        status: str,
        reason: str | None,
    ) -> list[tuple[bytes, bool]]:
        """The closing events of a response as ``(payload, ends_the_response)``."""
        ids = self._part_ids(run)
        content, part = self._final_content(run, words_sent)
        item_wire: JSON = {
            "id": run.item_id,
            "type": "message",
            "status": "completed" if status == "completed" else "incomplete",
            "role": "assistant",
            "content": [content],
        }
        events: list[tuple[bytes, bool]] = []

        def add(event_type: str, fields: JSON, *, finishes: bool = False) -> None:
            events.append((self._event(event_type, fields), finishes))

        if run.modality == "audio":
            add("response.output_audio.done", ids)
            add(
                "response.output_audio_transcript.done",
                {**ids, "transcript": content["transcript"]},
            )
        else:
            add("response.output_text.done", {**ids, "text": content["text"]})
        add("response.content_part.done", {**ids, "part": part})
        add(
            "response.output_item.done",
            {"response_id": run.response_id, "output_index": 0, "item": item_wire},
        )
        if run.conversation_id is not None:
            add(
                "conversation.item.done",
                {"previous_item_id": run.previous_item_id, "item": item_wire},
            )
        usage = self._usage(run, words_sent, chunks_sent)
        details = None if status == "completed" else {"type": status, "reason": reason}
        add(
            "response.done",
            {"response": self._response_object(run, status, details, [item_wire], usage)},
            finishes=True,
        )
        # OpenAI follows every response.done with the token budget left.
        total = usage["total_tokens"]
        add(
            "rate_limits.updated",
            {
                "rate_limits": [
                    {
                        "name": "tokens",
                        "limit": RATE_LIMIT_TOKENS_PER_MIN,
                        "remaining": RATE_LIMIT_TOKENS_PER_MIN - total,
                        "reset_seconds": round(60 * total / RATE_LIMIT_TOKENS_PER_MIN, 3),
                    }
                ]
            },
        )
        return events

    def _finish_run(
        self, run: _ResponseRun, words_sent: int, chunks_sent: int, status: str
    ) -> None:
        """The response is over: the conversation keeps what the client received."""
        if self._active is run:
            self._active = None
        content, _ = self._final_content(run, words_sent)
        run.item.wire.update(
            status="completed" if status == "completed" else "incomplete", content=[content]
        )
        run.item.audio_ms = self._sent_audio_ms(run, chunks_sent)
        if chunks_sent and run.conversation_id is not None:
            kept = b"".join(raw for raw, _ in run.audio_chunks[:chunks_sent])
            if self._retained_audio_bytes + len(kept) <= RETAINED_ITEM_AUDIO_MAX_BYTES:
                self._retained_audio_bytes += len(kept)
                run.item.audio_bytes = kept

    def _cancel_run(self, run: _ResponseRun, *, reason: str) -> None:
        """Unschedule what is not yet due and close the response as cancelled."""
        self._heap = [
            entry for entry in self._heap if entry.marker is None or entry.marker.run is not run
        ]
        heapq.heapify(self._heap)
        for payload, _ in self._tail_events(
            run, run.words_due, run.chunks_due, "cancelled", reason
        ):
            self._ready.append(payload)
        self._finish_run(run, run.words_due, run.chunks_due, "cancelled")


def _fit_output_budget(
    words: list[str], chunks: tuple[tuple[bytes, str], ...], budget: int, rate: int
) -> tuple[list[str], tuple[tuple[bytes, str], ...], bool]:
    """Cut the planned answer to ``max_output_tokens``; ``True`` if it was cut."""
    text_tokens = _text_tokens("".join(words))
    audio_ms = sum(len(raw) for raw, _ in chunks) / rate
    if text_tokens + math.ceil(audio_ms / OUTPUT_AUDIO_MS_PER_TOKEN) <= budget:
        return words, chunks, False
    if not chunks:
        kept: list[str] = []
        for word in words:
            if _text_tokens("".join([*kept, word])) > budget:
                break
            kept.append(word)
        return kept, chunks, True
    kept_chunks: list[tuple[bytes, str]] = []
    for chunk in chunks:
        count = len(kept_chunks) + 1
        kept_words = words[: -(-count * len(words) // len(chunks))]
        ms = sum(len(raw) for raw, _ in [*kept_chunks, chunk]) / rate
        if _text_tokens("".join(kept_words)) + math.ceil(ms / OUTPUT_AUDIO_MS_PER_TOKEN) > budget:
            break
        kept_chunks.append(chunk)
    kept_words = words[: -(-len(kept_chunks) * len(words) // len(chunks))]
    return kept_words, tuple(kept_chunks), True


def _decode_item_audio(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return audio.b64decode(text)
    except ValueError:
        raise ClientEventError(
            "Invalid 'item.content.audio'. Expected base64-encoded audio bytes.",
            code="invalid_value",
            param="item.content.audio",
        ) from None


__all__ = [
    "SESSION_MAX_DURATION_S",
    "SimulatedSession",
]
