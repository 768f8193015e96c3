"""Ephemeral client secrets: what OpenAI's ``POST /v1/realtime/client_secrets`` keeps.

This module owns the simulator's side of the endpoint, without any HTTP (the
request's schema and the session answered are OpenAI's wire format, in
:mod:`relay.protocol.client_secrets`):

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

from relay.protocol.client_secrets import SessionObjects, parse_request
from relay.protocol.events import IdFactory, http_error_body, new_id
from relay.protocol.validation import ClientEventError

#: Secrets kept at most; past this the ones closest to expiry are dropped first.
MAX_STORED_SECRETS: Final = 10_000
SECRET_PREFIX: Final = "ek_"
#: 16 random bytes, 32 hex characters, as in ``ek_68af296e8e408191a1120ab6383263c2``.
SECRET_RANDOM_BYTES: Final = 16
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
        self._session_objects = SessionObjects(id_factory=id_factory)
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
        return self._session_objects.session_object(session)


__all__ = [
    "MAX_STORED_SECRETS",
    "ClientSecretStore",
    "StoredSecret",
]
