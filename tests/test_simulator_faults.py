"""The simulator's in-process handshake faults (``sim.faults``) and handshake log.

Real sockets on 127.0.0.1: each hook programs what the next realtime handshakes
get (a refusal, a stall, a revoked key), per simulator instance, and
``sim.handshakes`` records what each one asked for and was answered. The stall is
observed on trio's autojump clock: a minute of silence costs no real time.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from relay.protocol import handshake
from relay.simulator import server
from relay.simulator.faults import HandshakeFaults, HandshakeRecord
from tests.conftest import (
    SIM_KEY,
    RunningSimulator,
    open_ws,
    raw_handshake,
    start_simulator,
)

MODEL = "gpt-realtime"
TARGET = f"/v1/realtime?model={MODEL}"
SECOND_KEY = "sk-sim-second-key-9876543210"
BEARER = [("Authorization", f"Bearer {SIM_KEY}")]
#: Virtual seconds a stalled handshake is watched for an answer that must not come.
STALL_WATCH_S = 60


async def opens(sim: RunningSimulator, headers: list[tuple[str, str]] = BEARER) -> int:
    """The status one handshake gets (101 after reading ``session.created``)."""
    answer = await raw_handshake(sim.port, TARGET, headers)
    return answer.status


def statuses(sim: RunningSimulator) -> list[int | None]:
    return [record.status for record in sim.sim.handshakes]


# --- refuse_next -------------------------------------------------------------------------


async def test_a_429_with_retry_after_then_the_next_handshake_opens(
    nursery: trio.Nursery,
) -> None:
    sim = await start_simulator(nursery)
    sim.sim.faults.refuse_next(429, retry_after_s=1.5)
    answer = await raw_handshake(sim.port, TARGET, BEARER)
    assert answer.status == 429
    assert answer.headers["retry-after"] == "2"  # whole seconds, rounded up
    assert answer.headers["retry-after-ms"] == "1500"
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert MODEL in error["message"]
    assert SIM_KEY not in answer.body.decode()
    assert await opens(sim) == 101
    # "The 429 cost one extra connect": two handshakes, one session, both on key 0.
    assert sim.sim.handshakes == [
        HandshakeRecord("/v1/realtime", MODEL, "bearer", 0, 429),
        HandshakeRecord("/v1/realtime", MODEL, "bearer", 0, 101),
    ]
    assert sim.sim.sessions_by_key_index == {0: 1}


async def test_a_429_without_retry_after_sends_no_such_header(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery)
    sim.sim.faults.refuse_next(429)
    answer = await raw_handshake(sim.port, TARGET, BEARER)
    assert answer.status == 429
    assert "retry-after" not in answer.headers
    assert "retry-after-ms" not in answer.headers


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_server_errors_for_count_handshakes(nursery: trio.Nursery, status: int) -> None:
    sim = await start_simulator(nursery)
    sim.sim.faults.refuse_next(status, count=2)
    assert sim.sim.faults.pending == 2
    for _ in range(2):
        answer = await raw_handshake(sim.port, TARGET, BEARER)
        assert answer.status == status
        assert answer.json()["error"]["type"] == "server_error"
    assert await opens(sim) == 101
    assert statuses(sim) == [status, status, 101]
    assert sim.sim.faults.pending == 0


async def test_a_given_body_is_sent_verbatim(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery)
    body = b'{"error":{"message":"custom","type":"x","param":null,"code":"y"}}'
    sim.sim.faults.refuse_next(403, body=body)
    answer = await raw_handshake(sim.port, TARGET, BEARER)
    assert (answer.status, answer.body) == (403, body)


async def test_a_refusal_comes_before_auth_and_needs_no_faults_query(
    nursery: trio.Nursery,
) -> None:
    """Programmed in process, so ``faults_enabled`` (the query hooks) is not needed."""
    sim = await start_simulator(nursery, faults_enabled=False)
    sim.sim.faults.refuse_next(503)
    assert await opens(sim, headers=[]) == 503
    assert sim.sim.handshakes == [HandshakeRecord("/v1/realtime", MODEL, "none", None, 503)]


async def test_azure_refusals_are_in_azure_shape(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery, flavor="azure")
    sim.sim.faults.refuse_next(429, retry_after_s=7)
    sim.sim.faults.refuse_next(503)
    target = "/openai/v1/realtime?model=dep"
    rate_limited = await raw_handshake(sim.port, target, [("api-key", SIM_KEY)])
    assert rate_limited.status == 429
    assert rate_limited.headers["retry-after"] == "7"
    assert rate_limited.json()["error"]["code"] == "429"
    assert "retry after 7 seconds" in rate_limited.json()["error"]["message"]
    unavailable = await raw_handshake(sim.port, target, [("api-key", SIM_KEY)])
    assert unavailable.status == 503
    assert set(unavailable.json()["error"]) == {"code", "message"}
    assert statuses(sim) == [429, 503]


def test_refuse_next_rejects_what_is_not_a_refusal() -> None:
    faults = HandshakeFaults()
    with pytest.raises(ValueError, match="4xx or 5xx"):
        faults.refuse_next(200)
    with pytest.raises(ValueError, match="count"):
        faults.refuse_next(503, count=0)
    with pytest.raises(ValueError, match="retry_after_s"):
        faults.refuse_next(429, retry_after_s=-1)
    with pytest.raises(ValueError, match="count"):
        faults.stall_next(0)
    assert faults.pending == 0


# --- stall_next ----------------------------------------------------------------------------


async def send_head(port: int, target: str = TARGET) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        handshake.upgrade_request(
            host_header=f"127.0.0.1:{port}",
            target=target,
            key=handshake.new_websocket_key(),
            headers=BEARER,
        )
    )
    return stream


async def test_a_stalled_handshake_is_read_and_never_answered(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sim = await start_simulator(nursery)
    sim.sim.faults.stall_next(count=2)
    streams = [await send_head(sim.port), await send_head(sim.port)]
    for stream in streams:
        with trio.move_on_after(STALL_WATCH_S) as watch:
            data = await stream.receive_some(1024)
            pytest.fail(f"a stalled handshake was answered: {data[:60]!r}")
        assert watch.cancelled_caught
    # Read (it is in the log, with what it asked for) but not answered.
    assert sim.sim.handshakes == [HandshakeRecord("/v1/realtime", MODEL, "bearer", 0, None)] * 2
    assert sim.sim.live_sessions == 0
    # The peer's hang-up ends the stall; the next handshake is answered as usual.
    for stream in streams:
        await stream.aclose()
    assert await opens(sim) == 101
    assert statuses(sim) == [None, None, 101]


async def test_faults_are_used_in_the_order_programmed(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    sim = await start_simulator(nursery)
    sim.sim.faults.refuse_next(429)
    sim.sim.faults.stall_next()
    sim.sim.faults.refuse_next(502)
    assert await opens(sim) == 429
    stalled = await send_head(sim.port)
    with trio.move_on_after(STALL_WATCH_S):
        await stalled.receive_some(1024)
        pytest.fail("the stall was answered")
    assert await opens(sim) == 502
    assert await opens(sim) == 101
    await stalled.aclose()
    assert statuses(sim) == [429, None, 502, 101]


# --- revoke_key ----------------------------------------------------------------------------


async def test_a_revoked_key_gets_openais_401_and_the_other_key_still_works(
    nursery: trio.Nursery,
) -> None:
    sim = await start_simulator(nursery, api_keys=(SIM_KEY, SECOND_KEY))
    sim.sim.faults.revoke_key(SIM_KEY)
    assert SIM_KEY not in repr(sim.sim.faults)
    answer = await raw_handshake(sim.port, TARGET, BEARER)
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert SIM_KEY not in answer.body.decode()
    assert await opens(sim, [("Authorization", f"Bearer {SECOND_KEY}")]) == 101
    # Revoked, not forgotten: the log still says which configured key was presented.
    assert [(r.key_index, r.status) for r in sim.sim.handshakes] == [(0, 401), (1, 101)]
    sim.sim.faults.restore_key(SIM_KEY)
    assert await opens(sim) == 101


async def test_a_revoked_key_cannot_mint_client_secrets(nursery: trio.Nursery) -> None:
    import httpx

    sim = await start_simulator(nursery)
    sim.sim.faults.revoke_key(SIM_KEY)

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{sim.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {SIM_KEY}"},
            json={"session": {"type": "realtime", "model": MODEL}},
        )
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("header", "credential"),
    [("api-key", SIM_KEY), ("Authorization", "Bearer entra-token-to-revoke")],
)
async def test_azure_revocations_get_azures_401(
    nursery: trio.Nursery, header: str, credential: str
) -> None:
    sim = await start_simulator(nursery, flavor="azure", entra_tokens=("entra-token-to-revoke",))
    target = "/openai/v1/realtime?model=dep"
    assert (await raw_handshake(sim.port, target, [(header, credential)])).status == 101
    sim.sim.faults.revoke_key(credential.removeprefix("Bearer "))
    answer = await raw_handshake(sim.port, target, [(header, credential)])
    assert answer.status == 401
    assert answer.json()["error"]["code"] == "401"
    assert credential.removeprefix("Bearer ") not in answer.body.decode()


# --- per instance ----------------------------------------------------------------------------


async def test_two_simulators_are_two_upstreams(nursery: trio.Nursery) -> None:
    first = await start_simulator(nursery)
    second = await start_simulator(nursery, flavor="azure")
    first.sim.faults.refuse_next(503)
    second.sim.faults.revoke_key(SIM_KEY)
    assert await opens(first) == 503
    assert await opens(first) == 101
    azure_target = "/openai/v1/realtime?model=dep"
    answer = await raw_handshake(second.port, azure_target, [("api-key", SIM_KEY)])
    assert answer.status == 401
    # The first's revocation list is its own: its key still works there.
    assert await opens(first) == 101
    assert statuses(first) == [503, 101, 101]
    assert second.sim.handshakes == [
        HandshakeRecord("/openai/v1/realtime", "dep", "api-key", 0, 401)
    ]


# --- the handshake log -------------------------------------------------------------------


async def test_the_log_records_scheme_key_index_and_status(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery, api_keys=(SIM_KEY, SECOND_KEY))
    browser = [f"openai-insecure-api-key.{SECOND_KEY}", "realtime"]
    async with open_ws(f"{sim.ws_base}/realtime?model=gpt-realtime-mini", subprotocols=browser):
        pass
    assert await opens(sim, [("Authorization", f"Bearer {SECOND_KEY}")]) == 101
    assert await opens(sim, [("Authorization", "Bearer sk-not-a-key-0000000000")]) == 401
    assert await opens(sim, []) == 401
    no_model = await raw_handshake(sim.port, "/v1/realtime", BEARER)
    assert no_model.status == 400
    assert sim.sim.handshakes == [
        HandshakeRecord("/v1/realtime", "gpt-realtime-mini", "subprotocol", 1, 101),
        HandshakeRecord("/v1/realtime", MODEL, "bearer", 1, 101),
        HandshakeRecord("/v1/realtime", MODEL, "bearer", None, 401),
        HandshakeRecord("/v1/realtime", MODEL, "none", None, 401),
        HandshakeRecord("/v1/realtime", "", "bearer", 0, 400),
    ]
    # "Sessions spread over two keys" reads from the same place.
    assert sim.sim.sessions_by_key_index == {1: 2}
    assert SECOND_KEY not in repr(sim.sim.handshakes)
    assert SIM_KEY not in repr(sim.sim.handshakes)


async def test_the_log_keeps_only_the_latest_records(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "HANDSHAKE_LOG_MAX_RECORDS", 3)
    sim = await start_simulator(nursery)
    for status in (500, 501, 502, 503):
        sim.sim.faults.refuse_next(status)
    for _ in range(5):
        await opens(sim)
    assert statuses(sim) == [502, 503, 101]


async def test_paths_that_are_not_realtime_handshakes_are_not_logged(
    simulator: RunningSimulator,
) -> None:
    answer = await raw_handshake(simulator.port, "/v1/other", BEARER)
    assert answer.status == 404
    assert simulator.sim.handshakes == []


def test_records_and_faults_show_no_secret() -> None:
    faults = HandshakeFaults()
    faults.revoke_key(SIM_KEY)
    faults.refuse_next(429, retry_after_s=1)
    shown: dict[str, Any] = {"faults": repr(faults)}
    shown["record"] = repr(HandshakeRecord("/v1/realtime", MODEL, "bearer", 0, 101))
    assert SIM_KEY not in json.dumps(shown)
    assert repr(faults) == "HandshakeFaults(planned=1, revoked=1)"
    faults.clear()
    assert repr(faults) == "HandshakeFaults(planned=0, revoked=0)"
    assert not faults.is_revoked(SIM_KEY)
