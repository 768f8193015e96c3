"""Admission: may this realtime handshake open a session? One ordered decision. Sans-I/O.

This module owns every check a realtime handshake passes before the relay dials the
upstream, in one documented order, as one pure function (:func:`admit`) that tests
drive with tables and no event loop:

1. the request is a valid RFC 6455 opening handshake (400/405/426);
2. the query: no repeated single-value parameter (400); what is forwarded;
3. the browser ``Origin`` against the global allowlist (403, whatever the credential:
   cross-site WebSocket hijacking);
4. the credential (:class:`~relay.credentials.checkers.CredentialChecker`: 401, or 403 for a
   relay token's model or Origin), then a single-use token not already spent or being
   used by a handshake in flight (401 ``token_used``) and room in the replay store (503);
5. the relay is draining (503) or full, live sessions plus handshakes in flight (503
   with ``Retry-After``);
6. the per-token and per-app-key limits (429);
7. the model: one some upstream serves (400 ``model_not_found``, ``param: "model"``),
   or named at all when every upstream serves a list of models (400 ``missing_model``),
   so a model nobody serves never costs a dial;
8. what the upstream will be sent: the forwarded query and the derived headers.

Nothing here commits anything. The shell reserves what :class:`Admitted` names while
it dials, and only when the upstream has answered ``101`` does it spend a single-use
token and count a start (:mod:`relay.dataplane.registry`), so a refusal the client is
invited to retry (503, 429, 502, 504) never burns its token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Final

from relay.credentials.checkers import AuthRefusal, CredentialChecker, TokenGrant
from relay.credentials.tokens import TokenClaims
from relay.protocol import handshake
from relay.protocol.handshake import HandshakeError, RealtimeQuery, RequestHead

#: Seconds a client is asked to wait after a 503 for capacity.
RETRY_AFTER_S: Final = 1
#: Characters of a refused model name quoted back in the error message.
MAX_QUOTED_MODEL_CHARS: Final = 64
SAFETY_IDENTIFIER_HEADER: Final = "OpenAI-Safety-Identifier"


@dataclass(frozen=True, slots=True)
class AdmissionPolicy:
    """The settings admission reads (a slice of ``ServeConfig``)."""

    max_sessions: int
    allowed_origins: tuple[str, ...] = ()
    upstream_query_params: tuple[str, ...] = ()
    #: 0 = no limit, for both.
    max_sessions_per_token: int = 0
    max_session_starts_per_token: int = 0
    #: The models some upstream serves; None: an upstream serves every model.
    served_models: Set[str] | None = None


@dataclass(frozen=True, slots=True)
class Occupancy:
    """What is in use right now, as admission needs to see it."""

    draining: bool = False
    #: Live sessions plus handshakes in flight.
    sessions: int = 0
    live_by_token: Mapping[str, int] | None = None
    starts_by_token: Mapping[str, int] | None = None
    live_by_app: Mapping[str, int] | None = None
    #: Single-use token ids held by handshakes still dialing.
    single_use_in_flight: Set[str] = frozenset()
    #: Whether the replay store can take one more single-use id.
    replay_has_room: bool = True


@dataclass(frozen=True, slots=True)
class Refused:
    """An HTTP refusal with OpenAI's error fields (never quoting the credential)."""

    status: int
    message: str
    code: str
    error_type: str = "invalid_request_error"
    param: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Admitted:
    """A handshake that may dial the upstream."""

    credential_id: str
    #: The relay token's claims; None for a static key or no-auth.
    claims: TokenClaims | None
    query: RealtimeQuery
    #: Headers for the upstream handshake besides the relay's own authorization.
    upstream_headers: tuple[tuple[str, str], ...]

    @property
    def single_use_id(self) -> str | None:
        """The id to spend once the upstream accepts, for a single-use token."""
        claims = self.claims
        return claims.jti if claims is not None and claims.single_use else None


REPLAY_STORE_FULL: Final = Refused(
    503,
    "Too many single-use tokens in flight; retry shortly.",
    "replay_store_full",
    "server_error",
)


def _refused(exc: HandshakeError) -> Refused:
    return Refused(
        exc.status, exc.message, exc.code or "invalid_request", param=exc.param, headers=exc.headers
    )


