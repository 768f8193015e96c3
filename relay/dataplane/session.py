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
- Under a locked config (:mod:`relay.dataplane.lock`) a separate up-pump
  forwards as it came only what is proven to be an audio append, streaming
  fragmented and cut-through appends through the lock's append proof piece by
  piece (a proof that fails after part of a message went upstream ends the
  session); every other text event is parsed and forwarded re-serialised, or
  refused; binary messages are refused.
- What the client sends is charged to its rate limit
  (:mod:`relay.dataplane.ratelimit`), one frame at a time, control frames included.
- Control frames are per hop: pings answered on the leg they came from, pongs
  recorded for dead-peer detection, a close frame turned into an
  :class:`~relay.dataplane.policy.Ending` that the policy maps to both legs.
- The watchdog asks the sans-I/O :class:`~relay.dataplane.liveness.SessionClock`
  what is due and sleeps until its next instant; it never awaits a write that may
  block: each ping is written by its own task (one per leg at most), and counts as
  sent when it was due, so a leg whose writes are stuck for ``pong_timeout_s`` is a
  dead peer. ``max_session_s`` is also the deadline of the session's cancel scope,
  so nothing, not even a stuck write, holds a session past it.
- A failed read or write is a :class:`~relay.net.websocket.LegFailed` naming its
  leg; :meth:`RelaySession._pump` turns every way a pump fails into the
  :class:`Ending`, in one place.
- The first task to end records the :class:`Ending` and cancels the nursery; then
  :func:`_close_legs` carries out the policy's close plan on both legs at once,
  shielded and bounded by ``close_timeout_s``, so no task outlives the session.

Backpressure is the awaited write: a pump that cannot write does not read, so a
client that stops reading stops the upstream pump, whose socket buffer fills and
TCP flow control reaches the upstream. Per direction the relay holds at most what
the frame reader keeps (a partial frame, or one whole frame up to
``WHOLE_FRAME_MAX_BYTES``) and a run copied while its write waits; the receive
buffer itself is the thread's, shared (:mod:`relay.net.websocket`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import trio

from relay.dataplane.liveness import LivenessLimits, SessionClock
from relay.dataplane.lock import (
    HOLDS,
    PENDING,
    AppendProof,
    SessionLock,
    binary_refusal,
    is_plain_append,
)
from relay.dataplane.policy import (
    UNTAPPED_HEAD,
    ClosePlan,
    Ending,
    EndKind,
    LegClose,
    Side,
    UpstreamTap,
    plan_close,
)
from relay.dataplane.ratelimit import ClientRateLimit
from relay.net.hub import ReadHub, running_hub
from relay.net.timers import current_timers
from relay.net.transport import Transport, TransportClosed
from relay.net.websocket import ConnectionClosed, LegFailed, UnsentRest, WebSocket
from relay.protocol import binary_audio, frames
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

LOGGER = logging.getLogger("relay.session")

#: Largest client control event assembled for the lock to inspect (session.update with
#: long instructions and many tools fits easily; appends are never assembled).
LOCKED_EVENT_MAX_BYTES: Final = 1024 * 1024
_TOO_BIG_REASON: Final = f"event over {LOCKED_EVENT_MAX_BYTES} bytes that is not an audio append"
#: Payload of the relay's own pings.
PING_PAYLOAD: Final = b"relay"


@dataclass(frozen=True, slots=True)
class SessionLimits:
    idle_timeout_s: float
    max_session_s: float
    ping_interval_s: float
    pong_timeout_s: float
    close_timeout_s: float
    #: What the client may send (every frame, control frames included); a rate of 0 is off.
    client_max_frames_per_s: float
    client_frame_burst: int
    client_max_bytes_per_s: float
    client_byte_burst_bytes: int


class _SessionEnded(Exception):
    """Raised inside a pump once it has recorded why the session ends."""


