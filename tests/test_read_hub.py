"""The read hub (relay.net.hub) over real socket pairs: inline handling, wake-ups, closing."""

from __future__ import annotations

import socket
from collections.abc import Callable
from functools import partial

import pytest
import trio

from relay.net import hub as hub_module
from relay.net.hub import current_hub
from relay.net.transport import Transport, TransportClosed
from relay.net.websocket import WebSocket
from tests.doubles import memory_pair

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]

WAIT_S = 10.0


def _pair() -> tuple[Transport, socket.socket]:
    """A transport over one end of a socket pair, made while the run's hub runs (as the
    relay's are: only then do its waits go through the hub), and the other end."""
    current_hub()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return Transport(ours), theirs


async def test_handler_runs_inline_and_wakes_the_pump_only_when_it_says_so() -> None:
    transport, peer = _pair()
    hub = current_hub()
    buffer = bytearray(64)
    seen: list[bytes] = []
    handled = trio.Event()

    def handler() -> object:
        received = transport.recv_now(buffer)
        if received < 0:
            return None
        seen.append(bytes(buffer[:received]))
        handled.set()
        return "stop" if b"stop" in buffer[:received] else None

    async with trio.open_nursery() as nursery:
        woken: list[object] = []

        async def pump() -> None:
            woken.append(await hub.serve(transport.sock, handler))

        nursery.start_soon(pump)
        await trio.testing.wait_all_tasks_blocked()
        peer.send(b"one")
        with trio.fail_after(WAIT_S):
            await handled.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert seen == [b"one"]
        assert woken == []  # handled without waking the pump
        assert hub.parked == 1
        peer.send(b"stop")
    assert woken == ["stop"]
    assert hub.parked == 0
    transport.close()
    peer.close()


async def test_what_a_handler_raises_reaches_its_pump() -> None:
    transport, peer = _pair()

    def handler() -> object:
        raise ValueError("bad bytes")

    peer.send(b"x")
    with trio.fail_after(WAIT_S), pytest.raises(ValueError, match="bad bytes"):
        await current_hub().serve(transport.sock, handler)
    transport.close()
    peer.close()


async def test_a_cancelled_pump_leaves_the_hub_at_once() -> None:
    transport, peer = _pair()
    hub = current_hub()
    with trio.move_on_after(0.05):
        await hub.serve(transport.sock, lambda: None)
    assert hub.parked == 0
    transport.close()
    peer.close()


async def test_closing_the_transport_wakes_its_parked_pump_with_transport_closed() -> None:
    transport, peer = _pair()
    hub = current_hub()
    failures: list[BaseException] = []

    async def pump() -> None:
        try:
            await hub.serve(transport.sock, lambda: None)
        except TransportClosed as exc:
            failures.append(exc)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            transport.close()
    assert len(failures) == 1
    assert hub.parked == 0
    peer.close()


async def test_a_reused_descriptor_number_is_a_new_registration() -> None:
    first, first_peer = _pair()
    hub = current_hub()
    with trio.move_on_after(0.01):
        await hub.serve(first.sock, lambda: None)  # registered, then cancelled
    number = first.sock.fileno()
    first.close()
    first_peer.close()
    # The next sockets take the lowest free numbers: one of them is the old number.
    pairs = [_pair() for _ in range(2)]
    reused = [(t, p) for t, p in pairs if t.sock.fileno() == number]
    assert reused, "the kernel did not reuse the descriptor number"
    transport, peer = reused[0]
    buffer = bytearray(16)

    def handler() -> object:
        received = transport.recv_now(buffer)
        return bytes(buffer[:received]) if received > 0 else None

    peer.send(b"new")
    with trio.fail_after(WAIT_S):
        assert await hub.serve(transport.sock, handler) == b"new"
    for t, p in pairs:
        t.close()
        p.close()


