"""The REST proxy's response body relay (relay.rest.proxy's body pump) over real socket
pairs: through the read hub (plain sockets) and the awaited path (any other stream),
the framing forwarded verbatim, the usage read, the idle cut, a client gone or
pipelining, a client that does not read (backpressure) and framing errors."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from relay.net.hub import current_hub
from relay.net.transport import RECEIVE_BYTES, Transport
from relay.rest import proxy
from relay.rest.messages import UsageReader

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]

WAIT_S = 10.0
IDLE_S = 30.0
HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
USAGE_EVENT = (
    b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}\n\n'
)


class _AwaitedTransport(Transport):
    """A Transport the relay does not recognise as a plain socket's (as a TLS one or a
    test double): its reads are awaited, not made by the read hub."""

    __slots__ = ()


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def sse_body(events: int) -> list[bytes]:
    pieces = [chunk(b'data: {"n":%d}\n\n' % n) for n in range(events)]
    return [*pieces, chunk(USAGE_EVENT), b"0\r\n\r\n"]


@dataclass
class Legs:
    """The relay's two transports and the far ends the test plays."""

    upstream: Transport
    client: Transport
    upstream_peer: socket.socket
    client_peer: socket.socket


@asynccontextmanager
async def legs(hub: bool, buffer_bytes: int = 0) -> AsyncIterator[Legs]:
    kind = Transport if hub else _AwaitedTransport
    current_hub()  # before the transports, as in the relay: only then do they use it
    pairs = [socket.socketpair() for _ in range(2)]
    for ours, theirs in pairs:
        ours.setblocking(False)
        theirs.setblocking(False)
        if buffer_bytes:
            for sock in (ours, theirs):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    (up, up_peer), (cl, cl_peer) = pairs
    result = Legs(kind(up), kind(cl), up_peer, cl_peer)
    try:
        yield result
    finally:
        for transport in (result.upstream, result.client):
            transport.close()
        up_peer.close()
        cl_peer.close()


def pump_for(found: Legs, usage: UsageReader | None = None) -> proxy._BodyPump:
    return proxy._BodyPump(
        found.upstream,
        found.client,
        True,
        None,
        usage or UsageReader("text/event-stream"),
        proxy._Exchange(),
    )


async def read_all(sock: socket.socket, until: bytes) -> bytes:
    received = bytearray()
    with trio.fail_after(WAIT_S):
        while not received.endswith(until):
            await trio.lowlevel.wait_readable(sock)
            data = sock.recv(65536)
            if not data:
                break
            received += data
    return bytes(received)


