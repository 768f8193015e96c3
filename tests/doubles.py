"""In-memory stand-ins for sockets, and named adverse peers, for the session shell.

:func:`memory_pair` gives two :class:`MemoryStream` ends (each a
:class:`~relay.net.transport.ByteStream`) joined by two bounded byte pipes: a
writer blocks while the pipe towards its peer is full, exactly as a socket whose
peer stops reading. Nothing here touches a socket or reads a real clock, so tests
run on ``autojump_clock`` and take virtual seconds.

:func:`relayed_session` builds a :class:`RelaySession` between two far ends the
test plays: a :class:`Peer` for the client (it masks what it sends) and one for
the upstream. The adverse peers are behaviours of those ends:

- a client that never reads: a :class:`Peer` on which nothing is ever received,
  its incoming pipe small;
- an upstream that refuses writes: its incoming pipe full and never read
  (``stop_reading``), or failing every write (:meth:`MemoryStream.refuse_writes`);
- a frame trickled byte by byte: :meth:`Peer.trickle`;
- an upstream that stops answering pings: one that stops reading (pings are
  answered by :meth:`Peer.serve`, which reads).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from relay.dataplane.lock import SessionLock
from relay.dataplane.session import RelaySession, SessionLimits
from relay.net.transport import TransportClosed
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import frames

MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: A pipe that a test never fills.
ROOMY_BYTES: Final = 64 * 1024 * 1024
#: A pipe that fills quickly: a peer that stops reading is noticed at once.
TIGHT_BYTES: Final = 64 * 1024


class _Pipe:
    """One direction of a connection: at most ``capacity`` bytes in flight."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = bytearray()
        #: The writing end closed: the reader sees the end of the stream once drained.
        self.writer_gone = False
        #: The reading end closed (or refuses): writes fail with this detail.
        self.refusal: str | None = None
        self.changed = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self.changed.unpark_all()


class MemoryStream:
    """One end of an in-memory connection; satisfies :class:`ByteStream`."""

    def __init__(self, incoming: _Pipe, outgoing: _Pipe, name: str) -> None:
        self._in = incoming
        self._out = outgoing
        self._closed = False
        self.name = name
        self.peer: tuple[str, int] | None = ("127.0.0.1", 1)
        self.is_tls = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        await trio.lowlevel.checkpoint()
        pipe = self._in
        while True:
            if self._closed:
                raise TransportClosed("connection closed")
            if pipe.buffer:
                size = min(len(buffer), nbytes or len(buffer), len(pipe.buffer))
                buffer[:size] = pipe.buffer[:size]
                del pipe.buffer[:size]
                pipe.wake()
                return size
            if pipe.writer_gone:
                return 0
            await pipe.changed.park()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # The ByteStream contract: ``data`` may be a view of the thread's shared
        # receive buffer, so it is copied before the first suspension.
        view = memoryview(bytes(data))
        await trio.lowlevel.checkpoint()
        pipe = self._out
        while True:
            if self._closed:
                raise TransportClosed("connection closed")
            if pipe.refusal is not None:
                raise TransportClosed(pipe.refusal)
            if not view:
                return
            room = pipe.capacity - len(pipe.buffer)
            if room > 0:
                pipe.buffer += view[:room]
                view = view[room:]
                pipe.wake()
                continue
            await pipe.changed.park()

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed:
            raise TransportClosed("connection closed")
        pipe = self._out
        if pipe.refusal is not None:
            raise TransportClosed(pipe.refusal)
        taken = min(len(data), pipe.capacity - len(pipe.buffer))
        if taken > 0:
            pipe.buffer += memoryview(data)[:taken]
            pipe.wake()
        return max(taken, 0)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.writer_gone = True
        if self._in.refusal is None:
            self._in.refusal = "EPIPE"
        self._in.wake()
        self._out.wake()

    def abort(self) -> None:
        self.close()

    # ------------------------------------------------------------------ adverse behaviour

    def refuse_writes(self, detail: str = "EPIPE") -> None:
        """The peer stopped accepting data: every write *towards this end* fails."""
        self._in.refusal = detail
        self._in.wake()

    @property
    def unread_bytes(self) -> int:
        """Bytes sent to this end that it has not read."""
        return len(self._in.buffer)


