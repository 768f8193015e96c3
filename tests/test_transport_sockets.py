"""Socket set-up in relay.net.transport: what every accepted and dialed socket must carry.

The relay sets ``TCP_NODELAY`` and ``TCP_NOTSENT_LOWAT`` on its listener once, where the
kernel copies them to accepted sockets, and creates dialed sockets non-blocking with
``SOCK_NONBLOCK`` (no ioctl). These tests hold the sockets to the options a per-socket
set-up would have given them, over real loopback connections.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from relay.net.transport import (
    _TCP_NOTSENT_LOWAT,
    NOTSENT_LOWAT_BYTES,
    Transport,
    TransportClosed,
    accept,
    open_listener,
    open_transport,
)

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]


def _assert_tuned(sock: socket.socket) -> None:
    assert sock.getblocking() is False
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert sock.getsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT) == NOTSENT_LOWAT_BYTES


async def test_accepted_and_dialed_sockets_are_non_blocking_without_nagle_and_bounded() -> None:
    listener = open_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                accepted: list[socket.socket] = []

                async def take() -> None:
                    sock, _ = await accept(listener)
                    accepted.append(sock)

                nursery.start_soon(take)
                dialed = await open_transport("127.0.0.1", port)
        try:
            _assert_tuned(accepted[0])
            _assert_tuned(dialed.sock)
            # Non-blocking for real (not just Python's flag): an empty read does not hang.
            with pytest.raises(BlockingIOError):
                accepted[0].recv(1)
            with pytest.raises(BlockingIOError):
                dialed.sock.recv(1)
        finally:
            accepted[0].close()
            dialed.close()
    finally:
        listener.close()


async def test_close_wakes_a_task_waiting_to_read_or_write_and_skips_trio_when_none_waits() -> None:
    """``notify_closing`` only when a task waits: a waiter still gets TransportClosed,
    and a descriptor number reused after a close without it waits and wakes normally."""
    for _ in range(3):  # the same descriptor numbers, again and again
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        transport = Transport(ours)
        theirs.send(b"x")
        assert await transport.recv_into(bytearray(1)) == 1  # a read that did not wait
        outcome: list[str] = []

        async def read(transport: Transport = transport, outcome: list[str] = outcome) -> None:
            try:
                await transport.recv_into(bytearray(8))
            except TransportClosed:
                outcome.append("closed")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                transport.close()
        assert outcome == ["closed"]
        # A socket that waited once and then closed with nobody waiting.
        ours, theirs2 = socket.socketpair()
        ours.setblocking(False)
        reused = Transport(ours)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reused.recv_into, bytearray(8))
            await trio.testing.wait_all_tasks_blocked()
            theirs2.send(b"y")
        reused.close()
        theirs.close()
        theirs2.close()


async def test_a_refused_dial_raises_and_a_dial_that_must_wait_still_connects() -> None:
    """The connect shortcut (connected when connect returns) must not hide a refusal, and
    a handshake that is not done at once (a full backlog here) still completes."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nobody listens on this port now
    with pytest.raises(OSError):
        await open_transport("127.0.0.1", port)
    # A listener whose backlog is full: the SYN waits until accept makes room.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        filler.connect_ex(address)
        fillers.append(filler)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                dialed: list[Transport] = []

                async def make_room() -> None:
                    listener.setblocking(False)
                    while True:  # accept (and drop) whatever is queued, until cancelled
                        try:
                            listener.accept()[0].close()
                        except BlockingIOError:
                            await trio.lowlevel.wait_readable(listener)

                async def dial() -> None:
                    dialed.append(await open_transport("127.0.0.1", address[1]))
                    nursery.cancel_scope.cancel()

                nursery.start_soon(dial)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(make_room)
        dialed[0].close()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
