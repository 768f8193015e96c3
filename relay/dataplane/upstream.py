"""Dialing the upstream Realtime endpoint, before the client's upgrade is answered.

This module owns one dial of one upstream with one key: the request target and
headers come from :func:`relay.upstreams.urls.handshake_target` (for OpenAI the
configured base + ``/realtime`` + the client's query string exactly as sent; for
Azure its own forms), no ``OpenAI-Beta`` header and no beta subprotocol, no
compression offered, TLS verified against the system store or a configured CA
file, resumed from the upstream's last ticket.

Failures come back as :class:`UpstreamRefused` carrying the HTTP answer the
client should get on *its* handshake, so a refusal is never a ``101`` followed by
a close, and the :class:`~relay.upstreams.chooser.Outcome` the failover loop
(:mod:`relay.dataplane.routing`) learns from: the upstream's own 404/429 (and
other 4xx but 401/403) with its error body and ``Retry-After``; 502 when the
upstream refused the relay's key, is unreachable or not speaking WebSocket (503
with its ``Retry-After`` when it said 503); 504 when the handshake does not
finish in time.
"""

from __future__ import annotations

import math
import ssl
from typing import Final

import orjson
import trio

from relay.net import http
from relay.net.transport import Transport, TransportClosed, open_transport
from relay.net.websocket import WebSocket
from relay.protocol import handshake
from relay.protocol.events import http_error_body
from relay.protocol.handshake import HandshakeError
from relay.upstreams.chooser import Outcome, outcome_for_status
from relay.upstreams.urls import HandshakeTarget

#: Upstream refusals of the relay's own credential: answered 502, the body only logged.
RELAY_CREDENTIAL_STATUSES: Final = frozenset({401, 403})
#: Other upstream HTTP statuses whose body is passed to the client unchanged
#: (404 unknown model, 429 rate limit, 400 bad parameter: the client's to fix).
PASSED_THROUGH_STATUSES: Final = frozenset(range(400, 500)) - RELAY_CREDENTIAL_STATUSES
#: How much of an upstream error message the log line keeps.
MAX_LOGGED_DETAIL_CHARS: Final = 200
USER_AGENT: Final = "openai-realtime-relay/0.1"


