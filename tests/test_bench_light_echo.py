"""bench/c/echo_upstream.c, the concurrency ramp's light upstream, against a real client.

trio-websocket (not our codec) talks to it over 127.0.0.1: the upgrade, the first
``session.created``, text, binary, a fragmented message, a large frame, a ping, and a
close; a head without a key and an unmasked frame end the connection.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from relay.protocol import frames

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness import (  # type: ignore[import-not-found,unused-ignore]
    build_light_echo,
    free_port,
    wait_for_port,
)


@pytest.fixture
def echo_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen([str(build_light_echo()), "--port", str(port)])
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_it_echoes_what_a_client_sends(echo_port: int) -> None:
    url = f"ws://127.0.0.1:{echo_port}/v1/realtime?model=gpt-realtime"
    async with trio_websocket.open_websocket_url(
        url, subprotocols=["realtime", "x.y"], max_message_size=1 << 22
    ) as ws:
        assert ws.subprotocol == "realtime"
        with trio.fail_after(5):
            created = orjson.loads(await ws.get_message())
            assert created["type"] == "session.created"
            for message in ("hello", b"\x00\x01" * 7, "x" * 300, b"\xff" * 70_000, "é" * 10):
                await ws.send_message(message)
                assert await ws.get_message() == message
            await ws.ping(b"probe")


async def test_fragments_come_back_as_fragments_and_a_close_is_answered(echo_port: int) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", echo_port) as stream:
        await _fragments_and_close(stream)


async def _fragments_and_close(stream: trio.SocketStream) -> None:
    await stream.send_all(
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    key = b"\x01\x02\x03\x04"
    await stream.send_all(
        frames.encode_frame(frames.OP_TEXT, b"ab", fin=False, mask_key=key)
        + frames.encode_frame(frames.OP_CONTINUATION, b"cd", mask_key=key)
        + frames.encode_frame(frames.OP_CLOSE, frames.encode_close_payload(1000), mask_key=key)
    )
    received = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    assert b"101 Switching Protocols" in head
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's example
    reader = frames.FrameReader(expect_masked=False, max_message_bytes=1 << 20)
    reader.feed(rest)
    events = []
    while (event := reader.next_event()) is not None:
        assert isinstance(event, frames.Frame)
        events.append((event.opcode, event.fin, event.payload()))
    assert events[1:] == [
        (frames.OP_TEXT, False, b"ab"),
        (frames.OP_CONTINUATION, True, b"cd"),
        (frames.OP_CLOSE, True, frames.encode_close_payload(1000)),
    ]


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # no key
        b"GET / HTTP/1.1\r\nSec-WebSocket-Key: a2V5\r\n\r\n\x81\x02hi",  # unmasked frame
    ],
    ids=["no_key", "unmasked_frame"],
)
async def test_it_ends_a_connection_that_breaks_the_protocol(echo_port: int, wire: bytes) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", echo_port) as stream:
        await stream.send_all(wire)
        with trio.fail_after(5):
            while await stream.receive_some():
                pass  # until the server closes