class _LockViolation(Exception):
    """Part of a client message was forwarded before it failed the append proof."""


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
        first_client_events: tuple[bytes, ...] = (),
        binary_audio_max_message_bytes: int | None = None,
    ) -> None:
        #: Text events the client gets before anything relayed (the session.created
        #: carrying a locked config); sent under the session's own deadline.
        self.first_client_events = first_client_events
        self.client = client
        self.upstream = upstream
        self.limits = limits
        self.remask_upstream = remask_upstream
        self.session_id = session_id
        self.lock = lock
        #: The ``relay.audio.v1`` path (docs/binary-audio.md), when the client opted in:
        #: the largest binary message turned into an append, the input format followed
        #: from session events, and the converter of the upstream's audio deltas.
        self.binary_audio_max_message_bytes = binary_audio_max_message_bytes
        self._audio_format: binary_audio.AudioFormat | None = None
        self._deltas: binary_audio.DeltaConverter | None = None
        self._audio_hub_handler: Callable[[], object] | None = None
        #: Which whole client frames a run may forward as they came (None: all).
        self._client_run_gate: Callable[[int, bool, bytes | memoryview], bool] | None = (
            _is_one_frame_append if lock is not None else None
        )
        if binary_audio_max_message_bytes is not None:
            self._audio_format = binary_audio.AudioFormat()
            self._deltas = binary_audio.DeltaConverter()
            for event in first_client_events:
                self._audio_format.observe(event)
            if lock is None:
                self._client_run_gate = self._audio_text_gate
        #: Who the client is (a key digest prefix or a token id), for logs and the admin API.
        self.credential_id = ""
        #: The upstream and key id (never the key) this session was dialed with.
        self.upstream_name = ""
        self.upstream_key_id = ""
        self.stats = SessionStats()
        self._cancel_scope = trio.CancelScope()
        #: Each pump's task while it runs (_PUMP_DONE after): who _wake_pumps may wake.
        self._pump_tasks: dict[Side, object] = {}
        self._watchdog: _Watchdog | None = None
        #: Set once both legs are closed and :meth:`run` is about to return.
        self.ended = trio.Event()
        #: How both legs were closed (set once the session has ended).
        self.close_plan: ClosePlan | None = None
        self._rate = ClientRateLimit(
            max_frames_per_s=limits.client_max_frames_per_s,
            frame_burst=limits.client_frame_burst,
            max_bytes_per_s=limits.client_max_bytes_per_s,
            byte_burst_bytes=limits.client_byte_burst_bytes,
            clock=trio.current_time,
        )

    def end(self, ending: Ending) -> None:
        """Ask the session to end (shutdown, admin); safe from any task."""
        self._finish(ending)

    def _finish(self, ending: Ending) -> None:
        if self.stats.ending is None:
            self.stats.ending = ending
        if not self._wake_pumps():
            self._cancel_scope.cancel()

    def _wake_pumps(self) -> bool:
        """End the session without a cancellation where that is possible: every pump
        other than the caller is parked in the read hub, and is woken there with
        ``_SESSION_ENDED`` (it returns). A cancellation raises through each pump's
        frames and the nursery (about 30 µs a session); False when one is needed (a
        pump not started yet or busy elsewhere, a ping in flight, no hub)."""
        if self._watchdog is None or self._watchdog.pinging:
            return False
        hub = running_hub()
        if hub is None:
            return False
        current = trio.lowlevel.current_task()
        for side, leg in ((Side.CLIENT, self.client), (Side.UPSTREAM, self.upstream)):
            task = self._pump_tasks.get(side)
            if task is _PUMP_DONE or task is current:
                continue  # gone, or the caller (every pump returns after _finish)
            transport = _hub_transport(leg)
            if (
                not isinstance(task, trio.lowlevel.Task)  # not started yet
                or transport is None
                or not hub.wake(transport.sock, task, _SESSION_ENDED)
            ):
                return False
        return True

    async def run(self) -> Ending:
        """Relay until the session ends; both legs are closed when this returns."""
        self.stats.started_at = trio.current_time()
        # Even a write stuck on a full socket cannot hold the session past this.
        self._cancel_scope.deadline = self.stats.started_at + self.limits.max_session_s
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    if self.lock is not None:
                        nursery.start_soon(self._pump, self._pump_up_locked, Side.CLIENT)
                    elif self._audio_format is not None:
                        nursery.start_soon(self._pump, self._pump_up_audio, Side.CLIENT)
                    else:
                        nursery.start_soon(self._pump, self._pump_up, Side.CLIENT)
                    watchdog = self._watchdog = _Watchdog(self, nursery)
                    # The down pump runs in this task: one task fewer to spawn per session.
                    down = self._pump_down if self._deltas is None else self._pump_down_audio
                    try:
                        await self._pump(down, Side.UPSTREAM)
                    finally:
                        # Before the nursery closes: the watchdog starts pings in it.
                        watchdog.stop()
        except Exception:
            LOGGER.exception("session %s failed", self.session_id)
            if self.stats.ending is None:
                self.stats.ending = Ending(EndKind.INTERNAL_ERROR)
        if self.stats.ending is None and self._cancel_scope.cancelled_caught:
            self.stats.ending = Ending(EndKind.SESSION_EXPIRED)  # the scope's deadline
        ending = self.stats.ending or Ending(EndKind.INTERNAL_ERROR)
        try:
            await self._close_legs(ending)
        finally:
            self.ended.set()
        return ending

    # ---------------------------------------------------------------- pumps

    async def _pump(self, pump: Callable[[], Awaitable[None]], source: Side) -> None:
        """Run one pump; every way it can fail becomes the session's :class:`Ending` here.

        ``source`` is the leg the pump reads: its protocol errors and its end of
        stream are that leg's. A failed write names its own leg (:class:`LegFailed`),
        whichever direction the pump runs; a bare :class:`TransportClosed` is a read
        the pump made itself on ``source``'s transport (the plain and binary pumps
        read without ``receive_run``'s coroutine), so it is ``source``'s.
        """
        self._pump_tasks[source] = trio.lowlevel.current_task()
        try:
            await pump()
        except _SessionEnded:
            pass
        except _LockViolation as exc:
            self._finish(Ending(EndKind.LOCKED_VIOLATION, Side.CLIENT, reason=str(exc)))
        except FrameProtocolError as exc:
            self._finish(_protocol_ending(exc, source))
        except ConnectionClosed:
            self._finish(Ending(EndKind.DROPPED, source))
        except LegFailed as exc:
            self._finish(Ending(EndKind.DROPPED, self._side_of(exc.leg)))
        except TransportClosed:
            self._finish(Ending(EndKind.DROPPED, source))
        finally:
            self._pump_tasks[source] = _PUMP_DONE

    def _side_of(self, leg: WebSocket) -> Side:
        return Side.CLIENT if leg is self.client else Side.UPSTREAM

    async def _pump_up(self) -> None:
        """Client -> upstream.

        The hot path is :meth:`WebSocket.receive_run`: the whole small data frames
        of one read, charged to the rate limit together and forwarded in one write
        (re-masked in one pass towards a plain ``ws://`` upstream). What the run
        leaves (control frames, large frames, a frame split across reads) is taken
        from the reader as events.
        """
        client, upstream = self.client, self.upstream
        reader = client.reader
        admit = self._rate.admit
        stats = self.stats
        remask = self.remask_upstream
        recv_into, read_view, run_of = client.transport.recv_into, client.read_view, client.run_of
        send_now = upstream.send_now

        def forward(received: int) -> object:
            # _forward_client_run's lines, after a read made by the pump or the hub (two
            # coroutines per message fewer than receive_run: 1.4k instructions of 79k
            # per relayed message, bench/instructions.py): None, _RATE_LIMITED, or the
            # bytes the kernel did not take.
            run = run_of(received)
            if run:
                size = len(run)
                if not admit(size, reader.run_frames):
                    return _RATE_LIMITED
                out = frames.remask_run(run) if remask else run  # the same size
                sent = send_now(out)
                stats.messages_up += reader.run_messages
                if sent < size:  # the kernel (or another writer) is not done
                    return upstream.keep_unsent(out, sent)
            return None

        hub_leg = _hub_transport(client)
        if hub_leg is not None:
            hub, hub_sock = _hub_of(hub_leg), hub_leg.sock
            handler = _hub_handler(hub_leg, read_view, reader, forward)
        while True:
            # The reader holds nothing after a read the run took whole: no next_event
            # call to learn so (0.9k instructions per message, bench/instructions.py).
            event = reader.next_event() if reader.may_hold else None
            if event is None:
                if hub_leg is not None and hub_leg.drained:
                    woken = await hub.serve(hub_sock, handler)  # read there, inline
                    if woken is _SESSION_ENDED:
                        return
                else:
                    woken = forward(await recv_into(read_view))
                if woken is _RATE_LIMITED:
                    self._finish(self._rate_ending())
                    return
                if type(woken) is UnsentRest:
                    await upstream.send_unsent(woken)
            elif type(event) is Frame:
                if not admit(len(event.raw)):
                    self._finish(self._rate_ending())
                    return
                if event.opcode < OP_CLOSE:
                    await self._forward_client_data(event)
                elif not await self._control(event, client, Side.CLIENT):
                    return
            elif type(event) is FrameStart:
                if not admit(len(event.header) + event.payload_len):
                    self._finish(self._rate_ending())
                    return
                await self._forward_client_data(event)

    async def _forward_client_data(self, event: Frame | FrameStart) -> None:
        """Forward one client data frame as it came (re-masked towards a plain upstream)."""
        if type(event) is Frame:
            await self.upstream.send_raw(_remasked(event) if self.remask_upstream else event.raw)
        else:
            await self._cut_through(event, self.client, self.upstream, remask=self.remask_upstream)
        if event.fin:
            self.stats.messages_up += 1

    async def _pump_up_audio(self) -> None:
        """Client -> upstream on the binary audio path (no locked config).

        A fresh read's whole common frames are taken by :meth:`_take_audio_read`
        (via :meth:`_next_client_event`): binary frames become appends, text frames
        go as they came, each shown to the input-format tracker. What the reader
        holds comes as events: a fragmented or large binary message is assembled
        into one append (:meth:`_binary_append`); any other data frame (a fragment
        of a text message, a large frame) is forwarded as it came.
        """
        audio_format = self._audio_format
        assert audio_format is not None
        next_event = self._next_client_event
        while True:
            event = await next_event()
            if event.opcode == OP_BINARY:
                await self._binary_append(event)
                continue
            if type(event) is Frame and event.fin and event.opcode == OP_TEXT:
                audio_format.observe(event.payload())
            await self._forward_client_data(event)

    def _audio_text_gate(self, opcode: int, fin: bool, payload: bytes | memoryview) -> bool:
        """Run gate of the binary path: whole text frames only, each shown to the format."""
        if opcode != OP_TEXT or not fin:
            return False
        assert self._audio_format is not None
        self._audio_format.observe(payload)
        return True

    async def _binary_append(self, first: Frame | FrameStart) -> None:
        """Turn one binary client message into an ``input_audio_buffer.append`` upstream.

        The message is assembled (fragments, a large frame's chunks) up to the
        limit; past it the rest is read and dropped. A message the contract refuses
        (empty, too large, a partial sample) is answered with an ``error`` event and
        not forwarded.
        """
        limit = self.binary_audio_max_message_bytes
        audio_format = self._audio_format
        assert limit is not None
        assert audio_format is not None
        parts: list[bytes] = []
        size = 0
        event: Frame | FrameStart = first
        while True:
            if type(event) is Frame:
                data = event.payload()
                size += len(data)
                if size <= limit:
                    parts.append(data)
            else:
                size += event.payload_len
                keep = size <= limit
                while True:
                    chunk = await self._next_chunk()
                    if keep:
                        assert event.mask_key is not None  # a client's frames are masked
                        parts.append(frames.xor_mask(chunk.data, event.mask_key, chunk.offset))
                    if chunk.last:
                        break
            if event.fin:
                break
            event = await self._next_client_event()
        await self._send_append(parts[0] if len(parts) == 1 else b"".join(parts), size)

    def _audio_refusal(self, size: int) -> bytes | None:
        """The ``error`` event for a binary message of ``size`` bytes, or None: it may go."""
        assert self._audio_format is not None
        assert self.binary_audio_max_message_bytes is not None
        return binary_audio.audio_problem(
            size, self._audio_format.sample_bytes, self.binary_audio_max_message_bytes
        )

    async def _send_append(self, audio: bytes, size: int) -> None:
        """One binary message's audio (``size`` bytes, kept whole when within the limit)
        upstream as an append, or the client told why not."""
        problem = self._audio_refusal(size)
        if problem is not None:
            await self.client.send_text(problem)
            return
        await self.upstream.send_text(binary_audio.append_event(audio))
        self.stats.messages_up += 1

    def _take_audio_read(self, data: memoryview) -> object:
        """One fresh client read on the binary path, taken without awaiting (the read
        hub's handler calls it, or the pump after its own read).

        The whole common frames at the front of the read (all of it, for a
        real-time client) are taken in one pass without the frame loop: a binary
        frame becomes an append (or a refusal told to the client), a text frame the
        run gate lets through goes as it came. What they make goes upstream in one
        write, charged to the rate limit at once; the rest goes to the reader, whose
        events the pump takes next. Returns None when all of it is done,
        ``_RATE_LIMITED`` once the client ran over its rate, or an
        :class:`_AudioRest`: what the pump must still write (a write the upstream did
        not take whole, refusals for the client).
        """
        reader = self.client.reader
        frame_at = reader.frame_at
        gate = self._client_run_gate
        pieces: list[bytes | memoryview] = []
        refusals: list[bytes] = []
        pos = taken_frames = messages = 0
        size = len(data)
        while pos < size and (span := frame_at(data, pos)) is not None:
            start, end = span
            key = bytes(data[start - 4 : start])  # a client's frames are masked
            if data[pos] == 0x82:
                problem = self._audio_refusal(end - start)
                if problem is None:
                    append = binary_audio.append_event(frames.xor_mask(data[start:end], key))
                    pieces.append(_upstream_text_frame(append))
                    messages += 1
                else:
                    refusals.append(problem)
            else:
                if gate is not None and not gate(
                    OP_TEXT, True, frames.xor_mask(data[start:end], key)
                ):
                    break  # not consumed: the reader gives it as an event
                frame = data[pos:end]
                pieces.append(frames.remask_run(frame) if self.remask_upstream else frame)
                messages += 1
            taken_frames += 1
            pos = end
        if pos < size:
            reader.feed(data[pos:])
        if not taken_frames:
            return None
        if not self._rate.admit(pos, taken_frames):
            return _RATE_LIMITED
        unsent: UnsentRest | None = None
        if pieces:
            out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            upstream = self.upstream
            sent = upstream.send_now(out)  # as in _pump_up
            self.stats.messages_up += messages
            if sent < len(out):
                unsent = upstream.keep_unsent(out, sent)
        if unsent is None and not refusals:
            return None
        return _AudioRest(unsent, refusals)

    def _audio_forward(self, received: int) -> object:
        """A binary-path client read of ``received`` bytes (see :meth:`_take_audio_read`)."""
        data = self.client.fresh_read(received)
        return None if data is None else self._take_audio_read(data)

    async def _finish_audio_read(self, woken: object) -> None:
        """What a binary-path read left for the pump: the end, or writes to finish."""
        if woken is _RATE_LIMITED:
            self._finish(self._rate_ending())
            raise _SessionEnded
        if type(woken) is _AudioRest:
            if woken.unsent is not None:
                await self.upstream.send_unsent(woken.unsent)
            for refusal in woken.refusals:
                await self.client.send_text(refusal)

    async def _forward_client_run(
        self, accept: Callable[[int, bool, bytes | memoryview], bool] | None = None
    ) -> bool:
        """Read once and forward the run of whole frames upstream (re-masked towards a
        plain ``ws://`` upstream), charged to the rate limit at once; ``False`` once
        the client ran over its rate (the session's ending is recorded)."""
        client = self.client
        run = await client.receive_run(accept=accept)
        if run:
            reader = client.reader
            if not self._rate.admit(len(run), reader.run_frames):
                self._finish(self._rate_ending())
                return False
            await self.upstream.send_raw(frames.remask_run(run) if self.remask_upstream else run)
            self.stats.messages_up += reader.run_messages
        return True

    def _rate_ending(self) -> Ending:
        return Ending(EndKind.RATE_LIMITED, Side.CLIENT, reason=self._rate.exceeded)

    async def _pump_up_locked(self) -> None:
        """Client -> upstream under a locked config (a separate loop so the plain one stays lean).

        A message in one text frame that is proven to be an append is forwarded as
        it came, like in :meth:`_pump_up`; any other one-frame text event goes
        through the lock's rewrite and is sent as one fresh frame (or refused).
        Fragmented and cut-through messages take :meth:`_locked_message`.
        """
        lock = self.lock
        assert lock is not None
        upstream = self.upstream
        remask = self.remask_upstream
        stats = self.stats
        next_event = self._next_client_event
        while True:
            event = await next_event()
            if type(event) is Frame and event.fin and event.opcode == OP_TEXT:
                payload = event.payload()
                if is_plain_append(payload):
                    await upstream.send_raw(_remasked(event) if remask else event.raw)
                    stats.messages_up += 1
                else:
                    await self._forward_locked(lock, payload)
            else:
                await self._locked_message(lock, event)

    def _audio_handler(self) -> Callable[[], object]:
        """The binary path's read-hub handler for the client leg, made on first use."""
        handler = self._audio_hub_handler
        if handler is None:
            transport = _hub_transport(self.client)
            assert transport is not None
            client = self.client
            handler = self._audio_hub_handler = _hub_handler(
                transport, client.read_view, client.reader, self._audio_forward
            )
        return handler

    async def _next_client_event(self) -> Frame | FrameStart:
        """The client's next data frame (or large frame's start); control frames handled.

        Whole frames that pass the session's run gate (the locked config's proven
        appends; the binary path's whole text frames) are forwarded on the way as
        runs. Raises :class:`_SessionEnded` once the client closed or ran over its rate.
        """
        client = self.client
        reader = client.reader
        admit = self._rate.admit
        while True:
            event = reader.next_event() if reader.may_hold else None  # as in _pump_up
            if event is None:
                if self._audio_format is not None:
                    # Parked in the read hub, whose handler takes each read inline (no
                    # task woken per message), else the read made here, as in _pump_up.
                    hub_leg = _hub_transport(client)
                    if hub_leg is not None and hub_leg.drained:
                        woken = await _hub_of(hub_leg).serve(hub_leg.sock, self._audio_handler())
                        if woken is _SESSION_ENDED:
                            raise _SessionEnded
                    else:
                        woken = self._audio_forward(
                            await client.transport.recv_into(client.read_view)
                        )
                    if woken is not None and woken is not _AWAKE:
                        await self._finish_audio_read(woken)
                # The hot path as in _pump_up, for the frames the gate lets through.
                elif not await self._forward_client_run(self._client_run_gate):
                    raise _SessionEnded
                continue
            if type(event) is Frame:
                if not admit(len(event.raw)):
                    self._finish(self._rate_ending())
                    raise _SessionEnded
                if event.opcode < OP_CLOSE:
                    return event
                if not await self._control(event, client, Side.CLIENT):
                    raise _SessionEnded
            elif type(event) is FrameStart:
                if not admit(len(event.header) + event.payload_len):
                    self._finish(self._rate_ending())
                    raise _SessionEnded
                return event
            else:
                raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame chunk out of place")

    async def _next_chunk(self) -> FrameChunk:
        event = await self.client.next_frame_event()
        if type(event) is not FrameChunk:
            raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame interrupted")
        return event

    async def _locked_message(self, lock: SessionLock, first: Frame | FrameStart) -> None:
        """One client message that is not a single text frame, under the lock.

        Text: the pieces (whole fragments, a large frame's header and chunks) are
        held, unforwarded, until the first ``APPEND_PREFIX_MAX_BYTES`` decide
        whether it starts like an append. If it does, every piece is shown to the
        :class:`AppendProof` before it is forwarded, so the message streams with
        bounded memory; should a later piece refute the proof, what went upstream
        cannot be recalled, and the session ends (:class:`_LockViolation`). A
        message that fails the proof before any of it was forwarded is assembled
        (up to ``LOCKED_EVENT_MAX_BYTES``) and goes through the lock's rewrite.
        Binary messages are refused: nothing the lock cannot read is forwarded.
        """
        if first.opcode != OP_TEXT:
            if self._audio_format is not None:
                await self._binary_append(first)  # an append the relay builds: lock-proof
                return
            await self._skip_message(first)
            await self.client.send_text(binary_refusal())
            return
        proof = AppendProof()
        writer = _FrameWriter(self.upstream, remask=self.remask_upstream)
        held: list[tuple[Frame | FrameStart | FrameChunk, bytes]] = []
        assembled: list[bytes] | None = None
        assembled_bytes = 0
        start: FrameStart | None = None  # the large frame whose chunks are being read
        piece: Frame | FrameStart | FrameChunk = first
        try:
            while True:
                if type(piece) is Frame:
                    data = piece.payload()
                    ends = piece.fin
                    if not data and not ends and piece.opcode == OP_CONTINUATION:
                        # An empty middle fragment changes nothing; skipping it keeps
                        # `held` bounded by the prefix length whatever the client sends.
                        piece = await self._next_client_event()
                        continue
                elif type(piece) is FrameStart:
                    start, data, ends = piece, b"", False
                else:
                    assert start is not None
                    data = piece.data
                    if start.mask_key is not None:
                        data = frames.xor_mask(data, start.mask_key, piece.offset)
                    ends = piece.last and start.fin
                if assembled is not None:
                    if data:
                        assembled.append(data)
                        assembled_bytes += len(data)
                    # A large frame announces its size: refuse before reading it.
                    announced = piece.payload_len if type(piece) is FrameStart else 0
                    if assembled_bytes + announced > LOCKED_EVENT_MAX_BYTES:
                        raise FrameProtocolError(frames.CLOSE_MESSAGE_TOO_BIG, _TOO_BIG_REASON)
                else:
                    state = proof.feed(data)
                    if ends:
                        state = proof.finish()
                    if state == PENDING:
                        held.append((piece, data))
                    elif state == HOLDS:
                        for earlier, _ in held:
                            await writer.forward(earlier)
                        held.clear()
                        await writer.forward(piece)
                    elif writer.started:
                        raise _LockViolation("an event that started like an append was not one")
                    else:
                        # Not provably an append, and nothing of it sent: parse it whole.
                        assembled = [d for _, d in held if d]
                        if data:
                            assembled.append(data)
                        assembled_bytes = sum(map(len, assembled))
                        held.clear()
                        if assembled_bytes > LOCKED_EVENT_MAX_BYTES:
                            raise FrameProtocolError(frames.CLOSE_MESSAGE_TOO_BIG, _TOO_BIG_REASON)
                if ends:
                    break
                if type(piece) is FrameChunk and piece.last:
                    start = None
                if start is not None:
                    piece = await self._next_chunk()
                else:
                    piece = await self._next_client_event()
        finally:
            writer.abandon()
        if assembled is None:
            self.stats.messages_up += 1  # streamed, proven
        else:
            await self._forward_locked(lock, b"".join(assembled))

    async def _skip_message(self, first: Frame | FrameStart) -> None:
        """Read one client message to its end without forwarding any of it."""
        event = first
        while True:
            if type(event) is FrameStart:
                while not (await self._next_chunk()).last:
                    pass
            if event.fin:
                return
            event = await self._next_client_event()

    async def _forward_locked(self, lock: SessionLock, payload: bytes) -> None:
        """Forward one whole text event as the lock rewrote it, or tell the client why not."""
        rewrite = lock.rewrite(payload)
        if rewrite.payload is not None:
            if self._audio_format is not None:
                self._audio_format.observe(rewrite.payload)
            await self.upstream.send_text(rewrite.payload)
            self.stats.messages_up += 1
        if rewrite.notice is not None:
            self.stats.locked_fields_removed += len(rewrite.removed)
            await self.client.send_text(rewrite.notice)

    async def _pump_down(self) -> None:
        """Upstream -> client. Upstream text is shown to the tap, then sent unchanged.

        The same hot path as :meth:`_pump_up`: one read's whole small frames in one
        write, the tap seeing each text message in place.
        """
        client, upstream = self.client, self.upstream
        reader = upstream.reader
        stats = self.stats
        observe = stats.tap.observe_text
        recv_into, read_view, run_of = (
            upstream.transport.recv_into,
            upstream.read_view,
            upstream.run_of,
        )
        send_now = client.send_now
        for first in self.first_client_events:  # before anything the upstream sends
            await client.send_text(first)

        def forward(received: int) -> object:  # as in _pump_up (no rate limit this way)
            run = run_of(received, observe, None, UNTAPPED_HEAD)
            if run:
                sent = send_now(run)
                stats.messages_down += reader.run_messages
                if sent < len(run):
                    return client.keep_unsent(run, sent)
            return None

        hub_leg = _hub_transport(upstream)
        if hub_leg is not None:
            hub, hub_sock = _hub_of(hub_leg), hub_leg.sock
            handler = _hub_handler(hub_leg, read_view, reader, forward)
        while True:
            event = reader.next_event() if reader.may_hold else None  # as in _pump_up
            if event is None:
                if hub_leg is not None and hub_leg.drained:
                    woken = await hub.serve(hub_sock, handler)
                    if woken is _SESSION_ENDED:
                        return
                else:
                    woken = forward(await recv_into(read_view))
                if type(woken) is UnsentRest:
                    await client.send_unsent(woken)
            elif type(event) is Frame:
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

    async def _pump_down_audio(self) -> None:
        """Upstream -> client on the binary audio path.

        Each audio delta goes to the client as a binary frame of its decoded audio,
        after a ``relay.output_audio.start`` marker when a new content part starts. A
        delta that cannot be converted, and every other event, goes as it came (the
        tap and the input-format tracker see it first). The whole common frames of
        one read are walked in one pass (``frame_at``) and written in one write, by
        the read hub's handler as in :meth:`_pump_down` (no task woken per delta);
        anything else (control, large or fragmented frames) is taken as events.
        """
        client, upstream = self.client, self.upstream
        reader = upstream.reader
        stats = self.stats
        converted_text = self._converted_text
        frame_at = reader.frame_at
        fresh_read = upstream.fresh_read
        recv_into, read_view = upstream.transport.recv_into, upstream.read_view
        send_now = client.send_now
        for first in self.first_client_events:
            await client.send_text(first)

        def forward(received: int) -> object:
            # One read's whole common frames (all of it, mostly) in one pass and one
            # write, each delta converted, the rest as it came: None, or the bytes the
            # kernel (or another writer) did not take.
            data = fresh_read(received)
            if data is None:
                return None
            pieces: list[bytes | memoryview] = []
            pos = 0
            size = len(data)
            while pos < size and (span := frame_at(data, pos)) is not None:
                start, end = span
                converted = converted_text(data[start:end]) if data[pos] == 0x81 else None
                pieces.append(data[pos:end] if converted is None else converted)
                pos = end
            if pos < size:
                reader.feed(data[pos:])
            if pieces:
                out = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                sent = send_now(out)
                stats.messages_down += len(pieces)
                if sent < len(out):
                    return client.keep_unsent(out, sent)
            return None

        hub_leg = _hub_transport(upstream)
        if hub_leg is not None:
            hub, hub_sock = _hub_of(hub_leg), hub_leg.sock
            handler = _hub_handler(hub_leg, read_view, reader, forward)
        while True:
            event = reader.next_event() if reader.may_hold else None  # as in _pump_up
            if event is None:
                if hub_leg is not None and hub_leg.drained:
                    woken = await hub.serve(hub_sock, handler)
                    if woken is _SESSION_ENDED:
                        return
                else:
                    woken = forward(await recv_into(read_view))
                if type(woken) is UnsentRest:
                    await client.send_unsent(woken)
            elif type(event) is Frame:
                opcode = event.opcode
                if opcode >= OP_CLOSE:
                    if not await self._control(event, upstream, Side.UPSTREAM):
                        return
                    continue
                if opcode == OP_TEXT and event.fin:
                    converted = converted_text(memoryview(event.raw)[event.header_len :])
                    if converted is not None:
                        await client.send_raw(converted)
                        stats.messages_down += 1
                        continue
                await client.send_raw(event.raw)
                if event.fin:
                    stats.messages_down += 1
            elif type(event) is FrameStart:
                await self._cut_through(event, upstream, client, remask=False)
                if event.fin:
                    stats.messages_down += 1

    def _converted_text(self, payload: memoryview) -> bytes | None:
        """The client's frames for one whole upstream text event on the binary path: an
        audio delta's binary frame (after its start marker), or None: the event goes as
        it came, once the input-format tracker and the tap have seen it."""
        assert self._deltas is not None
        assert self._audio_format is not None
        if binary_audio.is_audio_delta(payload):
            converted = self._deltas.convert(payload)
            if converted is not None:
                return _audio_frames(*converted)
        self._audio_format.observe(payload)
        if UNTAPPED_HEAD(payload) is None:
            self.stats.tap.observe_text(payload)
        return None

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
    ) -> None:
        """Forward one large frame piece by piece while its bytes arrive."""
        header, flip = _remasked_start(start, remask)
        lock = destination.lock_for_frame()
        async with lock:
            try:
                await destination.send_piece(header)
                while True:
                    chunk = await source.next_frame_event()
                    if type(chunk) is not FrameChunk:
                        raise FrameProtocolError(frames.CLOSE_PROTOCOL_ERROR, "frame interrupted")
                    data = chunk.data
                    if flip is not None:
                        data = frames.xor_mask(data, flip, chunk.offset)
                    await destination.send_piece(data)
                    if chunk.last:
                        return
            except BaseException:
                destination.mark_broken()
                raise

    # ---------------------------------------------------------------- watchdog

    async def _ping(
        self, clock: SessionClock, side: Side, leg: WebSocket, pinging: set[Side]
    ) -> None:
        """Write one ping, however long the leg's write lock and socket take."""
        try:
            await leg.send_ping(PING_PAYLOAD)
            clock.ping_written(side)
        except LegFailed as exc:
            self._finish(Ending(EndKind.DROPPED, self._side_of(exc.leg)))
        finally:
            pinging.discard(side)

    # ---------------------------------------------------------------- closing

    async def _close_legs(self, ending: Ending) -> None:
        plan = plan_close(ending)
        self.close_plan = plan
        timeout_s = self.limits.close_timeout_s
        client, upstream = self.client, self.upstream
        # A leg whose peer has closed already usually closes without an await.
        if _close_at_once(client, plan.client):
            await _close_leg(upstream, plan.upstream, timeout_s)
            return
        if _close_at_once(upstream, plan.upstream):
            await _close_leg(client, plan.client, timeout_s)
            return
        with trio.CancelScope(shield=True):
            if _has_close_work(upstream, plan.upstream) and _has_close_work(client, plan.client):
                # Both legs may wait on their peer: side by side, each within the timeout.
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_close_leg, upstream, plan.upstream, timeout_s)
                    await _close_leg(client, plan.client, timeout_s)
            else:  # at most one leg awaits anything
                await _close_leg(client, plan.client, timeout_s)
                await _close_leg(upstream, plan.upstream, timeout_s)


