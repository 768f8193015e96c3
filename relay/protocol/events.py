"""Realtime event envelopes and OpenAI error shapes, shared by relay and simulator.

This module owns:

- the two-phase decode of Realtime events: :func:`decode_envelope` reads only
  ``type`` and ``event_id`` (msgspec skips every other field without building
  it), so callers can dispatch on the tag and forward everything else as the
  original bytes;
- the wire shapes of errors, exactly as OpenAI sends them: the Realtime
  ``error`` server event (:func:`error_event`) and the HTTP error envelope
  ``{"error": {"message", "type", "param", "code"}}`` (:func:`http_error_body`);
- identifiers in OpenAI's style (``event_…``, ``sess_…``, ``resp_…``).

No I/O and no trio here.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from typing import Final

import msgspec
import orjson

#: OpenAI ids use 21 characters from [A-Za-z0-9] after the prefix.
ID_BODY_CHARS: Final = 21
_ID_ALPHABET: Final = string.ascii_letters + string.digits
#: Random bytes drawn beyond the id's length, to cover the ones rejection drops.
ID_SPARE_BYTES: Final = 8
#: Bytes 0-247 map onto the alphabet four times over; 248-255 are dropped (uniformity).
_ID_ACCEPTED_BYTES: Final = 256 - 256 % len(_ID_ALPHABET)
_ID_BYTE_TO_CHAR: Final = bytes(
    ord(_ID_ALPHABET[byte % len(_ID_ALPHABET)]) for byte in range(_ID_ACCEPTED_BYTES)
) + bytes(256 - _ID_ACCEPTED_BYTES)
_ID_REJECTED: Final = bytes(range(_ID_ACCEPTED_BYTES, 256))
#: Client ``event_id`` limit from the spec.
MAX_CLIENT_EVENT_ID_CHARS: Final = 512


class Envelope(msgspec.Struct):
    """The two fields every Realtime event may carry; everything else is skipped."""

    type: str
    event_id: str | None = None


class EventDecodeError(Exception):
    """A frame that is not a Realtime event: carries the OpenAI error fields to answer with."""

    def __init__(
        self, message: str, *, code: str = "invalid_event", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


_ENVELOPE_DECODER: Final = msgspec.json.Decoder(Envelope)


class _TypeOnly(msgspec.Struct):
    type: object = None
    event_id: object = None


_LOOSE_DECODER: Final = msgspec.json.Decoder(_TypeOnly)


def decode_envelope(data: bytes | bytearray | memoryview | str) -> Envelope:
    """Return the event's ``type`` and ``event_id``, reading nothing else.

    Raises :class:`EventDecodeError` with OpenAI's wording when the frame is not
    JSON, not an object, or has no string ``type``.
    """
    try:
        return _ENVELOPE_DECODER.decode(data)
    except msgspec.ValidationError:
        pass
    except msgspec.DecodeError:
        raise EventDecodeError(
            "Invalid JSON: the event could not be parsed.", code="invalid_json"
        ) from None
    # Slow path, only for bad events: say precisely what is wrong.
    try:
        loose = _LOOSE_DECODER.decode(data)
    except msgspec.ValidationError:
        raise EventDecodeError(
            "Invalid event: expected a JSON object.", code="invalid_event"
        ) from None
    if loose.type is None:
        raise EventDecodeError(
            "The 'type' field is missing.", code="missing_required_parameter", param="type"
        )
    if not isinstance(loose.type, str):
        raise EventDecodeError(
            "Invalid type for 'type': expected a string.", code="invalid_type", param="type"
        )
    raise EventDecodeError(
        "Invalid type for 'event_id': expected a string.", code="invalid_type", param="event_id"
    )


#: Makes an id from its prefix (``new_id``, or a seeded stand-in in tests and the simulator).
IdFactory = Callable[[str], str]


def new_id(prefix: str) -> str:
    """An OpenAI-style identifier such as ``event_C9G5RJeJ2gF77mV7f2B1j``.

    Each character comes from one byte of ``os.urandom``, mapped onto the 62
    letters and digits by rejection (bytes 248-255 are drawn again), so every
    character is uniform, at one system call per id instead of one
    ``secrets.choice`` per character (40 us an id).
    """
    body = os.urandom(ID_BODY_CHARS + ID_SPARE_BYTES).translate(_ID_BYTE_TO_CHAR, _ID_REJECTED)
    while len(body) < ID_BODY_CHARS:  # more than 8 of 29 bytes rejected: rare
        body += os.urandom(ID_BODY_CHARS).translate(_ID_BYTE_TO_CHAR, _ID_REJECTED)
    return prefix + body[:ID_BODY_CHARS].decode("ascii")


def new_event_id() -> str:
    return new_id("event_")


def error_event(
    *,
    message: str,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    caused_by_event_id: str | None = None,
) -> bytes:
    """A Realtime ``error`` server event, encoded as JSON text.

    ``caused_by_event_id`` is the client event that caused the error; OpenAI
    echoes it as ``error.event_id``.
    """
    return orjson.dumps(
        {
            "type": "error",
            "event_id": new_event_id(),
            "error": {
                "type": error_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": caused_by_event_id,
            },
        }
    )


def http_error_body(
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """OpenAI's HTTP error envelope: ``{"error": {message, type, param, code}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )
