"""The read hub's inline wait (relay.net.hub): while Trio would sleep and the hub's
wake-ups wake no task, ``get_events`` handles them and waits again without a pass of
Trio's run loop; anything that needs Trio still gets it at once.

Each test streams bytes from a plain thread (no Trio in it) to a parked handler that
never wakes its pump, and checks one thing Trio must still do meanwhile: end a sleep
at its deadline, run a task a handler woke, wake a task on a socket of Trio's own,
run a callback sent from another thread. Run in both dispatch modes; the count of
Trio's I/O waits is the inline mode's alone.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import trio

from relay.net.hub import ReadHub, current_hub
from relay.net.timers import current_timers
from relay.net.transport import Transport

pytestmark = [pytest.mark.trio, pytest.mark.usefixtures("hub_dispatch")]

WAIT_S = 10.0
#: Bytes the feeding thread sends, one per send, and the pause between them (seconds).
FEED_SENDS = 200
FEED_GAP_S = 0.002


class _Parked:
    """A socket pair whose hub end is parked with a handler that counts reads and never
    wakes its pump (until ``stop``); ``woken`` is set by the handler at ``wake_at``."""

    def __init__(self, wake_at: int = -1) -> None:
        current_hub()  # the transport is made while the hub runs, as the relay's are
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.transport = Transport(self.ours)
        self.reads = 0
        self.wake_at = wake_at
        self.woken = trio.Event()
        #: Also called when ``wake_at`` bytes have come (in the handler, inside the hub).
        self.on_wake: Callable[[], object] = lambda: None
        self._buffer = bytearray(64)

    def handler(self) -> object:
        received = self.transport.recv_now(self._buffer)
        if received <= 0:
            return None if received < 0 else "ended"
        self.reads += received
        if 0 < self.wake_at <= self.reads and not self.woken.is_set():
            self.woken.set()  # reschedules a task: the inline wait must hand back to Trio
            self.on_wake()
        return None

    async def park(self, hub: ReadHub) -> object:
        return await hub.serve(self.transport.sock, self.handler)

    def close(self) -> None:
        self.transport.close()
        self.theirs.close()


@contextmanager
def _feeding(parked: _Parked, also: socket.socket | None = None) -> Iterator[threading.Event]:
    """A thread sends FEED_SENDS single bytes to ``parked``, FEED_GAP_S apart (and one to
    ``also`` half way); the event it returns is set when it is done."""
    done = threading.Event()

    def feed() -> None:
        for number in range(FEED_SENDS):
            parked.theirs.send(b"x")
            if also is not None and number == FEED_SENDS // 2:
                also.send(b"y")
            done.wait(FEED_GAP_S)
        done.set()

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    try:
        yield done
    finally:
        done.set()
        thread.join(WAIT_S)


@asynccontextmanager
async def _parked_and_fed(
    wake_at: int = -1, also: socket.socket | None = None
) -> AsyncIterator[tuple[_Parked, threading.Event]]:
    """A :class:`_Parked` handler in the hub, fed by :func:`_feeding` while the body runs;
    the event is the feed's end."""
    parked = _Parked(wake_at)
    hub = current_hub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parked.park, hub)
        await trio.testing.wait_all_tasks_blocked()
        with _feeding(parked, also) as done:
            yield parked, done
        nursery.cancel_scope.cancel()
    parked.close()


async def test_a_deadline_ends_its_sleep_while_the_hubs_wakeups_wake_nobody() -> None:
    async with _parked_and_fed(wake_at=5) as (parked, done):
        with trio.fail_after(WAIT_S):
            await parked.woken.wait()  # the feed is under way
            # Trio sleeps to this deadline while the feed's wake-ups come.
            with trio.move_on_after(0.05) as sleep:
                await trio.sleep_forever()
        assert sleep.cancelled_caught
        assert not done.is_set()


async def test_a_deadline_a_handler_sets_nearer_ends_the_wait_at_it() -> None:
    """The wait's timeout is read again after each pass: a handler's timer (the REST
    body's idle alarm is one) nearer than every deadline Trio knew of still fires."""
    timers = current_timers()
    fired = trio.Event()

    def set_a_near_timer() -> None:
        timers.call_at(trio.current_time() + 0.05, fired.set)

    async with _parked_and_fed(wake_at=5) as (parked, done):
        parked.on_wake = set_a_near_timer
        with trio.fail_after(WAIT_S):  # the only deadline Trio knew of when it slept
            await fired.wait()
        assert not done.is_set()


async def test_a_task_a_handler_wakes_runs_at_once() -> None:
    async with _parked_and_fed(wake_at=FEED_SENDS // 2) as (parked, done):
        with trio.fail_after(WAIT_S):
            await parked.woken.wait()
        # Woken at the hundredth byte, not when the feed (and its wake-ups) stopped.
        assert not done.is_set()


async def test_a_socket_of_trios_own_wakes_its_task_during_the_hubs_wakeups() -> None:
    trios, trios_peer = socket.socketpair()  # waited on by Trio, not the hub
    trios.setblocking(False)
    async with _parked_and_fed(also=trios_peer) as (_, done):
        with trio.fail_after(WAIT_S):
            await trio.lowlevel.wait_readable(trios)
        assert trios.recv(8) == b"y"
        assert not done.is_set()
    trios.close()
    trios_peer.close()


async def test_a_callback_from_another_thread_runs_during_the_hubs_wakeups() -> None:
    token = trio.lowlevel.current_trio_token()
    called = trio.Event()
    async with _parked_and_fed() as (_, done):
        threading.Timer(0.05, token.run_sync_soon, args=(called.set,)).start()
        with trio.fail_after(WAIT_S):
            await called.wait()
        assert not done.is_set()


async def test_inline_the_hubs_wakeups_take_no_pass_of_trios_loop(hub_dispatch: str) -> None:
    """Inline, the feed's 200 wake-ups reach the handler without Trio's run loop asking
    for I/O once per wake-up (the loop's pass is what the wait saves: fails without
    it); nested, each is a pass of Trio's (the hub's task wakes)."""
    from trio._core import _run

    parked = _Parked()
    hub = current_hub()

    manager = _run.GLOBAL_RUN_CONTEXT.runner.io_manager
    manager_class = type(manager)
    original = manager_class.get_events
    waits = 0

    def counting(self: Any, timeout: float) -> Any:
        nonlocal waits
        waits += 1
        return original(self, timeout)

    manager_class.get_events = counting  # type: ignore[method-assign]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(parked.park, hub)
            await trio.testing.wait_all_tasks_blocked()
            with _feeding(parked) as done:
                with trio.fail_after(WAIT_S):
                    await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
    finally:
        manager_class.get_events = original  # type: ignore[method-assign]
    parked.close()
    assert parked.reads == FEED_SENDS
    # (Two bytes may share a wake-up on a busy machine: the bounds leave room for that.)
    if hub_dispatch == "inline":
        assert waits < FEED_SENDS // 4, waits
    else:
        assert waits >= FEED_SENDS // 4, waits
