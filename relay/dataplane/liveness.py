"""Session liveness: when a session is idle, expired or talking to a dead peer. Sans-I/O.

This module owns the session clock: the shell tells it what it saw (messages each
way, as counters it already keeps; pongs; pings it sent or could not send) and
when, and asks it two things: *when must I next look* (:meth:`SessionClock.next_check_at`)
and *what is due now* (:meth:`SessionClock.poll`: an :class:`Ending`, and the legs
to ping). It reads no clock and does no I/O, so tests drive it with plain numbers.

The rules, for both legs:

- ``max_session_s`` after the start the session expires (the shell also puts this
  instant on the session's cancel scope, so nothing, not even a stuck write, can
  hold a session past it);
- with no message either way for ``idle_timeout_s`` the session is idle;
- every ``ping_interval_s`` each leg gets a ping, unless the last one is still
  unanswered; a ping unanswered for ``pong_timeout_s`` means that leg is dead;
- a ping the shell could not even start writing (the leg's write lock was held, its
  socket full) counts as sent: if the leg is still stuck ``pong_timeout_s`` later it
  is dead. Our pings never wait behind a blocked write, so they cannot stall these
  deadlines;
- while one leg's ping is still unwritten, only such legs can be judged dead: a
  pump stuck writing to one leg does not read the other, so that other leg's pong
  may be waiting, unread, behind the stuck write (a client that never reads silences
  the upstream's pongs, a stalled upstream the client's). The shell says when a ping
  was written (:meth:`SessionClock.ping_written`).

Activity is judged from message counters at each check, so the hot path pays
nothing per message; an idle session wakes once per ping interval, not every second.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.dataplane.policy import Ending, EndKind, Side


@dataclass(frozen=True, slots=True)
class LivenessLimits:
    idle_timeout_s: float
    max_session_s: float
    ping_interval_s: float
    pong_timeout_s: float


@dataclass(slots=True)
class _Leg:
    #: When our oldest unanswered ping went out (or was due but could not be written).
    ping_outstanding_since: float | None = None
    next_ping_at: float = 0.0
    #: A ping is due or being written and has not been written yet.
    unwritten: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    ending: Ending | None = None
    #: Legs to send a ping to now.
    pings_due: tuple[Side, ...] = ()


@dataclass(slots=True)
class SessionClock:
    limits: LivenessLimits
    started_at: float
    _last_counts: tuple[int, int] = (0, 0)
    _last_activity: float = 0.0
    _legs: dict[Side, _Leg] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._last_activity = self.started_at
        first_ping = self.started_at + self.limits.ping_interval_s
        self._legs = {side: _Leg(next_ping_at=first_ping) for side in Side}

    @property
    def expires_at(self) -> float:
        return self.started_at + self.limits.max_session_s

    # ------------------------------------------------------------------ what the shell saw

    def saw_messages(self, up: int, down: int, now: float) -> None:
        """The pumps' message counters at ``now``; any change is activity."""
        if (up, down) != self._last_counts:
            self._last_counts = (up, down)
            self._last_activity = now

    def saw_pong(self, side: Side, at: float) -> None:
        """The leg's latest pong arrived at ``at``: it answers a ping sent by then."""
        leg = self._legs[side]
        if leg.unwritten:
            return  # no pong answers a ping that has not been written
        if leg.ping_outstanding_since is not None and at >= leg.ping_outstanding_since:
            leg.ping_outstanding_since = None

    def ping_sent(self, side: Side, now: float, *, written: bool = True) -> None:
        """A ping went out (or could not be written: the leg is stuck; same clock).

        ``written=False``: the ping is due and handed to a writer that may wait;
        :meth:`ping_written` follows once it is on the wire.
        """
        leg = self._legs[side]
        if leg.ping_outstanding_since is None:
            leg.ping_outstanding_since = now
            leg.unwritten = not written
        leg.next_ping_at = now + self.limits.ping_interval_s

    def ping_written(self, side: Side) -> None:
        """The ping :meth:`ping_sent` announced is now on the wire."""
        self._legs[side].unwritten = False

    # ------------------------------------------------------------------ what is due

    def _pong_deadlines(self) -> list[tuple[float, Side]]:
        """When each leg that can be judged now is dead, unless it answers first."""
        timeout = self.limits.pong_timeout_s
        waiting = [
            (since + timeout, side, leg.unwritten)
            for side, leg in self._legs.items()
            if (since := leg.ping_outstanding_since) is not None
        ]
        if any(unwritten for _, _, unwritten in waiting):
            return [(deadline, side) for deadline, side, unwritten in waiting if unwritten]
        return [(deadline, side) for deadline, side, _ in waiting]

    def next_check_at(self) -> float:
        """The earliest instant at which :meth:`poll` may have something to say."""
        limits = self.limits
        candidates = [self.expires_at, self._last_activity + limits.idle_timeout_s]
        candidates.extend(
            leg.next_ping_at for leg in self._legs.values() if leg.ping_outstanding_since is None
        )
        candidates.extend(deadline for deadline, _ in self._pong_deadlines())
        return min(candidates)

    def poll(self, now: float) -> Verdict:
        """What is due at ``now``.

        Deadlines are compared as the sums :meth:`next_check_at` returns
        (``now >= t + d``, never ``now - t >= d``, which rounds differently), so a
        poll at the instant it named always sees what it named.
        """
        limits = self.limits
        if now >= self.expires_at:
            return Verdict(Ending(EndKind.SESSION_EXPIRED))
        if now >= self._last_activity + limits.idle_timeout_s:
            return Verdict(Ending(EndKind.IDLE_TIMEOUT))
        for deadline, side in self._pong_deadlines():
            if now >= deadline:
                return Verdict(Ending(EndKind.DEAD_PEER, side))
        due = tuple(
            side
            for side, leg in self._legs.items()
            if leg.ping_outstanding_since is None and now >= leg.next_ping_at
        )
        return Verdict(pings_due=due)