class _Watchdog:
    """Carries out a session's clock: at each instant it names, end or ping as told.

    Not a task: a timer of the run's :class:`~relay.net.timers.Timers` (a task per
    session sleeping until an instant a short session never reaches cost a spawn, a
    cancel scope and two scheduler passes). Pings are written by their own tasks in
    the session's nursery, so a write stuck on a full socket (or behind a cut-through
    frame holding the write lock) never stalls the clock; a ping counts as sent when
    it was due, written or not.
    """

    __slots__ = ("_clock", "_legs", "_nursery", "_pinging", "_session", "_timer", "_timers")

    def __init__(self, session: RelaySession, nursery: trio.Nursery) -> None:
        limits = session.limits
        self._session = session
        self._nursery = nursery
        self._clock = SessionClock(
            LivenessLimits(
                idle_timeout_s=limits.idle_timeout_s,
                max_session_s=limits.max_session_s,
                ping_interval_s=limits.ping_interval_s,
                pong_timeout_s=limits.pong_timeout_s,
            ),
            started_at=session.stats.started_at,
        )
        self._legs = ((Side.CLIENT, session.client), (Side.UPSTREAM, session.upstream))
        self._pinging: set[Side] = set()
        self._timers = current_timers()
        self._timer = self._timers.call_at(self._clock.next_check_at(), self._check)

    @property
    def pinging(self) -> bool:
        """A ping task is in the session's nursery now (only a cancellation ends it)."""
        return bool(self._pinging)

    def stop(self) -> None:
        self._timers.cancel(self._timer)

    def _check(self) -> None:
        session, clock, stats = self._session, self._clock, self._session.stats
        try:
            now = trio.current_time()
            clock.saw_messages(stats.messages_up, stats.messages_down, now)
            for side, leg in self._legs:
                clock.saw_pong(side, leg.last_pong_at)
            verdict = clock.poll(now)
            if verdict.ending is not None:
                session._finish(verdict.ending)
                return
            for side, leg in self._legs:
                if side in verdict.pings_due:
                    if side in self._pinging:
                        clock.ping_sent(side, now)  # the last one is still stuck
                    else:
                        clock.ping_sent(side, now, written=False)
                        self._pinging.add(side)
                        self._nursery.start_soon(session._ping, clock, side, leg, self._pinging)
        except Exception:
            LOGGER.exception("session %s: its clock failed", session.session_id)
            session._finish(Ending(EndKind.INTERNAL_ERROR))
            return
        self._timer = self._timers.call_at(clock.next_check_at(), self._check)


