"""Latency histograms for the load tool: bounded memory, mergeable across processes.

This module owns how the load side records and summarises times, with no I/O:
:class:`LatencyHistogram` keeps counts in logarithmic buckets 1 % wide, so any
number of samples costs a few hundred integers, a percentile is exact to within
:data:`RELATIVE_PRECISION`, and the histograms of several load processes merge
into the one the run would have recorded in a single process. Bucket counts
cross process boundaries as ``{bucket index: count}`` (JSON-safe with string keys).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Final

#: Width of a bucket relative to its lower edge: percentiles are within this of the truth.
RELATIVE_PRECISION: Final = 0.01
#: Times below this fall in the first bucket (one microsecond, in milliseconds).
SMALLEST_TIME_MS: Final = 0.001
_GROWTH: Final = 1.0 + RELATIVE_PRECISION
_INV_LOG_GROWTH: Final = 1.0 / math.log(_GROWTH)
#: The fractions reported by :meth:`LatencyHistogram.summary`.
SUMMARY_PERCENTILES: Final = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


def bucket_of(value_ms: float) -> int:
    """The bucket index of a time in milliseconds (0 for anything at or below 1 µs)."""
    if value_ms <= SMALLEST_TIME_MS:
        return 0
    return int(math.log(value_ms / SMALLEST_TIME_MS) * _INV_LOG_GROWTH)


def bucket_value_ms(index: int) -> float:
    """The representative time of a bucket: the geometric middle of its edges."""
    return float(SMALLEST_TIME_MS * _GROWTH ** (index + 0.5))


class LatencyHistogram:
    """Counts of times in log buckets; also keeps the exact maximum."""

    __slots__ = ("counts", "max_ms", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0
        self.max_ms = 0.0

    def record(self, value_ms: float) -> None:
        index = bucket_of(value_ms)
        counts = self.counts
        counts[index] = counts.get(index, 0) + 1
        self.total += 1
        if value_ms > self.max_ms:
            self.max_ms = value_ms

    def merge(self, other: LatencyHistogram) -> None:
        for index, count in other.counts.items():
            self.counts[index] = self.counts.get(index, 0) + count
        self.total += other.total
        self.max_ms = max(self.max_ms, other.max_ms)

    def percentile(self, fraction: float) -> float:
        """The smallest recorded time with at least ``fraction`` of samples at or below it."""
        if self.total == 0:
            return math.nan
        rank = max(1, math.ceil(fraction * self.total))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                return min(bucket_value_ms(index), self.max_ms)
        return self.max_ms

    def summary(self) -> dict[str, float]:
        """``p50``, ``p90``, ``p99``, ``p99.9`` and ``max`` in milliseconds (NaN when empty)."""
        values = {name: self.percentile(fraction) for name, fraction in SUMMARY_PERCENTILES}
        values["max"] = self.max_ms if self.total else math.nan
        return values

    def cdf(self) -> list[tuple[float, float]]:
        """``(time ms, fraction of samples at or below it)`` per occupied bucket, ascending."""
        points: list[tuple[float, float]] = []
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            points.append((min(bucket_value_ms(index), self.max_ms), seen / self.total))
        return points

    def to_wire(self) -> dict[str, object]:
        return {"counts": {str(k): v for k, v in self.counts.items()}, "max_ms": self.max_ms}

    @classmethod
    def from_wire(cls, wire: Mapping[str, object]) -> LatencyHistogram:
        histogram = cls()
        counts = wire.get("counts", {})
        if isinstance(counts, Mapping):
            for key, count in counts.items():
                histogram.counts[int(key)] = int(count)
                histogram.total += int(count)
        max_ms = wire.get("max_ms", 0.0)
        histogram.max_ms = float(max_ms) if isinstance(max_ms, int | float) else 0.0
        return histogram

    @classmethod
    def of(cls, values: Iterable[float]) -> LatencyHistogram:
        histogram = cls()
        for value in values:
            histogram.record(value)
        return histogram
