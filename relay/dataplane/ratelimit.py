"""Per-session limits on what a client sends: frames per second and bytes per second. Sans-I/O.

This module owns the token buckets that stop one client from flooding the relay
(issue 10, finding 14: one client's 2,000,000 one-byte frames raised another
session's p99 from 1 ms to 240 ms, because the event loop spent its time on them).

Each bucket holds at most ``burst`` tokens and refills at ``rate_per_s``. A frame
costs one frame token and its wire size in byte tokens. The refill is lazy: the
hot path only subtracts and compares, and the clock (injected, so tests need no
event loop) is read only when a budget runs out. Over any interval a bucket
grants at most ``burst`` plus ``rate_per_s`` times its length, like a bucket
refilled continuously; a refused frame is not charged.

A rate of 0 turns that bucket off (an infinite budget).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

#: The budget of a bucket that is off: subtracting from it never makes it negative.
_UNLIMITED: Final = math.inf


class TokenBucket:
    """One token bucket with a lazy refill."""

    __slots__ = ("_clock", "_refilled_at", "burst", "rate_per_s", "tokens")

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst if rate_per_s > 0 else _UNLIMITED
        #: Tokens left as of the last refill, minus everything spent since.
        self.tokens: float = self.burst
        self._clock = clock
        self._refilled_at = clock() if rate_per_s > 0 else 0.0

    def spend(self, cost: float) -> bool:
        """Take ``cost`` tokens; ``False``, taking nothing, when a refill cannot cover them."""
        self.tokens -= cost
        if self.tokens >= 0:
            return True
        return self.settle(self._clock(), cost)

    def settle(self, now: float, cost: float) -> bool:
        """The budget ran out paying ``cost``: refill, then keep the payment or refund it.

        The refill is what accrued since the last one, capped at the burst before
        the current ``cost`` is paid, so a bucket never grants more than ``burst``
        plus ``rate_per_s`` times the elapsed time.
        """
        accrued = (now - self._refilled_at) * self.rate_per_s
        self._refilled_at = now
        self.tokens = min(self.burst, self.tokens + cost + accrued) - cost
        if self.tokens >= 0:
            return True
        self.tokens += cost  # refused: not charged
        return False


class ClientRateLimit:
    """The frame bucket and the byte bucket of one client connection."""

    __slots__ = ("_clock", "bytes", "exceeded", "frames")

    def __init__(
        self,
        *,
        max_frames_per_s: float,
        frame_burst: float,
        max_bytes_per_s: float,
        byte_burst_bytes: float,
        clock: Callable[[], float],
    ) -> None:
        self._clock = clock
        self.frames = TokenBucket(max_frames_per_s, frame_burst, clock)
        self.bytes = TokenBucket(max_bytes_per_s, byte_burst_bytes, clock)
        #: Which limit the last refused frame ran over, for the log and the error message.
        self.exceeded = ""

    def admit(self, wire_bytes: int, frames: int = 1) -> bool:
        """Charge ``frames`` frames of ``wire_bytes`` in all (headers included).

        ``False``: over a limit, and nothing is charged. The relay charges each run
        of frames from one read at once; a run the budget cannot cover is refused
        whole (the session then ends, rate limited).

        The hot path is one subtraction and one comparison per bucket; the clock is
        read only when a bucket's budget has run out.
        """
        frame_bucket, size = self.frames, self.bytes
        frame_bucket.tokens -= frames
        size.tokens -= wire_bytes
        if frame_bucket.tokens >= 0 and size.tokens >= 0:
            return True
        # Settle both at one clock reading, so the budget still in credit does not go stale.
        now = self._clock()
        frames_ok = frame_bucket.settle(now, frames)
        bytes_ok = size.settle(now, wire_bytes)
        if frames_ok and bytes_ok:
            return True
        # Refused: neither bucket keeps the payment.
        if frames_ok:
            frame_bucket.tokens += frames
        if bytes_ok:
            size.tokens += wire_bytes
        self.exceeded = "bytes per second" if frames_ok else "frames per second"
        return False
