"""The shared receive buffer end to end: two sessions at once on real sockets.

Every connection of a thread reads into one buffer (``relay.net.websocket``), and a
run is forwarded as a view of it. That is safe only if a write that must wait copies
what is left before it waits (``Transport.send_all``, ``WebSocket.send_raw``): the
other session's next read overwrites the buffer meanwhile. Here one session's far
end stops reading, so the relay's write to it blocks in the kernel part-way through
a run, while a second session moves data through the same buffer; then the stalled
end drains and must have received exactly what was sent to it.

Two :class:`RelaySession` objects on ``socket.socketpair()`` legs wrapped in
:class:`Transport` (the relay's own socket I/O); the far ends are WebSockets too.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import orjson
import pytest
import trio
import trio.testing

from relay.dataplane.policy import Ending, EndKind
from relay.dataplane.session import RelaySession
from relay.net.hub import current_hub
from relay.net.transport import Transport, TransportClosed, tune_stream_socket
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import binary_audio as binary_audio_protocol
from relay.protocol import frames
from relay.protocol.frames import OP_BINARY, OP_TEXT
from tests.doubles import MAX_MESSAGE_BYTES, limits

pytestmark = pytest.mark.usefixtures("hub_dispatch")

#: Kernel send buffer of a stalled leg's relay socket (Linux doubles it): small, so the
#: relay's write blocks part-way through a run quickly.
STALLED_SNDBUF_BYTES: Final = 16 * 1024
#: Message sizes around the length encodings, one split across reads, one cut through.
SIZES: Final = (7, 125, 126, 1000, 3000, 20_000, 60_000, 70_000)
#: Small messages the stalled session's sender writes first, in one write: the relay
#: reads them as one run (a view of the shared buffer) whose write then blocks part-way.
FIRST_RUN: Final = [
    b'{"type":"input_audio_buffer.append","audio":"%05d' % i + b"Q" * 900 + b'"}' for i in range(60)
]


def _pair(sndbuf: int | None = None) -> tuple[Transport, Transport]:
    """(relay end, far end) of one leg; ``sndbuf`` bounds what the relay end may queue.
    Made with the run's read hub started, as the relay's legs are (see Transport.hub)."""
    current_hub()
    relay_sock, far_sock = socket.socketpair()
    if sndbuf is not None:
        relay_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    tune_stream_socket(relay_sock)
    tune_stream_socket(far_sock)
    return Transport(relay_sock), Transport(far_sock)


def _messages(tag: bytes, count: int) -> list[bytes]:
    """``count`` distinct text payloads: the tag and index, then filler of each size."""
    out = []
    for index in range(count):
        size = SIZES[index % len(SIZES)]
        head = b'{"type":"input_audio_buffer.append","n":"' + tag + b"%06d" % index + b'","a":"'
        body = (tag + b"%06d" % index) * (size // 7 + 1)
        out.append(head + body[:size] + b'"}')
    return out


@dataclass
class FarEnd:
    """One far end of a session: what it received, and when it had all it expects."""

    ws: WebSocket
    expect: int
    received: list[bytes] = field(default_factory=list)
    got_all: trio.Event = field(default_factory=trio.Event)
    sent_all: trio.Event = field(default_factory=trio.Event)

    async def read(self) -> None:
        """Take messages until the relay closes (answering its close and pings)."""
        try:
            while True:
                _, payload = await self.ws.receive_message()
                self.received.append(payload)
                if len(self.received) == self.expect:
                    self.got_all.set()
        except (ConnectionClosed, TransportClosed):
            pass
        finally:
            self.ws.transport.close()

    async def send(self, messages: list[bytes], *, batch: int = 0) -> None:
        """The first ``batch`` messages in one write (one read, one run at the relay), then
        the rest one write each."""
        mask = self.ws.client_side
        first = b"".join(
            frames.encode_frame(OP_TEXT, m, mask_key=frames.fresh_mask_key() if mask else None)
            for m in messages[:batch]
        )
        if first:
            await self.ws.send_raw(first)
        for message in messages[batch:]:
            await self.ws.send_text(message)
        self.sent_all.set()


@dataclass
class SocketSession:
    session: RelaySession
    client: FarEnd
    upstream: FarEnd


def socket_session(
    name: str,
    *,
    up: int,
    down: int,
    stall_client: bool = False,
    stall_upstream: bool = False,
    remask: bool = False,
    binary_audio: bool = False,
    **limit_overrides: float,
) -> SocketSession:
    relay_client, client_end = _pair(STALLED_SNDBUF_BYTES if stall_client else None)
    relay_upstream, upstream_end = _pair(STALLED_SNDBUF_BYTES if stall_upstream else None)
    session = RelaySession(
        WebSocket(relay_client, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES),
        WebSocket(relay_upstream, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES),
        limits(**limit_overrides),
        remask_upstream=remask,
        session_id=name,
        binary_audio_max_message_bytes=(
            binary_audio_protocol.DEFAULT_MAX_AUDIO_MESSAGE_BYTES if binary_audio else None
        ),
    )
    client = FarEnd(
        WebSocket(client_end, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES), expect=down
    )
    upstream = FarEnd(
        WebSocket(upstream_end, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES), expect=up
    )
    return SocketSession(session, client, upstream)


def relayed(far: FarEnd) -> list[bytes]:
    """What ``far`` received before the relay's shutdown notice (clients get one)."""
    received = far.received
    if received and orjson.loads(received[-1]).get("type") == "error":
        assert orjson.loads(received[-1])["error"]["code"] == "server_shutdown"
        return received[:-1]
    return received