@dataclass(slots=True)
class _AudioRest:
    """What a binary-path client read left for its pump to write (see
    :meth:`RelaySession._take_audio_read`): the rest of the upstream write, refusals."""

    unsent: UnsentRest | None
    refusals: list[bytes]


#: What a hub handler wakes its pump with (besides an UnsentRest or an _AudioRest): the
#: rate limit refused the run; the pump's own loop has work (held frame events, a full read).
_RATE_LIMITED: Final = object()
_AWAKE: Final = object()
#: What :meth:`RelaySession._wake_pumps` wakes a parked pump with: return, the session
#: has ended (never a handler's answer).
_SESSION_ENDED: Final = object()
#: A pump's entry in ``RelaySession._pump_tasks`` once it has returned.
_PUMP_DONE: Final = object()


def _hub_transport(leg: WebSocket) -> Transport | None:
    """The leg's transport if its pump may park in the read hub: a plain socket's made
    while the hub ran (not TLS, not a test double's in-memory stream; see
    ``Transport.hub``)."""
    transport = leg.transport
    if type(transport) is Transport and transport.hub is not None:
        return transport
    return None


def _hub_of(transport: Transport) -> ReadHub:
    """The hub of a transport :func:`_hub_transport` returned."""
    hub = transport.hub
    assert hub is not None
    return hub


