"""``relay serve``: one process, one public port, two planes.

This module owns the front listener and the realtime handshake. How the port is
shared:

1. One non-blocking listening socket; each accepted connection gets a task.
2. The task reads the request head (bounded size, ``handshake_timeout_s``) and
   parses it with h11 (:mod:`relay.protocol.handshake`).
3. ``GET /v1/realtime`` (or ``/realtime``) with ``Upgrade: websocket`` stays
   here: the data plane answers the handshake itself, dials the upstream first,
   and relays frames on its own codec (:mod:`relay.dataplane.session`). Any other
   WebSocket upgrade is refused here (404), so hypercorn never terminates a
   WebSocket and never negotiates permessage-deflate.
4. Every other request is handed, socket and already-read bytes, to hypercorn
   running the quart-trio control app in this same ``trio.run``
   (:mod:`relay.control.hosting`).

The realtime handshake, in order: valid RFC 6455 request; credential check
before anything else (401 with OpenAI's envelope); session capacity (503);
the retired beta marker stripped and logged; upstream dialed (its refusal
becomes this handshake's HTTP answer); only then ``101`` with exactly
``Sec-WebSocket-Protocol: realtime`` when offered.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import socket
from typing import Final

import trio

from relay.config import ServeConfig
from relay.control.app import create_app
from relay.control.hosting import ControlPlaneHost
from relay.dataplane.auth import (
    AuthRefusal,
    CredentialChecker,
    NoAuthChecker,
    StaticKeyChecker,
    key_digest,
)
from relay.dataplane.policy import Ending, EndKind
from relay.dataplane.session import RelaySession, SessionLimits
from relay.dataplane.upstream import UpstreamEndpoint, UpstreamRefused, dial_upstream
from relay.net import http
from relay.net.transport import Transport, TransportClosed, accept, open_listener
from relay.net.websocket import WebSocket
from relay.protocol import handshake
from relay.protocol.events import new_id
from relay.protocol.handshake import HandshakeError, RequestHead

LOGGER = logging.getLogger("relay.server")

REALTIME_PATHS: Final = frozenset({"/v1/realtime", "/realtime"})
#: Client request headers forwarded to the upstream (everything else stays here).
FORWARDED_CLIENT_HEADERS: Final = (b"openai-safety-identifier",)


def build_checker(config: ServeConfig) -> CredentialChecker:
    if config.no_auth:
        return NoAuthChecker()
    digests = [*config.client_key_sha256, *(key_digest(k) for k in config.client_keys)]
    return StaticKeyChecker(digests)


class RelayServer:
    """The relay process's state: configuration, live sessions, the two planes."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        upstream: UpstreamEndpoint,
        checker: CredentialChecker | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.checker = checker or build_checker(config)
        self.sessions: dict[str, RelaySession] = {}
        self._draining = False
        self._session_numbers = itertools.count(1)
        self.limits = SessionLimits(
            idle_timeout_s=config.idle_timeout_s,
            max_session_s=config.max_session_s,
            ping_interval_s=config.ping_interval_s,
            pong_timeout_s=config.pong_timeout_s,
            close_timeout_s=config.close_timeout_s,
        )
        self.control = ControlPlaneHost(create_app(self))
        #: Handshakes in progress count against capacity too.
        self._pending_handshakes = 0

    # ControlState
    @property
    def live_sessions(self) -> int:
        return len(self.sessions)

    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def draining(self) -> bool:
        return self._draining

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started(port)``."""
        if self.config.no_auth:
            LOGGER.warning(
                "AUTHENTICATION IS OFF (--no-auth): anyone who can reach this port uses "
                "the relay's upstream key. Local development only."
            )
        listener = open_listener(self.config.host, self.config.port)
        try:
            port = int(listener.getsockname()[1])
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run)
                LOGGER.info(
                    "relay listening on %s:%d, upstream %s",
                    self.config.host,
                    port,
                    self.upstream.target.host_header,
                )
                task_status.started(port)
                while True:
                    sock, peer = await accept(listener)
                    nursery.start_soon(self._handle_connection, sock, peer)
                    await trio.lowlevel.checkpoint()
        finally:
            listener.close()

    async def _handle_connection(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        transport = Transport(sock, peer=peer)
        try:
            with trio.fail_after(self.config.handshake_timeout_s):
                head = await http.read_request_head(transport)
            if head is None:
                return
            if head.path in REALTIME_PATHS and head.is_websocket_upgrade():
                await self._realtime(transport, head)
            elif head.is_websocket_upgrade():
                raise HandshakeError(
                    404, f"No WebSocket endpoint at {head.path}.", code="not_found"
                )
            else:
                # hypercorn closes the socket itself; our close below is then a no-op.
                await self.control.handle(sock, head.raw + head.trailing)
        except HandshakeError as exc:
            await http.send_error(transport, exc.status, exc.message, code=exc.code)
        except trio.TooSlowError:
            await http.send_error(
                transport, 408, "The request head did not arrive in time.", code="timeout"
            )
        except TransportClosed:
            pass
        finally:
            transport.close()

    async def _realtime(self, transport: Transport, head: RequestHead) -> None:
        problem = handshake.websocket_request_problem(head)
        if problem is not None:
            raise problem
        decision = self.checker.check(handshake.client_credential(head), head)
        if isinstance(decision, AuthRefusal):
            await http.send_error(
                transport,
                decision.status,
                decision.message,
                error_type=decision.error_type,
                code=decision.code,
            )
            return
        if self._draining:
            await http.send_error(
                transport,
                503,
                "The relay is shutting down; retry shortly.",
                error_type="server_error",
                code="server_shutdown",
            )
            return
        if len(self.sessions) + self._pending_handshakes >= self.config.max_sessions:
            await http.send_error(
                transport,
                503,
                "The relay is at its session limit; retry shortly.",
                error_type="server_error",
                code="server_busy",
                extra_headers=(("Retry-After", "1"),),
            )
            return
        if handshake.has_beta_marker(head):
            LOGGER.info(
                "stripped the retired beta marker (OpenAI-Beta / openai-beta.realtime-v1) "
                "from a client handshake; the upstream gets the GA protocol"
            )
        extra = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in head.headers
            if name in FORWARDED_CLIENT_HEADERS
        ]
        self._pending_handshakes += 1
        try:
            try:
                upstream = await dial_upstream(
                    self.upstream,
                    client_query=head.query,
                    extra_headers=extra,
                    max_message_bytes=self.config.max_message_bytes,
                    timeout_s=self.config.upstream_connect_timeout_s,
                )
            except UpstreamRefused as refusal:
                LOGGER.info("upstream refused a session: %s", refusal.detail)
                await transport.send_all(handshake.http_response(refusal.status, refusal.body))
                return
            try:
                await transport.send_all(handshake.accept_response(head))
            except BaseException:
                upstream.transport.close()
                raise
        finally:
            self._pending_handshakes -= 1
        client = WebSocket(
            transport,
            client_side=False,
            max_message_bytes=self.config.max_message_bytes,
            initial_data=head.trailing,
        )
        session_id = f"rs_{next(self._session_numbers)}_{new_id('')[:8]}"
        session = RelaySession(
            client,
            upstream,
            self.limits,
            remask_upstream=_needs_remask(self.config, upstream),
            session_id=session_id,
        )
        self.sessions[session_id] = session
        try:
            ending = await session.run()
        finally:
            del self.sessions[session_id]
            upstream.transport.close()
        stats = session.stats
        LOGGER.info(
            "session %s ended: %s by %s code=%s up=%d down=%d",
            session_id,
            ending.kind.value,
            ending.side.value if ending.side else "relay",
            ending.code,
            stats.messages_up,
            stats.messages_down,
        )

    def end_all_sessions(self, kind: EndKind = EndKind.SHUTDOWN) -> None:
        for session in list(self.sessions.values()):
            session.end(Ending(kind))


def _needs_remask(config: ServeConfig, upstream: WebSocket) -> bool:
    """Re-mask client frames only where RFC 6455 §10.3's threat exists.

    Masking protects intermediaries on a cleartext path from attacker-chosen
    bytes. Over TLS nobody on the path sees them; on loopback there is no path.
    """
    if not config.remask_plain_upstream or upstream.transport.is_tls:
        return False
    peer = upstream.transport.peer
    if peer is None:
        return True
    try:
        return not ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return True
