"""A WebSocket endpoint on a :class:`~relay.net.transport.ByteStream`, after the handshake.

This module owns the Trio shell around the sans-I/O frame codec
(:mod:`relay.protocol.frames`) for one connection and one role:

- writes are serialised by one lock per connection, taken without a scheduler
  pass when free (``acquire_nowait``), so a frame is never interleaved with
  another task's frame, and a write cancelled half-way marks the connection
  broken rather than leaving a torn frame for the next writer;
- :meth:`WebSocket.next_frame_event` hands out raw frame events for the relay's
  verbatim pumps; :meth:`WebSocket.receive_message` assembles whole messages and
  runs the control-frame duties (answer pings, note pongs, answer a close) for
  endpoints such as the simulator, the demo and the bench;
- the close handshake, per hop, with a bounded wait.

- :meth:`WebSocket.receive_run` is the relay's hot path: one read, and the whole
  small data frames at its front handed back as a view of the receive buffer, to
  be forwarded in one write without a copy or an object per frame.

Memory per connection: what the frame reader holds (at most one read plus a
partial header, or one whole frame up to its whole-frame limit), plus, in
:meth:`receive_message`, the message being assembled (bounded by
``max_message_bytes``). The receive buffer (:data:`~relay.net.transport.RECEIVE_BYTES`)
is one per thread, shared by all its connections: a read lands in it and is
forwarded or copied into the reader before the reading task next awaits
(:meth:`Transport.recv_into` does not suspend after the read, and ``send_all``
copies before it waits), so an idle connection holds no read buffer at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final

import trio

from relay.net.transport import RECEIVE_BYTES, ByteStream, TransportClosed
from relay.protocol import frames
from relay.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameChunk,
    FrameProtocolError,
    FrameReader,
    FrameStart,
)

#: How long we wait for the peer's close frame after sending ours.
DEFAULT_CLOSE_TIMEOUT_S: Final = 2.0

FrameEvent = Frame | FrameStart | FrameChunk


class _SharedReceiveBuffer(threading.local):
    """The receive buffer of every connection on one thread (one Trio run)."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(RECEIVE_BYTES))


_RECEIVE_BUFFER: Final = _SharedReceiveBuffer()