def _hub_handler(
    transport: Transport,
    read_view: memoryview,
    reader: FrameReader,
    forward: Callable[[int], object],
) -> Callable[[], object]:
    """A pump's read-hub handler: one read of ``transport``, passed to the pump's
    ``forward``. It wakes the pump with what ``forward`` returned, or with ``_AWAKE``
    when the pump's own loop has work (frame events held, a read that filled the
    buffer); ``None`` (stay parked) after a message it saw through."""
    recv_now = transport.recv_now

    def handler() -> object:
        received = recv_now(read_view)
        if received < 0:
            return None
        woken = forward(received)
        if woken is None and (reader.may_hold or not transport.drained):
            return _AWAKE
        return woken

    return handler


def _upstream_text_frame(payload: bytes) -> bytes:
    """A text frame the relay writes upstream: masked with a fresh key, as a client must."""
    return frames.encode_frame(OP_TEXT, payload, mask_key=frames.fresh_mask_key())


def _audio_frames(marker: bytes | None, audio: bytes) -> bytes:
    """A converted delta for the client: its binary frame, after its start marker if any."""
    binary = frames.encode_frame(OP_BINARY, audio)
    return binary if marker is None else frames.encode_frame(OP_TEXT, marker) + binary


def _has_close_work(leg: WebSocket, plan: LegClose) -> bool:
    """Whether closing ``leg`` by ``plan`` writes (and so may wait), or just drops it."""
    return plan.send_close and not leg.transport.closed