def memory_pair(
    *, a_to_b: int = ROOMY_BYTES, b_to_a: int = ROOMY_BYTES, names: tuple[str, str] = ("a", "b")
) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends; each direction holds at most its capacity in flight."""
    forward, backward = _Pipe(a_to_b), _Pipe(b_to_a)
    return MemoryStream(backward, forward, names[0]), MemoryStream(forward, backward, names[1])


@dataclass
class Peer:
    """A far end of the relay: the test's client, or the test's upstream."""

    ws: WebSocket
    stream: MemoryStream
    #: Whole text messages received, in order.
    texts: list[bytes] = field(default_factory=list)
    #: Every whole data message received, in order: (opcode, payload).
    messages: list[tuple[int, bytes]] = field(default_factory=list)
    #: The peer's close frame as it arrived: (code, reason); None while open.
    closed_with: tuple[int, str] | None = None
    #: Set when the connection ended, however it ended.
    gone: trio.Event = field(default_factory=trio.Event)
    #: Whether :meth:`serve` answers pings (an upstream that stops answering does not).
    answer_pings: bool = True

    async def serve(self) -> None:
        """Read until the connection ends: keep text, answer pings, note the close."""
        ws = self.ws
        try:
            while True:
                event = await ws.next_frame_event()
                if isinstance(event, frames.Frame):
                    if event.opcode == frames.OP_PING:
                        if self.answer_pings:
                            await ws.send_pong(event.payload())
                    elif event.opcode == frames.OP_CLOSE:
                        self.closed_with = frames.decode_close_payload(event.payload())
                        ws.close_received = self.closed_with
                        await ws.close(self.closed_with[0], self.closed_with[1], timeout_s=1)
                        return
                    elif event.opcode == frames.OP_TEXT:
                        self.texts.append(event.payload())
                        self.messages.append((frames.OP_TEXT, self.texts[-1]))
                    elif event.opcode == frames.OP_BINARY:
                        self.messages.append((frames.OP_BINARY, event.payload()))
                elif isinstance(event, frames.FrameStart):
                    # A large frame, cut through: kept whole when it is one message.
                    start, parts = event, []
                    while not (isinstance(event, frames.FrameChunk) and event.last):
                        event = await ws.next_frame_event()
                        assert isinstance(event, frames.FrameChunk)
                        data = event.data
                        if start.mask_key is not None:
                            data = frames.xor_mask(data, start.mask_key, event.offset)
                        parts.append(data)
                    if start.fin and start.opcode in (frames.OP_TEXT, frames.OP_BINARY):
                        if start.opcode == frames.OP_TEXT:
                            self.texts.append(b"".join(parts))
                        self.messages.append((start.opcode, b"".join(parts)))
        except (ConnectionClosed, TransportClosed, frames.FrameProtocolError):
            pass
        finally:
            self.gone.set()

    async def send_text(self, payload: bytes) -> None:
        await self.ws.send_text(payload)

    async def trickle(self, wire: bytes, *, every_s: float) -> None:
        """Write ``wire`` one octet at a time, ``every_s`` apart."""
        for index in range(len(wire)):
            await self.stream.send_all(wire[index : index + 1])
            await trio.sleep(every_s)

    def error_codes(self) -> list[str]:
        import orjson

        codes = []
        for text in self.texts:
            event = orjson.loads(text)
            if event.get("type") == "error":
                codes.append(event["error"]["code"])
        return codes


def masked_text(payload: bytes) -> bytes:
    return frames.encode_frame(frames.OP_TEXT, payload, mask_key=os.urandom(4))


def limits(**overrides: float) -> SessionLimits:
    values: dict[str, float] = {
        "idle_timeout_s": 600.0,
        "max_session_s": 3600.0,
        "ping_interval_s": 20.0,
        "pong_timeout_s": 20.0,
        "close_timeout_s": 2.0,
        "client_max_frames_per_s": 0.0,
        "client_frame_burst": 0,
        "client_max_bytes_per_s": 0.0,
        "client_byte_burst_bytes": 0,
    }
    values.update(overrides)
    return SessionLimits(
        idle_timeout_s=values["idle_timeout_s"],
        max_session_s=values["max_session_s"],
        ping_interval_s=values["ping_interval_s"],
        pong_timeout_s=values["pong_timeout_s"],
        close_timeout_s=values["close_timeout_s"],
        client_max_frames_per_s=values["client_max_frames_per_s"],
        client_frame_burst=int(values["client_frame_burst"]),
        client_max_bytes_per_s=values["client_max_bytes_per_s"],
        client_byte_burst_bytes=int(values["client_byte_burst_bytes"]),
    )


@dataclass
class Relayed:
    """A session between two in-memory far ends."""

    session: RelaySession
    client: Peer
    upstream: Peer


def relayed_session(
    session_limits: SessionLimits,
    *,
    to_client_bytes: int = ROOMY_BYTES,
    to_upstream_bytes: int = ROOMY_BYTES,
    lock: SessionLock | None = None,
    binary_audio_max_message_bytes: int | None = None,
    first_client_events: tuple[bytes, ...] = (),
) -> Relayed:
    """A :class:`RelaySession` whose legs are memory streams (``to_*``: the pipe sizes)."""
    client_end, relay_client = memory_pair(
        a_to_b=ROOMY_BYTES, b_to_a=to_client_bytes, names=("client", "relay-client")
    )
    relay_upstream, upstream_end = memory_pair(
        a_to_b=to_upstream_bytes, b_to_a=ROOMY_BYTES, names=("relay-upstream", "upstream")
    )
    session = RelaySession(
        WebSocket(relay_client, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES),
        WebSocket(relay_upstream, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES),
        session_limits,
        remask_upstream=False,
        session_id="memory",
        lock=lock,
        binary_audio_max_message_bytes=binary_audio_max_message_bytes,
        first_client_events=first_client_events,
    )
    client = Peer(
        WebSocket(client_end, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES), client_end
    )
    upstream = Peer(
        WebSocket(upstream_end, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES),
        upstream_end,
    )
    return Relayed(session, client, upstream)


async def wait_until(
    condition: Callable[[], bool], *, timeout_s: float = 10.0, step_s: float = 0.01
) -> None:
    """Poll ``condition`` until it holds; ``trio.TooSlowError`` after ``timeout_s``.

    On ``autojump_clock`` the steps cost no real time.
    """
    with trio.fail_after(timeout_s):
        while not condition():
            await trio.sleep(step_s)


async def wait_until_async(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, step_s: float = 0.02
) -> None:
    """:func:`wait_until` for a condition that must itself await (an HTTP probe)."""
    with trio.fail_after(timeout_s):
        while not await condition():
            await trio.sleep(step_s)
