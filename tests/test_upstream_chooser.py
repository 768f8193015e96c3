"""The upstream chooser, without an event loop: plans, cool-downs, bad keys, budgets.

Table tests for the ordinary cases, then a hypothesis run of random outcome
sequences checking the plan's invariants after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.upstreams.chooser import (
    FAILS_OVER,
    Attempt,
    AttemptResult,
    Change,
    ChooserPolicy,
    KeyRef,
    LiveCounts,
    Outcome,
    UpstreamCandidate,
    UpstreamHealth,
    plan_attempts,
)

POLICY = ChooserPolicy(
    default_cool_down_s=10.0,
    max_cool_down_s=60.0,
    attempt_timeout_s=5.0,
    min_attempt_s=0.5,
    max_attempts=4,
)
OPENAI = UpstreamCandidate("openai", priority=1, key_ids=("k1", "k2"))
AZURE = UpstreamCandidate("azure", priority=2, key_ids=("a1",), max_sessions=2)
NOW = 1000.0
DEADLINE = NOW + 30.0


def key(upstream: str, key_id: str) -> KeyRef:
    return KeyRef(upstream, key_id)


def keys_of(plan: tuple[Attempt, ...]) -> list[tuple[str, str]]:
    return [(attempt.key.upstream, attempt.key.key_id) for attempt in plan]


def plan(
    health: UpstreamHealth | None = None,
    live: LiveCounts | None = None,
    *,
    now: float = NOW,
    deadline: float = DEADLINE,
    candidates: tuple[UpstreamCandidate, ...] = (AZURE, OPENAI),
    tried: frozenset[KeyRef] = frozenset(),
) -> list[tuple[str, str]]:
    return keys_of(
        plan_attempts(
            candidates,
            health or UpstreamHealth(POLICY),
            live or LiveCounts(),
            now=now,
            deadline=deadline,
            tried=tried,
        )
    )


# ------------------------------------------------------------------ ordinary plans


@dataclass(frozen=True)
class PlanCase:
    name: str
    expected: list[tuple[str, str]]
    live: LiveCounts = field(default_factory=LiveCounts)
    results: tuple[AttemptResult, ...] = ()
    tried: frozenset[KeyRef] = frozenset()


PLAN_CASES = [
    PlanCase(
        "by priority, ties by lowest key id", [("openai", "k1"), ("openai", "k2"), ("azure", "a1")]
    ),
    PlanCase(
        "fewest live sessions first within an upstream",
        [("openai", "k2"), ("openai", "k1"), ("azure", "a1")],
        live=LiveCounts(by_key={key("openai", "k1"): 3, key("openai", "k2"): 1}),
    ),
    PlanCase(
        "an upstream at its max_sessions is left out",
        [("openai", "k1"), ("openai", "k2")],
        live=LiveCounts(by_upstream={"azure": 2}),
    ),
    PlanCase(
        "a 429 cools its key only",
        [("openai", "k2"), ("azure", "a1")],
        results=(AttemptResult(key("openai", "k1"), Outcome.RATE_LIMITED),),
    ),
    PlanCase(
        "a 5xx cools the whole upstream",
        [("azure", "a1")],
        results=(AttemptResult(key("openai", "k2"), Outcome.SERVER_ERROR),),
    ),
    PlanCase(
        "a refused connection cools the whole upstream",
        [("azure", "a1")],
        results=(AttemptResult(key("openai", "k1"), Outcome.REFUSED),),
    ),
    PlanCase(
        "a 401 marks its key bad",
        [("openai", "k2"), ("azure", "a1")],
        results=(AttemptResult(key("openai", "k1"), Outcome.KEY_REJECTED),),
    ),
    PlanCase(
        "a client error changes nothing",
        [("openai", "k1"), ("openai", "k2"), ("azure", "a1")],
        results=(AttemptResult(key("openai", "k1"), Outcome.CLIENT_ERROR),),
    ),
    PlanCase(
        "a success clears the cool-down",
        [("openai", "k1"), ("openai", "k2"), ("azure", "a1")],
        results=(
            AttemptResult(key("openai", "k1"), Outcome.TIMEOUT),
            AttemptResult(key("openai", "k1"), Outcome.SUCCESS),
        ),
    ),
    PlanCase(
        "only cooled-down keys left: they are the last resort",
        [("openai", "k1"), ("openai", "k2")],
        live=LiveCounts(by_upstream={"azure": 2}),
        results=(AttemptResult(key("openai", "k1"), Outcome.TIMEOUT),),
    ),
    PlanCase(
        "bad keys are not even a last resort",
        [],
        results=(
            AttemptResult(key("openai", "k1"), Outcome.KEY_REJECTED),
            AttemptResult(key("openai", "k2"), Outcome.KEY_REJECTED),
            AttemptResult(key("azure", "a1"), Outcome.KEY_REJECTED),
        ),
    ),
    PlanCase(
        "planning again leaves out what was tried",
        [("openai", "k2"), ("azure", "a1")],
        tried=frozenset({key("openai", "k1")}),
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda case: case.name)
def test_plans(case: PlanCase) -> None:
    health = UpstreamHealth(POLICY)
    for result in case.results:
        health.record(result, NOW - 1.0)
    assert plan(health, case.live, tried=case.tried) == case.expected


def test_equal_priorities_go_to_the_upstream_with_fewer_live_sessions() -> None:
    east = UpstreamCandidate("east", priority=1, key_ids=("e",))
    west = UpstreamCandidate("west", priority=1, key_ids=("w",))
    live = LiveCounts(by_upstream={"east": 5, "west": 2})
    assert plan(live=live, candidates=(east, west)) == [("west", "w"), ("east", "e")]
    assert plan(candidates=(west, east)) == [("east", "e"), ("west", "w")]  # then by name


def test_a_key_listed_twice_is_planned_once() -> None:
    twice = UpstreamCandidate("openai", priority=1, key_ids=("k1", "k1"))
    assert plan(candidates=(twice, twice)) == [("openai", "k1")]


# ------------------------------------------------------------------ the budget


@pytest.mark.parametrize(
    ("left_s", "timeouts"),
    [
        (30.0, [5.0, 5.0, 5.0]),  # three keys, each the full attempt timeout
        (12.0, [5.0, 5.0, 2.0]),  # the last one gets what is left
        (10.2, [5.0, 5.0]),  # 0.2 s is below min_attempt_s: not worth a dial
        (0.4, []),
        (0.0, []),
        (-1.0, []),
    ],
)
def test_attempt_timeouts_fit_in_what_is_left(left_s: float, timeouts: list[float]) -> None:
    attempts = plan_attempts(
        (OPENAI, AZURE), UpstreamHealth(POLICY), LiveCounts(), now=NOW, deadline=NOW + left_s
    )
    assert [attempt.timeout_s for attempt in attempts] == pytest.approx(timeouts)


def test_max_attempts_bounds_the_plan() -> None:
    many = UpstreamCandidate("many", priority=1, key_ids=tuple(f"k{i}" for i in range(10)))
    assert len(plan(candidates=(many,), deadline=NOW + 1000)) == POLICY.max_attempts


# ------------------------------------------------------------------ outcomes


@pytest.mark.parametrize(
    ("retry_after_s", "cool_down_s"),
    [
        (None, 10.0),  # no Retry-After: the default
        (3.0, 3.0),  # the upstream's own
        (0.0, 0.0),
        (3600.0, 60.0),  # bounded by max_cool_down_s
        (math.inf, 10.0),  # nonsense: the default
        (math.nan, 10.0),
        (-5.0, 10.0),
    ],
)
def test_a_429_cools_its_key_for_retry_after_bounded(
    retry_after_s: float | None, cool_down_s: float
) -> None:
    health = UpstreamHealth(POLICY)
    k1 = key("openai", "k1")
    assert health.record(AttemptResult(k1, Outcome.RATE_LIMITED, retry_after_s), NOW) is (
        Change.KEY_COOLING
    )
    assert health.key_cooling_until[k1] == NOW + cool_down_s
    if cool_down_s:
        assert health.is_cooling(k1, NOW + cool_down_s - 0.001)
    assert not health.is_cooling(k1, NOW + cool_down_s)


@pytest.mark.parametrize("outcome", [Outcome.SERVER_ERROR, Outcome.REFUSED, Outcome.TIMEOUT])
def test_host_failures_cool_the_upstream_for_the_default(outcome: Outcome) -> None:
    health = UpstreamHealth(POLICY)
    assert health.record(AttemptResult(key("openai", "k1"), outcome), NOW) is (
        Change.UPSTREAM_COOLING
    )
    assert health.upstream_cooling_until == {"openai": NOW + 10.0}
    assert health.is_cooling(key("openai", "k2"), NOW + 9.9)


def test_a_shorter_cool_down_never_cuts_a_longer_one_short() -> None:
    health = UpstreamHealth(POLICY)
    k1 = key("openai", "k1")
    health.record(AttemptResult(k1, Outcome.RATE_LIMITED, 30.0), NOW)
    health.record(AttemptResult(k1, Outcome.RATE_LIMITED, 1.0), NOW + 1)
    assert health.key_cooling_until[k1] == NOW + 30.0


def test_a_bad_key_is_reported_once_and_forgiven_by_a_reload() -> None:
    health = UpstreamHealth(POLICY)
    k1 = key("openai", "k1")
    assert health.record(AttemptResult(k1, Outcome.KEY_REJECTED), NOW) is Change.KEY_MARKED_BAD
    assert health.record(AttemptResult(k1, Outcome.KEY_REJECTED), NOW) is Change.NONE
    assert plan(health, candidates=(OPENAI,)) == [("openai", "k2")]
    health.clear_bad_keys()
    assert plan(health, candidates=(OPENAI,)) == [("openai", "k1"), ("openai", "k2")]


def test_success_reports_whether_it_cleared_anything() -> None:
    health = UpstreamHealth(POLICY)
    k1 = key("openai", "k1")
    assert health.record(AttemptResult(k1, Outcome.SUCCESS), NOW) is Change.NONE
    health.record(AttemptResult(k1, Outcome.REFUSED), NOW)
    assert health.record(AttemptResult(k1, Outcome.SUCCESS), NOW) is Change.CLEARED
    assert not health.is_cooling(k1, NOW)


def test_the_client_s_own_mistakes_are_not_failed_over() -> None:
    assert Outcome.CLIENT_ERROR not in FAILS_OVER
    assert Outcome.SUCCESS not in FAILS_OVER
    assert Outcome.RATE_LIMITED in FAILS_OVER
    assert Outcome.KEY_REJECTED in FAILS_OVER


# ------------------------------------------------------------------ properties

KEY_IDS = ("a", "b", "c")
UPSTREAM_NAMES = ("u1", "u2", "u3")


@st.composite
def candidate_tables(draw: st.DrawFn) -> tuple[UpstreamCandidate, ...]:
    names = draw(st.lists(st.sampled_from(UPSTREAM_NAMES), min_size=1, unique=True))
    return tuple(
        UpstreamCandidate(
            name,
            priority=draw(st.integers(0, 2)),
            key_ids=tuple(draw(st.lists(st.sampled_from(KEY_IDS), min_size=1, unique=True))),
            max_sessions=draw(st.integers(0, 3)),
        )
        for name in names
    )


ALL_KEYS = [KeyRef(name, key_id) for name in UPSTREAM_NAMES for key_id in KEY_IDS]
results = st.builds(
    AttemptResult,
    key=st.sampled_from(ALL_KEYS),
    outcome=st.sampled_from(Outcome),
    retry_after_s=st.none()
    | st.floats(-10, 1e6)
    | st.sampled_from([math.nan, math.inf, -math.inf]),
)
live_counts = st.builds(
    LiveCounts,
    by_key=st.dictionaries(st.sampled_from(ALL_KEYS), st.integers(0, 5)),
    by_upstream=st.dictionaries(st.sampled_from(UPSTREAM_NAMES), st.integers(0, 5)),
)
policies = st.builds(
    ChooserPolicy,
    default_cool_down_s=st.floats(0, 100),
    max_cool_down_s=st.floats(0, 100),
    attempt_timeout_s=st.floats(0.01, 20),
    min_attempt_s=st.floats(0, 5),
    max_attempts=st.integers(1, 10),
)


@settings(max_examples=300, deadline=None)
@given(
    candidates=candidate_tables(),
    policy=policies,
    steps=st.lists(
        st.tuples(results, st.floats(0, 50), live_counts, st.floats(-1, 60)), max_size=20
    ),
    tried=st.frozensets(st.sampled_from(ALL_KEYS), max_size=3),
)
def test_any_sequence_of_outcomes_keeps_the_plan_s_promises(
    candidates: tuple[UpstreamCandidate, ...],
    policy: ChooserPolicy,
    steps: list[tuple[AttemptResult, float, LiveCounts, float]],
    tried: frozenset[KeyRef],
) -> None:
    health = UpstreamHealth(policy)
    now = NOW
    priority = {candidate.name: candidate.priority for candidate in candidates}
    for result, elapsed_s, live, left_s in steps:
        health.record(result, now)
        now += elapsed_s
        deadline = now + left_s
        attempts = plan_attempts(candidates, health, live, now=now, deadline=deadline, tried=tried)
        planned = [attempt.key for attempt in attempts]

        eligible = [
            ref
            for candidate in candidates
            if not candidate.max_sessions
            or live.by_upstream.get(candidate.name, 0) < candidate.max_sessions
            for ref in candidate.key_refs()
            if ref not in tried and not health.is_bad(ref)
        ]
        fresh = [ref for ref in eligible if not health.is_cooling(ref, now)]
        # Never a bad key, a tried key or a full upstream; never a cooled-down key
        # while a fresh one is eligible.
        assert set(planned) <= set(eligible)
        if fresh:
            assert set(planned) <= set(fresh)
        # Something is planned whenever something is eligible and there is time.
        # (The time left as the chooser sees it: now + left_s - now is not always left_s.)
        seen_left_s = deadline - now
        if eligible and min(policy.attempt_timeout_s, seen_left_s) >= max(
            policy.min_attempt_s, 1e-9
        ):
            assert planned
        # No pair twice; priorities never go back up; within the attempt count.
        assert len(planned) == len(set(planned))
        assert [priority[ref.upstream] for ref in planned] == sorted(
            priority[ref.upstream] for ref in planned
        )
        assert len(planned) <= policy.max_attempts
        # The budget: every attempt worth starting, and all of them within the deadline.
        assert all(attempt.timeout_s >= policy.min_attempt_s for attempt in attempts)
        assert all(0 < attempt.timeout_s <= policy.attempt_timeout_s for attempt in attempts)
        assert sum(attempt.timeout_s for attempt in attempts) <= max(0.0, deadline - now) + 1e-9
