"""Hosting the control-plane app with hypercorn, inside our own ``trio.run``.

This module owns the hand-off of a plain HTTP connection from the relay's front
listener to hypercorn. The front listener has already read the request head to
route it, so the connection is wrapped in :class:`PrefixedSocketStream`, a Trio
stream that first replays those bytes and then reads the transport; hypercorn's
per-connection ``TCPServer`` runs on it in our nursery. There is no second
listener and no local socket hop, and hypercorn sees the real client address.

hypercorn never gets a realtime upgrade: the front listener answers every
WebSocket request itself. Its CLI master, signal handling and worker processes
are not used; only the app protocol, with the ASGI lifespan run once at start.
"""

from __future__ import annotations

from typing import Any, Final

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from relay.net.transport import Transport, TransportClosed

#: Read size for control-plane connections.
CONTROL_READ_BYTES: Final = 64 * 1024
#: Control-plane requests are small; hypercorn refuses bigger bodies itself.
CONTROL_MAX_BODY_BYTES = 1024 * 1024
#: An idle keep-alive control connection is closed after this long.
CONTROL_KEEP_ALIVE_S = 5.0
#: A control connection that sends nothing for this long is dropped.
CONTROL_READ_TIMEOUT_S = 30.0


class PrefixedTransportStream(trio.abc.HalfCloseableStream):
    """A Trio stream over our :class:`Transport` whose first reads replay bytes already read.

    Works for plain and TLS transports alike (TLS is already terminated by the
    transport), so hypercorn serves the control plane on either.
    """

    def __init__(self, transport: Transport, prefix: bytes) -> None:
        self._transport = transport
        self._prefix = prefix
        self._buffer = bytearray(CONTROL_READ_BYTES)

    @property
    def socket(self) -> Any:  # hypercorn reads the peer and local address from here
        return self._transport.sock

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            size = len(self._prefix) if max_bytes is None else max_bytes
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            return data
        view = memoryview(self._buffer)
        if max_bytes is not None:
            view = view[:max_bytes]
        try:
            received = await self._transport.recv_into(view)
        except TransportClosed as exc:
            raise trio.BrokenResourceError(str(exc)) from None
        return bytes(view[:received])

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._transport.send_all(data)
        except TransportClosed as exc:
            raise trio.BrokenResourceError(str(exc)) from None

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self._transport.is_tls:
            self._transport.shutdown_write()

    async def aclose(self) -> None:
        self._transport.close()
        await trio.lowlevel.checkpoint()


class ControlPlaneHost:
    """Runs one ASGI app for connections handed over by the front listener."""

    def __init__(self, app: Any) -> None:
        self.config = HypercornConfig()
        self.config.keep_alive_timeout = CONTROL_KEEP_ALIVE_S
        self.config.read_timeout = int(CONTROL_READ_TIMEOUT_S)
        self.config.h11_max_incomplete_size = 16 * 1024
        self.config.wsgi_max_body_size = CONTROL_MAX_BODY_BYTES
        self.config.accesslog = None
        self.config.errorlog = None
        self._app = ASGIWrapper(app)
        self._context = WorkerContext(None)
        self._state: dict[str, Any] = {}
        self._lifespan = Lifespan(self._app, self.config, self._state)

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

    async def handle(self, transport: Transport, prefix: bytes) -> None:
        """Serve one HTTP connection whose first ``prefix`` bytes were already read."""
        stream = PrefixedTransportStream(transport, prefix)
        server = TCPServer(
            self._app,
            self.config,
            self._context,
            ConnectionState(self._state.copy()),
            stream,  # type: ignore[arg-type]  # a HalfCloseableStream with .socket, as hypercorn uses it
        )
        await server.run()
