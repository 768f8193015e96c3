"""What a load run is asked to do (:class:`LoadSpec`) and what it found (:class:`LoadResult`).

This module owns the load tool's data, with no I/O: the run specification that a
parent process hands to its load workers, the result every profile fills in, and
:func:`merge_results`, which folds the results of several load processes into the
one a single process would have reported (counts add, histograms merge, CPU adds
and the busiest process decides whether the load side saturated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Final, Literal

import msgspec

from relay.loadgen.stats import LatencyHistogram

Profile = Literal["stream", "voice", "flat", "churn", "idle"]
PROFILES: Final[tuple[Profile, ...]] = ("stream", "voice", "flat", "churn", "idle")
#: The times a run records, by histogram name: ``rtt`` (stream/flat: append to echoed
#: delta), ``handshake`` (TCP connect to ``session.created``), ``first_delta`` (voice:
#: commit sent to first audio delta) and ``jitter`` (voice: |gap between audio deltas −
#: audio length of the earlier one|).
LATENCY_KINDS: Final = ("rtt", "handshake", "first_delta", "jitter")
#: A load process using more than this share of one core is the bottleneck.
SATURATED_CPU_SHARE: Final = 0.85

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class LoadSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One load run. ``key`` is a secret: it never appears in a result or on a command line."""

    profile: Profile
    #: ``ws://`` or ``wss://`` base ending in ``/v1``; its query string is kept on every session.
    url: str
    key: str
    #: Sessions (``churn``: parallel workers opening sessions one after another).
    sessions: PositiveInt = 10
    #: The measured window; ``idle``: how long the sessions are held.
    duration_s: NonNegativeFloat = 10.0
    #: Load before the window opens (not counted in the window's rates and CPU).
    warmup_s: NonNegativeFloat = 0.0
    #: Audio per ``input_audio_buffer.append``.
    chunk_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    #: ``flat``: appends in flight per session.
    window: PositiveInt = 8
    #: ``voice``: how long the user speaks per turn, and the pause after the answer.
    speech_ms: Annotated[int, msgspec.Meta(ge=100, le=60_000)] = 1000
    pause_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 300
    model: str = "gpt-realtime"
    #: CA bundle for a ``wss://`` URL signed by a private CA; empty = system store.
    ca_file: str = ""
    #: First session number of this process (several processes share one run).
    index_offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Offer ``relay.audio.v1`` (docs/binary-audio.md): audio goes up as binary messages
    #: and comes back as binary frames; a server that does not select it fails the run.
    binary: bool = False

    def split(self, processes: int) -> list[LoadSpec]:
        """This run spread over ``processes`` load processes (fewer if sessions are fewer)."""
        processes = max(1, min(processes, self.sessions))
        base, extra = divmod(self.sessions, processes)
        parts: list[LoadSpec] = []
        offset = self.index_offset
        for number in range(processes):
            count = base + (1 if number < extra else 0)
            parts.append(msgspec.structs.replace(self, sessions=count, index_offset=offset))
            offset += count
        return parts