@dataclass
class BusySession:
    """Session B of the stalled-leg tests: plain, moving data both ways through the
    receive buffer the stalled session A shares, while A's write is blocked."""

    socket: SocketSession
    up: list[bytes]
    down: list[bytes]

    @classmethod
    def make(cls, *, remask: bool = False) -> BusySession:
        up, down = _messages(b"B", 300), _messages(b"b", 300)
        return cls(socket_session("B", up=len(up), down=len(down), remask=remask), up, down)

    async def stream(self, nursery: trio.Nursery) -> None:
        """Both ways at once; returns once both far ends have everything."""
        b = self.socket
        nursery.start_soon(b.upstream.read)
        nursery.start_soon(b.client.read)
        nursery.start_soon(b.client.send, self.up)
        nursery.start_soon(b.upstream.send, self.down)
        await b.upstream.got_all.wait()
        await b.client.got_all.wait()

    def check_relayed(self) -> None:
        assert relayed(self.socket.upstream) == self.up
        assert relayed(self.socket.client) == self.down


async def stall_then_drain(
    a: SocketSession,
    b: BusySession,
    *,
    stalled: FarEnd,
    feeder: FarEnd,
    feed: Callable[[], Awaitable[None]],
    relayed_so_far: Callable[[], int],
    total: int,
) -> None:
    """Session A's ``stalled`` far end reads nothing while ``feed`` sends from ``feeder``
    (the relay's write to ``stalled`` blocks) and busy session B streams both ways; then
    ``stalled`` drains, and both sessions are shut down once everything arrived."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for s in (a, b.socket):
                nursery.start_soon(s.session.run)
            nursery.start_soon(feeder.read)
            nursery.start_soon(feed)
            await trio.testing.wait_all_tasks_blocked()
            # The relay's write to A's stalled end is stuck, and so is the feeder behind it.
            assert not feeder.sent_all.is_set()
            assert relayed_so_far() < total

            await b.stream(nursery)
            assert not feeder.sent_all.is_set()  # A stayed stalled all along

            nursery.start_soon(stalled.read)  # the stalled end drains
            await stalled.got_all.wait()
            await feeder.sent_all.wait()
            if feeder.expect:
                await feeder.got_all.wait()
            for s in (a, b.socket):
                s.session.end(Ending(EndKind.SHUTDOWN))


@pytest.mark.parametrize("remask", [False, True], ids=["wss_verbatim", "ws_remasked"])
async def test_an_upstream_that_stops_reading_gets_what_its_client_sent_as_another_session_streams(
    remask: bool,
) -> None:
    """Stalled: session A's upstream (never reads until the end). Busy: session B, both
    ways, through the same receive buffer while A's relay write is blocked."""
    a_up = FIRST_RUN + _messages(b"A", 400)  # ~8 MB: far more than the stalled socket queues
    a = socket_session("A", up=len(a_up), down=0, stall_upstream=True, remask=remask)
    b = BusySession.make(remask=remask)
    await stall_then_drain(
        a,
        b,
        stalled=a.upstream,
        feeder=a.client,
        feed=partial(a.client.send, a_up, batch=len(FIRST_RUN)),
        relayed_so_far=lambda: a.session.stats.messages_up,
        total=len(a_up),
    )
    assert relayed(a.upstream) == a_up
    b.check_relayed()
    assert a.session.stats.messages_up == len(a_up)


