"""Hosting the control-plane app with hypercorn, inside our own ``trio.run``.

This module owns the hand-off of a plain HTTP connection from the relay's front
listener to hypercorn. The front listener has already read and parsed the request
head to route it; :meth:`ControlPlaneHost.handle` checks that head, then replays
its bytes into hypercorn's HTTP/1.1 protocol (``H11Protocol``) driven by
:class:`ControlConnection`, a small read/write loop over our transport in our
nursery. There is no second listener and no local socket hop, and hypercorn sees
the real client address. hypercorn's CLI master, signal handling, worker
processes and ``TCPServer`` are not used; only its protocol and ASGI layers, with
the ASGI lifespan run once at start.

The connection discipline, all enforced here:

- **One request per connection.** Every answer carries ``Connection: close`` and
  the socket is closed right after it (hypercorn's ``keep_alive_max_requests`` is
  1, which makes it add the header; h11 then ends the connection). The front
  listener routes each connection by its first head, so a second request on the
  same connection (a proxy's keep-alive pool reusing it for a WebSocket upgrade)
  must never reach hypercorn: there is no second request.
- **HTTP/1.1 only.** An ``Upgrade: h2c`` offer is ignored (answered in HTTP/1.1);
  the HTTP/2 preface ``PRI * HTTP/2.0`` never gets here: the front parser answers
  any version but 1.0/1.1 with 505 (:func:`relay.protocol.handshake.parse_request_head`).
- **No smuggling.** ``Content-Length`` with ``Transfer-Encoding`` is refused with
  400 and a close (RFC 9112 §6.3).
- **Bounded time.** The request (what was not yet read of the head, and the
  body) must arrive within :data:`CONTROL_REQUEST_DEADLINE_S` of the hand-off
  (408); the front listener already bounds the head by ``handshake_timeout_s``.
  The whole connection, answer included, lives at most
  :data:`CONTROL_CONNECTION_DEADLINE_S`.
- **Bounded count.** At most :data:`CONTROL_MAX_CONNECTIONS` control connections
  at once; beyond that a connection is answered 503 and closed at once, without
  reaching hypercorn. Health and readiness probes are not counted (each is answered
  and closed at once, within the same deadlines). The data plane has its own limits
  and never waits on these.

Every refusal is OpenAI's ``{"error": {...}}`` envelope, including hypercorn's
own answers to malformed bodies.

hypercorn never gets a realtime upgrade: the front listener answers every
WebSocket request itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import h11
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from relay.dataplane.admission import RETRY_AFTER_S
from relay.net import http
from relay.net.transport import Transport, TransportClosed
from relay.protocol.events import http_error_body
from relay.protocol.handshake import RequestHead

#: Read size for control-plane connections (allocated per read, not per connection).
CONTROL_READ_BYTES: Final = 16 * 1024
#: The rest of a request (head and body) must arrive within this many seconds of the hand-off.
CONTROL_REQUEST_DEADLINE_S: Final = 10.0
#: A control connection, answer included, is closed at the latest this many seconds after
#: the hand-off (longer than a passthrough mint's upstream timeout).
CONTROL_CONNECTION_DEADLINE_S: Final = 30.0
#: Control connections served at once; more are answered 503.
CONTROL_MAX_CONNECTIONS: Final = 256
#: Health and readiness probes are never capped: they read no body, answer a few bytes
#: and close, and a load balancer must not see the relay as down because of other traffic.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True, slots=True)
class ControlLimits:
    """The control plane's bounds; tests pass small ones."""

    request_deadline_s: float = CONTROL_REQUEST_DEADLINE_S
    connection_deadline_s: float = CONTROL_CONNECTION_DEADLINE_S
    max_connections: int = CONTROL_MAX_CONNECTIONS


def request_problem(head: RequestHead) -> tuple[int, str, str] | None:
    """Why this head must not reach hypercorn: ``(status, message, code)``, or ``None``."""
    names = {name for name, _ in head.headers}
    if b"transfer-encoding" in names and b"content-length" in names:
        return (
            400,
            "A request may not carry both Content-Length and Transfer-Encoding.",
            "invalid_request",
        )
    return None


