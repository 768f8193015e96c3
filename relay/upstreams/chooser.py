"""Which upstream and key a new session dials, and what a failed dial changes. Sans-I/O.

This module owns the choice made before a client's upgrade is answered: given the
upstreams that serve the client's model, their keys, what is live on each, and what
recent dials taught (:class:`UpstreamHealth`), :func:`plan_attempts` returns the
ordered attempts to make within one overall connect deadline, and
:meth:`UpstreamHealth.record` turns each attempt's :class:`Outcome` into cool-downs
and bad keys. It reads no clock and does no I/O: the shell passes ``now``.

The rules:

- Upstreams are tried by ``priority``, lowest number first; equal priorities go to
  the upstream with fewer live sessions, then by name, so two equal regions share
  the load and the order is still total.
- Within one upstream the key with the fewest live sessions goes first; ties go to
  the lowest key id. A stable order rather than a rotation keeps the plan a function
  of its inputs (tests, logs); it still spreads sessions because the shell counts a
  handshake in flight as live on its key, so the next handshake sees the difference.
- An upstream at its ``max_sessions`` is not planned at all. A key marked bad (the
  upstream answered 401/403 to it) is never planned until :meth:`UpstreamHealth.clear_bad_keys`
  (a reload). A key or upstream in a cool-down is planned only when nothing fresh is
  left: then the cooled-down ones are the last resort, in the same order, so the
  client gets the upstream's own answer (its 429 and ``Retry-After``) rather than
  a refusal the relay made up.
- What cools down what: a 429 is about the key (rate limits are per key or project),
  so it cools the key, for the upstream's ``Retry-After`` when given. A 5xx, a refused
  connection or a timeout is about the host, so it cools the whole upstream. Every
  cool-down is at most :attr:`ChooserPolicy.max_cool_down_s`, so a bogus
  ``Retry-After`` cannot park a key for a day; a new cool-down never shortens a
  longer one. A success clears the key's and its upstream's cool-downs.
- The budget: the attempts' timeouts add up to no more than what is left until the
  deadline. Each gets :attr:`ChooserPolicy.attempt_timeout_s` or what is left,
  whichever is less, and planning stops once less than
  :attr:`ChooserPolicy.min_attempt_s` is left or :attr:`ChooserPolicy.max_attempts`
  are planned. No (upstream, key) pair appears twice in a plan; the shell passes the
  pairs it already tried (``tried``) when it plans again after a failure, with the
  real time, so a fast refusal leaves its unused time to the next attempt.

Which outcomes move on to the next candidate is :data:`FAILS_OVER`: the client's own
mistakes (a 400 or 404 for a bad parameter or model) are answered, not retried.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from typing import Final

#: Seconds a key or upstream cools down after a failure that names no ``Retry-After``.
DEFAULT_COOL_DOWN_S: Final = 10.0
#: The longest cool-down, in seconds, whatever ``Retry-After`` the upstream sent.
MAX_COOL_DOWN_S: Final = 300.0
#: Seconds one dial may take when the overall deadline leaves more.
DEFAULT_ATTEMPT_TIMEOUT_S: Final = 5.0
#: Seconds below which an attempt is not worth starting (a TLS handshake alone takes more).
DEFAULT_MIN_ATTEMPT_S: Final = 0.25
#: Dials per client handshake at most, however much time is left.
DEFAULT_MAX_ATTEMPTS: Final = 4


class Outcome(enum.Enum):
    """How one dial ended, as the chooser needs to know it."""

    SUCCESS = "success"
    #: HTTP 429.
    RATE_LIMITED = "rate_limited"
    #: HTTP 5xx.
    SERVER_ERROR = "server_error"
    #: The TCP connection (or TLS) could not be opened.
    REFUSED = "refused"
    #: The handshake did not finish within its attempt's timeout.
    TIMEOUT = "timeout"
    #: HTTP 401 or 403: the upstream refused the relay's key.
    KEY_REJECTED = "key_rejected"
    #: Another 4xx (unknown model, bad parameter): the client's to fix, not retried.
    CLIENT_ERROR = "client_error"


def outcome_for_status(status: int) -> Outcome:
    """What an upstream's HTTP answer to a dial or request means for the chooser."""
    if status in (401, 403):
        return Outcome.KEY_REJECTED
    if status == 429:
        return Outcome.RATE_LIMITED
    if status >= 500:
        return Outcome.SERVER_ERROR
    if status >= 400:
        return Outcome.CLIENT_ERROR
    return Outcome.SUCCESS


