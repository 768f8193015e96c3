"""Raw WebSocket ends for tests that must control every byte: a hand-written client
that sends frames exactly as built (whole, fragmented, one octet per TCP write), and
a recording upstream that keeps every payload byte the relay sent it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
import trio

from relay.protocol import frames, handshake
from relay.protocol.frames import Frame, FrameChunk, FrameReader, FrameStart

READ_BYTES = 65536
MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One client frame, masked as RFC 6455 requires."""
    return frames.encode_frame(opcode, payload, fin=fin, mask_key=os.urandom(4))


def text(payload: bytes | str) -> bytes:
    return masked(frames.OP_TEXT, payload.encode() if isinstance(payload, str) else payload)


def fragments(payload: bytes, cuts: list[int]) -> bytes:
    """``payload`` as one text message cut into fragments at ``cuts``."""
    bounds = [0, *cuts, len(payload)]
    out = []
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        opcode = frames.OP_TEXT if index == 0 else frames.OP_CONTINUATION
        out.append(masked(opcode, payload[start:end], fin=end == len(payload)))
    return b"".join(out)


def error_codes(events: list[dict[str, object]]) -> list[object]:
    """The ``error.code`` of each ``error`` event."""
    return [e["error"]["code"] for e in events if e["type"] == "error"]  # type: ignore[index]


class Closed(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class RawClient:
    """A client WebSocket on a bare TCP stream."""

    def __init__(self, stream: trio.SocketStream, leftover: bytes) -> None:
        self.stream = stream
        self.reader = FrameReader(expect_masked=False, max_message_bytes=MAX_MESSAGE_BYTES)
        self.reader.feed(leftover)

    @classmethod
    async def connect(cls, port: int, target: str, token: str) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            handshake.upgrade_request(
                host_header=f"127.0.0.1:{port}",
                target=target,
                key=handshake.new_websocket_key(),
                headers=[("Authorization", f"Bearer {token}")],
            )
        )
        data = b""
        while (response := handshake.parse_response_head(data)) is None:
            chunk = await stream.receive_some(READ_BYTES)
            assert chunk, "relay closed during the handshake"
            data += chunk
        assert response.status == 101, response
        return cls(stream, response.trailing)

    async def send(self, wire: bytes, *, octet_writes: bool = False) -> None:
        if not octet_writes:
            await self.stream.send_all(wire)
            return
        for index in range(len(wire)):
            await self.stream.send_all(wire[index : index + 1])

    async def message(self) -> bytes:
        """The next whole data message; :class:`Closed` once the relay closes."""
        parts: list[bytes] = []
        while True:
            event = self.reader.next_event()
            if event is None:
                data = await self.stream.receive_some(READ_BYTES)
                if not data:
                    raise Closed(1006, "")
                self.reader.feed(data)
                continue
            if isinstance(event, Frame):
                if event.opcode == frames.OP_CLOSE:
                    code, reason = frames.decode_close_payload(event.payload())
                    payload = frames.encode_close_payload(code, reason)
                    await self.stream.send_all(masked(frames.OP_CLOSE, payload))
                    raise Closed(code, reason)
                if event.opcode == frames.OP_PING:
                    await self.stream.send_all(masked(frames.OP_PONG, event.payload()))
                    continue
                if event.opcode == frames.OP_PONG:
                    continue
                parts.append(event.payload())
                if event.fin:
                    return b"".join(parts)
            elif isinstance(event, FrameChunk):
                parts.append(event.data)
                if event.last and self._fin:
                    return b"".join(parts)
            else:
                self._fin = event.fin

    _fin = True

    async def event(self) -> dict[str, object]:
        value: dict[str, object] = orjson.loads(await self.message())
        return value

    async def until_closed(self) -> tuple[list[dict[str, object]], Closed]:
        events: list[dict[str, object]] = []
        while True:
            try:
                events.append(await self.event())
            except Closed as closed:
                return events, closed

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass
class UpstreamLeg:
    """Everything one relay -> upstream connection carried."""

    #: Complete data messages, unmasked, in order.
    messages: list[bytes] = field(default_factory=list)
    #: Every payload byte received, complete messages or not.
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._changed.wait()

    def types(self) -> list[object]:
        return [orjson.loads(m).get("type") for m in self.messages]


class RecordingUpstream:
    """An upstream that accepts the WebSocket upgrade and records what it receives."""

    def __init__(self) -> None:
        self.legs: list[UpstreamLeg] = []
        self.port = 0
        self._new_leg = trio.Event()

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._serve, listeners)

    async def leg(self, index: int = 0) -> UpstreamLeg:
        while len(self.legs) <= index:
            await self._new_leg.wait()
        return self.legs[index]

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while (head := handshake.parse_request_head(data)) is None:
                chunk = await stream.receive_some(READ_BYTES)
                if not chunk:
                    return
                data += chunk
            await stream.send_all(handshake.accept_response(head))
            # Like OpenAI: the session opens with session.created.
            await stream.send_all(frames.encode_frame(frames.OP_TEXT, SESSION_CREATED))
            leg = UpstreamLeg()
            self.legs.append(leg)
            self._new_leg.set()
            self._new_leg = trio.Event()
            try:
                await self._record(stream, leg, head.trailing)
            except trio.BrokenResourceError:
                pass
            finally:
                leg.ended = True
                leg._notify()

    async def _record(self, stream: trio.SocketStream, leg: UpstreamLeg, first: bytes) -> None:
        reader = FrameReader(expect_masked=True, max_message_bytes=MAX_MESSAGE_BYTES)
        reader.feed(first)
        message: list[bytes] = []
        start: FrameStart | None = None
        while True:
            event = reader.next_event()
            if event is None:
                chunk = await stream.receive_some(READ_BYTES)
                if not chunk:
                    return
                reader.feed(chunk)
                continue
            if isinstance(event, FrameStart):
                start = event
                continue
            if isinstance(event, FrameChunk):
                assert start is not None
                assert start.mask_key is not None
                data = frames.xor_mask(event.data, start.mask_key, event.offset)
                done = event.last and start.fin
            else:
                data = event.payload()
                if event.opcode >= frames.OP_CLOSE:
                    if event.opcode == frames.OP_CLOSE:
                        await stream.send_all(frames.encode_frame(frames.OP_CLOSE, data))
                        return
                    if event.opcode == frames.OP_PING:
                        await stream.send_all(frames.encode_frame(frames.OP_PONG, data))
                    continue
                done = event.fin
            leg.data += data
            message.append(data)
            if done:
                leg.messages.append(b"".join(message))
                message = []
                if len(leg.messages) == 1:
                    await _answer_first_update(stream, leg.messages[0])
            leg._notify()


SESSION_CREATED = orjson.dumps(
    {
        "type": "session.created",
        "event_id": "event_up_1",
        "session": {"id": "sess_up", "model": "gpt-realtime"},
    }
)


async def _answer_first_update(stream: trio.SocketStream, message: bytes) -> None:
    """Answer the relay's locked-config update as OpenAI would (recorded all the same)."""
    try:
        event = orjson.loads(message)
    except orjson.JSONDecodeError:
        return
    if isinstance(event, dict) and event.get("type") == "session.update":
        updated = {
            "type": "session.updated",
            "event_id": "event_up_2",
            "session": event.get("session"),
        }
        await stream.send_all(frames.encode_frame(frames.OP_TEXT, orjson.dumps(updated)))
