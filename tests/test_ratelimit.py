"""The client rate limit's token buckets, without an event loop (an injected clock)."""

from __future__ import annotations

import orjson

from relay.dataplane.policy import Ending, EndKind, Side, plan_close
from relay.dataplane.ratelimit import ClientRateLimit, TokenBucket


class Clock:
    """A clock the test moves by hand, counting how often it is read."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


def test_burst_then_refused_then_refilled() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=10, burst=5, clock=clock)
    assert all(bucket.spend(1) for _ in range(5))
    assert not bucket.spend(1)  # the burst is spent and no time has passed
    assert bucket.tokens == 0  # a refused frame is not charged
    clock.now += 0.25  # 2.5 tokens accrue
    assert bucket.spend(1)
    assert bucket.spend(1)
    assert not bucket.spend(1)


def test_refill_is_capped_at_the_burst() -> None:
    clock = Clock()
    bucket = TokenBucket(rate_per_s=1000, burst=3, clock=clock)
    assert all(bucket.spend(1) for _ in range(3))
    clock.now += 3600  # an hour idle still only refills the burst
    assert all(bucket.spend(1) for _ in range(3))
    assert not bucket.spend(1)


def test_clock_read_only_when_the_budget_runs_out() -> None:
    clock = Clock()
    limit = ClientRateLimit(
        max_frames_per_s=1000,
        frame_burst=5000,
        max_bytes_per_s=8 << 20,
        byte_burst_bytes=32 << 20,
        clock=clock,
    )
    reads_at_start = clock.reads
    assert all(limit.admit(1400) for _ in range(5000))
    assert clock.reads == reads_at_start  # 5000 frames, not one clock read
    assert not limit.admit(1400)
    assert clock.reads == reads_at_start + 1  # one reading refills both buckets
    assert limit.exceeded == "frames per second"


def test_one_max_size_message_fits_the_byte_burst() -> None:
    clock = Clock()
    limit = ClientRateLimit(
        max_frames_per_s=1000,
        frame_burst=5000,
        max_bytes_per_s=8 << 20,
        byte_burst_bytes=32 << 20,
        clock=clock,
    )
    assert limit.admit(24 << 20)  # one message of the default max_message_bytes
    assert not limit.admit(24 << 20)  # a second at once is over the byte burst
    assert limit.exceeded == "bytes per second"
    clock.now += 3.0  # 24 MiB accrue at 8 MiB/s
    assert limit.admit(1)


def test_zero_rate_is_off() -> None:
    clock = Clock()
    limit = ClientRateLimit(
        max_frames_per_s=0, frame_burst=1, max_bytes_per_s=0, byte_burst_bytes=1, clock=clock
    )
    assert all(limit.admit(1 << 20) for _ in range(100_000))
    assert clock.reads == 0


def test_rate_limited_session_is_told_and_closed_1008() -> None:
    plan = plan_close(Ending(EndKind.RATE_LIMITED, Side.CLIENT, reason="frames per second"))
    assert (plan.client.code, plan.client.reason) == (1008, "rate_limit_exceeded")
    error = orjson.loads(plan.client.error_event or b"{}")["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "frames per second" in error["message"]
    assert (plan.upstream.code, plan.upstream.send_close) == (1000, True)
