"""Which upstream and key a new session gets: the failover loop, before the client's 101.

This module owns the shell around the chooser (:mod:`relay.upstreams.chooser`):
for one admitted handshake it plans the attempts over the upstreams that serve the
client's model, dials them one after another (:func:`~relay.dataplane.upstream.dial_upstream`),
tells :class:`~relay.upstreams.chooser.UpstreamHealth` how each ended, and plans
again with the real time after each failure, all within one overall connect
deadline. The client sees only the final answer: the session, or the last
upstream's refusal (its status, body and ``Retry-After``), or 502/504.

A dial in flight counts as live on its key (:class:`~relay.upstreams.table.LiveSessions`),
so concurrent handshakes spread over a pool; the count is kept for the session
that succeeds (:class:`Routed` hands it to the caller, who releases it when the
session ends) and released at once for an attempt that fails.

What each outcome does (the chooser's docstring has the rules): a 429 cools the
key down (for its ``Retry-After``), a 5xx, refused connection or timeout cools the
upstream down, a 401/403 marks the key bad until the next reload and is logged at
ERROR once; a client error (404 unknown model, 400) is answered at once.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import trio

from relay.dataplane.upstream import UpstreamRefused, auth_failed, dial_upstream, timed_out
from relay.metrics import RelayMetrics, UpstreamKeyState
from relay.net.websocket import WebSocket
from relay.protocol.events import http_error_body
from relay.protocol.handshake import RealtimeQuery
from relay.upstreams.chooser import (
    FAILS_OVER,
    AttemptResult,
    Change,
    KeyRef,
    Outcome,
    UpstreamHealth,
    plan_attempts,
)
from relay.upstreams.table import LiveSessions, Upstream, UpstreamTable
from relay.upstreams.urls import handshake_target

LOGGER = logging.getLogger("relay.upstreams")

#: Seconds a client is asked to wait when every upstream for its model is full.
UPSTREAMS_FULL_RETRY_AFTER_S: Final = 1


@dataclass(frozen=True, slots=True)
class Routed:
    """A dialed upstream leg: the session holds ``key``'s live count until it ends."""

    websocket: WebSocket
    upstream: Upstream
    key: KeyRef
    #: Dials this handshake made, the successful one included.
    attempts: int


@dataclass(slots=True)
class Router:
    """The upstream table of the moment, with what outlives a reload (health, live counts)."""

    table: UpstreamTable
    health: UpstreamHealth
    live: LiveSessions
    metrics: RelayMetrics
    #: Dials by key and outcome since start, for the admin API (``/metrics`` has them too).
    outcomes: Counter[tuple[KeyRef, str]] = field(default_factory=Counter)

    async def dial(
        self,
        upstreams: tuple[Upstream, ...],
        query: RealtimeQuery,
        *,
        extra_headers: tuple[tuple[str, str], ...],
        max_message_bytes: int,
        timeout_s: float,
    ) -> Routed:
        """Dial ``upstreams`` (those serving the client's model) until one accepts.

        Raises :class:`UpstreamRefused` with the answer for the client.
        """
        by_name = {upstream.name: upstream for upstream in upstreams}
        candidates = [upstream.candidate() for upstream in upstreams]
        health, live = self.health, self.live
        deadline = trio.current_time() + timeout_s
        tried: set[KeyRef] = set()
        last: UpstreamRefused | None = None
        while True:
            now = trio.current_time()
            plan = plan_attempts(
                candidates, health, live.counts(), now=now, deadline=deadline, tried=tried
            )
            if not plan:
                raise last if last is not None else self._nothing_to_try(upstreams, deadline)
            attempt = plan[0]
            key = attempt.key
            upstream = by_name[key.upstream]
            tried.add(key)
            live.add(key)
            started = trio.current_time()
            try:
                target = handshake_target(
                    upstream.spec,
                    query,
                    upstream.key(key.key_id).credential(),
                    extra_headers=extra_headers,
                )
                websocket = await dial_upstream(
                    target,
                    ssl_context=upstream.ssl_context,
                    resumption=upstream.resumption,
                    max_message_bytes=max_message_bytes,
                    timeout_s=attempt.timeout_s,
                )
            except UpstreamRefused as refusal:
                live.remove(key)
                self.learn(key, refusal.outcome, refusal.retry_after_s, refusal.detail)
                if refusal.outcome not in FAILS_OVER:
                    raise
                last = refusal
                continue
            except BaseException:
                live.remove(key)
                raise
            self.learn(key, Outcome.SUCCESS, None, "")
            self.metrics.upstream_connect_seconds.observe(trio.current_time() - started)
            self.metrics.upstream_attempt_seconds_by(key.upstream, key.key_id).observe(
                trio.current_time() - started
            )
            return Routed(websocket, upstream, key, attempts=len(tried))

    def key_states(self) -> list[UpstreamKeyState]:
        """Every key of the table now, for ``/metrics`` and the admin API."""
        now = trio.current_time()
        health, by_key = self.health, self.live.by_key
        states: list[UpstreamKeyState] = []
        for key in self.table.key_refs():
            until = max(
                health.key_cooling_until.get(key, now),
                health.upstream_cooling_until.get(key.upstream, now),
            )
            states.append(
                UpstreamKeyState(
                    upstream=key.upstream,
                    key_id=key.key_id,
                    live_sessions=by_key.get(key, 0),
                    cooling_s=round(max(0.0, until - now), 3),
                    rejected=health.is_bad(key),
                    handshakes={
                        outcome.value: self.outcomes[(key, outcome.value)]
                        for outcome in Outcome
                        if self.outcomes[(key, outcome.value)]
                    },
                )
            )
        return states

    def learn(
        self, key: KeyRef, outcome: Outcome, retry_after_s: float | None, detail: str
    ) -> None:
        """One dial's (or REST attempt's) outcome: health, the counter, the log."""
        change = self.health.record(AttemptResult(key, outcome, retry_after_s), trio.current_time())
        value = outcome.value  # (an enum's value is a descriptor call each time)
        self.metrics.upstream_handshakes.inc((key.upstream, key.key_id, value))
        self.outcomes[(key, value)] += 1
        if change is Change.KEY_MARKED_BAD:
            LOGGER.error(
                "upstream %s rejected key %s (HTTP 401/403): it is not used again until a "
                "reload; %s",
                key.upstream,
                key.key_id,
                detail,
            )
        elif outcome is not Outcome.SUCCESS:
            LOGGER.warning(
                "upstream %s key %s: %s (%s)%s",
                key.upstream,
                key.key_id,
                outcome.value,
                detail,
                f"; cooling down ({change.value})" if change is not Change.NONE else "",
            )

    def _nothing_to_try(self, upstreams: tuple[Upstream, ...], deadline: float) -> UpstreamRefused:
        """The answer when no attempt could even be planned."""
        keys = [KeyRef(up.name, key.key_id) for up in upstreams for key in up.keys]
        if keys and all(self.health.is_bad(key) for key in keys):
            return auth_failed("every key of every upstream for this model was rejected (401/403)")
        if trio.current_time() >= deadline:
            return timed_out("no time left for another upstream attempt")
        return UpstreamRefused(
            503,
            http_error_body(
                "Every upstream for this model is at its session limit; retry shortly.",
                error_type="server_error",
                code="upstream_busy",
            ),
            detail="every upstream for this model is at its max_sessions",
            outcome=Outcome.SERVER_ERROR,
            retry_after_s=UPSTREAMS_FULL_RETRY_AFTER_S,
        )