class _RelayH11Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol, HTTP/1.1 only and with OpenAI-shaped refusals.

    Overrides two of its private methods (hypercorn is pinned below 0.19; the tests in
    ``tests/test_control_plane.py`` pin the behaviour: h2c, bad chunked bodies).
    """

    refused = False

    async def _check_protocol(self, event: h11.Request) -> None:
        # hypercorn would switch to HTTP/2 here (h2c upgrade, PRI preface). Never: the
        # preface is refused before hand-off and an h2c offer is simply not taken up.
        return None

    async def _send_error_response(self, status_code: int) -> None:
        # hypercorn's answer to a malformed request body (bad chunk, oversized line).
        message = {431: "Request header fields too large."}.get(
            status_code, "Malformed HTTP request body."
        )
        await self.refuse(status_code, message, "invalid_request")

    async def refuse(self, status: int, message: str, code: str) -> None:
        """Answer with the envelope if no answer has started; the connection then closes."""
        if self.refused or not isinstance(self.connection, h11.Connection):
            return
        if self.connection.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        self.refused = True
        body = http_error_body(message, code=code)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *self.config.response_headers("h11"),
        ]
        await self._send_h11_event(h11.Response(status_code=status, headers=headers))
        await self._send_h11_event(h11.Data(data=body))
        await self._send_h11_event(h11.EndOfMessage())

    async def stream_send(self, event: StreamEvent) -> None:
        if self.refused:
            return  # the app answers too late: the refusal went out instead
        await super().stream_send(event)

    def request_incomplete(self) -> bool:
        """The request head or body has not fully arrived yet."""
        connection = self.connection
        return isinstance(connection, h11.Connection) and connection.their_state in (
            h11.IDLE,
            h11.SEND_BODY,
        )


class ControlConnection:
    """One control-plane connection: bytes from the transport into hypercorn and back.

    Plays the part of hypercorn's ``TCPServer`` without its keep-alive machinery:
    a request deadline while the request arrives, no shielded writes (the
    connection deadline can always end a client that does not read), and the
    socket closed as soon as hypercorn is done with the one request.
    """

    def __init__(self, host: ControlPlaneHost, transport: Transport, prefix: bytes) -> None:
        self._host = host
        self._transport = transport
        self._prefix = prefix
        self._send_lock = trio.Lock()
        self._protocol: _RelayH11Protocol

    async def run(self, deadline: float) -> None:
        host = self._host
        try:
            async with TaskGroup() as task_group:
                self._protocol = _RelayH11Protocol(
                    host.app,
                    host.config,
                    host.context,
                    task_group,
                    ConnectionState(host.state.copy()),
                    False,  # TLS, if any, is already terminated by the transport
                    _address(self._transport.sock, peer=True),
                    _address(self._transport.sock, peer=False),
                    self._protocol_send,
                )
                await self._read(deadline)
        finally:
            self._transport.close()

    async def _read(self, deadline: float) -> None:
        protocol = self._protocol
        while not self._transport.closed:
            data = b""
            with trio.move_on_at(deadline if protocol.request_incomplete() else math.inf) as late:
                try:
                    data = await self._receive()
                except TransportClosed:
                    break
            if late.cancelled_caught:
                await protocol.refuse(408, "The request did not arrive in time.", "timeout")
                break  # Closed below: the app hears a disconnect and stops
            await protocol.handle(RawData(data))
            if not data:
                break
        await protocol.handle(Closed())

    async def _receive(self) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
        else:
            buffer = bytearray(CONTROL_READ_BYTES)
            received = await self._transport.recv_into(buffer)
            data = bytes(buffer[:received])
        self._host.bytes_received += len(data)
        return data

    async def _protocol_send(self, event: Event) -> None:
        if isinstance(event, RawData):
            async with self._send_lock:
                try:
                    await self._transport.send_all(event.data)
                except TransportClosed:
                    self._transport.close()
                    await self._protocol.handle(Closed())
        elif isinstance(event, Closed):
            self._transport.close()  # wakes the reader, which ends the connection
            await trio.lowlevel.checkpoint()
        # Updated (idle / busy) drives hypercorn's keep-alive timer: no keep-alive here.


def _address(sock: Any, *, peer: bool) -> tuple[str, int] | None:
    try:
        address = sock.getpeername() if peer else sock.getsockname()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None


class ControlPlaneHost:
    """Runs one ASGI app for connections handed over by the front listener."""

    def __init__(self, app: Any) -> None:
        #: The bounds this host enforces; tests swap in small ones.
        self.limits = ControlLimits()
        self.config = HypercornConfig()
        # One request per connection: hypercorn adds ``Connection: close`` to every answer.
        self.config.keep_alive_max_requests = 1
        self.config.h11_max_incomplete_size = 16 * 1024
        self.config.include_server_header = False
        self.config.accesslog = None
        self.config.errorlog = None
        self.app = ASGIWrapper(app)
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}
        self._lifespan = Lifespan(self.app, self.config, self.state)
        #: Control connections being served now, and bytes read from them in total.
        self.open_connections = 0
        self.bytes_received = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the ASGI lifespan for as long as the relay runs."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._lifespan.handle_lifespan)
            await self._lifespan.wait_for_startup()
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.move_on_after(2, shield=True):
                    await self._lifespan.wait_for_shutdown()

    async def handle(self, transport: Transport, head: RequestHead) -> None:
        """Serve the one request of a connection whose ``head`` the front listener read."""
        limits = self.limits
        problem = request_problem(head)
        if problem is not None:
            status, message, code = problem
            await http.send_error(transport, status, message, code=code)
            return
        probe = head.method in ("GET", "HEAD") and head.path in PROBE_PATHS
        if not probe and self.open_connections >= limits.max_connections:
            await http.send_error(
                transport,
                503,
                "Too many control-plane connections; retry shortly.",
                error_type="server_error",
                code="control_plane_busy",
                extra_headers=(("Retry-After", str(RETRY_AFTER_S)),),
            )
            return
        counted = 0 if probe else 1
        self.open_connections += counted
        try:
            started = trio.current_time()
            with trio.move_on_at(started + limits.connection_deadline_s):
                connection = ControlConnection(self, transport, head.raw + head.trailing)
                await connection.run(started + limits.request_deadline_s)
        finally:
            self.open_connections -= counted
            transport.close()
