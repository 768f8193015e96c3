"""The sans-I/O core of the simulator: one Realtime session's state and its event dispatch.

This module owns what a GA Realtime server decides for one WebSocket session as a
whole, with no clock, socket or event loop of its own:

- the session: its configuration as ``session.created`` shows it and
  ``session.update`` changes it (OpenAI's schema, wording and merge rules are
  :mod:`relay.protocol.session_config`'s), its expiry (OpenAI's 60 minutes, Azure's
  30, or ``max_session_s``: :meth:`~relay.config.SimulatorConfig.session_cap_s`), and
  the close it asks of the shell (:attr:`SimulatedSession.close_request`);
- the dispatch of client events: the envelope, OpenAI's refusals of a bad one
  (:mod:`relay.protocol.client_events`), and the component each event goes to:
  the input audio buffer and VAD (:mod:`relay.simulator.input_audio`), the
  conversation (:mod:`relay.simulator.conversation`), responses
  (:mod:`relay.simulator.responses`); it wires their turns together (speech
  interrupts a response, a finished turn is committed and may start one);
- the echo mode's hot path: each ``input_audio_buffer.append`` becomes one
  ``response.output_audio.delta`` with the same ``event_id`` and ``audio`` text,
  built by byte concatenation around slices of the input.

The Trio shell (:mod:`relay.simulator.server`) feeds client text messages to
:meth:`SimulatedSession.receive`, asks :meth:`SimulatedSession.pop_due` for the
server events due by a time it passes in, and sleeps until
:meth:`SimulatedSession.next_due`; the schedule itself is
:mod:`relay.simulator.outbox`'s. Given the times passed in, a ``seed`` and an
``id_factory``, the output is deterministic.

Wire facts follow live captures of OpenAI's GA server (2025-12 and 2026-09), the
official SDK's types and the spec; where a detail could not be confirmed, the
comment next to it says so.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Final

import msgspec
import orjson

from relay.config import DEFAULT_MAX_SESSION_S, SimulatorConfig
from relay.protocol import audio
from relay.protocol import validation as v
from relay.protocol.client_events import SUPPORTED_CLIENT_EVENT_TYPES, check_event_fields
from relay.protocol.events import (
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
    validate_session_config,
)
from relay.protocol.validation import ClientEventError, invalid_value
from relay.simulator.conversation import Conversation
from relay.simulator.generated import DEFAULT_AUDIO_SEED
from relay.simulator.input_audio import APPEND_TYPE, AudioObserver, InputAudio
from relay.simulator.outbox import MARK_EXPIRED, FastIds, Marker, Outbox
from relay.simulator.responses import Responses

JSON = dict[str, Any]

#: OpenAI's session lifetime (the default cap); ``session.expires_at`` is ``created + cap``.
SESSION_MAX_DURATION_S: Final = DEFAULT_MAX_SESSION_S
#: The close that follows the ``session_expired`` error (OpenAI's 4000 family).
SESSION_EXPIRED_CLOSE: Final = (4000, "invalid_request_error.session_expired")


class _EchoProbe(msgspec.Struct):
    """The echo hot path reads only these, as raw JSON text (no string decoding)."""

    type: str
    audio: msgspec.Raw = msgspec.Raw(b"")
    event_id: msgspec.Raw = msgspec.Raw(b"")


class _LooseEnvelope(msgspec.Struct):
    type: object = None
    event_id: object = None


_ECHO_DECODER: Final = msgspec.json.Decoder(_EchoProbe)
_LOOSE_DECODER: Final = msgspec.json.Decoder(_LooseEnvelope)
_QUOTE: Final = ord('"')
_EQUALS: Final = ord("=")


class SimulatedSession:
    """One Realtime session's protocol state machine (no I/O, time passed in).

    ``seed`` makes generated audio, answers, event ids and ``obfuscation`` padding
    reproducible (``None``: event ids differ per session, like OpenAI's);
    ``id_factory`` makes object ids (``sess_``, ``resp_``, ``item_``, ``conv_``)
    reproducible too (default: :func:`relay.protocol.events.new_id`).
    ``on_audio`` sees the decoded audio of every accepted append, with the session's
    input format (a test hook: the echo path decodes only when it is set).
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
        on_audio: AudioObserver | None = None,
    ) -> None:
        self.config = config
        self._on_audio = on_audio
        #: Set when the server must close (code, reason) after sending what is due.
        self.close_request: tuple[int, str] | None = None
        self._model = model
        rng = random.Random(seed)  # None: seeded from the OS
        self._ids = FastIds(rng)
        self._outbox = Outbox(self._ids, now, self._on_due)
        self._cap_s = config.session_cap_s()
        # The expiry falls due at the exact instant (a test may cap at a fraction of a
        # second); session.expires_at shows it in whole seconds, as OpenAI's does.
        self._expires_due = now + self._cap_s
        self._expires_at = int(self._expires_due)
        conversation_id = id_factory("conv_")
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
        self._conversation = Conversation(self._outbox, rng=rng, id_factory=id_factory)
        self._input = InputAudio(
            self._outbox,
            id_factory=id_factory,
            on_speech_started=self._on_speech_started,
            on_speech_stopped=self._on_speech_stopped,
            on_audio=on_audio,
        )
        self._responses = Responses(
            config,
            self._outbox,
            self._conversation,
            conversation_id=conversation_id,
            # Without a seed, event ids and obfuscation differ per session, as OpenAI's
            # do, while the spoken answer stays the cached default signal.
            audio_seed=DEFAULT_AUDIO_SEED if seed is None else seed,
            id_factory=id_factory,
        )
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
        self._handlers: dict[str, Callable[[JSON], None]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.retrieve": self._conversation.on_retrieve,
            "conversation.item.delete": self._conversation.on_delete,
            "conversation.item.truncate": self._conversation.on_truncate,
            "response.create": self._on_response_create,
            "response.cancel": self._responses.on_cancel,
            "session.close": self._on_translation_only,
            "session.input_audio_buffer.append": self._on_translation_only,
        }

    # --- the shell's interface -----------------------------------------------------

    def start(self, now: float) -> None:
        """Queue ``session.created`` (due at once) and the session's expiry."""
        if self._started:
            return
        self._started = True
        self._outbox.advance(now)
        self._outbox.emit("session.created", {"session": self._session})
        # [unconfirmed for Azure] Azure is assumed to word its 30-minute cap as OpenAI does.
        expiry = error_event(
            message=f"Your session hit the maximum duration of {_duration_text(self._cap_s)}.",
            code="session_expired",
        )
        self._outbox.schedule(self._expires_due, expiry, Marker(None, MARK_EXPIRED, 0))

    def receive(self, data: bytes, now: float) -> None:
        """Handle one client text message (raw JSON bytes)."""
        self._outbox.advance(now)
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
            if envelope.type == APPEND_TYPE:
                self._input.append(data, self._input_format(), self._turn_detection())
                return
            handler = self._handlers.get(envelope.type)
            if handler is None:
                raise invalid_value(envelope.type, SUPPORTED_CLIENT_EVENT_TYPES, "type")
            event = orjson.loads(data)
            check_event_fields(event, envelope.type)
            handler(event)
        except ClientEventError as exc:
            self._outbox.emit_error(exc, event_id)

    @property
    def input_format(self) -> str:
        """The session's input audio format (``audio.input.format.type``)."""
        return self._input_format()

    def pop_due(self, now: float) -> list[bytes]:
        """Server events due by ``now``, in order; each returned once."""
        return self._outbox.pop_due(now)

    def next_due(self) -> float | None:
        """When the next event falls due (now, if some already have), else ``None``."""
        return self._outbox.next_due()

    # --- what falls due; frames with no usable envelope ---------------------------------

    def _on_due(self, marker: Marker) -> None:
        if marker.kind == MARK_EXPIRED:
            self.close_request = SESSION_EXPIRED_CLOSE
        else:
            self._responses.on_due(marker)

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
            self._outbox.emit_error(err, None)
            return
        self._outbox.emit_error(
            ClientEventError(exc.message, code=exc.code, param=exc.param), caused_by
        )

    # --- echo mode -------------------------------------------------------------------

    def _echo_append(self, data: bytes) -> bool:
        """The benchmark's hot path; ``False`` hands the message to the normal path."""
        try:
            probe = _ECHO_DECODER.decode(data)
        except msgspec.MsgspecError:
            return False
        if probe.type != APPEND_TYPE:
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
        if self._on_audio is not None:
            self._observe_echoed(audio_text)
        self._outbox.ready.append(
            b"".join((self._echo_head, event_id, self._echo_middle, audio_text, b"}"))
        )
        # Account for the audio without decoding it, so commit/clear behave as usual.
        encoded_chars = len(audio_text) - 2
        padding = 0
        if encoded_chars >= 2 and audio_text[-2] == _EQUALS:
            padding = 2 if audio_text[-3] == _EQUALS else 1
        self._input.count_only(audio.b64_decoded_length(encoded_chars, padding))
        return True

    def _observe_echoed(self, audio_text: memoryview) -> None:
        """The echo path validates no base64 (it echoes the text): record what decodes."""
        assert self._on_audio is not None
        try:
            pcm = audio.b64decode(bytes(audio_text[1:-1]))
        except ValueError:
            return  # echoed as it came, as without the hook; nothing to record
        self._on_audio(pcm, self._input_format())

    # --- the session's config ------------------------------------------------------

    def _input_format(self) -> str:
        return str(self._session["audio"]["input"]["format"]["type"])

    def _turn_detection(self) -> JSON | None:
        detection: JSON | None = self._session["audio"]["input"]["turn_detection"]
        return detection

    def _on_session_update(self, event: JSON) -> None:
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
        if (
            new_voice is not None
            and new_voice != current_voice
            and self._responses.assistant_audio_started
        ):
            raise ClientEventError(
                "Cannot update a conversation's voice if assistant audio is present.",
                code="cannot_update_voice",
            )
        before = self._turn_detection()
        self._session = apply_session_update(self._session, update)
        if self._turn_detection() != before:
            self._input.restart_detector()
        self._outbox.emit("session.updated", {"session": self._session})

    def _on_translation_only(self, event: JSON) -> None:
        # [unconfirmed wording] Listed as supported by OpenAI, but meant for translation
        # sessions; a realtime session has no use for them.
        raise ClientEventError(
            f"The event type '{event['type']}' is only supported in translation sessions.",
            code="invalid_value",
            param="type",
        )

    # --- events handed to a component ------------------------------------------------

    def _on_clear(self, event: JSON) -> None:
        self._input.clear()

    def _on_item_create(self, event: JSON) -> None:
        self._conversation.on_create(event, self._input_format())

    def _on_response_create(self, event: JSON) -> None:
        self._responses.on_create(event, self._session)

    # --- turns: input audio into the conversation, and responses ---------------------

    def _on_commit(self, event: JSON) -> None:
        item_id, segment, duration = self._input.commit(self._input_format())
        self._commit_user_audio(item_id, segment, duration)

    def _commit_user_audio(self, item_id: str, segment: bytes, duration: float) -> None:
        self._conversation.commit_user_audio(
            item_id,
            segment,
            duration,
            input_format=self._input_format(),
            transcription=self._session["audio"]["input"].get("transcription"),
        )

    def _on_speech_started(self, detection: JSON) -> None:
        """Speech interrupts a response in the conversation (if ``interrupt_response``)."""
        run = self._responses.active
        if (
            run is not None
            and run.conversation_id is not None
            and detection.get("interrupt_response", True)
        ):
            self._responses.cancel(run, reason="turn_detected")

    def _on_speech_stopped(
        self, detection: JSON, item_id: str, segment: bytes, duration: float
    ) -> None:
        """A turn ended: it is committed, and answered if ``create_response`` and idle."""
        self._commit_user_audio(item_id, segment, duration)
        if (
            self._session["type"] == "realtime"
            and detection.get("create_response", True)
            and self._responses.active is None
        ):
            self._responses.start(self._session, None)


def _duration_text(seconds: float) -> str:
    """``60 minutes`` for OpenAI's cap; a test's sub-minute cap in seconds."""
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} minutes"
    return f"{seconds:g} seconds"


__all__ = [
    "SESSION_EXPIRED_CLOSE",
    "SESSION_MAX_DURATION_S",
    "SimulatedSession",
]