@dataclass
class LoadResult:
    """What one profile run saw. Latency dicts are in milliseconds (see ``stats.summary``)."""

    profile: str
    sessions_requested: int
    duration_s: float
    sessions_opened: int = 0
    #: stream/flat: appends sent; voice: appends, commits and response.create sent.
    sent: int = 0
    #: stream/flat: echoes received; voice: audio deltas received.
    received: int = 0
    #: stream/flat: appends never echoed; voice: turns without ``response.done``.
    lost: int = 0
    #: Messages both ways and payload bytes both ways inside the measured window.
    window_sent: int = 0
    window_received: int = 0
    window_bytes: int = 0
    window_s: float = 0.0
    #: Bytes on the client sockets inside the measured window (frame headers, masks and
    #: every frame included: the client leg's cost), and the audio the appends sent in
    #: it carried (an echo carries as much back).
    client_bytes_sent: int = 0
    client_bytes_received: int = 0
    window_audio_s: float = 0.0
    #: Whether the sessions spoke ``relay.audio.v1`` (the spec's ``binary``).
    binary: bool = False
    #: voice: completed turns; churn: sessions opened, used and closed; idle: sessions alive.
    turns: int = 0
    sessions_completed: int = 0
    sessions_held: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    load_procs: int = 1
    load_cpu_s: float = 0.0
    #: The busiest load process, in percent of one core.
    load_cpu_percent: float = 0.0
    load_saturated: bool = False
    histograms: dict[str, LatencyHistogram] = field(default_factory=dict)

    def histogram(self, name: str) -> LatencyHistogram:
        found = self.histograms.get(name)
        if found is None:
            found = self.histograms[name] = LatencyHistogram()
        return found

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def note_load_cpu(self, cpu_s: float, wall_s: float) -> None:
        self.load_cpu_s = cpu_s
        share = cpu_s / wall_s if wall_s > 0 else 0.0
        self.load_cpu_percent = 100.0 * share
        self.load_saturated = share > SATURATED_CPU_SHARE

    # Derived figures, computed from the fields above.

    def latency(self, name: str) -> dict[str, float]:
        """Percentiles of one of :data:`LATENCY_KINDS`, ms (NaN when nothing was recorded)."""
        histogram = self.histograms.get(name)
        return histogram.summary() if histogram is not None else LatencyHistogram().summary()

    @property
    def messages_per_s(self) -> float:
        return (self.window_sent + self.window_received) / self.window_s if self.window_s else 0.0

    @property
    def megabytes_per_s(self) -> float:
        return self.window_bytes / self.window_s / 1e6 if self.window_s else 0.0

    @property
    def client_bytes_per_audio_s(self) -> float:
        """Client-leg bytes both ways per second of audio streamed in the window."""
        both = self.client_bytes_sent + self.client_bytes_received
        return both / self.window_audio_s if self.window_audio_s else 0.0

    @property
    def sessions_per_s(self) -> float:
        return self.sessions_completed / self.window_s if self.window_s else 0.0

    def to_json(self) -> dict[str, Any]:
        """Every field and derived figure; histograms as wire dicts (``NaN`` becomes null)."""
        data = asdict(self)
        data["histograms"] = {name: h.to_wire() for name, h in self.histograms.items()}
        for name in LATENCY_KINDS:
            if name in self.histograms:
                data[f"{name}_ms"] = _finite(self.latency(name))
        data["messages_per_s"] = self.messages_per_s
        data["megabytes_per_s"] = self.megabytes_per_s
        data["sessions_per_s"] = self.sessions_per_s
        data["client_bytes_per_audio_s"] = self.client_bytes_per_audio_s
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LoadResult:
        known = {name for name in cls.__dataclass_fields__ if name != "histograms"}
        result = cls(**{k: v for k, v in data.items() if k in known})
        result.histograms = {
            name: LatencyHistogram.from_wire(wire)
            for name, wire in data.get("histograms", {}).items()
        }
        return result


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if math.isnan(v) else v) for k, v in values.items()}


_SUMMED: Final = (
    "sessions_requested",
    "sessions_opened",
    "sent",
    "received",
    "lost",
    "window_sent",
    "window_received",
    "window_bytes",
    "client_bytes_sent",
    "client_bytes_received",
    "window_audio_s",
    "turns",
    "sessions_completed",
    "sessions_held",
    "load_cpu_s",
)


def merge_results(parts: list[LoadResult]) -> LoadResult:
    """One result for a run spread over several load processes with a shared window."""
    if not parts:
        raise ValueError("no results to merge")
    first = parts[0]
    merged = LoadResult(
        profile=first.profile,
        sessions_requested=0,
        duration_s=first.duration_s,
        window_s=max(part.window_s for part in parts),
        load_procs=len(parts),
        binary=first.binary,
    )
    for part in parts:
        for name in _SUMMED:
            setattr(merged, name, getattr(merged, name) + getattr(part, name))
        for kind, count in part.errors.items():
            merged.errors[kind] = merged.errors.get(kind, 0) + count
        for name, histogram in part.histograms.items():
            merged.histogram(name).merge(histogram)
    merged.load_cpu_percent = max(part.load_cpu_percent for part in parts)
    merged.load_saturated = any(part.load_saturated for part in parts)
    return merged