async def test_a_client_that_stops_reading_gets_what_its_upstream_sent_as_another_streams() -> None:
    """Stalled: session A's client (the relay's down write blocks). Busy: session B."""
    a_down = FIRST_RUN + _messages(b"A", 400)
    a = socket_session("A", up=0, down=len(a_down), stall_client=True)
    b = BusySession.make()
    await stall_then_drain(
        a,
        b,
        stalled=a.client,
        feeder=a.upstream,
        feed=partial(a.upstream.send, a_down, batch=len(FIRST_RUN)),
        relayed_so_far=lambda: a.session.stats.messages_down,
        total=len(a_down),
    )
    assert relayed(a.client) == a_down
    b.check_relayed()
    assert a.session.stats.messages_down == len(a_down)


def _audio_delta(index: int) -> tuple[bytes, bytes]:
    """An upstream audio delta (item_1 of resp_1) and the PCM16 audio it carries."""
    audio = bytes((index + i) % 251 for i in range(4800))
    event = orjson.dumps(
        {
            "type": "response.output_audio.delta",
            "event_id": f"event_{index}",
            "response_id": "resp_1",
            "item_id": "item_1",
            "output_index": 0,
            "content_index": 0,
            "delta": base64.b64encode(audio).decode(),
        }
    )
    return event, audio


async def test_a_binary_path_client_that_stops_reading_gets_every_converted_delta_in_order() -> (
    None
):
    """Stalled: session A's client on the binary audio path, whose deltas the relay turns
    into binary frames (the relay's down write blocks part-way). Busy: session B, plain,
    through the same receive buffer. Then A's client drains: one start marker, each
    delta's audio as a binary frame, the other events as they came, in order."""
    a_down: list[bytes] = []
    expected: list[bytes] = [binary_audio_protocol.start_marker("resp_1", "item_1", 0, 0)]
    for index in range(400):
        if index % 50 == 7:
            transcript = b'{"type":"response.output_audio_transcript.delta","delta":"%d"}' % index
            a_down.append(transcript)
            expected.append(transcript)
        event, audio = _audio_delta(index)
        a_down.append(event)
        expected.append(audio)
    a = socket_session("A", up=0, down=len(expected), stall_client=True, binary_audio=True)
    b = BusySession.make()
    await stall_then_drain(
        a,
        b,
        stalled=a.client,
        feeder=a.upstream,
        feed=partial(a.upstream.send, a_down, batch=20),
        relayed_so_far=lambda: a.session.stats.messages_down,
        total=len(a_down),
    )
    assert relayed(a.client) == expected
    b.check_relayed()
    assert a.session.stats.messages_down == len(a_down)


