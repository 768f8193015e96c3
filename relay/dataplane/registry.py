"""The registry of live sessions: what is in use, and what is recorded when a session ends.

This module owns the relay's session bookkeeping, out of the listener:

- live sessions by id (the admin API lists and ends them, drain waits for them);
- handshakes in flight (they count against capacity while they dial) and the
  single-use token ids they hold, so two handshakes cannot both spend one token;
- live sessions per relay token and per app key, and sessions started per token;
- the commit points of a handshake: :meth:`SessionRegistry.reserve` when admission
  said yes, :meth:`SessionRegistry.establish` once the upstream answered ``101``
  (only then is a single-use token spent and a start counted), and the reservation
  released whatever happens (:meth:`SessionRegistry.release`);
- the end-of-session record: metrics and the one log line per session.

:meth:`SessionRegistry.occupancy` is the view admission reads
(:mod:`relay.dataplane.admission`). No sockets here; the drain wait is the only
Trio primitive (an event replaced each time a session ends).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Final

import trio

from relay.credentials.checkers import ReplayStore
from relay.credentials.tokens import TokenClaims
from relay.dataplane.admission import Admitted, Occupancy
from relay.dataplane.policy import Ending, EndKind
from relay.dataplane.session import RelaySession
from relay.metrics import RelayMetrics
from relay.protocol.events import new_id

SESSION_LOG = logging.getLogger("relay.session")
#: Token ids whose start counts are kept before expired ones are pruned.
MAX_TRACKED_TOKENS: Final = 100_000
#: Usage kinds reported as ``relay_usage_tokens{kind=...}``.
USAGE_KINDS: Final = (
    "input_text",
    "input_audio",
    "input_image",
    "input_cached",
    "output_text",
    "output_audio",
)


@dataclass(frozen=True, slots=True)
class SessionContext:
    """Who a session is for, kept for its end-of-session record."""

    credential_id: str
    claims: TokenClaims | None
    client_address: str


class Reservation:
    """A handshake's hold on capacity (and a single-use id) while it dials."""

    __slots__ = ("admitted", "released")

    def __init__(self, admitted: Admitted) -> None:
        self.admitted = admitted
        self.released = False


