"""Prometheus metrics for one relay process (prometheus-client, own registry).

This module owns the metric names, their labels and units. Nothing here runs on
the per-message path: sessions add their message and byte counts and their usage
when they end, and gauges are read by callback when ``/metrics`` is scraped. What is
counted per REST request (requests, first-byte times, usage, upstream outcomes) uses
:class:`LightCounter` and :class:`LightHistogram`: a dict update where
prometheus-client's children cost a few calls and a lock, exported the same way.

Label values never carry a credential: close codes, sides, model names, token
kinds, error kinds, key file names, upstream names and key ids (a digest prefix,
:mod:`relay.upstreams.table`) only.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from relay.credentials.keyfiles import APP_KEYS_LABEL, SIGNING_KEYS_LABEL

#: Buckets for handshake timings, seconds: loopback is sub-millisecond, WAN to OpenAI ~0.1-1 s.
HANDSHAKE_BUCKETS_S: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)

#: The ``file`` labels of ``relay_key_file_reload_failures`` (the key files'
#: ``label`` in :mod:`relay.credentials.keyfiles`), exported at 0 from the start.
KEY_FILE_LABELS: Final = (APP_KEYS_LABEL, SIGNING_KEYS_LABEL)


_Labelled = TypeVar("_Labelled", Counter, Histogram)


class Children(Generic[_Labelled]):
    """A labelled metric's children by label values (in the metric's label order), kept.

    prometheus-client's ``labels()`` validates, builds a tuple and takes a lock on every
    call (about 2 µs); a dict lookup does not. Label values are the bounded sets the
    module docstring names, so this holds no more than prometheus-client holds anyway.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: _Labelled) -> None:
        self._metric: _Labelled = metric
        self._children: dict[tuple[str, ...], _Labelled] = {}

    def __call__(self, *values: str) -> _Labelled:
        try:
            return self._children[values]
        except KeyError:
            child: _Labelled = self._metric.labels(*values)
            self._children[values] = child
            return child


LabelValues = tuple[str, ...]
#: How prometheus-client writes a bucket's bound (``le``), typed.
_BUCKET_BOUND_TEXT: Final[Callable[[float], str]] = floatToGoString