#: Outcomes after which the shell tries the next attempt of the plan.
FAILS_OVER: Final = frozenset(
    {
        Outcome.RATE_LIMITED,
        Outcome.SERVER_ERROR,
        Outcome.REFUSED,
        Outcome.TIMEOUT,
        Outcome.KEY_REJECTED,
    }
)
#: Outcomes that cool the whole upstream down, not only the key.
_COOLS_UPSTREAM: Final = frozenset({Outcome.SERVER_ERROR, Outcome.REFUSED, Outcome.TIMEOUT})


@dataclass(frozen=True, slots=True, order=True)
class KeyRef:
    """One key of one upstream: the unit of live counts, cool-downs and bad marks.

    ``key_id`` is the short digest prefix logs name, never the key itself.
    """

    upstream: str
    key_id: str


@dataclass(frozen=True, slots=True)
class UpstreamCandidate:
    """An upstream that serves the client's model, as the chooser sees it."""

    name: str
    #: Lower is tried first.
    priority: int
    key_ids: tuple[str, ...]
    #: Live sessions this upstream may hold; 0 = no limit.
    max_sessions: int = 0
    #: :meth:`key_refs`, built once: a plan per REST request would build them anew.
    _key_refs: tuple[KeyRef, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        refs = tuple(KeyRef(self.name, key_id) for key_id in self.key_ids)
        object.__setattr__(self, "_key_refs", refs)

    def key_refs(self) -> tuple[KeyRef, ...]:
        return self._key_refs


@dataclass(frozen=True, slots=True)
class LiveCounts:
    """Live sessions, handshakes in flight included, per key and per upstream."""

    by_key: Mapping[KeyRef, int] = field(default_factory=dict)
    by_upstream: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChooserPolicy:
    default_cool_down_s: float = DEFAULT_COOL_DOWN_S
    max_cool_down_s: float = MAX_COOL_DOWN_S
    attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S
    min_attempt_s: float = DEFAULT_MIN_ATTEMPT_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS


@dataclass(frozen=True, slots=True)
class Attempt:
    """One dial: this key of this upstream, for at most ``timeout_s`` seconds."""

    key: KeyRef
    timeout_s: float


@dataclass(frozen=True, slots=True)
class AttemptResult:
    key: KeyRef
    outcome: Outcome
    #: The upstream's ``Retry-After`` in seconds, when it sent one (429, 503).
    retry_after_s: float | None = None


class Change(enum.Enum):
    """What :meth:`UpstreamHealth.record` changed, for the shell's log and metrics."""

    NONE = "none"
    KEY_COOLING = "key_cooling"
    UPSTREAM_COOLING = "upstream_cooling"
    #: The key was just marked bad: the one time to log it loudly.
    KEY_MARKED_BAD = "key_marked_bad"
    CLEARED = "cleared"


@dataclass(slots=True)
class UpstreamHealth:
    """What recent dials taught: cool-downs (until-times) and bad keys. One per upstream table."""

    policy: ChooserPolicy = field(default_factory=ChooserPolicy)
    key_cooling_until: dict[KeyRef, float] = field(default_factory=dict)
    upstream_cooling_until: dict[str, float] = field(default_factory=dict)
    bad_keys: set[KeyRef] = field(default_factory=set)

    def is_cooling(self, key: KeyRef, now: float) -> bool:
        return now < self.key_cooling_until.get(
            key, -math.inf
        ) or now < self.upstream_cooling_until.get(key.upstream, -math.inf)

    def is_bad(self, key: KeyRef) -> bool:
        return key in self.bad_keys

    def cool_down_s(self, retry_after_s: float | None) -> float:
        """How long a failure cools down: its ``Retry-After`` if sane, bounded."""
        policy = self.policy
        if retry_after_s is None or not math.isfinite(retry_after_s) or retry_after_s < 0:
            return min(policy.default_cool_down_s, policy.max_cool_down_s)
        return min(retry_after_s, policy.max_cool_down_s)

    def record(self, result: AttemptResult, now: float) -> Change:
        """Learn from one dial that ended at ``now``."""
        key, outcome = result.key, result.outcome
        if outcome is Outcome.SUCCESS:
            if not self.key_cooling_until and not self.upstream_cooling_until:
                return Change.NONE  # the usual success: nothing cooling, nothing to clear
            cleared = self.key_cooling_until.pop(key, None) is not None
            cleared |= self.upstream_cooling_until.pop(key.upstream, None) is not None
            return Change.CLEARED if cleared else Change.NONE
        if outcome is Outcome.KEY_REJECTED:
            if key in self.bad_keys:
                return Change.NONE
            self.bad_keys.add(key)
            return Change.KEY_MARKED_BAD
        if outcome is Outcome.CLIENT_ERROR:
            return Change.NONE
        # max(): a short Retry-After on a second failure must not cut a longer cool-down short.
        until = now + self.cool_down_s(result.retry_after_s)
        if outcome in _COOLS_UPSTREAM:
            upstreams = self.upstream_cooling_until
            upstreams[key.upstream] = max(upstreams.get(key.upstream, -math.inf), until)
            return Change.UPSTREAM_COOLING
        self.key_cooling_until[key] = max(self.key_cooling_until.get(key, -math.inf), until)
        return Change.KEY_COOLING

    def clear_bad_keys(self) -> None:
        """A reload: keys marked bad get another chance (they may have been replaced)."""
        self.bad_keys.clear()


def _ordered_keys(candidates: Iterable[UpstreamCandidate], live: LiveCounts) -> list[KeyRef]:
    """Every key of every upstream with room, in the order of the module docstring."""
    upstreams = list(candidates)
    if len(upstreams) > 1:
        upstreams.sort(key=lambda up: (up.priority, live.by_upstream.get(up.name, 0), up.name))
    ordered: list[KeyRef] = []
    seen: set[KeyRef] = set()  # an upstream or key listed twice is still tried once
    for upstream in upstreams:
        if (
            upstream.max_sessions
            and live.by_upstream.get(upstream.name, 0) >= upstream.max_sessions
        ):
            continue
        refs = upstream.key_refs()
        if len(refs) == 1:
            # One key (the usual pool): nothing to sort, the same key order as below.
            if refs[0] not in seen:
                seen.add(refs[0])
                ordered.append(refs[0])
            continue
        keys = set(refs) - seen
        seen |= keys
        ordered.extend(sorted(keys, key=lambda key: (live.by_key.get(key, 0), key.key_id)))
    return ordered


def plan_attempts(
    candidates: Iterable[UpstreamCandidate],
    health: UpstreamHealth,
    live: LiveCounts,
    *,
    now: float,
    deadline: float,
    tried: Set[KeyRef] = frozenset(),
) -> tuple[Attempt, ...]:
    """The attempts to make, in order, from ``now`` until ``deadline`` at the latest.

    Empty when no key is eligible (all bad, all upstreams full, all tried) or the
    deadline leaves no room for one attempt.
    """
    policy = health.policy
    ordered = _ordered_keys(candidates, live)
    # The filters are skipped when they cannot drop a key (the usual first plan: nothing
    # tried, bad or cooling); each test is a hash of the key.
    if tried or health.bad_keys:
        ordered = [key for key in ordered if key not in tried and not health.is_bad(key)]
    if health.key_cooling_until or health.upstream_cooling_until:
        fresh = [key for key in ordered if not health.is_cooling(key, now)]
        chosen = fresh or ordered  # the cooled-down ones only when nothing fresh is left
    else:
        chosen = ordered
    attempts: list[Attempt] = []
    left_s = deadline - now
    for key in chosen:
        if len(attempts) >= policy.max_attempts:
            break
        timeout_s = min(policy.attempt_timeout_s, left_s)
        if timeout_s < policy.min_attempt_s or timeout_s <= 0:
            break
        attempts.append(Attempt(key, timeout_s))
        left_s -= timeout_s
    return tuple(attempts)