async def _close_leg(leg: WebSocket, plan: LegClose, timeout_s: float) -> None:
    """One leg's part of the close plan, within ``timeout_s`` all told.

    A leg whose socket cannot take the error event and the close frame in time (a
    client that never reads, a write cut off mid-frame) is just dropped.
    """
    if not _has_close_work(leg, plan):
        leg.transport.close()
        return
    # One shielded scope for the error event and the handshake (the session's own scope
    # is cancelled by now, or its deadline passed).
    with trio.move_on_after(timeout_s, shield=True):
        try:
            if plan.error_event is not None and leg.close_sent is None:
                await leg.send_text(plan.error_event)
        except LegFailed:
            leg.transport.close()
            return
        await leg.close_handshake(plan.code, plan.reason)
    leg.transport.close()


def _close_at_once(leg: WebSocket, plan: LegClose) -> bool:
    """Carry out ``plan`` on ``leg`` now if that needs no await (see ``close_now``)."""
    if not _has_close_work(leg, plan):
        leg.transport.close()
        return True
    return plan.error_event is None and leg.close_now(plan.code, plan.reason)


def _is_one_frame_append(opcode: int, fin: bool, payload: bytes | memoryview) -> bool:
    """Whether a whole client frame may pass the lock as it came: a proven append."""
    # A client's frames are masked, so the gate sees them unmasked as bytes.
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    return fin and opcode == OP_TEXT and is_plain_append(payload)


