"""Client credential checks: one small interface in front of the data plane.

This module owns the decision "may this handshake open a session?", made before
any upgrade. :class:`CredentialChecker` is the interface the data plane calls;
:class:`StaticKeyChecker` implements it for static client keys from configuration,
kept only as SHA-256 digests and compared in constant time (every digest is
compared, so neither timing nor key length says which key almost matched);
:class:`NoAuthChecker` is for local development. Short-lived relay tokens plug in
as another implementation of the same interface.

Refusals are :class:`AuthRefusal` values carrying the HTTP status and OpenAI's
error fields; their messages never contain the credential.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from relay.protocol.handshake import RequestHead


@dataclass(frozen=True, slots=True)
class AuthGrant:
    """A successful check: who the client is, for logs and limits (never the secret)."""

    credential_id: str


@dataclass(frozen=True, slots=True)
class AuthRefusal:
    status: int
    message: str
    code: str
    error_type: str = "invalid_request_error"


class CredentialChecker(Protocol):
    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        """Decide on one handshake; ``credential`` is what the client presented."""
        ...


MISSING = AuthRefusal(
    401,
    "You didn't provide an API key. Provide it in an Authorization header using Bearer "
    "auth (Authorization: Bearer YOUR_KEY) or, from a browser, in the "
    "'openai-insecure-api-key.<key>' WebSocket subprotocol.",
    "missing_api_key",
)
INVALID = AuthRefusal(401, "Incorrect API key provided.", "invalid_api_key")


def key_digest(key: str) -> str:
    """The hex SHA-256 digest stored in configuration instead of a client key."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class StaticKeyChecker:
    """Static client keys, stored as digests, compared in constant time."""

    def __init__(self, digests_hex: Iterable[str]) -> None:
        self._digests = tuple(bytes.fromhex(d.strip().lower()) for d in digests_hex)
        if any(len(d) != 32 for d in self._digests):
            raise ValueError("client key digests must be SHA-256 hex (64 characters)")

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        if not credential:
            return MISSING
        candidate = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        matched_index = -1
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(candidate, digest):
                matched_index = index
        if matched_index < 0:
            return INVALID
        # The id names the key by a digest prefix: stable, loggable, not the key.
        return AuthGrant(credential_id=f"key:{candidate.hex()[:12]}")


class NoAuthChecker:
    """Accept everyone. Local development only; the relay logs a warning at start."""

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        return AuthGrant(credential_id="anonymous")
