"""The light counter and histogram export what prometheus-client's would, fed the same."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from relay.metrics import HANDSHAKE_BUCKETS_S, LightCounter, LightHistogram

_CREATED = re.compile(rb"^(\w+_created\{[^}]*\}) [0-9.e+]+$", re.MULTILINE)


def exposition(registry: CollectorRegistry) -> bytes:
    """``/metrics`` text with the creation times (wall clock) blanked."""
    return _CREATED.sub(rb"\1 T", generate_latest(registry))


COUNTS = [
    (("default", "200"), 1.0),
    (("default", "200"), 1.0),
    (("azure", "429"), 1.0),
    (("default", "200"), 2.5),
    (("none", "none"), 1.0),
]


def test_a_light_counter_exports_what_a_counter_would() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    counter = Counter("relay_rest_requests", "Requests.", ["upstream", "status"], registry=theirs)
    light = LightCounter("relay_rest_requests", "Requests.", ("upstream", "status"), ours)
    for labels, amount in COUNTS:
        counter.labels(*labels).inc(amount)
        light.inc(labels, amount)
    assert exposition(ours) == exposition(theirs)
    assert b'relay_rest_requests_total{status="200",upstream="default"} 4.5' in exposition(ours)


@pytest.mark.parametrize(
    "amounts",
    [
        [0.0005, 0.001, 0.0011, 0.3, 7.0, 10.0, 11.0, 0.001],  # on, under and past the bounds
        [],
    ],
)
def test_a_light_histogram_exports_what_a_histogram_would(amounts: list[float]) -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    histogram = Histogram(
        "relay_rest_first_byte_seconds",
        "First byte.",
        ["upstream"],
        buckets=HANDSHAKE_BUCKETS_S,
        registry=theirs,
    )
    light = LightHistogram(
        "relay_rest_first_byte_seconds", "First byte.", ("upstream",), HANDSHAKE_BUCKETS_S, ours
    )
    for index, amount in enumerate(amounts):
        upstream = "default" if index % 3 else "azure"
        histogram.labels(upstream).observe(amount)
        light.observe((upstream,), amount)
    assert exposition(ours) == exposition(theirs)


def test_a_counter_refuses_a_decrease_and_the_wrong_labels() -> None:
    light = LightCounter("relay_x", "X.", ("a", "b"), CollectorRegistry())
    with pytest.raises(ValueError, match="only be increased"):
        light.inc(("1", "2"), -1.0)
    with pytest.raises(ValueError, match="takes labels"):
        light.inc(("1",))
    with pytest.raises(ValueError, match="takes labels"):
        LightHistogram("relay_y", "Y.", ("a",), (1.0, 2.0), CollectorRegistry()).observe((), 1.0)
    assert light.values == {}


def test_a_name_registered_twice_is_refused() -> None:
    registry = CollectorRegistry()
    LightCounter("relay_x", "X.", ("a",), registry)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("relay_x", "X.", ["a"], registry=registry)