def _protocol_ending(exc: FrameProtocolError, side: Side) -> Ending:
    kind = (
        EndKind.TOO_BIG
        if exc.close_code == frames.CLOSE_MESSAGE_TOO_BIG
        else (EndKind.PROTOCOL_ERROR)
    )
    return Ending(kind, side, exc.close_code, exc.reason)


def _remasked_start(start: FrameStart, remask: bool) -> tuple[bytes, bytes | None]:
    """A large frame's header to forward, and the key that re-masks its chunks (or None).

    Re-masking is one XOR pass per chunk with ``old_key XOR new_key`` (RFC 6455 §5.3).
    """
    if not remask or start.mask_key is None:
        return start.header, None
    new_key = frames.fresh_mask_key()
    return frames.remask_header(start.header, new_key), frames.xor_mask(start.mask_key, new_key)


def _remasked(frame: Frame) -> bytes:
    """The same frame under a fresh mask key: one XOR pass with old_key ^ new_key."""
    old = frame.mask_key
    if old is None:
        return bytes(frame.raw)
    new = frames.fresh_mask_key()
    header_len = frame.header_len
    raw = frame.raw
    header = frames.remask_header(bytes(raw[:header_len]), new)
    return header + frames.xor_mask(raw[header_len:], frames.xor_mask(old, new))