async def test_a_binary_path_upstream_that_stops_reading_gets_every_append_in_order() -> None:
    """Stalled: session A's upstream, while A's client sends binary audio (the relay turns
    each message into an append; the relay's up write blocks part-way), some of it
    refused (odd lengths: a partial sample). Busy: session B. Then A's upstream drains:
    every accepted message as its append, in order; A's client got each refusal."""
    audio = [bytes((index + i) % 251 for i in range(3840)) for index in range(400)]
    wire: list[bytes] = []
    appends: list[bytes] = []
    refused = 0
    for index, chunk in enumerate(audio):
        if index % 40 == 3:
            chunk = chunk[:-1]  # a partial sample: refused, told, not forwarded
            refused += 1
        else:
            appends.append(binary_audio_protocol.append_event(chunk))
        wire.append(frames.encode_frame(OP_BINARY, chunk, mask_key=frames.fresh_mask_key()))
    a = socket_session("A", up=len(appends), down=refused, stall_upstream=True, binary_audio=True)
    b = BusySession.make()

    async def send_audio() -> None:
        await a.client.ws.send_raw(b"".join(wire[:20]))  # one read: one pass, one write
        for frame in wire[20:]:
            await a.client.ws.send_raw(frame)
        a.client.sent_all.set()

    await stall_then_drain(
        a,
        b,
        stalled=a.upstream,
        feeder=a.client,
        feed=send_audio,
        relayed_so_far=lambda: a.session.stats.messages_up,
        total=len(appends),
    )
    assert relayed(a.upstream) == appends
    codes = [orjson.loads(m)["error"]["code"] for m in relayed(a.client)]
    assert codes == [binary_audio_protocol.CODE_PARTIAL_SAMPLE] * refused
    b.check_relayed()
    assert a.session.stats.messages_up == len(appends)


@pytest.mark.parametrize("binary_audio", [False, True], ids=["json", "binary_audio"])
async def test_a_client_close_ends_a_parked_session_without_a_cancellation(
    binary_audio: bool,
) -> None:
    """The client's close frame reaches the up pump; the down pump, parked in the read
    hub, is woken there instead of cancelled: the session's scope is never cancelled,
    both legs get the close table's frames, and nothing is left parked. The same on the
    binary audio path, whose pumps park in the hub too."""
    s = socket_session("closing", up=1, down=1, binary_audio=binary_audio)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.session.run)
            nursery.start_soon(s.client.read)
            nursery.start_soon(s.upstream.read)
            await s.client.send([b'{"type":"input_audio_buffer.append","audio":"AA"}'])
            await s.upstream.got_all.wait()
            await s.upstream.send([b'{"type":"response.done"}'])
            await s.client.got_all.wait()
            await trio.testing.wait_all_tasks_blocked()  # both pumps parked in the hub
            await s.client.ws.send_close(1000, "done")
            await s.session.ended.wait()
    assert s.session.stats.ending is not None
    assert s.session.stats.ending.kind is EndKind.CLOSED
    assert not s.session._cancel_scope.cancel_called
    assert s.upstream.ws.close_received is not None  # the upstream was told, with a frame
    assert current_hub().parked == 0


