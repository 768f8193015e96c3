"""The registry of live sessions: what is in use, and what is recorded when a session ends.

This module owns the relay's session bookkeeping, out of the listener:

- live sessions by id (the admin API lists and ends them, drain waits for them);
- handshakes in flight (they count against capacity while they dial) and the
  single-use token ids they hold, so two handshakes cannot both spend one token;
- live sessions per relay token and per app key, and sessions started per token;
- the commit points of a handshake: :meth:`SessionRegistry.reserve` when admission
  said yes (the handshake counts against capacity and against its token's and app's
  limits while it dials, so concurrent handshakes cannot all slip under a limit);
  :meth:`SessionRegistry.establish` once the upstream answered ``101``: only then
  is a single-use token spent, and the session is live (listed, drained, counted)
  before the client's ``101`` goes out; :meth:`SessionRegistry.release` whatever
  happens, which undoes the counts of a handshake that never became a session;
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

    __slots__ = ("admitted", "established", "released")

    def __init__(self, admitted: Admitted) -> None:
        self.admitted = admitted
        self.established = False
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
        #: Sessions started (or starting) per token id, and each token's expiry for pruning.
        self._start_counts: Counter[str] = Counter()
        self._token_expiry: dict[str, float] = {}
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

    @property
    def busy(self) -> bool:
        """Whether any session is live or any handshake is still dialing."""
        return bool(self.sessions) or self._pending > 0

    def reserve(self, admitted: Admitted) -> Reservation:
        """Hold capacity, the single-use id and the token's and app's counts while dialing."""
        self._pending += 1
        single_use = admitted.single_use_id
        if single_use is not None:
            self._single_use_in_flight.add(single_use)
        claims = admitted.claims
        if claims is not None:
            self._live_by_token[claims.jti] += 1
            self._live_by_app[claims.app] += 1
            self._start_counts[claims.jti] += 1
            self._token_expiry[claims.jti] = float(claims.expires_at)
        return Reservation(admitted)

    def establish(self, reservation: Reservation, session: RelaySession) -> bool | None:
        """The upstream said 101: spend a single-use token and make ``session`` live.

        Returns True, or what the replay store said instead: False (another
        handshake spent the token first), None (the store is full).
        """
        admitted = reservation.admitted
        single_use = admitted.single_use_id
        if admitted.claims is not None and single_use is not None:
            spent = self.replay.claim(single_use, admitted.claims.expires_at, time.time())
            if spent is not True:
                return spent
        reservation.established = True
        self.sessions[session.session_id] = session
        self._notify()  # a drain in progress must end this one too
        return True

    def release(self, reservation: Reservation) -> None:
        """End a reservation, established or not; safe to call twice. A handshake that
        never became a session gives back its token's and app's counts."""
        if reservation.released:
            return
        reservation.released = True
        self._pending -= 1
        single_use = reservation.admitted.single_use_id
        if single_use is not None:
            self._single_use_in_flight.discard(single_use)
        if not reservation.established:
            self._uncount(reservation.admitted.claims, start=True)
            self._notify()

    # ------------------------------------------------------------------ live sessions

    def new_session_id(self) -> str:
        return f"rs_{next(self._numbers)}_{new_id('')[:8]}"

    def remove(self, session: RelaySession, claims: TokenClaims | None) -> None:
        del self.sessions[session.session_id]
        self._uncount(claims, start=False)
        self._notify()

    def _uncount(self, claims: TokenClaims | None, *, start: bool) -> None:
        if claims is None:
            return
        counters = [(self._live_by_token, claims.jti), (self._live_by_app, claims.app)]
        if start:
            counters.append((self._start_counts, claims.jti))
        for counter, key in counters:
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]
        if len(self._token_expiry) > MAX_TRACKED_TOKENS:
            now = time.time()
            for jti in [j for j, expiry in self._token_expiry.items() if expiry <= now]:
                del self._token_expiry[jti]
                self._start_counts.pop(jti, None)

    def _notify(self) -> None:
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
                "upstream": session.upstream_name,
                "upstream_key_id": session.upstream_key_id,
                "bytes_up": session.client.bytes_received,
                "bytes_down": session.upstream.bytes_received,
                "messages_up": session.stats.messages_up,
                "messages_down": session.stats.messages_down,
            }
            for session_id, session in self.sessions.items()
        ]

    async def wait_changed(self) -> None:
        """Return once a session has ended or a handshake was released (drain waits on this)."""
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
        metrics.sessions_ended_by(client_code, ended_by).inc()
        metrics.messages_up.inc(stats.messages_up)
        metrics.messages_down.inc(stats.messages_down)
        metrics.bytes_up.inc(session.client.bytes_received)
        metrics.bytes_down.inc(session.upstream.bytes_received)
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
                metrics.usage_tokens.inc((model, kind), value)
        if ending is not None and ending.kind is EndKind.INTERNAL_ERROR:
            metrics.errors.labels(kind="session_internal_error").inc()
        if not SESSION_LOG.isEnabledFor(logging.INFO):
            return  # the line's fields cost more than the rest of a short session's record
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
