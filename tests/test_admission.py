"""Admission as one ordered decision (issue 11): a table without an event loop, the
registry's commit points, and the single-use guarantee across refusals end to end."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from relay.credentials.checkers import MISSING, AuthGrant, AuthRefusal, ReplayStore, TokenGrant
from relay.credentials.tokens import TokenClaims
from relay.dataplane.admission import AdmissionPolicy, Admitted, Occupancy, Refused, admit
from relay.metrics import RelayMetrics
from relay.protocol.handshake import RequestHead, parse_request_head
from tests.conftest import Keys, RunningRelay, RunningSimulator, open_ws, raw_handshake, start_relay
from tests.test_relay_tokens import auth, token_for

MODEL = "gpt-realtime"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
CLAIMS = TokenClaims(
    jti="jti-1", app="voice-app", issued_at=0, expires_at=10**10, user="u-hash", single_use=True
)


def head(
    *extra: str, target: str = f"/v1/realtime?model={MODEL}", method: str = "GET"
) -> RequestHead:
    lines = [
        f"{method} {target} HTTP/1.1",
        "Host: relay",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Sec-WebSocket-Key: {KEY}",
        *extra,
    ]
    parsed = parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert parsed is not None
    return parsed


@dataclass
class FixedChecker:
    """Answers every credential the same way (the real checkers are tested elsewhere)."""

    answer: AuthGrant | AuthRefusal

    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        return self.answer


TOKEN = FixedChecker(TokenGrant(credential_id="token:voice-app:jti-1", claims=CLAIMS))
STATIC = FixedChecker(AuthGrant(credential_id="key:abc"))
NO_KEY = FixedChecker(MISSING)
POLICY = AdmissionPolicy(
    max_sessions=10,
    allowed_origins=("https://app.example",),
    max_sessions_per_token=1,
    max_session_starts_per_token=3,
)
FREE = Occupancy()


def outcome(decision: Admitted | Refused) -> tuple[int, str]:
    return (101, "admitted") if isinstance(decision, Admitted) else (decision.status, decision.code)


# Each row breaks the checks from some point on: the first broken check in the
# documented order decides, whatever else is wrong.
ROWS = [
    ("valid token", head(), TOKEN, FREE, (101, "admitted")),
    ("valid static key", head(), STATIC, FREE, (101, "admitted")),
    (
        "POST beats everything",
        head("Origin: https://evil.example", method="POST"),
        NO_KEY,
        replace(FREE, draining=True),
        (405, "method_not_allowed"),
    ),
    (
        "repeated model before Origin",
        head("Origin: https://evil.example", target="/v1/realtime?model=a&model=b"),
        NO_KEY,
        FREE,
        (400, "invalid_request"),
    ),
    (
        "Origin before credential",
        head("Origin: https://evil.example"),
        NO_KEY,
        FREE,
        (403, "origin_not_allowed"),
    ),
    (
        "credential before drain",
        head(),
        NO_KEY,
        replace(FREE, draining=True),
        (401, "missing_api_key"),
    ),
    (
        "single use in flight before drain",
        head(),
        TOKEN,
        replace(FREE, draining=True, single_use_in_flight={"jti-1"}),
        (401, "token_used"),
    ),
    (
        "replay store full",
        head(),
        TOKEN,
        replace(FREE, replay_has_room=False),
        (503, "replay_store_full"),
    ),
    (
        "a full replay store does not concern static keys",
        head(),
        STATIC,
        replace(FREE, replay_has_room=False),
        (101, "admitted"),
    ),
    (
        "drain before capacity",
        head(),
        TOKEN,
        replace(FREE, draining=True, sessions=10),
        (503, "server_shutdown"),
    ),
    (
        "capacity counts handshakes in flight",
        head(),
        STATIC,
        replace(FREE, sessions=10),
        (503, "server_busy"),
    ),
    (
        "capacity before per-token limit",
        head(),
        TOKEN,
        replace(FREE, sessions=10, live_by_token={"jti-1": 1}),
        (503, "server_busy"),
    ),
    (
        "per-token live limit",
        head(),
        TOKEN,
        replace(FREE, live_by_token={"jti-1": 1}),
        (429, "rate_limit_exceeded"),
    ),
    (
        "per-token start limit",
        head(),
        TOKEN,
        replace(FREE, starts_by_token={"jti-1": 3}),
        (429, "rate_limit_exceeded"),
    ),
    (
        "per-app limit",
        head(),
        TOKEN,
        replace(FREE, live_by_app={"voice-app": 2}),
        (429, "rate_limit_exceeded"),
    ),
    (
        "static keys have no per-token limits",
        head(),
        STATIC,
        replace(FREE, live_by_token={"jti-1": 9}),
        (101, "admitted"),
    ),
]


@pytest.mark.parametrize(
    ("name", "request_head", "checker", "occupancy", "expected"), ROWS, ids=[r[0] for r in ROWS]
)
def test_admission_order(
    name: str,
    request_head: RequestHead,
    checker: FixedChecker,
    occupancy: Occupancy,
    expected: tuple[int, str],
) -> None:
    decision = admit(
        request_head,
        checker=checker,
        policy=POLICY,
        occupancy=occupancy,
        app_session_limit=lambda app: 2 if app == "voice-app" else 0,
    )
    assert outcome(decision) == expected


def test_admitted_carries_what_the_upstream_gets() -> None:
    request_head = head(
        "OpenAI-Safety-Identifier: chosen-by-client",
        target=f"/v1/realtime?model={MODEL}&api_key=sk-x&intent=y",
    )
    decision = admit(request_head, checker=TOKEN, policy=POLICY, occupancy=FREE)
    assert isinstance(decision, Admitted)
    assert decision.query.forwarded == f"model={MODEL}&intent=y"
    assert decision.query.dropped == ("api_key",)
    assert decision.upstream_headers == (("OpenAI-Safety-Identifier", "u-hash"),)
    assert decision.single_use_id == "jti-1"
    static = admit(request_head, checker=STATIC, policy=POLICY, occupancy=FREE)
    assert isinstance(static, Admitted)
    assert static.upstream_headers == ()
    assert static.single_use_id is None


def test_refusals_carry_protocol_headers() -> None:
    busy = admit(head(), checker=STATIC, policy=POLICY, occupancy=replace(FREE, sessions=10))
    assert isinstance(busy, Refused)
    assert busy.headers == (("Retry-After", "1"),)
    post = admit(head(method="POST"), checker=STATIC, policy=POLICY, occupancy=FREE)
    assert isinstance(post, Refused)
    assert post.headers == (("Allow", "GET"),)


# ------------------------------------------------------------ the registry's commit points


#: The registry only files a session by its id here.
SESSION: Any = SimpleNamespace(session_id="rs_1_test")


def test_a_single_use_token_is_spent_only_when_established() -> None:
    from relay.dataplane.registry import SessionRegistry

    metrics = RelayMetrics(live_sessions=lambda: 0, draining=lambda: 0, dropped_log_lines=lambda: 0)
    replay = ReplayStore(10)
    registry = SessionRegistry(replay, metrics)
    decision = admit(head(), checker=TOKEN, policy=POLICY, occupancy=registry.occupancy())
    assert isinstance(decision, Admitted)
    held = registry.reserve(decision)
    occupancy = registry.occupancy()
    assert occupancy.sessions == 1
    assert occupancy.single_use_in_flight == {"jti-1"}
    assert outcome(admit(head(), checker=TOKEN, policy=POLICY, occupancy=occupancy)) == (
        401,
        "token_used",
    )
    registry.release(held)  # the upstream refused: nothing is spent
    registry.release(held)  # twice is harmless
    assert registry.occupancy().sessions == 0
    assert not replay.is_spent("jti-1")
    again = registry.reserve(decision)
    assert registry.establish(again, SESSION)  # the upstream said 101
    registry.release(again)
    assert replay.is_spent("jti-1")
    # A second 101 cannot spend it.
    assert not registry.establish(registry.reserve(decision), SESSION)


# ------------------------------------------------------------ end to end


async def test_refusals_inviting_a_retry_never_burn_a_single_use_token(
    nursery: trio.Nursery, simulator: RunningSimulator, keys: Keys
) -> None:
    """Issue 11, defect 3: 503 (draining, full), 429 and 502 used to spend the token, so
    the retry those answers invite got 401 token_used."""
    relay: RunningRelay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
        max_sessions=1,
    )
    once = await token_for(relay, keys, relay={"single_use": True})
    target = f"/v1/realtime?model={MODEL}"

    relay.server.start_drain()
    assert (await raw_handshake(relay.port, target, auth(once))).status == 503
    relay.server.registry.draining = False

    upstream_down = await raw_handshake(relay.port, f"{target}&sim_fault=refuse:500", auth(once))
    assert upstream_down.status == 502

    other = await token_for(relay, keys)
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(other)) as ws:
        await ws.get_message()  # the relay is now full (max_sessions=1)
        assert (await raw_handshake(relay.port, target, auth(once))).status == 503

    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(once)) as ws:
        assert '"session.created"' in await ws.get_message()
    replay = await raw_handshake(relay.port, target, auth(once))
    assert (replay.status, replay.json()["error"]["code"]) == (401, "token_used")


def test_a_replay_store_that_filled_while_dialing_is_not_a_replay() -> None:
    """establish says None (full), not False (spent): the client gets 503, not token_used."""
    from relay.dataplane.registry import SessionRegistry

    metrics = RelayMetrics(live_sessions=lambda: 0, draining=lambda: 0, dropped_log_lines=lambda: 0)
    replay = ReplayStore(1)
    registry = SessionRegistry(replay, metrics)
    decision = admit(head(), checker=TOKEN, policy=POLICY, occupancy=registry.occupancy())
    assert isinstance(decision, Admitted)
    held = registry.reserve(decision)
    assert replay.claim("someone-else", 10**10, 0.0)  # filled while this one dialed
    assert registry.establish(held, SESSION) is None
    registry.release(held)
    assert not replay.is_spent("jti-1")
    assert registry.occupancy().sessions == 0


async def _token_relay_on(
    nursery: trio.Nursery, keys: Keys, upstream_url: str, **overrides: Any
) -> RunningRelay:
    return await start_relay(
        nursery,
        upstream_url,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
        **overrides,
    )


async def _racing_handshakes(relay: RunningRelay, token: str, upstream: Any) -> list[int]:
    """Two handshakes with one token while the upstream holds its 101, then let it go."""
    statuses: list[int] = []

    async def one() -> None:
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", auth(token))
        statuses.append(answer.status)

    async with trio.open_nursery() as racers:
        racers.start_soon(one)
        racers.start_soon(one)
        # Both admitted (or one refused) before the upstream answers anything.
        with trio.fail_after(10):
            while len(upstream.heads) + len(statuses) < 2:
                await trio.sleep(0.01)
        upstream.hold.set()
    return sorted(statuses)


async def test_concurrent_handshakes_cannot_all_slip_under_a_per_token_limit(
    nursery: trio.Nursery, keys: Keys
) -> None:
    """Handshakes still dialing count against max_sessions_per_token (they used not to)."""
    from tests.scripted_upstream import start_scripted_upstream

    upstream = await start_scripted_upstream(
        nursery, close_code=None, hold=trio.Event(), opens_like_openai=True
    )
    relay = await _token_relay_on(nursery, keys, upstream.ws_base, max_sessions_per_token=1)
    token = await token_for(relay, keys)
    assert await _racing_handshakes(relay, token, upstream) == [101, 429]


async def test_two_handshakes_racing_with_one_single_use_token(
    nursery: trio.Nursery, keys: Keys
) -> None:
    from tests.scripted_upstream import start_scripted_upstream

    upstream = await start_scripted_upstream(
        nursery, close_code=None, hold=trio.Event(), opens_like_openai=True
    )
    relay = await _token_relay_on(nursery, keys, upstream.ws_base)
    once = await token_for(relay, keys, relay={"single_use": True})
    assert await _racing_handshakes(relay, once, upstream) == [101, 401]


async def test_an_upstream_refusing_the_locked_config_opens_no_session(
    nursery: trio.Nursery, keys: Keys
) -> None:
    """502 upstream_refused_session_config, and the single-use token is still unspent."""
    import orjson

    from tests.scripted_upstream import start_scripted_upstream

    refusal = orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "no such voice"}}
    )
    upstream = await start_scripted_upstream(
        nursery, close_code=None, opens_like_openai=True, refuse_update=refusal
    )
    relay = await _token_relay_on(nursery, keys, upstream.ws_base)
    once = await token_for(relay, keys, relay={"single_use": True})
    answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", auth(once))
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "upstream_refused_session_config"
    assert not relay.server.registry.busy
    assert len(relay.server.replay) == 0  # nothing spent


async def test_drain_waits_for_a_handshake_still_dialing(nursery: trio.Nursery) -> None:
    """A handshake admitted before the drain becomes a session after it began: the drain
    ends that session too (1001) and returns only once it has closed."""
    from tests.conftest import close_reason
    from tests.scripted_upstream import start_scripted_upstream

    hold = trio.Event()
    upstream = await start_scripted_upstream(nursery, close_code=None, hold=hold)
    relay = await start_relay(nursery, upstream.ws_base)
    closes: list[int] = []

    async def client() -> None:
        import trio_websocket

        try:
            async with open_ws(
                f"{relay.ws_base}/realtime?model={MODEL}",
                extra_headers=[("Authorization", f"Bearer {relay.key}")],
            ) as ws:
                while True:
                    await ws.get_message()
        except trio_websocket.ConnectionClosed as closed:
            closes.append(close_reason(closed).code)

    drained = trio.Event()

    async def drain() -> None:
        await relay.server.drain(0, hurry=trio.Event())
        drained.set()

    async with trio.open_nursery() as inner:
        inner.start_soon(client)
        with trio.fail_after(10):
            while not upstream.heads:
                await trio.sleep(0.01)
        assert relay.server.registry.busy  # dialing, not yet a session
        inner.start_soon(drain)
        await trio.testing.wait_all_tasks_blocked()
        assert not drained.is_set()  # the handshake in flight holds the drain
        hold.set()
        with trio.fail_after(10):
            await drained.wait()
    assert closes == [1001]
    assert not relay.server.registry.busy


def test_a_full_replay_store_frees_room_exactly_when_an_id_expires() -> None:
    replay = ReplayStore(2)
    assert replay.claim("a", 100.0, 0.0)
    assert replay.claim("b", 200.0, 0.0)
    assert not replay.has_room(50.0)
    assert not replay.has_room(99.9)  # not rescanned before the earliest expiry
    assert replay.has_room(100.0)  # "a" expired
    assert replay.claim("c", 300.0, 100.0)
    assert not replay.has_room(150.0)
    assert replay.is_spent("b")
