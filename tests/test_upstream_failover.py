"""Several upstreams end to end: simulators on 127.0.0.1 as OpenAI-shaped upstreams,
real sockets, and the relay choosing, spreading and failing over before the client's 101."""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
import trio

from relay.config import ServeConfig, UpstreamSettings
from relay.credentials.digests import digest_hex
from relay.server import RelayServer
from relay.upstreams.table import build_upstream_table
from tests.conftest import (
    CLIENT_KEY,
    RunningRelay,
    RunningSimulator,
    open_ws,
    raw_handshake,
    start_simulator,
)

KEY_A = "sk-sim-pool-key-a-000000"
KEY_B = "sk-sim-pool-key-b-111111"
ADMIN_KEY = "admin-key-for-upstream-tests"


def bearer() -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {CLIENT_KEY}")]


async def start_routed_relay(
    nursery: trio.Nursery,
    upstreams: dict[str, UpstreamSettings],
    environ: dict[str, str],
    **overrides: Any,
) -> RunningRelay:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "client_keys": (CLIENT_KEY,),
        "upstreams": upstreams,
        "upstream_connect_timeout_s": 5.0,
        "admin_key_sha256": digest_hex(ADMIN_KEY),
    }
    config = ServeConfig(**(fields | overrides))
    server = RelayServer(config, upstreams=build_upstream_table(config, environ=environ))
    port: int = await nursery.start(server.serve)
    return RunningRelay(port=port, key=CLIENT_KEY, server=server)


def openai_like(sim: RunningSimulator | str, *keys: str, **fields: Any) -> UpstreamSettings:
    url = sim if isinstance(sim, str) else sim.ws_base
    return UpstreamSettings(kind="openai", url=url, api_key_env=keys, **fields)


def dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1"


@asynccontextmanager
async def held_sessions(relay: RunningRelay, model: str, count: int) -> AsyncIterator[None]:
    """``count`` sessions opened one after another (each past ``session.created``) and
    held open for the block, so each handshake sees the ones before it live."""
    async with trio.open_nursery() as clients:
        opened = trio.Semaphore(0)
        release = trio.Event()

        async def hold() -> None:
            async with open_ws(
                f"ws://127.0.0.1:{relay.port}/v1/realtime?model={model}", extra_headers=bearer()
            ) as ws:
                await ws.get_message()
                opened.release()
                await release.wait()

        for _ in range(count):
            clients.start_soon(hold)
            await opened.acquire()
        try:
            yield
        finally:
            release.set()


async def one_session(relay: RunningRelay, model: str = "gpt-realtime") -> dict[str, Any]:
    """Open a session, read session.created, close; the event as the client saw it."""
    import json

    async with open_ws(
        f"ws://127.0.0.1:{relay.port}/v1/realtime?model={model}",
        extra_headers=[("Authorization", f"Bearer {CLIENT_KEY}")],
    ) as ws:
        with trio.fail_after(10):
            created: dict[str, Any] = json.loads(await ws.get_message())
        return created


