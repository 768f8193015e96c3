"""The session clock, without an event loop: idle, expiry, pings, dead peers, wake-ups."""

from __future__ import annotations

import pytest

from relay.dataplane.liveness import LivenessLimits, SessionClock, Verdict
from relay.dataplane.policy import Ending, EndKind, Side

LIMITS = LivenessLimits(idle_timeout_s=60, max_session_s=100, ping_interval_s=10, pong_timeout_s=5)


def clock() -> SessionClock:
    return SessionClock(LIMITS, started_at=1000.0)


def test_nothing_is_due_before_the_first_ping() -> None:
    c = clock()
    assert c.next_check_at() == 1010.0
    assert c.poll(1009.9) == Verdict()


def test_pings_fall_due_on_both_legs_and_wait_for_their_pongs() -> None:
    c = clock()
    assert c.poll(1010.0).pings_due == (Side.CLIENT, Side.UPSTREAM)
    c.ping_sent(Side.CLIENT, 1010.0)
    c.ping_sent(Side.UPSTREAM, 1010.0)
    # Outstanding pings: the next look is their pong deadline, not another ping.
    assert c.next_check_at() == 1015.0
    c.saw_pong(Side.CLIENT, 1010.2)
    c.saw_pong(Side.UPSTREAM, 1010.3)
    assert c.next_check_at() == 1020.0
    assert c.poll(1020.0).pings_due == (Side.CLIENT, Side.UPSTREAM)


@pytest.mark.parametrize("side", [Side.CLIENT, Side.UPSTREAM])
def test_an_unanswered_ping_is_a_dead_peer(side: Side) -> None:
    c = clock()
    for leg in Side:
        c.ping_sent(leg, 1010.0)
    other = Side.UPSTREAM if side is Side.CLIENT else Side.CLIENT
    c.saw_pong(other, 1011.0)
    assert c.poll(1014.9).ending is None
    assert c.poll(1015.0).ending == Ending(EndKind.DEAD_PEER, side)


def test_a_ping_that_could_not_be_written_starts_the_same_clock() -> None:
    """A leg whose socket is full cannot take our ping: stuck for pong_timeout_s = dead."""
    c = clock()
    c.ping_sent(Side.CLIENT, 1010.0)  # the shell could not even start the write
    c.ping_sent(Side.CLIENT, 1012.0)  # nor the next time: the clock keeps the first
    c.saw_pong(Side.UPSTREAM, 1010.0)
    assert c.poll(1015.0).ending == Ending(EndKind.DEAD_PEER, Side.CLIENT)


def test_a_pong_from_before_the_ping_does_not_answer_it() -> None:
    c = clock()
    c.ping_sent(Side.CLIENT, 1010.0)
    c.saw_pong(Side.CLIENT, 1009.0)
    assert c.poll(1015.0).ending == Ending(EndKind.DEAD_PEER, Side.CLIENT)


def test_idle_counts_messages_either_way() -> None:
    c = clock()
    answer_pings = [(t, side) for t in range(1010, 1100, 10) for side in Side]
    for t, side in answer_pings:
        c.ping_sent(side, float(t))
        c.saw_pong(side, float(t))
    c.saw_messages(3, 0, 1030.0)
    assert c.poll(1089.9).ending is None
    assert c.poll(1090.0).ending == Ending(EndKind.IDLE_TIMEOUT)
    c.saw_messages(3, 7, 1089.0)  # the counters moved: activity
    assert c.poll(1090.0).ending is None


def test_expiry_wins_over_everything() -> None:
    c = SessionClock(
        LivenessLimits(idle_timeout_s=5, max_session_s=5, ping_interval_s=1, pong_timeout_s=1),
        started_at=0.0,
    )
    c.ping_sent(Side.CLIENT, 1.0)
    assert c.poll(5.0).ending == Ending(EndKind.SESSION_EXPIRED)


def test_an_idle_session_wakes_once_per_ping_interval() -> None:
    """Not once a second: the clock names the next instant anything can change."""
    c = clock()
    wakes = 0
    now = 1000.0
    while True:
        now = c.next_check_at()
        wakes += 1
        verdict = c.poll(now)
        if verdict.ending is not None:
            break
        for side in verdict.pings_due:
            c.ping_sent(side, now)
            c.saw_pong(side, now + 0.01)
    assert verdict.ending == Ending(EndKind.IDLE_TIMEOUT)
    assert now == 1060.0
    assert wakes <= 2 * 6 + 1  # a ping and a pong check per interval at most


@pytest.mark.parametrize("what", ["idle", "pong"])
def test_a_poll_at_the_instant_it_named_sees_the_deadline(what: str) -> None:
    """0.7 + 0.1 - 0.7 < 0.1 in floating point: a shell sleeping until next_check_at()
    must find the deadline there, or it wakes at the same instant forever."""
    idle, pong = (0.1, 50.0) if what == "idle" else (50.0, 0.1)
    limits = LivenessLimits(
        idle_timeout_s=idle, max_session_s=100, ping_interval_s=1, pong_timeout_s=pong
    )
    c = SessionClock(limits, started_at=0.7 if what == "idle" else 0.0)
    if what == "pong":
        c.ping_sent(Side.CLIENT, 0.7)
        c.ping_sent(Side.UPSTREAM, 0.7)
    at = c.next_check_at()
    assert at == 0.7 + 0.1
    ending = c.poll(at).ending
    assert ending is not None
    assert ending.kind is (EndKind.IDLE_TIMEOUT if what == "idle" else EndKind.DEAD_PEER)


@pytest.mark.parametrize("stuck", [Side.CLIENT, Side.UPSTREAM])
def test_while_one_legs_ping_cannot_be_written_only_that_leg_is_judged(stuck: Side) -> None:
    """A pump stuck writing to one leg reads nothing from the other: that leg's pong may
    be waiting unread behind the stuck write, so its silence proves nothing."""
    c = clock()
    other = Side.UPSTREAM if stuck is Side.CLIENT else Side.CLIENT
    c.ping_sent(Side.CLIENT, 1010.0, written=False)
    c.ping_sent(Side.UPSTREAM, 1010.0, written=False)
    c.ping_written(other)  # went out; its pong is never seen
    assert c.next_check_at() == 1015.0
    assert c.poll(1015.0).ending == Ending(EndKind.DEAD_PEER, stuck)


def test_a_pong_cannot_answer_an_unwritten_ping() -> None:
    c = clock()
    c.ping_sent(Side.CLIENT, 1010.0, written=False)
    c.saw_pong(Side.CLIENT, 1011.0)  # unsolicited, or for an older ping
    assert c.poll(1015.0).ending == Ending(EndKind.DEAD_PEER, Side.CLIENT)


def test_once_the_stuck_ping_is_written_the_other_leg_is_judged_again() -> None:
    c = clock()
    c.ping_sent(Side.CLIENT, 1010.0, written=False)
    c.ping_written(Side.CLIENT)
    c.ping_sent(Side.UPSTREAM, 1012.0, written=False)  # stuck behind a write
    assert c.next_check_at() == 1017.0  # the client's deadline (1015) waits
    assert c.poll(1016.0).ending is None
    c.ping_written(Side.UPSTREAM)
    assert c.poll(1016.0).ending == Ending(EndKind.DEAD_PEER, Side.CLIENT)