async def send_slowly(sock: socket.socket, pieces: list[bytes]) -> None:
    """Each piece once the relay has dealt with the one before (all tasks blocked)."""
    for piece in pieces:
        await trio.testing.wait_all_tasks_blocked()
        sock.send(piece)


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_chunked_stream_goes_through_verbatim_with_its_usage(
    hub: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_reads = 0
    hub_reader = Transport.hub_reader

    def counted(
        transport: Transport, view: memoryview, consume: Callable[[int], object], full: object
    ) -> Callable[[], object]:
        read = hub_reader(transport, view, consume, full)

        def counting() -> object:
            nonlocal hub_reads
            hub_reads += 1
            return read()

        return counting

    monkeypatch.setattr(Transport, "hub_reader", counted)
    async with legs(hub) as found:
        pieces = sse_body(6)
        # Split reads too: a chunk's size line, its data and its CRLF apart.
        split = [pieces[0][:2], pieces[0][2:9], pieces[0][9:], *pieces[1:]]
        usage = UsageReader("text/event-stream")
        pump = pump_for(found, usage)
        result: list[tuple[bool, bytes | None]] = []

        async def relay() -> None:
            result.append(await proxy._watched_body(pump, HEAD, b"", IDLE_S))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            nursery.start_soon(send_slowly, found.upstream_peer, [*split, b"NEXT RESPONSE"])
            got = await read_all(found.client_peer, b"0\r\n\r\n")
        assert got == HEAD + b"".join(pieces)
        assert result == [(True, b"")]
        usage.finish()
        assert usage.usage is not None
        assert (usage.usage.input_text, usage.usage.output_text) == (3, 5)
        assert current_hub().parked == 0
        # Through the hub, the reads after the first were the hub's, inline.
        assert hub_reads >= len(split) - 1 if hub else hub_reads == 0


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_more_than_a_read_in_one_edge_and_then_nothing_arrives_whole(hub: bool) -> None:
    """The pump parked in the hub, the upstream writes more than one read's buffer at
    once and then waits for the client to have it all: a read that fills the buffer
    must go on reading (no edge comes for the rest), or the body stalls."""
    async with legs(hub) as found:
        first = chunk(b'data: {"n":0}\n\n')
        big = b"".join(chunk(b"data: %s\n\n" % (b"x" * 4000)) for _ in range(40))
        assert len(big) > RECEIVE_BYTES
        rest = big + chunk(USAGE_EVENT) + b"0\r\n\r\n"
        pump = pump_for(found)

        async def upstream() -> None:
            found.upstream_peer.send(first)
            await trio.testing.wait_all_tasks_blocked()  # the pump is parked again
            assert found.upstream_peer.send(rest) == len(rest)  # one write, one edge

        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._watched_body, pump, HEAD, b"", IDLE_S)
            nursery.start_soon(upstream)
            got = await read_all(found.client_peer, b"0\r\n\r\n")
        assert got == HEAD + first + rest


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_the_bytes_that_came_with_the_head_go_out_with_it(hub: bool) -> None:
    async with legs(hub) as found:
        pieces = sse_body(2)
        pump = pump_for(found)
        already = b"".join(pieces[:2])
        result: list[tuple[bool, bytes | None]] = []

        async def relay() -> None:
            result.append(await proxy._watched_body(pump, HEAD, already, IDLE_S))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            nursery.start_soon(send_slowly, found.upstream_peer, pieces[2:])
            got = await read_all(found.client_peer, b"0\r\n\r\n")
        assert got == HEAD + b"".join(pieces)
        assert result == [(True, b"")]


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_silent_upstream_is_cut_after_the_idle_timeout(
    hub: bool, autojump_clock: trio.testing.MockClock
) -> None:
    async with legs(hub) as found:
        pump = pump_for(found)
        found.upstream_peer.send(sse_body(1)[0])
        started = trio.current_time()
        assert await proxy._watched_body(pump, HEAD, b"", IDLE_S) == (False, b"")
        waited = trio.current_time() - started
        assert IDLE_S <= waited <= IDLE_S * (1 + 1 / proxy.IDLE_CHECKS_PER_TIMEOUT)