@pytest.mark.parametrize("binary_audio", [False, True], ids=["json", "binary_audio"])
async def test_an_end_from_outside_wakes_both_parked_pumps_and_a_busy_one_is_cancelled(
    binary_audio: bool,
) -> None:
    """``end()`` (admin, drain) from another task: both pumps parked are woken without a
    cancellation (on the binary audio path too, the idle session's); a session whose
    pump is stuck in a write still ends by cancelling."""
    idle = socket_session("idle", up=1, down=1, binary_audio=binary_audio)
    stuck = socket_session("stuck", up=10**6, down=0, stall_upstream=True)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for s in (idle, stuck):
                nursery.start_soon(s.session.run)
            nursery.start_soon(idle.client.read)
            nursery.start_soon(idle.upstream.read)
            # A message each way first: a pump parks in the hub after a read of its own
            # (before it, it waits in its first read, which only a cancellation ends).
            await idle.client.send([b'{"type":"input_audio_buffer.append","audio":"AA"}'])
            await idle.upstream.send([b'{"type":"response.done"}'])
            await idle.upstream.got_all.wait()
            await idle.client.got_all.wait()
            nursery.start_soon(stuck.client.read)
            nursery.start_soon(stuck.client.send, FIRST_RUN)  # the upstream never reads
            await trio.testing.wait_all_tasks_blocked()
            for s in (idle, stuck):
                s.session.end(Ending(EndKind.SHUTDOWN))
            await idle.session.ended.wait()
            await stuck.session.ended.wait()
            nursery.start_soon(stuck.upstream.read)  # drain it, so its close can land
    assert not idle.session._cancel_scope.cancel_called
    assert stuck.session._cancel_scope.cancel_called  # its up pump was in a write
    for s in (idle, stuck):
        assert s.session.stats.ending == Ending(EndKind.SHUTDOWN)


async def test_a_binary_path_client_over_its_frame_rate_is_ended_with_only_its_allowance_sent() -> (
    None
):
    """The rate limit on the binary path's hub handler: a client sending binary audio
    one frame per read, past its burst, gets its session ended RATE_LIMITED (1008),
    and the upstream got exactly the burst's appends."""
    burst = 3
    s = socket_session(
        "fast",
        up=burst,
        down=0,
        binary_audio=True,
        client_max_frames_per_s=0.001,
        client_frame_burst=burst,
    )
    audio = [bytes([index]) * 960 for index in range(burst + 2)]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.session.run)
            nursery.start_soon(s.client.read)
            nursery.start_soon(s.upstream.read)
            for chunk in audio:  # one write, one read each: the pump parked in the hub
                await s.client.ws.send_raw(
                    frames.encode_frame(OP_BINARY, chunk, mask_key=frames.fresh_mask_key())
                )
                await trio.testing.wait_all_tasks_blocked()
                if s.session.ended.is_set():
                    break
            await s.session.ended.wait()
    assert s.session.stats.ending is not None
    assert s.session.stats.ending.kind is EndKind.RATE_LIMITED
    assert s.upstream.received == [binary_audio_protocol.append_event(a) for a in audio[:burst]]
    assert s.client.ws.close_received is not None
    assert s.client.ws.close_received[0] == frames.CLOSE_POLICY_VIOLATION


async def test_an_end_while_a_ping_is_stuck_in_its_write_cancels_the_session() -> None:
    """Both pumps parked, but the watchdog's ping is blocked writing to an upstream that
    reads nothing: waking the pumps would leave the ping task holding the session's
    nursery open, so the end takes the cancellation path, and the session ends."""
    s = socket_session("pinging", up=1, down=1, stall_upstream=True, ping_interval_s=0.05)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s.session.run)
            nursery.start_soon(s.client.read)
            await s.client.send([b'{"type":"input_audio_buffer.append","audio":"AA"}'])
            await s.upstream.ws.receive_message()  # the up pump read, wrote and parked
            await s.upstream.send([b'{"type":"response.done"}'])
            await s.client.got_all.wait()
            # Fill the relay's upstream socket behind the pumps' backs: the next ping's
            # write cannot go, and the upstream end reads nothing from now on.
            relay_upstream = s.session.upstream.transport
            assert isinstance(relay_upstream, Transport)
            while relay_upstream.send_now(b"\x89\x00" * 32768):
                pass
            watchdog = s.session._watchdog
            assert watchdog is not None
            while not watchdog.pinging:
                await trio.sleep(0.01)  # the watchdog's own clock: no event to wait on
            s.session.end(Ending(EndKind.SHUTDOWN))
            await s.session.ended.wait()
            nursery.cancel_scope.cancel()
    s.upstream.ws.transport.close()
    assert s.session._cancel_scope.cancel_called
    assert s.session.stats.ending == Ending(EndKind.SHUTDOWN)
