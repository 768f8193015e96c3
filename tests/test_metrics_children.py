"""relay.metrics.Children: a cached child is the series ``labels()`` names, once per values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

from relay.metrics import Children


def test_children_are_the_labelled_series_and_are_made_once() -> None:
    registry = CollectorRegistry()
    counter = Counter("ended", "Ended.", ["close_code", "ended_by"], registry=registry)
    children = Children(counter)
    children("1000", "client").inc()
    children("1000", "client").inc(2)
    children("1011", "relay").inc()
    assert children("1000", "client") is children("1000", "client")
    assert children("1000", "client") is counter.labels(close_code="1000", ended_by="client")
    text = generate_latest(registry).decode()
    assert 'ended_total{close_code="1000",ended_by="client"} 3.0' in text
    assert 'ended_total{close_code="1011",ended_by="relay"} 1.0' in text
