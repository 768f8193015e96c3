"""Timers for a Trio run: callbacks due at an instant, run by one system task.

This module owns :class:`Timers`. A session's clock (idle timeout, pings, pong
deadlines, :mod:`relay.dataplane.liveness`) needs to run a few lines at an instant
that is almost never reached in a short session: a task per session sleeping until
then costs a task spawn, a cancel scope, and two scheduler passes to start and to
cancel it, most of what the watchdog costs a session that opens, talks and closes
(``bench/instructions.py --churn``). Here every session's next instant is one entry
in a heap, and one system task sleeps until the earliest.

A callback runs in the timers' task: it must not block, and what it raises is logged
and dropped (an exception in a system task would end the whole run). Cancelling a
timer marks it; marked entries leave the heap when they come due, or all at once when
they outnumber the live ones (so churned sessions do not hold memory until their
timers would have fired).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Callable
from typing import Final

import trio

from relay.net.hub import run_service

LOGGER = logging.getLogger("relay.timers")
#: The heap is rebuilt without cancelled entries once it holds more than this many
#: and they are more than half of it.
COMPACT_MIN_ENTRIES: Final = 64


class Timer:
    """One scheduled callback; :meth:`cancel` before it ran means it never runs."""

    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False


#: A heap entry: (due, sequence number, timer). Tuples, so that the heap's comparisons
#: are C's: a Python ``__lt__`` made each push a dozen calls at a few hundred timers.
_Entry = tuple[float, int, Timer]


class Timers:
    """The run's timer heap and the system task that fires it (:meth:`run`)."""

    __slots__ = ("_cancelled", "_heap", "_scope", "_seq")

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._seq = 0
        self._cancelled = 0
        #: The run loop's sleep while it sleeps: an earlier timer moves its deadline.
        self._scope: trio.CancelScope | None = None

    @property
    def pending(self) -> int:
        """Timers scheduled and neither run nor cancelled."""
        return len(self._heap) - self._cancelled

    def call_at(self, at: float, callback: Callable[[], None]) -> Timer:
        """Run ``callback`` in the timers' task at Trio time ``at`` (never if ``at`` is inf)."""
        self._seq += 1
        timer = Timer(callback)
        if at == math.inf:
            timer.cancelled = True  # a clock with nothing to do ever: nothing to keep
            return timer
        heapq.heappush(self._heap, (at, self._seq, timer))
        scope = self._scope
        if scope is not None and at < scope.deadline:
            scope.deadline = at
        return timer

    def cancel(self, timer: Timer) -> None:
        """Make sure ``timer`` does not run (a no-op once it ran or was cancelled)."""
        if timer.cancelled:
            return
        timer.cancelled = True
        if timer.callback is _RAN:
            return
        timer.callback = _RAN  # what it would have run (a whole session) is not held
        self._cancelled += 1
        heap = self._heap
        if len(heap) > COMPACT_MIN_ENTRIES and self._cancelled * 2 > len(heap):
            self._heap = [entry for entry in heap if not entry[2].cancelled]
            heapq.heapify(self._heap)
            self._cancelled = 0

    async def run(self) -> None:
        """Fire timers as they come due, forever (a system task)."""
        while True:
            heap = self._heap
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                timer = heapq.heappop(heap)[2]
                if timer.cancelled:
                    self._cancelled -= 1
                    continue
                callback, timer.callback = timer.callback, _RAN
                try:
                    callback()
                except Exception:
                    LOGGER.exception("a timer callback failed; the other timers go on")
                heap = self._heap  # a callback's cancel may have compacted it
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None


def _RAN() -> None:  # a marker, not a function anyone calls
    """The callback of a timer that has run (it cannot run twice, or be cancelled)."""


_TIMERS: trio.lowlevel.RunVar[Timers] = trio.lowlevel.RunVar("relay_timers")


def current_timers() -> Timers:
    """This Trio run's timers, started (as a system task) on first use."""
    return run_service(_TIMERS, Timers, "relay timers")