async def test_close_now_closes_without_an_await_once_the_peer_closed() -> None:
    transport, peer = _pair()
    leg = WebSocket(transport, client_side=False, max_message_bytes=1 << 20)
    assert not leg.close_now(1000, "bye")  # the peer has not closed: close() must wait
    leg.close_received = (1000, "")
    assert leg.close_now(1000, "bye")
    assert transport.closed
    peer.setblocking(True)
    assert peer.recv(64) == b"\x88\x05\x03\xe8bye"
    assert peer.recv(64) == b""  # and TCP closed after it
    peer.close()


async def test_close_now_leaves_a_full_socket_to_close() -> None:
    transport, peer = _pair()  # a peer that never reads
    leg = WebSocket(transport, client_side=False, max_message_bytes=1 << 20)
    while transport.send_now(b"x" * 65536):
        pass
    leg.close_received = (1000, "")
    assert not leg.close_now(1000, "bye")
    assert leg.close_sent is None
    with trio.fail_after(WAIT_S):
        await leg.close(1000, "bye", timeout_s=0.05)  # bounded: the peer still reads nothing
    assert transport.closed
    peer.close()


async def test_a_write_the_kernel_took_part_of_keeps_other_writers_out_until_its_rest() -> None:
    # An upstream that takes 3 bytes and then nothing until it reads: the hub's handler
    # wrote part of a frame; a ping from another task must not land inside it.
    ours, theirs = memory_pair(a_to_b=3)
    leg = WebSocket(ours, client_side=False, max_message_bytes=1 << 20)
    frame = b"\x81\x05hello"
    sent = leg.send_now(frame)
    assert sent == 3
    rest = leg.keep_unsent(frame, sent)
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(leg.send_raw, b"\x89\x00")  # the other writer: a ping
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(leg.send_unsent, rest)
        buffer = bytearray(64)
        with trio.fail_after(WAIT_S):
            while len(received) < len(frame) + 2:
                got = await theirs.recv_into(buffer)
                received += buffer[:got]
    assert bytes(received) == frame + b"\x89\x00"


async def test_close_now_that_writes_part_of_its_frame_leaves_close_to_finish_it() -> None:
    ours, theirs = memory_pair(a_to_b=3)  # a peer with room for 3 bytes, then none
    leg = WebSocket(ours, client_side=False, max_message_bytes=1 << 20)
    leg.close_received = (1000, "")
    assert not leg.close_now(1000, "bye")
    assert leg.close_sent == (1000, "bye")
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(leg.close, 1000, "bye", timeout_s=WAIT_S))
        buffer = bytearray(64)
        with trio.fail_after(WAIT_S):
            while len(received) < 7:
                got = await theirs.recv_into(buffer)
                received += buffer[:got]
    assert bytes(received) == b"\x88\x05\x03\xe8bye"
    assert ours.closed


def _eof_aware_handler(transport: Transport, seen: list[bytes]) -> Callable[[], object]:
    """A pump's handler: stays parked after a short read, wakes at the stream's end."""
    buffer = bytearray(64)

    def handler() -> object:
        received = transport.recv_now(buffer)
        if received < 0:
            return None
        if received == 0:
            return "end"
        seen.append(bytes(buffer[:received]))
        return None

    return handler


async def test_bytes_and_the_peers_end_in_one_edge_still_wake_the_parked_pump() -> None:
    """The last bytes and the FIN come together: the handler's short read leaves the
    FIN unread, and no edge follows it. The hub reads again on a hang-up."""
    transport, peer = _pair()
    seen: list[bytes] = []
    handler = _eof_aware_handler(transport, seen)
    hub = current_hub()
    woken: list[object] = []

    async def pump() -> None:
        woken.append(await hub.serve(transport.sock, handler))

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            peer.send(b"last words")
            peer.shutdown(socket.SHUT_WR)  # before the hub has run: one edge for both
    assert seen == [b"last words"]
    assert woken == ["end"]
    transport.close()
    peer.close()