class SessionRegistry:
    """Live sessions and handshakes in flight, with their per-credential counts."""

    def __init__(self, replay: ReplayStore, metrics: RelayMetrics) -> None:
        self.replay = replay
        self.metrics = metrics
        self.sessions: dict[str, RelaySession] = {}
        self.draining = False
        self._pending = 0
        self._single_use_in_flight: set[str] = set()
        self._live_by_token: Counter[str] = Counter()
        self._live_by_app: Counter[str] = Counter()
        #: Sessions started per token id, with the token's expiry for pruning.
        self._starts_by_token: dict[str, tuple[int, float]] = {}
        self._start_counts: dict[str, int] = {}
        self._numbers = itertools.count(1)
        self._changed = trio.Event()

    # ------------------------------------------------------------------ admission

    def occupancy(self) -> Occupancy:
        return Occupancy(
            draining=self.draining,
            sessions=len(self.sessions) + self._pending,
            live_by_token=self._live_by_token,
            starts_by_token=self._start_counts,
            live_by_app=self._live_by_app,
            single_use_in_flight=self._single_use_in_flight,
            replay_has_room=self.replay.has_room(time.time()),
        )

    def reserve(self, admitted: Admitted) -> Reservation:
        """Hold capacity (and the single-use id) for a handshake that is about to dial."""
        self._pending += 1
        single_use = admitted.single_use_id
        if single_use is not None:
            self._single_use_in_flight.add(single_use)
        return Reservation(admitted)

    def release(self, reservation: Reservation) -> None:
        """End a reservation, established or not; safe to call twice."""
        if reservation.released:
            return
        reservation.released = True
        self._pending -= 1
        single_use = reservation.admitted.single_use_id
        if single_use is not None:
            self._single_use_in_flight.discard(single_use)

    def establish(self, reservation: Reservation) -> bool:
        """The upstream said 101: spend a single-use token. False if it cannot be spent."""
        claims = reservation.admitted.claims
        single_use = reservation.admitted.single_use_id
        if claims is not None and single_use is not None:
            spent = self.replay.claim(single_use, claims.expires_at, time.time())
            if spent is not True:
                return False
        return True

    # ------------------------------------------------------------------ live sessions

    def new_session_id(self) -> str:
        return f"rs_{next(self._numbers)}_{new_id('')[:8]}"

    def add(self, session: RelaySession, claims: TokenClaims | None) -> None:
        self.sessions[session.session_id] = session
        if claims is None:
            return
        self._live_by_token[claims.jti] += 1
        self._live_by_app[claims.app] += 1
        count = self._starts_by_token.get(claims.jti, (0, 0.0))[0] + 1
        self._starts_by_token[claims.jti] = (count, float(claims.expires_at))
        self._start_counts[claims.jti] = count
        if len(self._starts_by_token) > MAX_TRACKED_TOKENS:
            now = time.time()
            self._starts_by_token = {k: v for k, v in self._starts_by_token.items() if v[1] > now}
            self._start_counts = {k: v[0] for k, v in self._starts_by_token.items()}

    def remove(self, session: RelaySession, claims: TokenClaims | None) -> None:
        del self.sessions[session.session_id]
        if claims is not None:
            for counter, key in (
                (self._live_by_token, claims.jti),
                (self._live_by_app, claims.app),
            ):
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]
        self._changed.set()
        self._changed = trio.Event()

    def end_all(self, kind: EndKind = EndKind.SHUTDOWN) -> None:
        for session in list(self.sessions.values()):
            session.end(Ending(kind))

    def end(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.end(Ending(EndKind.ADMIN))
        return True

    def listing(self) -> list[dict[str, object]]:
        now = trio.current_time()
        return [
            {
                "id": session_id,
                "age_s": round(now - session.stats.started_at, 3),
                "model": session.stats.tap.upstream_model,
                "credential_id": session.credential_id,
                "bytes_up": session.client.bytes_received,
                "bytes_down": session.upstream.bytes_received,
                "messages_up": session.stats.messages_up,
                "messages_down": session.stats.messages_down,
            }
            for session_id, session in self.sessions.items()
        ]

    async def wait_changed(self) -> None:
        """Return once a session has ended (drain waits on this)."""
        await self._changed.wait()

    # ------------------------------------------------------------------ the record

    def record_end(self, session: RelaySession, context: SessionContext) -> None:
        """Metrics and the end-of-session log line for one finished session."""
        stats = session.stats
        ending = stats.ending
        plan = session.close_plan
        client_close = plan.client if plan is not None else None
        upstream_close = plan.upstream if plan is not None else None
        ended_by = ending.side.value if ending and ending.side else "relay"
        client_code = str(client_close.code) if client_close and client_close.send_close else "none"
        metrics = self.metrics
        metrics.sessions_ended.labels(close_code=client_code, ended_by=ended_by).inc()
        metrics.messages.labels(direction="up").inc(stats.messages_up)
        metrics.messages.labels(direction="down").inc(stats.messages_down)
        metrics.bytes.labels(direction="up").inc(session.client.bytes_received)
        metrics.bytes.labels(direction="down").inc(session.upstream.bytes_received)
        usage = stats.tap.usage
        model = stats.tap.upstream_model or "unknown"
        counts = (
            usage.input_text_tokens,
            usage.input_audio_tokens,
            usage.input_image_tokens,
            usage.input_cached_tokens,
            usage.output_text_tokens,
            usage.output_audio_tokens,
        )
        for kind, value in zip(USAGE_KINDS, counts, strict=True):
            if value:
                metrics.usage_tokens.labels(model=model, kind=kind).inc(value)
        if ending is not None and ending.kind is EndKind.INTERNAL_ERROR:
            metrics.errors.labels(kind="session_internal_error").inc()
        claims = context.claims
        SESSION_LOG.info(
            "session ended",
            extra={
                "fields": {
                    "event": "session_end",
                    "session_id": session.session_id,
                    "upstream_session_id": stats.tap.upstream_session_id,
                    "client": context.client_address,
                    "credential_id": context.credential_id,
                    "model": stats.tap.upstream_model,
                    "duration_s": round(trio.current_time() - stats.started_at, 3),
                    "messages_up": stats.messages_up,
                    "messages_down": stats.messages_down,
                    "bytes_up": session.client.bytes_received,
                    "bytes_down": session.upstream.bytes_received,
                    "ended_by": ended_by,
                    "end_kind": ending.kind.value if ending else None,
                    "client_close": [client_close.code, client_close.reason]
                    if client_close
                    else None,
                    "upstream_close": (
                        [upstream_close.code, upstream_close.reason] if upstream_close else None
                    ),
                    "locked_fields_removed": stats.locked_fields_removed,
                    "usage": {
                        "responses": usage.responses,
                        "total_tokens": usage.total_tokens,
                        **dict(zip(USAGE_KINDS, counts, strict=True)),
                    },
                    "token_app": claims.app if claims else None,
                }
            },
        )
