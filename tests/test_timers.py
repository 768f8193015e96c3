"""relay.net.timers: callbacks at their instant, cancels honoured, no memory held by churn."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import trio
import trio.testing

from relay.net.timers import COMPACT_MIN_ENTRIES, current_timers

pytestmark = pytest.mark.trio


class _Session:
    def check(self) -> None:
        raise AssertionError("a cancelled timer ran")


async def test_callbacks_run_at_their_instant_in_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = current_timers()
    start = trio.current_time()
    fired: list[tuple[str, float]] = []
    done = trio.Event()

    def note(name: str) -> None:
        fired.append((name, trio.current_time() - start))
        if name == "last":
            done.set()

    timers.call_at(start + 30, lambda: note("last"))
    timers.call_at(start + 10, lambda: note("first"))
    # Earlier than the one the timers' task sleeps towards: it must move the sleep.
    timers.call_at(start + 5, lambda: note("earliest"))
    timers.call_at(start + 10, lambda: note("tie, second"))
    with trio.fail_after(60):
        await done.wait()
    assert fired == [("earliest", 5), ("first", 10), ("tie, second", 10), ("last", 30)]
    assert timers.pending == 0


async def test_a_cancelled_timer_never_runs_and_a_late_cancel_is_harmless(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = current_timers()
    start = trio.current_time()
    fired: list[str] = []
    cancelled = timers.call_at(start + 1, lambda: fired.append("cancelled"))
    ran = timers.call_at(start + 2, lambda: fired.append("ran"))
    timers.cancel(cancelled)
    timers.cancel(cancelled)  # twice: no double count
    await trio.sleep(3)
    timers.cancel(ran)  # after it ran
    assert fired == ["ran"]
    assert timers.pending == 0
    never = timers.call_at(math.inf, lambda: fired.append("never"))
    assert timers.pending == 0
    timers.cancel(never)
    await trio.sleep(1000)
    assert fired == ["ran"]


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    timers = current_timers()
    start = trio.current_time()
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    timers.call_at(start + 1, boom)
    timers.call_at(start + 1, lambda: fired.append("after"))
    await trio.sleep(2)
    assert fired == ["after"]
    assert "a timer callback failed" in caplog.text


async def test_churned_timers_do_not_pile_up_or_hold_their_callbacks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Sessions that open and close long before their clock's instant: the heap stays
    near the live count, and a cancelled entry keeps no reference to its session."""
    timers = current_timers()
    start = trio.current_time()
    live = [timers.call_at(start + 600, lambda: None) for _ in range(10)]
    biggest = 0
    sessions: list[weakref.ref[_Session]] = []
    for i in range(10 * COMPACT_MIN_ENTRIES):
        session = _Session()
        sessions.append(weakref.ref(session))
        timer = timers.call_at(start + 600 + i, session.check)
        timers.cancel(timer)
        del session, timer
        biggest = max(biggest, len(timers._heap))
    gc.collect()
    assert all(ref() is None for ref in sessions)
    assert timers.pending == len(live)
    assert biggest <= 2 * COMPACT_MIN_ENTRIES + 2


async def test_a_timer_set_from_a_callback_runs_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The session clock re-arms itself from its own callback."""
    timers = current_timers()
    start = trio.current_time()
    times: list[float] = []
    done = trio.Event()

    def tick() -> None:
        times.append(trio.current_time() - start)
        if len(times) < 3:
            timers.call_at(trio.current_time() + 20, tick)
        else:
            done.set()

    timers.call_at(start + 20, tick)
    with trio.fail_after(100):
        await done.wait()
    assert times == [20, 40, 60]
