"""One relayed Realtime session: two verbatim pumps and a watchdog in one nursery.

This module owns the Trio shell of a session after both handshakes:

- ``client -> upstream`` and ``upstream -> client`` pumps move frames as they
  arrived on the wire. Data frames are never decoded, re-encoded or (over TLS)
  unmasked: a client frame keeps its mask on the way up, because the upstream
  expects masked frames and the client's mask already satisfies RFC 6455. Towards
  a plain ``ws://`` upstream, where §10.3's concern (attacker-chosen bytes on a
  cleartext wire reaching intermediaries) applies, frames are re-masked with a
  fresh key: one XOR pass with ``old_key XOR new_key``. Frames larger than the
  codec's whole-frame limit are cut through, chunk by chunk, holding the
  destination's write lock for the frame so nothing interleaves with it.
- Control frames are per hop: pings answered on the leg they came from, pongs
  recorded for dead-peer detection, a close frame turned into an
  :class:`~relay.dataplane.policy.Ending` that the policy maps to both legs.
- The watchdog sends our own pings on both legs and checks pong deadlines, the
  idle timeout and the maximum session duration.
- The first task to end records the :class:`Ending` and cancels the nursery; then
  :func:`_close_legs` carries out the policy's close plan on both legs at once,
  shielded and bounded, so no task outlives the session.

Backpressure is the awaited write: a pump that cannot write does not read, so a
client that stops reading stops the upstream pump, whose socket buffer fills and
TCP flow control reaches the upstream. Per direction the relay holds at most one
read buffer (``RECEIVE_BYTES``) and what the frame reader keeps (one read plus a
partial header, or one whole frame up to ``WHOLE_FRAME_MAX_BYTES``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Final

import trio

from relay.dataplane.lock import PREFIX_PROBE_BYTES, SessionLock, needs_inspection
from relay.dataplane.policy import (
    ClosePlan,
    Ending,
    EndKind,
    LegClose,
    Side,
    UpstreamTap,
    plan_close,
)
from relay.net.transport import TransportClosed
from relay.net.websocket import ConnectionClosed, FrameEvent, WebSocket
from relay.protocol import frames
from relay.protocol.frames import (
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameChunk,
    FrameProtocolError,
    FrameStart,
)

LOGGER = logging.getLogger("relay.session")

#: Largest client control event assembled for the lock to inspect (session.update with
#: long instructions and many tools fits easily; appends are never assembled).
LOCKED_EVENT_MAX_BYTES: Final = 1024 * 1024
#: How often the watchdog wakes to check idle and pong deadlines, at most.
WATCHDOG_TICK_MAX_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    idle_timeout_s: float
    max_session_s: float
    ping_interval_s: float
    pong_timeout_s: float
    close_timeout_s: float


@dataclass(slots=True)
class SessionStats:
    """Counters for one session (the end-of-session log line and metrics read these)."""

    messages_up: int = 0
    messages_down: int = 0
    locked_fields_removed: int = 0
    started_at: float = 0.0
    ending: Ending | None = None
    tap: UpstreamTap = field(default_factory=UpstreamTap)


class RelaySession:
    """Relays one client WebSocket to one upstream WebSocket until either ends."""

    def __init__(
        self,
        client: WebSocket,
        upstream: WebSocket,
        limits: SessionLimits,
        *,
        remask_upstream: bool,
        session_id: str,
        lock: SessionLock | None = None,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.limits = limits
        self.remask_upstream = remask_upstream
        self.session_id = session_id
        self.lock = lock
        #: Who the client is (a key digest prefix or a token id), for logs and the admin API.
        self.credential_id = ""
        self.stats = SessionStats()
        self._cancel_scope = trio.CancelScope()
        #: How both legs were closed (set once the session has ended).
        self.close_plan: ClosePlan | None = None
        self._external_ending: Ending | None = None

    def end(self, ending: Ending) -> None:
        """Ask the session to end (shutdown, admin); safe from any task."""
        self._finish(ending)

    def _finish(self, ending: Ending) -> None:
        if self.stats.ending is None:
            self.stats.ending = ending
        self._cancel_scope.cancel()

    async def run(self) -> Ending:
        """Relay until the session ends; both legs are closed when this returns."""
        self.stats.started_at = trio.current_time()
        try:
            with self._cancel_scope:
                if self.lock is not None:
                    # Applied before any client event can reach the upstream.
                    await self.upstream.send_text(self.lock.initial_update())
                async with trio.open_nursery() as nursery:
                    if self.lock is None:
                        nursery.start_soon(self._pump_up)
                    else:
                        nursery.start_soon(self._pump_up_locked, self.lock)
                    nursery.start_soon(self._pump_down)
                    nursery.start_soon(self._watchdog)
        except Exception:
            LOGGER.exception("session %s failed", self.session_id)
            if self.stats.ending is None:
                self.stats.ending = Ending(EndKind.INTERNAL_ERROR)
        ending = self.stats.ending or Ending(EndKind.INTERNAL_ERROR)
        await self._close_legs(ending)
        return ending

    # ---------------------------------------------------------------- pumps

    async def _pump_up(self) -> None:
        """Client -> upstream."""
        client, upstream = self.client, self.upstream
        remask = self.remask_upstream
        stats = self.stats
        try:
            while True:
                event = await client.next_frame_event()
                if type(event) is Frame:
                    opcode = event.opcode
                    if opcode < OP_CLOSE:
                        if remask:
                            await upstream.send_raw(_remasked(event))
                        else:
                            await upstream.send_raw(event.raw)
                        if event.fin:
                            stats.messages_up += 1
                    elif not await self._control(event, client, Side.CLIENT):
                        return
                elif type(event) is FrameStart:
                    await self._cut_through(event, client, upstream, remask=remask)
                    if event.fin:
                        stats.messages_up += 1
        except FrameProtocolError as exc:
            self._finish(_protocol_ending(exc, Side.CLIENT))
        except ConnectionClosed:
            self._finish(Ending(EndKind.DROPPED, Side.CLIENT))
        except TransportClosed:
            # Either the client's read or the upstream's write broke; find out which.
            side = Side.UPSTREAM if upstream.transport.closed else Side.CLIENT
            self._finish(Ending(EndKind.DROPPED, side))

    async def _pump_up_locked(self, lock: SessionLock) -> None:
        """Client -> upstream under a locked config (a separate loop so the plain one stays lean).

        Appends are recognised from their first bytes and forwarded like in
        :meth:`_pump_up`; other text messages (small control events) are assembled,
        rewritten by the lock, and sent as one fresh frame.
        """
        client, upstream = self.client, self.upstream
        remask = self.remask_upstream
        stats = self.stats
        assembling: list[bytes] | None = None
        assembled_bytes = 0
        try:
            while True:
                event = await client.next_frame_event()
                if type(event) is Frame:
                    opcode = event.opcode
                    if opcode >= OP_CLOSE:
                        if not await self._control(event, client, Side.CLIENT):
                            return
                        continue
                    if assembling is None and not (
                        opcode == OP_TEXT and needs_inspection(_probe(event))
                    ):
                        await upstream.send_raw(_remasked(event) if remask else event.raw)
                        if event.fin:
                            stats.messages_up += 1
                        continue
                    payload = event.payload()
                    if event.fin and assembling is None:
                        await self._forward_locked(lock, payload)
                        continue
                    assembling = assembling or []
                    assembling.append(payload)
                    assembled_bytes += len(payload)
                elif type(event) is FrameStart:
                    first = await client.next_frame_event()
                    if type(first) is not FrameChunk:
                        raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame interrupted")
                    head = first.data[:PREFIX_PROBE_BYTES]
                    if event.mask_key is not None:
                        head = frames.xor_mask(head, event.mask_key)
                    if assembling is None and not (
                        event.opcode == OP_TEXT and needs_inspection(head)
                    ):
                        await self._cut_through(event, client, upstream, remask=remask, first=first)
                        if event.fin:
                            stats.messages_up += 1
                        continue
                    assembling = assembling or []
                    payload = await self._collect(event, first, client)
                    assembling.append(payload)
                    assembled_bytes += len(payload)
                else:
                    continue
                if assembled_bytes > LOCKED_EVENT_MAX_BYTES:
                    raise FrameProtocolError(
                        frames.CLOSE_MESSAGE_TOO_BIG,
                        f"control event over {LOCKED_EVENT_MAX_BYTES} bytes",
                    )
                if event.fin and assembling is not None:
                    await self._forward_locked(lock, b"".join(assembling))
                    assembling, assembled_bytes = None, 0
        except FrameProtocolError as exc:
            self._finish(_protocol_ending(exc, Side.CLIENT))
        except ConnectionClosed:
            self._finish(Ending(EndKind.DROPPED, Side.CLIENT))
        except TransportClosed:
            side = Side.UPSTREAM if upstream.transport.closed else Side.CLIENT
            self._finish(Ending(EndKind.DROPPED, side))

    async def _forward_locked(self, lock: SessionLock, payload: bytes) -> None:
        rewrite = lock.rewrite(payload)
        await self.upstream.send_text(rewrite.payload if rewrite.payload is not None else payload)
        self.stats.messages_up += 1
        if rewrite.notice is not None:
            self.stats.locked_fields_removed += len(rewrite.removed)
            await self.client.send_text(rewrite.notice)

    async def _collect(self, start: FrameStart, first: FrameChunk, source: WebSocket) -> bytes:
        """Read a large frame's payload (bounded by the locked-event limit), unmasked."""
        if start.payload_len > LOCKED_EVENT_MAX_BYTES:
            raise FrameProtocolError(
                frames.CLOSE_MESSAGE_TOO_BIG, f"control event over {LOCKED_EVENT_MAX_BYTES} bytes"
            )
        parts: list[bytes] = []
        chunk: FrameEvent = first
        while True:
            if type(chunk) is not FrameChunk:
                raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame interrupted")
            data = chunk.data
            if start.mask_key is not None:
                data = frames.xor_mask(data, start.mask_key, chunk.offset)
            parts.append(data)
            if chunk.last:
                return b"".join(parts)
            chunk = await source.next_frame_event()

    async def _pump_down(self) -> None:
        """Upstream -> client. Upstream text is shown to the tap, then sent unchanged."""
        client, upstream = self.client, self.upstream
        stats = self.stats
        observe = stats.tap.observe_text
        try:
            while True:
                event = await upstream.next_frame_event()
                if type(event) is Frame:
                    opcode = event.opcode
                    if opcode < OP_CLOSE:
                        await client.send_raw(event.raw)
                        if event.fin:
                            stats.messages_down += 1
                            if opcode == OP_TEXT:
                                observe(memoryview(event.raw)[event.header_len :])
                    elif not await self._control(event, upstream, Side.UPSTREAM):
                        return
                elif type(event) is FrameStart:
                    await self._cut_through(event, upstream, client, remask=False)
                    if event.fin:
                        stats.messages_down += 1
        except FrameProtocolError as exc:
            self._finish(_protocol_ending(exc, Side.UPSTREAM))
        except ConnectionClosed:
            self._finish(Ending(EndKind.DROPPED, Side.UPSTREAM))
        except TransportClosed:
            side = Side.CLIENT if client.transport.closed else Side.UPSTREAM
            self._finish(Ending(EndKind.DROPPED, side))

    async def _control(self, frame: Frame, source: WebSocket, side: Side) -> bool:
        """Handle a control frame from ``source``; ``False`` when the session ends."""
        opcode = frame.opcode
        if opcode == OP_PING:
            await source.send_pong(frame.payload())
            return True
        if opcode == OP_PONG:
            source.last_pong_at = trio.current_time()
            return True
        code, reason = frames.decode_close_payload(frame.payload())
        source.close_received = (code, reason)
        self._finish(Ending(EndKind.CLOSED, side, code, reason))
        return False

    async def _cut_through(
        self,
        start: FrameStart,
        source: WebSocket,
        destination: WebSocket,
        *,
        remask: bool,
        first: FrameChunk | None = None,
    ) -> None:
        """Forward one large frame piece by piece while its bytes arrive."""
        new_key = os.urandom(4) if remask and start.mask_key is not None else None
        flip = _xor_key(start.mask_key, new_key) if new_key is not None else None
        header = frames.remask_header(start.header, new_key) if new_key else start.header
        lock = destination.lock_for_frame()
        async with lock:
            try:
                await destination.transport.send_all(header)
                while True:
                    chunk = first if first is not None else await source.next_frame_event()
                    first = None
                    if type(chunk) is not FrameChunk:
                        raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame interrupted")
                    data = chunk.data
                    if flip is not None:
                        data = frames.xor_mask(data, flip, chunk.offset)
                    await destination.transport.send_all(data)
                    if chunk.last:
                        return
            except BaseException:
                destination.mark_broken()
                raise

    # ---------------------------------------------------------------- watchdog

    async def _watchdog(self) -> None:
        limits = self.limits
        started = self.stats.started_at
        expires_at = started + limits.max_session_s
        next_ping = started + limits.ping_interval_s
        last_seen = (-1, -1)
        last_activity = started
        tick = min(WATCHDOG_TICK_MAX_S, limits.ping_interval_s, limits.idle_timeout_s / 4)
        client, upstream = self.client, self.upstream
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            if now >= expires_at:
                self._finish(Ending(EndKind.SESSION_EXPIRED))
                return
            seen = (self.stats.messages_up, self.stats.messages_down)
            if seen != last_seen:
                last_seen, last_activity = seen, now
            elif now - last_activity >= limits.idle_timeout_s:
                self._finish(Ending(EndKind.IDLE_TIMEOUT))
                return
            for side, leg in ((Side.CLIENT, client), (Side.UPSTREAM, upstream)):
                # A pong is overdue when our last ping has gone unanswered too long.
                if (
                    leg.ping_sent_at is not None
                    and leg.last_pong_at < leg.ping_sent_at
                    and (now - leg.ping_sent_at >= limits.pong_timeout_s)
                ):
                    self._finish(Ending(EndKind.DEAD_PEER, side))
                    return
            if now >= next_ping:
                next_ping = now + limits.ping_interval_s
                for leg in (client, upstream):
                    if leg.ping_sent_at is None or leg.last_pong_at >= leg.ping_sent_at:
                        leg.ping_sent_at = now
                        try:
                            await leg.send_ping(b"relay")
                        except TransportClosed:
                            pass

    # ---------------------------------------------------------------- closing

    async def _close_legs(self, ending: Ending) -> None:
        plan = plan_close(ending)
        self.close_plan = plan
        timeout_s = self.limits.close_timeout_s
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_close_leg, self.client, plan.client, timeout_s)
                nursery.start_soon(_close_leg, self.upstream, plan.upstream, timeout_s)