class WriteLock:
    """One writer at a time on a connection, taken without a scheduler pass when free.

    ``trio.Lock`` costs 1.3 us per uncontended acquire and release on the relay's
    per-message path (owner bookkeeping, statistics); this is a flag and a parking
    lot. On release a waiter, if any, is handed the lock directly.
    """

    __slots__ = ("_waiters", "held", "waiting")

    def __init__(self) -> None:
        self.held = False
        #: Tasks parked for the lock (a plain count: ParkingLot's len is a Python call).
        self.waiting = 0
        #: Made by the first writer that has to wait: most connections never contend,
        #: and a parking lot is 3k instructions to build, two per session.
        self._waiters: trio.lowlevel.ParkingLot | None = None

    async def acquire(self) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.held:
            waiters = self._waiters
            if waiters is None:
                waiters = self._waiters = trio.lowlevel.ParkingLot()
            self.waiting += 1
            try:
                await waiters.park()  # woken by release() as the new holder
            finally:
                self.waiting -= 1
        else:
            self.held = True

    def release(self) -> None:
        # ``waiting`` may still count a waiter whose cancellation already took it out
        # of the lot: only a waiter actually unparked takes the lock over. A count
        # above zero means a waiter made the lot.
        waiters = self._waiters
        if self.waiting and waiters is not None and waiters.unpark():
            return  # the lock passed on, still held
        self.held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class ConnectionClosed(Exception):
    """The WebSocket is closed: ``code``/``reason`` are what the peer (or we) sent.

    ``code`` is 1006 when the TCP connection ended without a close frame.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


class LegFailed(TransportClosed):
    """A read from, or a write to, one WebSocket failed: names which.

    A relay has two legs, and a broken pipe on one must be blamed on that leg, from
    the fact and not from a guess: :attr:`leg` is the connection whose socket failed.
    """

    def __init__(self, leg: WebSocket, detail: str) -> None:
        super().__init__(detail)
        self.leg = leg


class UnsentRest:
    """The bytes of a write the kernel did not take whole (:meth:`WebSocket.keep_unsent`)."""

    __slots__ = ("data", "reserved")

    def __init__(self, data: bytes, *, reserved: bool) -> None:
        self.data = data
        #: The write lock is held for these bytes (part of their frame went already).
        self.reserved = reserved


class WebSocket:
    """One WebSocket connection in one role (``client_side`` masks what it sends)."""

    def __init__(
        self,
        transport: ByteStream,
        *,
        client_side: bool,
        max_message_bytes: int,
        initial_data: bytes = b"",
    ) -> None:
        self.transport = transport
        self.client_side = client_side
        self.max_message_bytes = max_message_bytes
        self.reader = FrameReader(
            expect_masked=not client_side, max_message_bytes=max_message_bytes
        )
        if initial_data:
            self.reader.feed(initial_data)
        #: Where reads land: the thread's shared receive buffer (see :meth:`run_of`).
        self.read_view = _RECEIVE_BUFFER.view
        self._send_lock = WriteLock()
        self._send_broken = False
        #: The rest of a close frame :meth:`close_now` could not write whole.
        self._unsent_close: UnsentRest | None = None
        #: Set once we sent a close frame: (code, reason).
        self.close_sent: tuple[int, str] | None = None
        #: Set once the peer's close frame arrived: (code, reason).
        self.close_received: tuple[int, str] | None = None
        #: When the peer's latest pong arrived (the session clock reads it at its checks).
        self.last_pong_at = trio.current_time()
        self.bytes_received = 0
        self.bytes_sent = 0

    # ------------------------------------------------------------------ writing

    async def send_raw(
        self, data: bytes | bytearray | memoryview, *, reserved: bool = False
    ) -> None:
        """Write wire bytes (one or more whole frames, or part of a frame the caller owns).

        ``reserved``: the caller holds the write lock already (:meth:`send_unsent`).
        """
        lock = self._send_lock
        if self._send_broken:
            if reserved:
                lock.release()
            raise LegFailed(self, "connection broken by an interrupted write")
        if reserved:
            pass
        elif lock.held:
            data = bytes(data)  # it may be a view of the shared receive buffer
            await lock.acquire()
        else:
            lock.held = True
        try:
            await self.transport.send_all(data)
            self.bytes_sent += len(data)
        except TransportClosed as exc:
            self._send_broken = True
            raise LegFailed(self, str(exc)) from None
        except BaseException:
            self._send_broken = True
            raise
        finally:
            if lock.waiting:
                lock.release()
            else:  # release()'s common case, inline: a call per message fewer
                lock.held = False

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Begin a write without a coroutine: the bytes of ``data`` that went at once.

        The relay's pumps write each run so (the awaited :meth:`send_raw` is two
        coroutines per message more: 2.1k instructions, bench/instructions.py). All
        of it, usually; fewer (0 when another task holds the write lock): the caller
        must ``await send_rest(data, sent)`` next, before any other await, so
        nothing is written between the two and no frame is torn.
        """
        if self._send_broken:
            raise LegFailed(self, "connection broken by an interrupted write")
        if self._send_lock.held:
            return 0
        try:
            sent = self.transport.send_now(data)
        except TransportClosed as exc:
            self._send_broken = True
            raise LegFailed(self, str(exc)) from None
        self.bytes_sent += sent
        return sent

    async def send_rest(self, data: bytes | bytearray | memoryview, sent: int) -> None:
        """Finish a write :meth:`send_now` began, of which ``sent`` bytes went.

        With ``sent`` bytes of a frame on the wire the write lock is still free (no
        task ran since); :meth:`send_raw` takes it for the rest, and marks the
        connection broken if the rest is cut off.
        """
        await self.send_raw(memoryview(data)[sent:] if sent else data)

    def keep_unsent(self, data: bytes | bytearray | memoryview, sent: int) -> UnsentRest:
        """After :meth:`send_now` wrote ``sent`` of ``data``'s bytes, where the caller
        cannot await (a :mod:`relay.net.hub` handler): the rest, copied, for
        :meth:`send_unsent` once the caller can. With part of a frame on the wire
        the write lock is taken now, so no other writer gets in between."""
        if sent:
            self._send_lock.held = True  # free: send_now wrote, and nothing ran since
        return UnsentRest(bytes(memoryview(data)[sent:]), reserved=bool(sent))

    async def send_unsent(self, rest: UnsentRest) -> None:
        """Write what :meth:`keep_unsent` kept (and release the lock it took)."""
        await self.send_raw(rest.data, reserved=rest.reserved)

    def mark_broken(self) -> None:
        """A write was interrupted mid-frame: nothing more may be written."""
        self._send_broken = True

    def lock_for_frame(self) -> WriteLock:
        """The write lock, for a caller that writes one frame in several pieces."""
        return self._send_lock

    async def send_piece(self, data: bytes | bytearray | memoryview) -> None:
        """Write part of a frame while holding :meth:`lock_for_frame` (cut-through)."""
        try:
            await self.transport.send_all(data)
        except TransportClosed as exc:
            self._send_broken = True
            raise LegFailed(self, str(exc)) from None
        self.bytes_sent += len(data)

    def _encode(self, opcode: int, payload: bytes | bytearray | memoryview) -> bytes:
        mask_key = frames.fresh_mask_key() if self.client_side else None
        return frames.encode_frame(opcode, payload, mask_key=mask_key)

    async def send_text(self, payload: bytes | bytearray | memoryview) -> None:
        """Send one TEXT message; ``payload`` is already UTF-8 (JSON from orjson)."""
        await self.send_raw(self._encode(OP_TEXT, payload))

    async def send_binary(self, payload: bytes | bytearray | memoryview) -> None:
        await self.send_raw(self._encode(OP_BINARY, payload))

    async def send_ping(self, payload: bytes = b"") -> None:
        await self.send_raw(self._encode(OP_PING, payload))

    async def send_pong(self, payload: bytes) -> None:
        await self.send_raw(self._encode(OP_PONG, payload))

    async def send_close(self, code: int | None, reason: str = "") -> None:
        """Send our close frame once; later calls do nothing."""
        if self.close_sent is not None:
            unsent, self._unsent_close = self._unsent_close, None
            if unsent is not None:  # the rest of the frame close_now began
                await self.send_unsent(unsent)
            return
        self.close_sent = (code if code is not None else frames.CLOSE_NO_STATUS, reason)
        await self.send_raw(self._encode(OP_CLOSE, frames.encode_close_payload(code, reason)))

    # ------------------------------------------------------------------ reading

    async def fill(self) -> bool:
        """Read once from the socket into the frame reader; ``False`` at end of stream."""
        try:
            received = await self.transport.recv_into(self.read_view)
        except TransportClosed as exc:
            raise LegFailed(self, str(exc)) from None
        if received == 0:
            return False
        self.bytes_received += received
        self.reader.feed(self.read_view[:received])
        return True

    async def receive_run(
        self,
        on_text: Callable[[memoryview], None] | None = None,
        accept: Callable[[int, bool, bytes | memoryview], bool] | None = None,
        skip_text: Callable[[memoryview, int, int], object] | None = None,
    ) -> memoryview:
        """Read once; return the whole small data frames at the front of what came.

        The run is a view of the shared receive buffer, valid until the caller's
        next await: forward it at once (``send_raw`` copies it if it must wait).
        ``reader.run_frames`` and ``reader.run_messages`` count it, ``on_text`` sees
        each complete unmasked text message in it (but those ``skip_text`` matches), and
        ``accept`` may keep frames
        out of it (:meth:`~relay.protocol.frames.FrameReader.take_run`). Whatever is not in
        the run (a control frame, a large or incomplete frame) goes to the reader,
        for
        :meth:`next_frame_event`'s caller to take as events. Raises
        :class:`ConnectionClosed` (1006) when the stream ends.
        """
        try:
            received = await self.transport.recv_into(self.read_view)
        except TransportClosed as exc:
            raise LegFailed(self, str(exc)) from None
        return self.run_of(received, on_text, accept, skip_text)

    def run_of(
        self,
        received: int,
        on_text: Callable[[memoryview], None] | None = None,
        accept: Callable[[int, bool, bytes | memoryview], bool] | None = None,
        skip_text: Callable[[memoryview, int, int], object] | None = None,
    ) -> memoryview:
        """:meth:`receive_run` after its read: the run in the ``received`` bytes that
        ``transport.recv_into(read_view)`` just read. A pump that makes the read
        itself (a coroutine per message fewer) calls this at once after it."""
        view = self.read_view
        reader = self.reader
        # The usual read: fresh_read's lines, inline (may_hold: idle without a call).
        if received and (not reader.may_hold or reader.idle):
            self.bytes_received += received
            data = view[:received]
            taken = reader.take_run(data, on_text, accept, skip_text, received)
            if taken == received:  # the usual run: the whole read
                return data
        else:
            fresh = self.fresh_read(received)
            if fresh is None:
                reader.run_frames = reader.run_messages = 0
                return view[:0]
            data = fresh
            taken = reader.take_run(data, on_text, accept, skip_text)
            if taken == len(data):
                return data
        reader.feed(data[taken:])
        return data[:taken]

    def fresh_read(self, received: int) -> memoryview | None:
        """The ``received`` bytes that ``transport.recv_into(read_view)`` just read,
        ready to take frames from, or ``None`` once fed to the reader; for a pump that
        makes the read itself.

        The bytes (joined to the partial frame the reader held, if this read
        completes it) are a view valid until the caller's next await, and nothing of
        them is consumed yet: the caller takes whole frames with
        :meth:`~relay.protocol.frames.FrameReader.frame_at`, or a run with
        ``take_run``, and feeds the reader the rest. ``None``: the read went to the
        reader (a frame it does not finish), for :meth:`next_frame_event`. Raises
        :class:`ConnectionClosed` (1006) when the stream ended."""
        if received == 0:
            raise ConnectionClosed(
                frames.CLOSE_ABNORMAL, "connection dropped without a close frame"
            )
        self.bytes_received += received
        data = self.read_view[:received]
        reader = self.reader
        if not reader.may_hold or reader.idle:  # may_hold: idle without a call
            return data
        pending = reader.take_pending(received)
        if pending is None:  # a cut-through frame, or a frame this read won't finish
            reader.feed(data)
            return None
        # One copy joins the partial frame to the bytes it waited for, and the frames
        # start there (then in a private buffer, not the shared one).
        return memoryview(pending + data)

    async def next_frame_event(self) -> FrameEvent:
        """The next frame event, reading as needed.

        Raises :class:`ConnectionClosed` (1006) when the stream ends without a close
        frame, and :class:`~relay.protocol.frames.FrameProtocolError` on a violation.
        """
        reader = self.reader
        while True:
            event = reader.next_event()
            if event is not None:
                return event
            if not await self.fill():
                raise ConnectionClosed(
                    frames.CLOSE_ABNORMAL, "connection dropped without a close frame"
                )

    async def receive_message(self) -> tuple[int, bytes]:
        """The next whole data message as ``(opcode, payload)``; handles control frames.

        Raises :class:`ConnectionClosed` with the peer's code once the peer closed (our
        close reply is sent before raising), or 1006 when the stream just ended.
        On a protocol violation we close with its code and raise ``ConnectionClosed``.
        """
        parts: list[bytes] = []
        opcode = 0
        size = 0
        while True:
            try:
                event = await self.next_frame_event()
            except FrameProtocolError as exc:
                await self.close_quietly(exc.close_code, exc.reason)
                raise ConnectionClosed(exc.close_code, exc.reason) from None
            if isinstance(event, Frame):
                op = event.opcode
                if op >= OP_CLOSE:
                    await self._on_control(event)
                    continue
                payload = event.payload()
                if op != OP_CONTINUATION:
                    opcode = op
                if event.fin and not parts:
                    return opcode, payload
                parts.append(payload)
                size += len(payload)
                if event.fin:
                    return opcode, b"".join(parts)
            elif isinstance(event, FrameStart):
                if event.opcode != OP_CONTINUATION:
                    opcode = event.opcode
                mask_key = event.mask_key
                chunk_parts: list[bytes] = []
                while True:
                    chunk = await self.next_frame_event()
                    assert isinstance(chunk, FrameChunk)
                    data = bytes(chunk.data)
                    if mask_key is not None:
                        data = frames.xor_mask(data, mask_key, chunk.offset)
                    chunk_parts.append(data)
                    if chunk.last:
                        break
                payload = b"".join(chunk_parts)
                parts.append(payload)
                size += len(payload)
                if event.fin:
                    return opcode, b"".join(parts)
            else:  # pragma: no cover - FrameChunk outside a FrameStart cannot happen
                raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "unexpected frame chunk")

    async def _on_control(self, frame: Frame) -> None:
        op = frame.opcode
        if op == OP_PING:
            if self.close_sent is None:
                await self.send_pong(frame.payload())
        elif op == OP_PONG:
            self.last_pong_at = trio.current_time()
        else:
            code, reason = frames.decode_close_payload(frame.payload())
            self.close_received = (code, reason)
            # Echo the code back (RFC 6455 §5.5.1), then our side is done.
            reply = None if code == frames.CLOSE_NO_STATUS else code
            try:
                await self.send_close(reply, reason if reply is not None else "")
            except TransportClosed:
                pass
            raise ConnectionClosed(code, reason)

    # ------------------------------------------------------------------ closing

    async def close(
        self,
        code: int | None = frames.CLOSE_NORMAL,
        reason: str = "",
        *,
        timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        """Close handshake: send ours, wait (bounded) for the peer's, then close TCP.

        ``code`` None sends a close frame without a status (the peer sees 1005).
        Safe to call from a ``finally`` under cancellation: it shields itself and
        always returns within ``timeout_s`` (plus a little).
        """
        with trio.move_on_after(timeout_s, shield=True):
            await self.close_handshake(code, reason)
        self.transport.close()

    async def close_handshake(self, code: int | None, reason: str = "") -> None:
        """:meth:`close`'s handshake, unbounded and leaving TCP open: for a caller whose
        own cancel scope bounds it (one scope per leg instead of two, on the path every
        session ends by). A failed or dropped connection just ends it."""
        try:
            await self.send_close(code, reason)
            while self.close_received is None:
                event = await self.next_frame_event()
                if isinstance(event, Frame) and event.opcode == OP_CLOSE:
                    self.close_received = frames.decode_close_payload(event.payload())
        except (TransportClosed, ConnectionClosed, FrameProtocolError):
            pass

    def close_now(self, code: int | None, reason: str = "") -> bool:
        """The whole close handshake at once, when nothing in it needs waiting for: the
        peer's close came already, and ours goes in one write the kernel takes whole;
        then TCP closes. ``False``: nothing was written, :meth:`close` has it all to do
        (a write lock held, a full socket). With part of our frame written, the rest
        waits for :meth:`close` (:attr:`close_sent` set, the lock held for it)."""
        if self.close_received is None or self.close_sent is not None:
            return False
        if self._send_lock.held or self._send_broken:
            return False
        frame = self._encode(OP_CLOSE, frames.encode_close_payload(code, reason))
        try:
            sent = self.transport.send_now(frame)
        except TransportClosed:
            self.transport.close()  # gone already: as close() would end
            return True
        if sent == 0:
            return False
        self.close_sent = (code if code is not None else frames.CLOSE_NO_STATUS, reason)
        self.bytes_sent += sent
        if sent < len(frame):
            self._unsent_close = self.keep_unsent(frame, sent)
            return False
        self.transport.close()
        return True

    async def close_quietly(self, code: int, reason: str) -> None:
        """Send a close frame if we can (bounded), then drop the TCP connection."""
        with trio.move_on_after(DEFAULT_CLOSE_TIMEOUT_S, shield=True):
            try:
                await self.send_close(code, reason)
            except TransportClosed:
                pass
        self.transport.close()


__all__ = [
    "OP_BINARY",
    "OP_TEXT",
    "ConnectionClosed",
    "FrameEvent",
    "LegFailed",
    "WebSocket",
]