class UpstreamRefused(Exception):
    """The upstream could not be opened; answer the client's handshake with this."""

    def __init__(
        self,
        status: int,
        body: bytes,
        *,
        detail: str,
        outcome: Outcome,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = body
        self.detail = detail
        self.outcome = outcome
        #: The upstream's ``Retry-After``, in seconds, when it sent one.
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Headers for the client's answer: the upstream's ``Retry-After``, rounded up."""
        if self.retry_after_s is None:
            return ()
        return (("Retry-After", str(math.ceil(self.retry_after_s))),)


class TlsResumption:
    """The latest resumable TLS session with the upstream, for the next dial.

    A full TLS handshake is most of what a new session costs the relay over
    ``wss://``; resuming the last session the upstream gave a ticket for skips the
    certificate chain and its verification (TLS 1.3 still runs a fresh key
    exchange with the ticket, so forward secrecy is kept). Sessions belong to
    their ``SSLContext``: a reload builds a new endpoint, and so a new holder.
    """

    __slots__ = ("session",)

    def __init__(self) -> None:
        self.session: ssl.SSLSession | None = None

    def remember(self, transport: Transport) -> None:
        sock = transport.sock
        if isinstance(sock, ssl.SSLSocket):
            session = sock.session
            if session is not None and session.has_ticket:
                self.session = session


async def dial_upstream(
    target: HandshakeTarget,
    *,
    ssl_context: ssl.SSLContext | None,
    resumption: TlsResumption,
    max_message_bytes: int,
    timeout_s: float,
) -> WebSocket:
    """Open the upstream WebSocket or raise :class:`UpstreamRefused`."""
    transport: Transport | None = None
    try:
        # A bare scope, not trio.fail_after: that is a generator context manager, a few
        # microseconds more per session for the same deadline.
        with trio.CancelScope(deadline=trio.current_time() + timeout_s) as deadline:
            try:
                transport = await open_transport(
                    target.host,
                    target.port,
                    ssl_context=ssl_context,
                    tls_session=resumption.session,
                )
            except (OSError, ssl.SSLError) as exc:
                raise UpstreamRefused(
                    502,
                    http_error_body(
                        "The relay could not reach the upstream Realtime API.",
                        error_type="server_error",
                        code="upstream_unreachable",
                    ),
                    detail=f"connect to {target.host}:{target.port} failed: {_describe(exc)}",
                    outcome=Outcome.REFUSED,
                ) from None
            key = handshake.new_websocket_key()
            await transport.send_all(
                handshake.upgrade_request(
                    host_header=target.host_header,
                    target=target.request_target,
                    key=key,
                    headers=[*target.wire_headers(), ("User-Agent", USER_AGENT)],
                )
            )
            response = await http.read_response_head(transport)
            if response.status != 101:
                body = await _read_error_body(transport, response)
                raise _refusal(response.status, body, response.retry_after_s)
            problem = handshake.upgrade_response_problem(response, key)
            if problem is not None:
                raise UpstreamRefused(
                    502, _bad_gateway(), detail=problem, outcome=Outcome.SERVER_ERROR
                )
            # TLS 1.3 tickets come after the handshake: with the 101 they have arrived.
            resumption.remember(transport)
        if deadline.cancelled_caught:
            raise trio.TooSlowError
    except trio.TooSlowError:
        if transport is not None:
            transport.close()
        raise timed_out(
            f"handshake with {target.host}:{target.port} timed out after {timeout_s}s"
        ) from None
    except (TransportClosed, HandshakeError) as exc:
        if transport is not None:
            transport.close()
        raise UpstreamRefused(
            502,
            _bad_gateway(),
            detail=f"upstream handshake failed: {exc}",
            outcome=Outcome.SERVER_ERROR,
        ) from None
    except BaseException:
        if transport is not None:
            transport.close()
        raise
    assert transport is not None  # the scope ran to its end: the dial succeeded
    return WebSocket(
        transport,
        client_side=True,
        max_message_bytes=max_message_bytes,
        initial_data=response.trailing,
    )


async def _read_error_body(transport: Transport, response: handshake.ResponseHead) -> bytes:
    try:
        return await http.read_body(
            transport,
            response.trailing,
            response.content_length,
            max_bytes=handshake.MAX_ERROR_BODY_BYTES,
        )
    except (HandshakeError, TransportClosed):
        return b""
    finally:
        transport.close()


def auth_failed(detail: str) -> UpstreamRefused:
    """The upstream refused the relay's key (its body, which quotes it, never passed on)."""
    return UpstreamRefused(
        502,
        http_error_body(
            "The relay could not authenticate with the upstream Realtime API.",
            error_type="server_error",
            code="upstream_auth_failed",
        ),
        detail=detail,
        outcome=Outcome.KEY_REJECTED,
    )


def timed_out(detail: str) -> UpstreamRefused:
    """No upstream answered the handshake before its deadline."""
    return UpstreamRefused(
        504,
        http_error_body(
            "The upstream Realtime API did not answer the handshake in time.",
            error_type="server_error",
            code="upstream_timeout",
        ),
        detail=detail,
        outcome=Outcome.TIMEOUT,
    )


def _refusal(status: int, body: bytes, retry_after_s: float | None) -> UpstreamRefused:
    if status in RELAY_CREDENTIAL_STATUSES:
        # The upstream refused *our* key: its body quotes part of it and would blame
        # the client's key. The client learns only that the relay failed.
        return auth_failed(
            f"upstream answered HTTP {status} to the relay's key: {_error_detail(body)}"
        )
    if status in PASSED_THROUGH_STATUSES:
        if not body.lstrip().startswith(b"{"):
            body = http_error_body(
                f"The upstream refused the session (HTTP {status}).", code="upstream_refused"
            )
        return UpstreamRefused(
            status,
            body,
            detail=f"upstream answered HTTP {status}",
            outcome=outcome_for_status(status),
            retry_after_s=retry_after_s,
        )
    # A 503 is the one 5xx a client can act on (come back after Retry-After); any
    # other is the gateway's failure to get an answer: 502.
    return UpstreamRefused(
        503 if status == 503 else 502,
        http_error_body(
            f"The upstream Realtime API failed (HTTP {status}).",
            error_type="server_error",
            code="upstream_unavailable" if status == 503 else "upstream_error",
        ),
        detail=f"upstream answered HTTP {status}",
        # A 1xx or 3xx is no WebSocket either: a server error, as for any 5xx.
        outcome=Outcome.SERVER_ERROR,
        retry_after_s=retry_after_s if status == 503 else None,
    )


def _error_detail(body: bytes) -> str:
    """The upstream's own error code and message, for the relay's log (redacted there)."""
    try:
        error = orjson.loads(body).get("error", {})
        return f"{error.get('code')}: {str(error.get('message'))[:MAX_LOGGED_DETAIL_CHARS]}"
    except (orjson.JSONDecodeError, AttributeError):
        return f"{len(body)} bytes, not OpenAI's error envelope"


def _bad_gateway() -> bytes:
    return http_error_body(
        "The upstream Realtime API sent an invalid handshake.",
        error_type="server_error",
        code="bad_gateway",
    )


def _describe(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