async def _close_leg(leg: WebSocket, plan: LegClose, timeout_s: float) -> None:
    if not plan.send_close or leg.transport.closed:
        leg.transport.close()
        return
    with trio.move_on_after(timeout_s):
        try:
            if plan.error_event is not None and leg.close_sent is None:
                await leg.send_text(plan.error_event)
        except TransportClosed:
            leg.transport.close()
            return
    await leg.close(plan.code, plan.reason, timeout_s=timeout_s)


def _probe(frame: Frame) -> bytes:
    """The first bytes of a frame's payload, unmasked (enough to recognise an append)."""
    start = frame.header_len
    head = frame.raw[start : start + PREFIX_PROBE_BYTES]
    return frames.xor_mask(head, frame.mask_key) if frame.mask_key is not None else head


def _protocol_ending(exc: FrameProtocolError, side: Side) -> Ending:
    kind = (
        EndKind.TOO_BIG
        if exc.close_code == frames.CLOSE_MESSAGE_TOO_BIG
        else (EndKind.PROTOCOL_ERROR)
    )
    return Ending(kind, side, exc.close_code, exc.reason)


def _xor_key(old: bytes | None, new: bytes) -> bytes:
    assert old is not None
    return bytes(a ^ b for a, b in zip(old, new, strict=True))


def _remasked(frame: Frame) -> bytes:
    """The same frame under a fresh mask key: one XOR pass with old_key ^ new_key."""
    old = frame.mask_key
    if old is None:
        return bytes(frame.raw)
    new = os.urandom(4)
    header_len = frame.header_len
    raw = frame.raw
    header = frames.remask_header(bytes(raw[:header_len]), new)
    return header + frames.xor_mask(raw[header_len:], _xor_key(old, new))
