"""A scripted upstream for tests: accepts the relay's handshake, records it, and sends
whatever events a test hands it (arbitrary JSON included), over real sockets.

The simulator plays OpenAI faithfully; this peer plays a broken or hostile one, which
the simulator by design cannot: negative usage counts, garbage events, and a record
of exactly which request target and headers reached the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import trio

from relay.net import http
from relay.net.transport import Transport, TransportClosed, accept, open_listener
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import handshake
from relay.protocol.handshake import RequestHead

MAX_MESSAGE_BYTES = 1 << 24


@dataclass
class ScriptedUpstream:
    """Each connection gets ``script`` (text messages) sent after the 101, then a close."""

    script: list[bytes] = field(default_factory=list)
    #: Close code sent after the script; None keeps the connection open until the relay closes.
    close_code: int | None = 1000
    #: Answer the handshake only once this is set (a slow upstream, a race to 101).
    hold: trio.Event | None = None
    #: Open each session the way OpenAI does first: session.created, and the first
    #: session.update answered by session.updated (or by ``refuse_update`` if given).
    opens_like_openai: bool = False
    refuse_update: bytes | None = None
    heads: list[RequestHead] = field(default_factory=list)
    received: list[tuple[int, bytes]] = field(default_factory=list)
    port: int = 0

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listener = open_listener("127.0.0.1", 0)
        self.port = int(listener.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:
                    sock, peer = await accept(listener)
                    nursery.start_soon(self._connection, Transport(sock, peer=peer))
        finally:
            listener.close()

    async def _connection(self, transport: Transport) -> None:
        try:
            head = await http.read_request_head(transport)
            if head is None:
                return
            self.heads.append(head)
            if self.hold is not None:
                await self.hold.wait()
            await transport.send_all(handshake.accept_response(head))
            ws = WebSocket(
                transport,
                client_side=False,
                max_message_bytes=MAX_MESSAGE_BYTES,
                initial_data=head.trailing,
            )
            if self.opens_like_openai:
                await self._open_session(ws)
            for message in self.script:
                await ws.send_text(message)
            if self.close_code is not None:
                await ws.close(self.close_code, "script done", timeout_s=2)
                return
            while True:
                self.received.append(await ws.receive_message())
        except (ConnectionClosed, TransportClosed):
            pass
        finally:
            transport.close()

    async def _open_session(self, ws: WebSocket) -> None:
        created = {"type": "session.created", "session": {"id": "sess_s", "model": "gpt-realtime"}}
        await ws.send_text(orjson.dumps(created))
        _, payload = await ws.receive_message()
        self.received.append((1, payload))
        if self.refuse_update is not None:
            await ws.send_text(self.refuse_update)
            return
        update = orjson.loads(payload)
        updated = {"type": "session.updated", "session": update.get("session")}
        await ws.send_text(orjson.dumps(updated))


async def start_scripted_upstream(
    nursery: trio.Nursery,
    script: list[bytes] | None = None,
    *,
    close_code: int | None = 1000,
    **options: Any,
) -> ScriptedUpstream:
    upstream = ScriptedUpstream(script=list(script or []), close_code=close_code, **options)
    await nursery.start(upstream.serve)
    return upstream
