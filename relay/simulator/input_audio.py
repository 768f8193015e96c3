"""A simulated session's input audio buffer and its energy-based voice activity detector.

This module owns the user's audio before it becomes a conversation item:

- ``input_audio_buffer.append``: the fast decode of the event and its audio, with
  OpenAI's refusals for a bad one; the buffer is bounded (uncommitted audio past
  :data:`INPUT_AUDIO_BUFFER_MAX_MS` is dropped from the front);
- ``input_audio_buffer.commit`` (at least :data:`COMMIT_MIN_AUDIO_MS` of audio) and
  ``.clear``;
- turn detection: a frame-by-frame RMS detector standing in for OpenAI's server
  and semantic VAD, with the configured threshold, prefix padding and silence
  duration. It emits ``input_audio_buffer.speech_started`` / ``speech_stopped`` and
  hands each turn to the session (the ``on_speech_started`` / ``on_speech_stopped``
  callbacks), which commits it and may interrupt or start a response;
- an optional ``on_audio`` observer sees each append's decoded audio (the
  simulator's record of the audio it received, for tests).

Offsets are absolute (bytes since the session started), so event times
(``audio_start_ms``, ``audio_end_ms``) survive the buffer's trimming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import orjson

from relay.protocol import audio
from relay.protocol import validation as v
from relay.protocol.client_events import check_event_fields
from relay.protocol.events import IdFactory
from relay.protocol.validation import ClientEventError
from relay.simulator.outbox import Outbox

JSON = dict[str, Any]

#: A commit needs this much audio ("Expected at least 100ms of audio").
COMMIT_MIN_AUDIO_MS: Final = 100
#: Uncommitted input audio kept at most (VAD off, no commit): older audio is dropped.
INPUT_AUDIO_BUFFER_MAX_MS: Final = 15 * 60 * 1000

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

APPEND_TYPE: Final = "input_audio_buffer.append"


class _AppendEvent(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    audio: str
    event_id: str | None = None


_APPEND_DECODER: Final = msgspec.json.Decoder(_AppendEvent)


@dataclass(slots=True)
class _VadState:
    """The energy detector's position and the turn it is tracking (absolute byte offsets)."""

    scanned_to: int = 0
    in_speech: bool = False
    speech_start: int = 0
    quiet_bytes: int = 0
    item_id: str | None = None


@dataclass(slots=True)
class _Buffer:
    """The input audio buffer: uncommitted bytes and where they sit in the session's audio."""

    buffer: bytearray = field(default_factory=bytearray)
    #: Absolute offset (bytes since session start) of ``buffer[0]``.
    start: int = 0
    #: Bytes ever appended in this session.
    total: int = 0
    #: Echo mode counts appended audio without keeping it.
    counted_only: int = 0


#: ``(turn_detection)``: speech began (its event is out).
SpeechStarted = Callable[[JSON], None]
#: ``(turn_detection, item_id, audio, duration_ms)``: a turn ended (its event is out).
SpeechStopped = Callable[[JSON, str, bytes, float], None]
#: ``(audio, input_format)``: audio an append added to the buffer (a test hook).
AudioObserver = Callable[[bytes, str], None]


class InputAudio:
    """The input audio buffer of one session and the detector that watches it."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        id_factory: IdFactory,
        on_speech_started: SpeechStarted,
        on_speech_stopped: SpeechStopped,
        on_audio: AudioObserver | None = None,
    ) -> None:
        self._outbox = outbox
        self._on_audio = on_audio
        self._new_id = id_factory
        self._on_speech_started = on_speech_started
        self._on_speech_stopped = on_speech_stopped
        self._input = _Buffer()
        self._vad = _VadState()

    def append(self, data: bytes, input_format: str, detection: JSON | None) -> None:
        """An ``input_audio_buffer.append`` (raw JSON); runs the detector if one is on."""
        try:
            event = _APPEND_DECODER.decode(data)
        except msgspec.ValidationError:
            # Slow path, only for bad events: find the precise problem.
            loose = orjson.loads(data)
            check_event_fields(loose, APPEND_TYPE)
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
        if self._on_audio is not None:
            self._on_audio(pcm, input_format)
        inp = self._input
        inp.buffer += pcm
        inp.total += len(pcm)
        max_bytes = INPUT_AUDIO_BUFFER_MAX_MS * audio.bytes_per_ms(input_format)
        if len(inp.buffer) > max_bytes:
            # Bounded memory: the oldest uncommitted audio goes first.
            drop = len(inp.buffer) - max_bytes
            del inp.buffer[:drop]
            inp.start += drop
        if detection is not None:
            self._run_vad(detection, input_format)

    def count_only(self, byte_count: int) -> None:
        """Echo mode: audio appended but not kept, so commit and clear behave as usual."""
        self._input.counted_only += byte_count

    def commit(self, input_format: str) -> tuple[str, bytes, float]:
        """``input_audio_buffer.commit``: ``(item id, audio, duration ms)``, buffer emptied."""
        rate = audio.bytes_per_ms(input_format)
        buffered_ms = (len(self._input.buffer) + self._input.counted_only) / rate
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
        self._reset()
        return item_id, segment, buffered_ms

    def clear(self) -> None:
        """``input_audio_buffer.clear``."""
        self._reset()
        self._outbox.emit("input_audio_buffer.cleared", {})

    def restart_detector(self) -> None:
        """A new detector starts from the current position, outside any turn."""
        self._vad = _VadState(scanned_to=self._input.total)

    def _reset(self) -> None:
        inp = self._input
        inp.start += len(inp.buffer)
        inp.buffer.clear()
        inp.counted_only = 0
        self.restart_detector()

    def _vad_settings(self, detection: JSON, rate: int) -> tuple[float, int, int]:
        """(RMS threshold, prefix padding bytes, silence bytes) for the current config."""
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

    def _run_vad(self, detection: JSON, format_type: str) -> None:
        rate = audio.bytes_per_ms(format_type)
        rms_threshold, prefix_bytes, silence_bytes = self._vad_settings(detection, rate)
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
        self._outbox.emit(
            "input_audio_buffer.speech_started",
            {"audio_start_ms": vad.speech_start // rate, "item_id": vad.item_id},
        )
        self._on_speech_started(detection)

    def _speech_stopped(self, detection: JSON, end: int, rate: int) -> None:
        vad, inp = self._vad, self._input
        item_id = vad.item_id or self._new_id("item_")
        self._outbox.emit(
            "input_audio_buffer.speech_stopped", {"audio_end_ms": end // rate, "item_id": item_id}
        )
        start = max(vad.speech_start, inp.start)
        segment = bytes(inp.buffer[start - inp.start : end - inp.start])
        del inp.buffer[: end - inp.start]
        inp.start = end
        vad.in_speech = False
        vad.quiet_bytes = 0
        vad.item_id = None
        self._on_speech_stopped(detection, item_id, segment, len(segment) / rate)


__all__ = [
    "APPEND_TYPE",
    "COMMIT_MIN_AUDIO_MS",
    "INPUT_AUDIO_BUFFER_MAX_MS",
    "AudioObserver",
    "InputAudio",
    "SpeechStarted",
    "SpeechStopped",
]