@pytest.mark.parametrize("gap_of_timeout", [0.5, 0.99])
@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_chunks_keep_a_stream_alive_past_the_idle_timeout(
    hub: bool, gap_of_timeout: float, autojump_clock: trio.testing.MockClock
) -> None:
    # 0.99: a gap just under the timeout spans as many of the alarm's checks as a cut
    # needs, counted from the one after the read; it must not be cut.
    async with legs(hub) as found:
        pieces = sse_body(8)
        pump = pump_for(found)

        async def upstream() -> None:
            for piece in pieces:
                await trio.sleep(IDLE_S * gap_of_timeout)  # virtual time
                found.upstream_peer.send(piece)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream)
            complete, _ = await proxy._watched_body(pump, HEAD, b"", IDLE_S)
        assert complete


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_client_gone_while_the_upstream_is_silent_ends_the_relay(hub: bool) -> None:
    async with legs(hub) as found:
        pump = pump_for(found)
        found.upstream_peer.send(sse_body(1)[0])
        result: list[tuple[bool, bytes | None]] = []

        async def relay() -> None:
            result.append(await proxy._watched_body(pump, HEAD, b"", IDLE_S))

        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay)
                await read_all(found.client_peer, b"\n\n\r\n")
                await trio.testing.wait_all_tasks_blocked()
                found.client_peer.close()
        assert result == [(False, None)]
        assert current_hub().parked == 0


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_client_s_next_request_sent_early_is_kept(hub: bool) -> None:
    async with legs(hub) as found:
        pieces = sse_body(2)
        pump = pump_for(found)
        result: list[tuple[bool, bytes | None]] = []

        async def relay() -> None:
            result.append(await proxy._watched_body(pump, HEAD, b"", IDLE_S))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            found.upstream_peer.send(pieces[0])
            await read_all(found.client_peer, pieces[0])
            await trio.testing.wait_all_tasks_blocked()
            found.client_peer.send(b"POST /v1/next")
            nursery.start_soon(send_slowly, found.upstream_peer, pieces[1:])
            await read_all(found.client_peer, b"0\r\n\r\n")
        assert result == [(True, b"POST /v1/next")]


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_client_that_does_not_read_stops_the_upstream_reads(hub: bool) -> None:
    """Backpressure: a short write waits for the client; the relay buffers nothing more,
    so the upstream's writes stop too, and every byte arrives once the client reads."""
    async with legs(hub, buffer_bytes=16 * 1024) as found:
        payload = bytes(range(256)) * 64  # 16 KiB a chunk
        body = [chunk(payload) for _ in range(256)] + [b"0\r\n\r\n"]  # 4 MiB
        wire = b"".join(body)
        sent = 0
        result: list[tuple[bool, bytes | None]] = []

        async def relay() -> None:
            result.append(await proxy._watched_body(pump_for(found), HEAD, b"", IDLE_S))

        async def upstream() -> None:
            nonlocal sent
            while sent < len(wire):
                await trio.lowlevel.wait_writable(found.upstream_peer)
                try:
                    sent += found.upstream_peer.send(wire[sent:])
                except BlockingIOError:
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay)
            nursery.start_soon(upstream)
            await trio.testing.wait_all_tasks_blocked()
            # Everyone is blocked: the upstream on a full socket, the relay on the client's.
            held_back = sent
            assert held_back < len(wire) // 4
            got = await read_all(found.client_peer, b"0\r\n\r\n")
        assert got == HEAD + wire
        assert result == [(True, b"")]


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
@pytest.mark.parametrize(
    "bad",
    [b"zz\r\nhello\r\n", b"5\r\nhelloXX\r\n", b"0x5\r\nhello\r\n"],
    ids=["size", "crlf", "prefix"],
)
async def test_a_framing_error_or_a_cut_ends_the_body_incomplete(hub: bool, bad: bytes) -> None:
    async with legs(hub) as found:
        pump = pump_for(found)
        found.upstream_peer.send(chunk(b"data: 1\n\n") + bad)
        with trio.fail_after(WAIT_S):
            complete, pipelined = await proxy._watched_body(pump, HEAD, b"", IDLE_S)
        assert (complete, pipelined) == (False, b"")


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_an_upstream_reset_mid_body_ends_it_incomplete_not_as_the_clients_going(
    hub: bool,
) -> None:
    """A reset from the upstream after some of the body is the upstream's failure: the
    body ends incomplete (the client's connection is then closed unframed), and it is
    not taken for the client going away (which is what the log would say)."""
    async with legs(hub) as found:
        pump = pump_for(found)
        found.upstream.sock.send(b"x")  # unread when the peer closes: the close resets
        found.upstream_peer.send(chunk(b"data: 1\n\n"))
        found.upstream_peer.close()
        with trio.fail_after(WAIT_S):
            complete, pipelined = await proxy._watched_body(pump, HEAD, b"", IDLE_S)
        assert (complete, pipelined) == (False, b"")
        assert HEAD + chunk(b"data: 1\n\n") == await read_all(
            found.client_peer, chunk(b"data: 1\n\n")
        )


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_an_upstream_that_closes_mid_body_ends_it_incomplete(hub: bool) -> None:
    async with legs(hub) as found:
        pump = pump_for(found)
        found.upstream_peer.send(chunk(b"data: 1\n\n"))
        found.upstream_peer.shutdown(socket.SHUT_WR)
        with trio.fail_after(WAIT_S):
            complete, _ = await proxy._watched_body(pump, HEAD, b"", IDLE_S)
        assert not complete


@pytest.mark.parametrize("hub", [True, False], ids=["hub", "awaited"])
async def test_a_client_that_never_reads_is_cut_after_the_idle_timeout(
    hub: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """The idle alarm ends a write that waits on the client too (it closes both legs),
    not only an upstream read; and the client is not taken for gone."""
    async with legs(hub, buffer_bytes=16 * 1024) as found:
        payload = bytes(range(256)) * 64
        wire = b"".join(chunk(payload) for _ in range(64))  # 1 MiB, never all taken
        sent = found.upstream_peer.send(wire)
        pump = pump_for(found)
        with trio.fail_after(IDLE_S * 3):  # virtual time
            assert await proxy._watched_body(pump, HEAD, b"", IDLE_S) == (False, b"")
        assert 0 < sent < len(wire)
        assert current_hub().parked == 0