async def test_a_peers_end_seen_while_the_pump_was_busy_wakes_it_when_it_parks() -> None:
    """The socket is registered (a wait on it returned), then bytes and the FIN come
    while nobody is parked, and a read takes the bytes: the pump parks on a socket
    that will give no edge again, and must still be woken."""
    transport, peer = _pair()
    hub = current_hub()
    peer.send(b"first")
    with trio.fail_after(WAIT_S):
        await transport.recv_into(bytearray(64))  # a short read: drained
        peer.send(b"more")
        peer.shutdown(socket.SHUT_WR)
        await hub.wait_readable(transport.sock)  # registered; woken by the edge
        await trio.testing.wait_all_tasks_blocked()  # the hub has seen the FIN
        assert await transport.recv_into(bytearray(64)) == 4  # "more", short: drained
        seen: list[bytes] = []
        assert await hub.serve(transport.sock, _eof_aware_handler(transport, seen)) == "end"
    transport.close()
    peer.close()


async def test_two_readers_of_one_socket_are_refused_as_trio_refuses_them() -> None:
    transport, peer = _pair()
    hub = current_hub()
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.wait_readable, transport.sock)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await hub.wait_readable(transport.sock)
            peer.send(b"x")
    transport.close()
    peer.close()


async def test_wake_hands_a_value_to_a_handler_park_only() -> None:
    """``wake`` reaches a pump parked with its own handler; never a plain
    ``wait_readable`` (its caller would read again and miss it), nor another task."""
    transport, peer = _pair()
    hub = current_hub()
    woken: list[object] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:

            async def plain_wait() -> None:
                await hub.wait_readable(transport.sock)

            nursery.start_soon(plain_wait)
            await trio.testing.wait_all_tasks_blocked()
            (waiter,) = (t for t in nursery.child_tasks)
            assert not hub.wake(transport.sock, waiter, "ended")
            peer.send(b"x")  # lets it go
        transport.sock.recv(16)

        async with trio.open_nursery() as nursery:

            async def pump() -> None:
                woken.append(await hub.serve(transport.sock, lambda: None))

            nursery.start_soon(pump)
            await trio.testing.wait_all_tasks_blocked()
            (pump_task,) = (t for t in nursery.child_tasks)
            assert not hub.wake(transport.sock, trio.lowlevel.current_task(), "ended")
            assert hub.wake(transport.sock, pump_task, "ended")
            assert not hub.wake(transport.sock, pump_task, "twice")
    assert woken == ["ended"]
    assert hub.parked == 0
    transport.close()
    peer.close()


def _fill(transport: Transport) -> None:
    """Write until the kernel takes no more (the peer reads nothing meanwhile)."""
    while transport.send_now(b"x" * 65536):
        pass


def _drain(peer: socket.socket) -> int:
    peer.setblocking(False)
    taken = 0
    while True:
        try:
            data = peer.recv(1 << 20)
        except BlockingIOError:
            return taken
        if not data:
            return taken
        taken += len(data)


def _reads_into(transport: Transport, seen: list[bytes]) -> Callable[[], object]:
    buffer = bytearray(64)

    def handler() -> object:
        received = transport.recv_now(buffer)
        if received > 0:
            seen.append(bytes(buffer[:received]))
        return None

    return handler


async def test_a_write_waits_for_room_while_the_same_sockets_reader_stays_parked() -> None:
    """A peer that stops reading, then reads: the writer waits (inline: in the hub, as
    Trio's own wait would take the socket's registration over) and is woken when there
    is room, and the reader parked on the same socket still gets what the peer sends,
    during the wait and after it."""
    transport, peer = _pair()
    hub = current_hub()
    seen: list[bytes] = []
    handler = _reads_into(transport, seen)
    wrote = trio.Event()

    async def writer() -> None:
        await transport.send_all(b"y" * 200_000)
        wrote.set()

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.serve, transport.sock, handler)
            await trio.testing.wait_all_tasks_blocked()
            _fill(transport)
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            assert not wrote.is_set()
            assert len(hub._writers) == (1 if hub.inline else 0)
            peer.send(b"during")
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [b"during"]
            while not wrote.is_set():
                _drain(peer)
                await trio.testing.wait_all_tasks_blocked()
            assert hub._writers == {}
            peer.send(b"after")
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [b"during", b"after"]
            nursery.cancel_scope.cancel()
    transport.close()
    peer.close()