async def handshakes_by_outcome(relay: RunningRelay) -> dict[tuple[str, str], float]:
    """``relay_upstream_handshakes`` from ``/metrics``: (upstream, outcome) -> count."""
    async with httpx.AsyncClient() as client:
        response = await client.get(
            f"http://127.0.0.1:{relay.port}/metrics",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    counts: dict[tuple[str, str], float] = {}
    for line in response.text.splitlines():
        if line.startswith("relay_upstream_handshakes_total{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            key = (labels["upstream"].strip('"'), labels["outcome"].strip('"'))
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


async def test_sessions_spread_over_a_pool_of_keys(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery, api_keys=(KEY_A, KEY_B))
    relay = await start_routed_relay(
        nursery,
        {"openai": openai_like(sim, "KEY_A", "KEY_B")},
        {"KEY_A": KEY_A, "KEY_B": KEY_B},
    )
    # Sessions held open at once: each new one goes to the key with fewer live sessions.
    async with held_sessions(relay, "gpt-realtime", 4):
        assert dict(sim.sim.sessions_by_key_index) == {0: 2, 1: 2}
        listing = relay.server.list_upstreams()
        keys = cast(list[dict[str, object]], listing[0]["keys"])
        assert [key["live_sessions"] for key in keys] == [2, 2]


async def test_a_refused_connection_fails_over_within_the_handshake(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = await start_simulator(nursery, api_keys=(KEY_A,))
    relay = await start_routed_relay(
        nursery,
        {
            "first": openai_like(dead_url(), "KEY_A", priority=0),
            "second": openai_like(healthy, "KEY_A", priority=1),
        },
        {"KEY_A": KEY_A},
    )
    with caplog.at_level(logging.WARNING, logger="relay.upstreams"):
        created = await one_session(relay)
    assert created["type"] == "session.created"
    counts = await handshakes_by_outcome(relay)
    assert counts == {("first", "refused"): 1, ("second", "success"): 1}
    # The first upstream now cools down: the next session goes straight to the second.
    await one_session(relay)
    counts = await handshakes_by_outcome(relay)
    assert counts == {("first", "refused"): 1, ("second", "success"): 2}
    (first,) = [up for up in relay.server.list_upstreams() if up["name"] == "first"]
    assert first["keys"][0]["cool_down_s"] > 0  # type: ignore[index]
    assert KEY_A not in caplog.text


async def test_a_revoked_key_is_marked_bad_logged_once_and_skipped(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await start_simulator(nursery, api_keys=(KEY_B,))  # KEY_A is not (or no longer) valid
    relay = await start_routed_relay(
        nursery, {"openai": openai_like(sim, "KEY_A", "KEY_B")}, {"KEY_A": KEY_A, "KEY_B": KEY_B}
    )
    with caplog.at_level(logging.ERROR, logger="relay.upstreams"):
        for _ in range(3):
            assert (await one_session(relay))["type"] == "session.created"
    counts = await handshakes_by_outcome(relay)
    assert counts == {("openai", "key_rejected"): 1, ("openai", "success"): 3}
    rejected = [r for r in caplog.records if "rejected key" in r.getMessage()]
    assert len(rejected) == 1
    assert rejected[0].levelno == logging.ERROR
    assert KEY_A not in caplog.text
    assert KEY_B not in caplog.text
    states = {k["key_id"]: k for k in relay.server.list_upstreams()[0]["keys"]}  # type: ignore[attr-defined]
    assert states[digest_hex(KEY_A)[:8]]["rejected"] is True
    assert states[digest_hex(KEY_B)[:8]]["rejected"] is False
    # A reload gives the bad key another chance (it may have been replaced).
    config = relay.server.config
    relay.server.apply_config(
        config, build_upstream_table(config, environ={"KEY_A": KEY_A, "KEY_B": KEY_B})
    )
    assert not any(k["rejected"] for k in relay.server.list_upstreams()[0]["keys"])  # type: ignore[attr-defined]


async def test_the_model_chooses_the_upstream_and_an_unknown_one_is_never_dialed(
    nursery: trio.Nursery,
) -> None:
    mini = await start_simulator(nursery, api_keys=(KEY_A,))
    full = await start_simulator(nursery, api_keys=(KEY_B,))
    relay = await start_routed_relay(
        nursery,
        {
            "mini": openai_like(mini, "KEY_A", models=("gpt-realtime-mini",)),
            "full": openai_like(full, "KEY_B", models={"gpt-realtime": "gpt-realtime-2025-08-28"}),
        },
        {"KEY_A": KEY_A, "KEY_B": KEY_B},
    )
    await one_session(relay, "gpt-realtime-mini")
    created = await one_session(relay, "gpt-realtime")
    # The alias: the client asked for gpt-realtime, the upstream was asked for the snapshot.
    assert created["session"]["model"] == "gpt-realtime-2025-08-28"
    assert dict(mini.sim.sessions_by_key_index) == {0: 1}
    assert dict(full.sim.sessions_by_key_index) == {0: 1}
    for query, code in (("model=whisper-1", "model_not_found"), ("", "missing_model")):
        answer = await raw_handshake(relay.port, f"/v1/realtime?{query}", bearer())
        assert answer.status == 400
        error = answer.json()["error"]
        assert (error["param"], error["code"]) == ("model", code)
    assert await handshakes_by_outcome(relay) == {("mini", "success"): 1, ("full", "success"): 1}


async def test_every_upstream_down_answers_the_last_failure(nursery: trio.Nursery) -> None:
    relay = await start_routed_relay(
        nursery,
        {"a": openai_like(dead_url(), "KEY_A"), "b": openai_like(dead_url(), "KEY_A")},
        {"KEY_A": KEY_A},
    )
    answer = await raw_handshake(relay.port, "/v1/realtime?model=gpt-realtime", bearer())
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "upstream_unreachable"
    assert await handshakes_by_outcome(relay) == {("a", "refused"): 1, ("b", "refused"): 1}


async def test_an_upstream_at_its_session_limit_is_skipped(nursery: trio.Nursery) -> None:
    small = await start_simulator(nursery, api_keys=(KEY_A,))
    big = await start_simulator(nursery, api_keys=(KEY_A,))
    relay = await start_routed_relay(
        nursery,
        {
            "small": openai_like(small, "KEY_A", priority=0, max_sessions=1),
            "big": openai_like(big, "KEY_A", priority=1),
        },
        {"KEY_A": KEY_A},
    )
    async with open_ws(
        f"ws://127.0.0.1:{relay.port}/v1/realtime?model=gpt-realtime", extra_headers=bearer()
    ) as held:
        await held.get_message()
        await one_session(relay)
    assert sum(small.sim.sessions_by_key_index.values()) == 1
    assert sum(big.sim.sessions_by_key_index.values()) == 1


async def test_metrics_and_admin_name_key_ids_never_keys(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery, api_keys=(KEY_A, KEY_B))
    relay = await start_routed_relay(
        nursery, {"openai": openai_like(sim, "KEY_A", "KEY_B")}, {"KEY_A": KEY_A, "KEY_B": KEY_B}
    )
    await one_session(relay)
    async with httpx.AsyncClient() as client:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        metrics = (await client.get(f"http://127.0.0.1:{relay.port}/metrics", headers=headers)).text
        admin = await client.get(f"http://127.0.0.1:{relay.port}/admin/upstreams", headers=headers)
        refused = await client.get(f"http://127.0.0.1:{relay.port}/admin/upstreams")
    assert refused.status_code == 401
    assert admin.status_code == 200
    (upstream,) = admin.json()["upstreams"]
    assert upstream["name"] == "openai"
    assert upstream["kind"] == "openai"
    assert {key["key_id"] for key in upstream["keys"]} == {
        digest_hex(KEY_A)[:8],
        digest_hex(KEY_B)[:8],
    }
    for key_id in (digest_hex(KEY_A)[:8], digest_hex(KEY_B)[:8]):
        assert f'relay_upstream_key_live_sessions{{key_id="{key_id}",upstream="openai"}}' in metrics
    (used,) = [key for key in upstream["keys"] if key["handshakes"]]
    assert used["handshakes"] == {"success": 1}
    assert (
        f'relay_upstream_attempt_seconds_count{{key_id="{used["key_id"]}",upstream="openai"}} 1.0'
        in metrics
    )
    for text in (metrics, admin.text):
        assert KEY_A not in text
        assert KEY_B not in text