def admit(
    head: RequestHead,
    *,
    checker: CredentialChecker,
    policy: AdmissionPolicy,
    occupancy: Occupancy,
    app_session_limit: Callable[[str], int] = lambda app: 0,
) -> Admitted | Refused:
    """Decide on one handshake, in the order of the module docstring."""
    problem = handshake.websocket_request_problem(head)
    if problem is not None:
        return _refused(problem)
    try:
        query = handshake.parse_realtime_query(head.query, policy.upstream_query_params)
    except HandshakeError as exc:
        return _refused(exc)
    origin = head.header(b"origin")
    if policy.allowed_origins and origin is not None and origin not in policy.allowed_origins:
        return Refused(403, "This Origin is not allowed.", "origin_not_allowed")
    decision = checker.check(handshake.client_credential(head), head)
    if isinstance(decision, AuthRefusal):
        return Refused(decision.status, decision.message, decision.code, decision.error_type)
    claims = decision.claims if isinstance(decision, TokenGrant) else None
    if claims is not None and claims.single_use:
        if claims.jti in occupancy.single_use_in_flight:
            return Refused(
                401, "This single-use token is being used by another handshake.", "token_used"
            )
        if not occupancy.replay_has_room:
            return REPLAY_STORE_FULL
    if occupancy.draining:
        return Refused(
            503, "The relay is shutting down; retry shortly.", "server_shutdown", "server_error"
        )
    if occupancy.sessions >= policy.max_sessions:
        return Refused(
            503,
            "The relay is at its session limit; retry shortly.",
            "server_busy",
            "server_error",
            headers=(("Retry-After", str(RETRY_AFTER_S)),),
        )
    if claims is not None:
        limit = _credential_limit(claims, policy, occupancy, app_session_limit)
        if limit is not None:
            return Refused(429, limit, "rate_limit_exceeded")
    model_refusal = _model_refusal(query.model, policy.served_models)
    if model_refusal is not None:
        return model_refusal
    # A client's own OpenAI-Safety-Identifier is never forwarded: the relay derives it
    # (from a token's hashed end user) or sends none.
    headers: tuple[tuple[str, str], ...] = ()
    if claims is not None and claims.user:
        headers = ((SAFETY_IDENTIFIER_HEADER, claims.user),)
    return Admitted(
        credential_id=decision.credential_id,
        claims=claims,
        query=query,
        upstream_headers=headers,
    )


def quoted(text: str) -> str:
    """A client's text fit to quote back in an error: printable ASCII, bounded."""
    return "".join(
        char if char.isascii() and char.isprintable() else "?"
        for char in text[:MAX_QUOTED_MODEL_CHARS]
    )


def _model_refusal(model: str | None, served: Set[str] | None) -> Refused | None:
    if served is None:
        return None
    if model is None:
        return Refused(
            400,
            "Name the model (?model=...): this relay chooses the upstream by model.",
            "missing_model",
            param="model",
        )
    if model not in served:
        return Refused(
            400,
            f"The model '{quoted(model)}' does not exist or is not served by this relay.",
            "model_not_found",
            param="model",
        )
    return None


def _credential_limit(
    claims: TokenClaims,
    policy: AdmissionPolicy,
    occupancy: Occupancy,
    app_session_limit: Callable[[str], int],
) -> str | None:
    """Why this token may not open another session now, or None."""
    live_by_token = occupancy.live_by_token or {}
    starts_by_token = occupancy.starts_by_token or {}
    live_by_app = occupancy.live_by_app or {}
    if (
        policy.max_sessions_per_token
        and live_by_token.get(claims.jti, 0) >= policy.max_sessions_per_token
    ):
        return "This token has reached its concurrent session limit."
    if (
        policy.max_session_starts_per_token
        and starts_by_token.get(claims.jti, 0) >= policy.max_session_starts_per_token
    ):
        return "This token has opened as many sessions as it may."
    app_limit = app_session_limit(claims.app)
    if app_limit and live_by_app.get(claims.app, 0) >= app_limit:
        return "This app key has reached its concurrent session limit."
    return None