async def test_a_cancelled_write_wait_leaves_the_sockets_reads_to_the_hub() -> None:
    transport, peer = _pair()
    hub = current_hub()
    seen: list[bytes] = []
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub.serve, transport.sock, _reads_into(transport, seen))
            await trio.testing.wait_all_tasks_blocked()
            _fill(transport)
            with trio.move_on_after(0.05) as waited:
                await transport.send_all(b"z" * 100_000)
            assert waited.cancelled_caught
            assert hub._writers == {}
            _drain(peer)
            peer.send(b"still read")
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [b"still read"]
            nursery.cancel_scope.cancel()
    transport.close()
    peer.close()


async def test_closing_a_transport_wakes_its_waiting_writer_with_transport_closed() -> None:
    transport, peer = _pair()
    hub = current_hub()
    if hub.inline:
        # Held by the hub (registered by a read wait), as a relay leg's socket is.
        with trio.move_on_after(0):
            await hub.wait_readable(transport.sock)
        assert hub._registered.get(transport.sock.fileno()) is transport.sock
    failures: list[BaseException] = []

    async def writer() -> None:
        try:
            await transport.send_all(b"w" * 200_000)
        except TransportClosed as exc:
            failures.append(exc)

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as nursery:
            _fill(transport)
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()
            transport.close()
    assert len(failures) == 1
    assert hub._writers == {}
    peer.close()


async def test_an_edge_before_the_hubs_task_first_runs_is_not_lost() -> None:
    """Inline, Trio hands the hub's events over from the hub's creation on, not from
    its task's first step: a socket parked at once still hears its first bytes."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    hub = current_hub()  # no checkpoint between this and the park below
    transport = Transport(ours)
    theirs.send(b"first")
    buffer = bytearray(16)

    def handler() -> object:
        received = transport.recv_now(buffer)
        return bytes(buffer[:received]) if received > 0 else None

    with trio.fail_after(WAIT_S):
        assert await hub.serve(transport.sock, handler) == b"first"
    transport.close()
    theirs.close()


async def test_the_dispatch_is_the_one_asked_for(hub_dispatch: str) -> None:
    """Inline on the Trio this project pins (a Trio the inline dispatch was not checked
    against would fall back to nested: this fails then, to have it checked)."""
    assert current_hub().inline is (hub_dispatch == "inline")
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    transport = Transport(ours)
    assert transport.hub is current_hub()
    transport.close()
    theirs.close()


async def test_an_unknown_dispatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hub_module.DISPATCH_ENV, "threaded")
    with pytest.raises(ValueError, match="RELAY_READ_HUB must be one of inline, nested"):
        current_hub()


async def test_a_handler_that_ignores_the_peers_end_fails_its_pump_not_the_hub() -> None:
    """A handler that stays parked on a hung-up socket would be called for ever (no edge
    ends it): after MAX_HANDLER_CALLS_AFTER_HANG_UP calls its pump gets the error, and the
    hub goes on serving other sockets."""
    transport, peer = _pair()
    other, other_peer = _pair()
    hub = current_hub()
    calls = 0

    def deaf() -> object:
        nonlocal calls
        calls += 1
        return None

    peer.shutdown(socket.SHUT_WR)
    with trio.fail_after(WAIT_S):
        with pytest.raises(RuntimeError, match="ignored the end of stream"):
            await hub.serve(transport.sock, deaf)
        assert calls == hub_module.MAX_HANDLER_CALLS_AFTER_HANG_UP
        other_peer.send(b"still served")
        assert await hub.serve(other.sock, lambda: other.recv_now(bytearray(64))) == 12
    for t, p in ((transport, peer), (other, other_peer)):
        t.close()
        p.close()