class LightCounter(Collector):
    """A labelled counter for the per-request path: :meth:`inc` is a dict update.

    prometheus-client's child ``inc()`` is four Python calls and a lock; the REST proxy
    made four such calls per request, 4 % of a small request's instructions
    (``bench/instructions.py --rest``). The relay adds from its one Trio thread, and
    ``/metrics`` is rendered there too, so nothing here needs a lock. Exported as
    prometheus-client's ``Counter`` would be: ``<name>_total`` and ``<name>_created``
    per label set, in the order the sets first counted.
    """

    def __init__(
        self, name: str, documentation: str, labelnames: LabelValues, registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        #: Counts by label values (in ``labelnames`` order).
        self.values: dict[LabelValues, float] = {}
        self._created: dict[LabelValues, float] = {}
        registry.register(self)

    def inc(self, labels: LabelValues, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative: a counter only goes up) to ``labels``' count."""
        if amount < 0:
            raise ValueError("a counter can only be increased")
        values = self.values
        value = values.get(labels)
        if value is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            self._created[labels] = time.time()
            value = 0.0
        values[labels] = value + amount

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        created = self._created
        for labels, value in self.values.items():
            family.add_metric(labels, value, created=created[labels])
        return [family]


class LightHistogram(Collector):
    """A labelled histogram for the per-request path: :meth:`observe` is a bisect and
    two list updates (prometheus-client's is a loop over the buckets in Python, a call
    and a lock per bucket). Exported as its ``Histogram`` would be (cumulative
    ``_bucket`` samples up to ``+Inf``, ``_count``, ``_sum``, ``_created``)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: LabelValues,
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = labelnames
        self._bounds = tuple(float(bound) for bound in buckets)
        if list(self._bounds) != sorted(set(self._bounds)):
            raise ValueError("buckets must be increasing")
        #: Per label values: the count in each bucket (the last is +Inf's), and the sum.
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}
        self._created: dict[LabelValues, float] = {}
        registry.register(self)

    def observe(self, labels: LabelValues, amount: float) -> None:
        counts = self._counts.get(labels)
        if counts is None:
            if len(labels) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}")
            counts = self._counts[labels] = [0] * (len(self._bounds) + 1)
            self._sums[labels] = 0.0
            self._created[labels] = time.time()
        # The first bound at or above the amount: Prometheus buckets are "le".
        counts[bisect.bisect_left(self._bounds, amount)] += 1
        self._sums[labels] += amount

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        edges = [_BUCKET_BOUND_TEXT(bound) for bound in self._bounds] + ["+Inf"]
        for labels, counts in self._counts.items():
            cumulative, total = [], 0
            for edge, count in zip(edges, counts, strict=True):
                total += count
                cumulative.append((edge, float(total)))
            family.add_metric(labels, cumulative, self._sums[labels])
            family.add_sample(
                self._name + "_created",
                dict(zip(self._labelnames, labels, strict=True)),
                self._created[labels],
            )
        return [family]


@dataclass(frozen=True, slots=True)
class UpstreamKeyState:
    """One key of one upstream as ``/metrics`` and the admin API show it (no secret)."""

    upstream: str
    key_id: str
    live_sessions: int
    #: Seconds left of the key's (or its upstream's) cool-down; 0 when not cooling.
    cooling_s: float
    #: The upstream answered 401/403 to it: unused until a reload.
    rejected: bool
    #: Dials with this key since start, by outcome (``success``, ``rate_limited``...).
    handshakes: dict[str, int]


class _UpstreamKeysCollector(Collector):
    """Per-key gauges read at scrape time, so a reload's new keys appear and old ones go."""

    def __init__(self, states: Callable[[], Iterable[UpstreamKeyState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        labels = ["upstream", "key_id"]
        live = GaugeMetricFamily(
            "relay_upstream_key_live_sessions",
            "Live sessions and dials in flight, by upstream and key id.",
            labels=labels,
        )
        cooling = GaugeMetricFamily(
            "relay_upstream_key_cool_down_seconds",
            "Seconds until the key (or its upstream) is tried first again; 0: not cooling.",
            labels=labels,
        )
        rejected = GaugeMetricFamily(
            "relay_upstream_key_rejected",
            "1 when the upstream answered 401/403 to the key (unused until a reload).",
            labels=labels,
        )
        for state in self._states():
            values = [state.upstream, state.key_id]
            live.add_metric(values, state.live_sessions)
            cooling.add_metric(values, state.cooling_s)
            rejected.add_metric(values, 1.0 if state.rejected else 0.0)
        yield from (live, cooling, rejected)


class RelayMetrics:
    def __init__(
        self,
        *,
        live_sessions: Callable[[], float],
        draining: Callable[[], float],
        dropped_log_lines: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("relay_live_sessions", "Sessions being relayed now.", registry=r).set_function(
            live_sessions
        )
        Gauge("relay_draining", "1 while the relay drains for shutdown.", registry=r).set_function(
            draining
        )
        Gauge(
            "relay_log_lines_dropped",
            "Log lines dropped because the log queue was full.",
            registry=r,
        ).set_function(dropped_log_lines)
        self.sessions_ended = Counter(
            "relay_sessions_ended",
            "Sessions ended, by the client's close code and who ended it.",
            ["close_code", "ended_by"],
            registry=r,
        )
        self.handshake_seconds = Histogram(
            "relay_handshake_seconds",
            "Client handshake: request head parsed to 101 sent.",
            buckets=HANDSHAKE_BUCKETS_S,
            registry=r,
        )
        self.upstream_connect_seconds = Histogram(
            "relay_upstream_connect_seconds",
            "Upstream TCP + TLS + WebSocket upgrade.",
            buckets=HANDSHAKE_BUCKETS_S,
            registry=r,
        )
        self.upstream_attempt_seconds = Histogram(
            "relay_upstream_attempt_seconds",
            "One successful upstream dial (TCP + TLS + upgrade), by upstream and key id.",
            ["upstream", "key_id"],
            buckets=HANDSHAKE_BUCKETS_S,
            registry=r,
        )
        # Counted per REST request (and per dial): light, see LightCounter.
        self.upstream_handshakes = LightCounter(
            "relay_upstream_handshakes",
            "Upstream dials, by upstream, key id and outcome (success, rate_limited, "
            "server_error, refused, timeout, key_rejected, client_error).",
            ("upstream", "key_id", "outcome"),
            r,
        )
        self.sessions_ended_by = Children(self.sessions_ended)
        self.upstream_attempt_seconds_by = Children(self.upstream_attempt_seconds)
        self.rest_requests = LightCounter(
            "relay_rest_requests",
            "REST proxy requests, by the upstream that answered and the status sent.",
            ("upstream", "status"),
            r,
        )
        self.rest_first_byte_seconds = LightHistogram(
            "relay_rest_first_byte_seconds",
            "REST proxy: request sent upstream to its response head, by upstream.",
            ("upstream",),
            HANDSHAKE_BUCKETS_S,
            r,
        )
        self.messages = Counter(
            "relay_messages",
            "Messages relayed, by direction (up: client to upstream).",
            ["direction"],
            registry=r,
        )
        self.bytes = Counter(
            "relay_bytes",
            "Wire bytes received from each side, by direction.",
            ["direction"],
            registry=r,
        )
        # The per-session end touches these every time: children resolved once
        # (``labels()`` costs three times the ``inc()``).
        self.messages_up = self.messages.labels(direction="up")
        self.messages_down = self.messages.labels(direction="down")
        self.bytes_up = self.bytes.labels(direction="up")
        self.bytes_down = self.bytes.labels(direction="down")
        self.errors = Counter(
            "relay_errors",
            "Refused handshakes and failed sessions, by kind.",
            ["kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "relay_config_reloads",
            "SIGHUP reloads, by outcome (applied, or refused and the old configuration kept).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("applied", "refused"):
            self.config_reloads.labels(outcome=outcome)
        # Every REST response with usage counts two or three kinds (model, kind order).
        self.usage_tokens = LightCounter(
            "relay_usage_tokens",
            "Tokens from response.done usage, by model and kind.",
            ("model", "kind"),
            r,
        )

        self.key_file_reload_failures = Counter(
            "relay_key_file_reload_failures",
            "Key file versions that failed to load (the previous keys were kept), by file.",
            ["file"],
            registry=r,
        )
        for label in KEY_FILE_LABELS:
            self.key_file_reload_failures.labels(file=label)

    def watch_upstream_keys(self, states: Callable[[], Iterable[UpstreamKeyState]]) -> None:
        """Export per-key live sessions, cool-downs and rejections, read from ``states``."""
        self.registry.register(_UpstreamKeysCollector(states))

    def count_key_file_reload_failure(self, label: str) -> None:
        self.key_file_reload_failures.labels(file=label).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
