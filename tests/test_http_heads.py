"""relay.net.http's head and body reads over real socket pairs, several at once.

The reads share one buffer per Trio run (``relay.net.http._HEAD_READS``): these tests
hold that sharing to what it promises, with readers whose bytes arrive interleaved a
byte at a time, so that every read of one lands between two reads of the others.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from relay.net import http
from relay.net.hub import current_hub
from relay.net.transport import Transport
from relay.protocol.handshake import RequestHead

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]

WAIT_S = 10.0
#: Readers at once: more than one, so each read lands between the others'.
READERS = 4


def request_bytes(index: int) -> bytes:
    body = b'{"model":"m-%d"}' % index
    return (
        b"POST /v1/chat/completions?reader=%d HTTP/1.1\r\nHost: relay\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n"
        b"X-Reader: %d\r\n\r\n" % (index, len(body), index)
    ) + body


def response_bytes(index: int) -> bytes:
    body = b'{"reader": %d, "pad": "%s"}' % (index, b"x" * (100 + index))
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nX-Reader: %d\r\n\r\n" % (len(body), index)
    ) + body


async def read_all_trickled(
    read: Callable[[int, Transport], Awaitable[None]], messages: list[bytes]
) -> None:
    """``read(index, transport)`` for each message's connection at once, while the
    messages arrive interleaved a byte at a time (:func:`trickle_interleaved`)."""
    current_hub()  # before the transports, as in the relay: only then do they use it
    pairs = []
    for _ in messages:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        theirs.setblocking(False)
        pairs.append((Transport(ours), theirs))
    try:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for index, (transport, _) in enumerate(pairs):
                    nursery.start_soon(read, index, transport)
                await trio.testing.wait_all_tasks_blocked()
                await trickle_interleaved([peer for _, peer in pairs], messages)
    finally:
        for transport, peer in pairs:
            transport.close()
            peer.close()


async def trickle_interleaved(peers: list[socket.socket], messages: list[bytes]) -> None:
    """One byte of each message in turn, letting the readers run after each byte."""
    for at in range(max(len(message) for message in messages)):
        for peer, message in zip(peers, messages, strict=True):
            if at < len(message):
                peer.send(message[at : at + 1])
        await trio.testing.wait_all_tasks_blocked()


async def test_request_heads_read_at_once_a_byte_at_a_time_each_get_their_own() -> None:
    heads: dict[int, RequestHead] = {}
    bodies: dict[int, bytes] = {}

    async def read(index: int, transport: Transport) -> None:
        head = await http.read_request_head(transport)
        assert head is not None
        heads[index] = head
        length = int(head.header(b"content-length") or 0)
        bodies[index] = await http.read_body(transport, head.trailing, length, max_bytes=1024)

    await read_all_trickled(read, [request_bytes(i) for i in range(READERS)])
    for index in range(READERS):
        head = heads[index]
        assert head.query == f"reader={index}"
        assert head.header(b"x-reader") == str(index)
        assert bodies[index] == b'{"model":"m-%d"}' % index


async def test_response_heads_read_at_once_a_byte_at_a_time_each_get_their_own() -> None:
    seen: dict[int, tuple[int, str | None, bytes]] = {}

    async def read(index: int, transport: Transport) -> None:
        head = await http.read_response_head(transport)
        body = await http.read_body(transport, head.trailing, head.content_length, max_bytes=1024)
        seen[index] = (head.status, head.header(b"x-reader"), body)

    await read_all_trickled(read, [response_bytes(i) for i in range(READERS)])
    for index in range(READERS):
        expected = response_bytes(index)
        assert seen[index] == (200, str(index), expected[expected.index(b"\r\n\r\n") + 4 :])
