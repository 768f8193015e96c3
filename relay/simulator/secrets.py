"""Ephemeral client secrets: the logic of ``POST /v1/realtime/client_secrets``.

This module owns what OpenAI's endpoint decides, without any HTTP:

- validation of the request body with OpenAI's wording and codes (GA shape:
  ``{"expires_after": {"anchor": "created_at", "seconds": 10..7200}, "session":
  {"type": "realtime" | "transcription", ...}}``); a bad body is answered ``400``
  with OpenAI's error envelope (:func:`relay.protocol.events.http_error_body`) whose
  ``param`` names the field, e.g. ``expires_after.seconds``;
- minting: ``ek_`` plus 32 hex characters, like OpenAI's secrets, and the ``200``
  body ``{"value", "expires_at", "session"}`` with the full GA session object;
- the store the Trio shell consults when a WebSocket presents an ``ek_``: it maps a
  secret to its expiry and session config. Expiry limits *creating* sessions only
  (a session may outlive its secret) and one secret may open several sessions.
  The store is bounded (:data:`MAX_STORED_SECRETS`) and drops expired entries.

Time is always passed in (``now``: unix seconds); nothing here reads a clock.
"""

from __future__ import annotations

import copy
import heapq
import secrets
from dataclasses import dataclass
from typing import Any, Final

import orjson

from relay.protocol.events import http_error_body, new_id
from relay.simulator.engine import (
    ClientEventError,
    IdFactory,
    apply_session_update,
    default_session_object,
    invalid_value,
    json_type_name,
    validate_session_config,
)

#: ``expires_after.seconds`` when the request does not say.
DEFAULT_SECRET_TTL_S: Final = 600
#: OpenAI's bounds for ``expires_after.seconds``.
MIN_SECRET_TTL_S: Final = 10
MAX_SECRET_TTL_S: Final = 7200
#: Secrets kept at most; past this the ones closest to expiry are dropped first.
MAX_STORED_SECRETS: Final = 10_000
SECRET_PREFIX: Final = "ek_"
#: 16 random bytes, 32 hex characters, as in ``ek_68af296e8e408191a1120ab6383263c2``.
SECRET_RANDOM_BYTES: Final = 16
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

STATUS_OK: Final = 200
STATUS_BAD_REQUEST: Final = 400


@dataclass(frozen=True, slots=True)
class StoredSecret:
    """What a minted secret grants: sessions may be created until ``expires_at``."""

    expires_at: int
    #: The validated session config of the request (``type`` and ``model`` included).
    session: dict[str, Any]


class ClientSecretStore:
    """Mints ``ek_`` secrets and remembers them until they expire (bounded)."""

    def __init__(
        self, *, max_secrets: int = MAX_STORED_SECRETS, id_factory: IdFactory = new_id
    ) -> None:
        if max_secrets < 1:
            raise ValueError("max_secrets must be at least 1")
        self._max_secrets = max_secrets
        self._new_id = id_factory
        self._secrets: dict[str, StoredSecret] = {}
        #: (expires_at, secret), the soonest expiry first: pruning pops from here.
        self._expiry_heap: list[tuple[int, str]] = []

    def __len__(self) -> int:
        return len(self._secrets)

    def mint(self, body: bytes, now: float) -> tuple[int, bytes]:
        """Answer a ``client_secrets`` request: ``(HTTP status, JSON body)``."""
        try:
            ttl_s, session = parse_request(body)
        except ClientEventError as exc:
            return STATUS_BAD_REQUEST, http_error_body(
                exc.message, error_type=exc.error_type, code=exc.code, param=exc.param
            )
        expires_at = int(now) + ttl_s
        value = SECRET_PREFIX + secrets.token_hex(SECRET_RANDOM_BYTES)
        self.prune(now)
        while len(self._secrets) >= self._max_secrets:
            self._evict_soonest()
        self._secrets[value] = StoredSecret(expires_at=expires_at, session=session)
        heapq.heappush(self._expiry_heap, (expires_at, value))
        return STATUS_OK, orjson.dumps(
            {"value": value, "expires_at": expires_at, "session": self.session_object(session)}
        )

    def lookup(self, secret: str, now: float) -> dict[str, Any] | None:
        """The session config of a live secret (a copy), or ``None`` if unknown or expired."""
        stored = self._secrets.get(secret)
        if stored is None:
            return None
        if now >= stored.expires_at:
            self.prune(now)
            return None
        return copy.deepcopy(stored.session)

    def prune(self, now: float) -> int:
        """Drop expired secrets; return how many went."""
        dropped = 0
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            _, value = heapq.heappop(heap)
            if self._secrets.pop(value, None) is not None:
                dropped += 1
        return dropped

    def _evict_soonest(self) -> None:
        _, value = heapq.heappop(self._expiry_heap)
        self._secrets.pop(value, None)

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
    "DEFAULT_SECRET_TTL_S",
    "MAX_SECRET_TTL_S",
    "MAX_STORED_SECRETS",
    "MIN_SECRET_TTL_S",
    "ClientSecretStore",
    "StoredSecret",
    "parse_request",
]
