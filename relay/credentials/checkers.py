"""Client credential checks: one small interface in front of the data plane.

This module owns the decision "may this handshake open a session?", made before
any upgrade, and the state it needs. :class:`CredentialChecker` is the interface
the data plane calls; :class:`StaticKeyChecker` implements it for static client
keys from configuration, kept only as SHA-256 digests and compared with
:func:`relay.credentials.digests.matches_any` (every digest, constant time);
:class:`NoAuthChecker` is for local development; :class:`RelayTokenChecker` takes
short-lived relay tokens (``ek_r1.…``) and hands anything else to one of the
others. :class:`ReplayStore` remembers spent single-use token ids.

Refusals are :class:`AuthRefusal` values carrying the HTTP status and OpenAI's
error fields; their messages never contain the credential.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from relay.credentials.digests import matches_any, parse_digest_hex
from relay.credentials.tokens import (
    Keyring,
    TokenClaims,
    TokenRefusal,
    looks_like_relay_token,
    verify,
)
from relay.protocol.handshake import RequestHead, parse_realtime_query


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


class StaticKeyChecker:
    """Static client keys, stored as digests, compared in constant time."""

    def __init__(self, digests_hex: Iterable[str]) -> None:
        self._digests = tuple(parse_digest_hex(d) for d in digests_hex)
        # The id names the key by a digest prefix: stable, loggable, not the key. One
        # grant per key, made once (a grant is immutable): not a format per request.
        self._grants = tuple(AuthGrant(credential_id=f"key:{d.hex()[:12]}") for d in self._digests)

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        if not credential:
            return MISSING
        index = matches_any(credential, self._digests)
        if index is None:
            return INVALID
        return self._grants[index]


class NoAuthChecker:
    """Accept everyone. Local development only; the relay logs a warning at start."""

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        return AuthGrant(credential_id="anonymous")


# ------------------------------------------------------------------ relay tokens


class ReplayStore:
    """Single-use token ids seen by this relay instance, until the tokens expire.

    In memory, so the guarantee is per instance: with several instances behind a
    load balancer a single-use token could be used once per instance (a shared
    store such as Redis closes that gap). Bounded at ``max_entries``; when full,
    expired ids are dropped first, and if none has expired new single-use tokens
    are refused (503) rather than letting the store grow.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._expiry_by_id: dict[str, float] = {}
        #: No id expires before this (known after a prune): a full store is not
        #: scanned again until then, so a full store costs nothing per handshake.
        self._no_expiry_before = 0.0

    def is_spent(self, token_id: str) -> bool:
        return token_id in self._expiry_by_id

    def has_room(self, now: float) -> bool:
        """Whether one more id fits (expired ids are dropped first when full)."""
        if len(self._expiry_by_id) >= self.max_entries and now >= self._no_expiry_before:
            self._expiry_by_id = {k: v for k, v in self._expiry_by_id.items() if v > now}
            self._no_expiry_before = min(self._expiry_by_id.values(), default=now)
        return len(self._expiry_by_id) < self.max_entries

    def claim(self, token_id: str, expires_at: float, now: float) -> bool | None:
        """Spend ``token_id``: True the first time, False for a replay, None when full."""
        if token_id in self._expiry_by_id:
            return False
        if not self.has_room(now):
            return None
        self._expiry_by_id[token_id] = expires_at
        return True

    def __len__(self) -> int:
        return len(self._expiry_by_id)


@dataclass(frozen=True, slots=True)
class TokenGrant(AuthGrant):
    """A grant from a relay token: what the session must enforce."""

    claims: TokenClaims | None = None


class RelayTokenChecker:
    """Relay tokens (``ek_r1.…``) first, anything else to the fallback checker.

    Checked before the upgrade: signature, expiry, model (``?model=`` must be one
    the token allows), Origin (when the token names origins), and that a single-use
    token is not spent yet. Spending it is not this check's business: the registry
    does that once the upstream has accepted the session.
    """

    def __init__(
        self,
        keyring: Callable[[], Keyring],
        fallback: CredentialChecker,
        replay: ReplayStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keyring = keyring
        self.fallback = fallback
        self.replay = replay
        self.clock = clock

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        if not credential or not looks_like_relay_token(credential):
            return self.fallback.check(credential, head)
        now = self.clock()
        result = verify(credential, self.keyring(), now)
        if isinstance(result, TokenRefusal):
            return AuthRefusal(result.status, result.message, result.code)
        claims = result
        # A repeated model was refused before this check (parse_realtime_query).
        model = parse_realtime_query(head.query).model or ""
        if claims.models and model and model not in claims.models:
            return AuthRefusal(
                403, f"This token does not allow the model '{model}'.", "model_not_allowed"
            )
        origin = head.header(b"origin")
        if claims.origins and origin not in claims.origins:
            return AuthRefusal(403, "This token does not allow this Origin.", "origin_not_allowed")
        if claims.single_use and self.replay.is_spent(claims.jti):
            return AuthRefusal(401, "This single-use token was already used.", "token_used")
        return TokenGrant(credential_id=f"token:{claims.app}:{claims.jti[:8]}", claims=claims)
