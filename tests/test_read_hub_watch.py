"""The read hub's watches (relay.net.hub ``watch``/``unwatch``) over real socket pairs: a
callback with no task, run on readiness until it says it is done."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.net.hub import current_hub
from relay.net.transport import Transport
from tests.test_read_hub import WAIT_S, _pair

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]


class Recorder:
    """A watch callback that reads what came and is done after ``done_after`` reads."""

    def __init__(self, transport: Transport, done_after: int = 1) -> None:
        self.transport = transport
        self.done_after = done_after
        self.reads: list[bytes] = []
        self.called = trio.Event()
        self._buffer = bytearray(64)

    def __call__(self) -> bool:
        received = self.transport.recv_now(self._buffer)
        if received < 0:
            return False
        self.reads.append(bytes(self._buffer[:received]))
        self.called.set()
        return len(self.reads) >= self.done_after


async def test_a_watch_runs_its_callback_on_readiness_until_it_is_done() -> None:
    transport, peer = _pair()
    hub = current_hub()
    recorder = Recorder(transport, done_after=2)
    hub.watch(transport.sock, recorder)
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.reads == []
    for data in (b"one", b"two"):
        recorder.called = trio.Event()
        peer.send(data)
        with trio.fail_after(WAIT_S):
            await recorder.called.wait()
    peer.send(b"three")
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.reads == [b"one", b"two"]  # done after two: the third is not its
    # The socket is free again: a task can wait on it through the hub.
    with trio.fail_after(WAIT_S):
        await hub.wait_readable(transport.sock)
    transport.close()
    peer.close()


async def test_unwatch_ends_a_watch_and_a_watch_sees_bytes_that_came_before_it() -> None:
    transport, peer = _pair()
    hub = current_hub()
    first = Recorder(transport)
    hub.watch(transport.sock, first)
    hub.unwatch(transport.sock)
    peer.send(b"early")
    await trio.testing.wait_all_tasks_blocked()
    assert first.reads == []  # unwatched: not called
    # The edge of those bytes came while no one watched: a new watch runs at once.
    second = Recorder(transport)
    hub.watch(transport.sock, second)
    assert second.reads == [b"early"]
    transport.close()
    peer.close()


async def test_a_watched_socket_cannot_be_read_by_a_task_and_a_close_drops_the_watch() -> None:
    transport, peer = _pair()
    hub = current_hub()
    recorder = Recorder(transport)
    hub.watch(transport.sock, recorder)
    with pytest.raises(trio.BusyResourceError):
        hub.watch(transport.sock, recorder)
    transport.close()  # forgets the socket, and its watch with it
    hub.unwatch(transport.sock)  # a no-op on a closed socket
    peer.close()
    await trio.testing.wait_all_tasks_blocked()
    assert recorder.reads == []