class _FrameWriter:
    """Writes the pieces of one client message upstream as they came, frame by frame.

    A large frame's header and chunks go out under the upstream's write lock, held
    from the header to the last chunk so nothing interleaves with the frame. If the
    message is abandoned mid-frame (a lock violation, an error, cancellation), the
    upstream is marked broken: it must never see another byte, least of all the
    rest of that frame.
    """

    __slots__ = ("_destination", "_flip", "_in_frame", "_remask", "started")

    def __init__(self, destination: WebSocket, *, remask: bool) -> None:
        self._destination = destination
        self._remask = remask
        self._flip: bytes | None = None
        self._in_frame = False
        #: Whether any piece of the message has been written.
        self.started = False

    async def forward(self, piece: Frame | FrameStart | FrameChunk) -> None:
        destination = self._destination
        self.started = True
        if type(piece) is Frame:
            await destination.send_raw(_remasked(piece) if self._remask else piece.raw)
        elif type(piece) is FrameStart:
            header, self._flip = _remasked_start(piece, self._remask)
            await destination.lock_for_frame().acquire()
            self._in_frame = True
            await destination.send_piece(header)
        else:
            data = piece.data
            if self._flip is not None:
                data = frames.xor_mask(data, self._flip, piece.offset)
            await destination.send_piece(data)
            if piece.last:
                self._in_frame = False
                destination.lock_for_frame().release()

    def abandon(self) -> None:
        """Called when the message ends, however it ends: no torn frame may stay open."""
        if self._in_frame:
            self._in_frame = False
            self._destination.mark_broken()
            self._destination.lock_for_frame().release()
