"""OpenAI's ``POST /v1/realtime/client_secrets``: the request body and the session answered.

This module owns the wire schema of the endpoint, for both the relay (which
answers it with relay tokens, :mod:`relay.minting`) and the simulator (whose
secret store mints ``ek_`` secrets like OpenAI's):

- validation of the request body with OpenAI's wording and codes (GA shape:
  ``{"expires_after": {"anchor": "created_at", "seconds": 10..7200}, "session":
  {"type": "realtime" | "transcription", ...}}``), :func:`parse_request`; a bad body
  is answered ``400`` with OpenAI's error envelope
  (:func:`relay.protocol.events.http_error_body`) whose ``param`` names the field,
  e.g. ``expires_after.seconds``;
- the ``session`` of the ``200`` answer ``{"value", "expires_at", "session"}``: the
  full GA session object the config amounts to (:class:`SessionObjects`).

No I/O and no clock here.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import orjson

from relay.protocol.events import IdFactory, new_id
from relay.protocol.session_config import (
    apply_session_update,
    default_session_object,
    validate_session_config,
)
from relay.protocol.validation import ClientEventError, invalid_value, json_type_name

#: ``expires_after.seconds`` when the request does not say.
DEFAULT_SECRET_TTL_S: Final = 600
#: OpenAI's bounds for ``expires_after.seconds``.
MIN_SECRET_TTL_S: Final = 10
MAX_SECRET_TTL_S: Final = 7200
#: Model used when a realtime session config names none.
DEFAULT_REALTIME_MODEL: Final = "gpt-realtime"

#: OpenAI's answer to a body that is not JSON (its exact wording).
INVALID_JSON_MESSAGE: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please contact "
    "us through our help center at help.openai.com.)"
)
_BODY_FIELDS: Final = frozenset({"expires_after", "session"})
_EXPIRES_AFTER_FIELDS: Final = frozenset({"anchor", "seconds"})


class SessionObjects:
    """Builds the ``session`` of a client-secret answer, each with a fresh ``sess_`` id."""

    def __init__(self, *, id_factory: IdFactory = new_id) -> None:
        self._new_id = id_factory

    def session_object(self, session: dict[str, Any]) -> dict[str, Any]:
        """The full GA session object of a secret's response (``expires_at`` 0, as OpenAI's)."""
        base = default_session_object(
            session["type"],
            model=str(session.get("model") or DEFAULT_REALTIME_MODEL),
            session_id=self._new_id("sess_"),
            expires_at=0,
        )
        return apply_session_update(base, session)


def parse_request(body: bytes) -> tuple[int, dict[str, Any]]:
    """Validate a ``client_secrets`` body; return ``(ttl seconds, session config)``.

    Raises :class:`ClientEventError` with OpenAI's message, code and param.
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ClientEventError(INVALID_JSON_MESSAGE, code=None) from None
    if not isinstance(document, dict):
        raise ClientEventError(
            "Invalid type for request body: expected an object.", code="invalid_type"
        )
    for name in document:
        if name not in _BODY_FIELDS:
            raise ClientEventError(
                f"Unknown parameter: '{name}'.", code="unknown_parameter", param=name
            )
    ttl_s = _parse_expires_after(document.get("expires_after"))
    session = document.get("session")
    if session is None:
        # The SDK marks ``session`` optional; a bare request gets a default realtime session.
        session = {"type": "realtime"}
    validate_session_config(session)
    session = copy.deepcopy(session)
    if session["type"] == "realtime":
        session.setdefault("model", DEFAULT_REALTIME_MODEL)
    return ttl_s, session


def _parse_expires_after(value: Any) -> int:
    if value is None:
        return DEFAULT_SECRET_TTL_S
    if not isinstance(value, dict):
        raise ClientEventError(
            f"Invalid type for 'expires_after': expected an object, but got "
            f"{json_type_name(value)} instead.",
            code="invalid_type",
            param="expires_after",
        )
    for name in value:
        if name not in _EXPIRES_AFTER_FIELDS:
            raise ClientEventError(
                f"Unknown parameter: 'expires_after.{name}'.",
                code="unknown_parameter",
                param=f"expires_after.{name}",
            )
    anchor = value.get("anchor", "created_at")
    if anchor != "created_at":
        if not isinstance(anchor, str):
            raise ClientEventError(
                f"Invalid type for 'expires_after.anchor': expected a string, but got "
                f"{json_type_name(anchor)} instead.",
                code="invalid_type",
                param="expires_after.anchor",
            )
        raise invalid_value(anchor, ("created_at",), "expires_after.anchor")
    seconds = value.get("seconds", DEFAULT_SECRET_TTL_S)
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise ClientEventError(
            f"Invalid type for 'expires_after.seconds': expected an integer, but got "
            f"{json_type_name(seconds)} instead.",
            code="invalid_type",
            param="expires_after.seconds",
        )
    if seconds < MIN_SECRET_TTL_S:
        raise ClientEventError(
            "Invalid 'expires_after.seconds': integer below minimum value. Expected a value "
            f">= {MIN_SECRET_TTL_S}, but got {seconds} instead.",
            code="integer_below_min_value",
            param="expires_after.seconds",
        )
    if seconds > MAX_SECRET_TTL_S:
        raise ClientEventError(
            "Invalid 'expires_after.seconds': integer above maximum value. Expected a value "
            f"<= {MAX_SECRET_TTL_S}, but got {seconds} instead.",
            code="integer_above_max_value",
            param="expires_after.seconds",
        )
    return seconds


__all__ = [
    "DEFAULT_REALTIME_MODEL",
    "DEFAULT_SECRET_TTL_S",
    "INVALID_JSON_MESSAGE",
    "MAX_SECRET_TTL_S",
    "MIN_SECRET_TTL_S",
    "SessionObjects",
    "parse_request",
]
