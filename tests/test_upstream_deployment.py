"""The README's deployment for real: two OpenAI keys and one Azure deployment, played by
simulators on 127.0.0.1 (one Azure-flavored, one OpenAI-flavored), with the fault hooks
driving failover: a 429 with ``Retry-After`` costs one extra connect and nothing else, a
stalled upstream costs one attempt's timeout, the last refusal reaches the client, and the
official SDK and a browser-style client complete voice turns chosen by model."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

from relay import config as cfg
from relay.config import UpstreamSettings
from relay.credentials.digests import digest_hex
from relay.simulator.faults import HandshakeRecord
from tests.conftest import (
    CLIENT_KEY,
    RunningRelay,
    RunningSimulator,
    open_ws,
    raw_handshake,
    read_until_closed,
    start_simulator,
)
from tests.sdk_client import sdk_voice_turn
from tests.test_upstream_failover import (
    ADMIN_KEY,
    handshakes_by_outcome,
    held_sessions,
    start_routed_relay,
)

README = Path(__file__).resolve().parent.parent / "README.md"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
KEY_A = "sk-sim-openai-project-a-0000"
KEY_B = "sk-sim-openai-project-b-1111"
ENV = {"AZURE_EU_KEY": AZURE_KEY, "OPENAI_KEY_A": KEY_A, "OPENAI_KEY_B": KEY_B}
DEPLOYMENT = "voice-prod"


def bearer() -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {CLIENT_KEY}")]


def readme_deployment_toml() -> str:
    """The complete TOML file of the README's "Several upstreams" section."""
    text = README.read_text()
    section = text[text.index("## Several upstreams") :]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


async def azure_simulator(nursery: trio.Nursery) -> RunningSimulator:
    """An Azure-flavored simulator with one resource key and the one deployment."""
    return await start_simulator(
        nursery, flavor="azure", api_keys=(AZURE_KEY,), azure_deployments=(DEPLOYMENT,)
    )


async def azure_only_relay(
    nursery: trio.Nursery, azure: RunningSimulator, path: str = "", **settings: Any
) -> RunningRelay:
    """A relay whose one upstream is ``azure`` (``settings``: more of its table), and
    ``serve`` settings as ``serve_*``."""
    serve = {k[len("serve_") :]: v for k, v in settings.items() if k.startswith("serve_")}
    table = {k: v for k, v in settings.items() if not k.startswith("serve_")}
    table.setdefault("models", {"gpt-realtime": DEPLOYMENT})
    upstream = UpstreamSettings(
        kind="azure",
        url=f"http://127.0.0.1:{azure.port}{path}",
        api_key_env=("AZURE_EU_KEY",),
        **table,
    )
    return await start_routed_relay(nursery, {"azure": upstream}, ENV, **serve)


async def start_deployment(
    nursery: trio.Nursery, tmp_path: Path, **serve: Any
) -> tuple[RunningRelay, RunningSimulator, RunningSimulator]:
    """The README's TOML, loaded as ``relay serve --config`` would, pointed at simulators."""
    azure = await azure_simulator(nursery)
    openai = await start_simulator(nursery, api_keys=(KEY_A, KEY_B))
    toml = (
        readme_deployment_toml()
        .replace("https://voice-eu.openai.azure.com", f"http://127.0.0.1:{azure.port}")
        .replace("wss://api.openai.com/v1", openai.ws_base)
        .replace('"<relay keys hash of the admin key>"', f'"{digest_hex(ADMIN_KEY)}"')
        .replace('"<relay keys hash of each client key>"', f'"{digest_hex(CLIENT_KEY)}"')
    )
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    config = cfg.load(cfg.ServeConfig, toml_path=path, environ={})
    # The checks relay serve runs before it starts, with the keys in the environment.
    problems = [p for p in _problems_with_env(config) if not p.startswith("serve.port")]
    assert problems == []
    fields = {name: getattr(config, name) for name in config.__struct_fields__}
    fields.update({"port": 0, "upstream_connect_timeout_s": 5.0} | serve)
    upstreams = fields.pop("upstreams")
    relay = await start_routed_relay(nursery, upstreams, ENV, **fields)
    return relay, azure, openai


def _problems_with_env(config: cfg.ServeConfig) -> list[str]:
    import os

    saved = {name: os.environ.get(name) for name in ENV}
    os.environ.update(ENV)
    try:
        return cfg.serve_config_problems(config)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def statuses(sim: RunningSimulator) -> list[tuple[str, int | None, int | None]]:
    """(model or deployment, key index, status) of each handshake the simulator saw."""
    records: list[HandshakeRecord] = list(sim.sim.handshakes)
    return [(record.model, record.key_index, record.status) for record in records]


async def browser_style_turn(relay: RunningRelay, model: str) -> str:
    """A voice turn as the browser SDKs drive one: the subprotocol key, audio in, a
    response out. Returns the model ``session.created`` named."""
    async with open_ws(
        f"ws://127.0.0.1:{relay.port}/v1/realtime?model={model}",
        subprotocols=["realtime", f"openai-insecure-api-key.{CLIENT_KEY}"],
    ) as ws:
        assert ws.subprotocol == "realtime"
        created = json.loads(await ws.get_message())
        assert created["type"] == "session.created"
        speech = base64.b64encode(b"\x10\x27" * (24_000 * 3 // 10)).decode()  # 300 ms
        for event in (
            {"type": "input_audio_buffer.append", "audio": speech},
            {"type": "input_audio_buffer.commit"},
            {"type": "response.create"},
        ):
            await ws.send_message(json.dumps(event))
        seen: list[str] = []
        with trio.fail_after(10):
            while not seen or seen[-1] != "response.done":
                seen.append(json.loads(await ws.get_message())["type"])
        assert "response.output_audio.delta" in seen
        return str(created["session"]["model"])


async def session_created(relay: RunningRelay, model: str) -> dict[str, Any]:
    async with open_ws(
        f"ws://127.0.0.1:{relay.port}/v1/realtime?model={model}", extra_headers=bearer()
    ) as ws:
        with trio.fail_after(10):
            event: dict[str, Any] = json.loads(await ws.get_message())
    return event


async def test_the_readme_deployment_routes_by_model_sdk_and_browser_clients(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, azure, openai = await start_deployment(nursery, tmp_path)
    # The unmodified SDK: gpt-realtime goes to the Azure deployment (priority 0) ...
    summary = await sdk_voice_turn(relay.http_base, relay.ws_base, CLIENT_KEY, model="gpt-realtime")
    assert summary["audio_deltas"] > 0
    (record,) = azure.sim.handshakes
    assert (record.path, record.model, record.auth_scheme) == (
        "/openai/v1/realtime",
        DEPLOYMENT,
        "api-key",
    )
    # ... and gpt-realtime-mini to OpenAI, which alone serves it.
    summary = await sdk_voice_turn(
        relay.http_base, relay.ws_base, CLIENT_KEY, model="gpt-realtime-mini"
    )
    assert summary["audio_deltas"] > 0
    assert statuses(openai) == [("gpt-realtime-mini", 0, 101)]
    # A browser-style client (the key in the subprotocol, as the JS SDKs send it)
    # completes a voice turn on each upstream, chosen by model.
    assert await browser_style_turn(relay, "gpt-realtime") == DEPLOYMENT
    assert await browser_style_turn(relay, "gpt-realtime-mini") == "gpt-realtime-mini"
    assert [status for *_, status in statuses(openai)] == [101, 101]
    assert [r.status for r in azure.sim.handshakes] == [101, 101]
    # Unknown model: 400 before any dial; neither simulator saw a handshake for it.
    answer = await raw_handshake(relay.port, "/v1/realtime?model=gpt-4o-realtime", bearer())
    assert answer.status == 400
    assert answer.json()["error"]["param"] == "model"
    assert len(azure.sim.handshakes) == 2
    assert len(openai.sim.handshakes) == 2


async def test_sessions_spread_over_the_two_openai_keys(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, _, openai = await start_deployment(nursery, tmp_path)
    async with held_sessions(relay, "gpt-realtime-mini", 6):
        assert dict(openai.sim.sessions_by_key_index) == {0: 3, 1: 3}


async def test_a_429_on_one_key_costs_one_extra_connect_and_nothing_else(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, _, openai = await start_deployment(nursery, tmp_path)
    openai.sim.faults.refuse_next(429, retry_after_s=30)
    created = await session_created(relay, "gpt-realtime-mini")
    assert created["type"] == "session.created"
    # Two handshakes upstream: the 429 on the first key, then the 101 on the other.
    assert statuses(openai) == [("gpt-realtime-mini", 0, 429), ("gpt-realtime-mini", 1, 101)]
    # The refused key cools down for its Retry-After: the next sessions skip it.
    await session_created(relay, "gpt-realtime-mini")
    assert statuses(openai)[2:] == [("gpt-realtime-mini", 1, 101)]
    key_a = digest_hex(KEY_A)[:8]
    (listed,) = [up for up in relay.server.list_upstreams() if up["name"] == "openai"]
    cooling = {key["key_id"]: key["cool_down_s"] for key in listed["keys"]}  # type: ignore[attr-defined]
    assert 25 < cooling[key_a] <= 30
    counts = await handshakes_by_outcome(relay)
    assert counts[("openai", "rate_limited")] == 1
    assert counts[("openai", "success")] == 2


async def test_when_every_key_is_rate_limited_the_client_gets_the_upstream_s_429(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, _, openai = await start_deployment(nursery, tmp_path)
    openai.sim.faults.refuse_next(429, count=2, retry_after_s=7)
    answer = await raw_handshake(relay.port, "/v1/realtime?model=gpt-realtime-mini", bearer())
    assert answer.status == 429
    assert answer.headers["retry-after"] == "7"
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    assert [status for *_, status in statuses(openai)] == [429, 429]


async def test_azure_failing_falls_back_to_openai_for_the_model_both_serve(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, azure, openai = await start_deployment(nursery, tmp_path)
    azure.sim.faults.refuse_next(503, retry_after_s=2)
    created = await session_created(relay, "gpt-realtime")
    assert created["session"]["model"] == "gpt-realtime"  # OpenAI's own name, not the deployment
    assert [r.status for r in azure.sim.handshakes] == [503]
    assert [status for *_, status in statuses(openai)] == [101]
    # The whole Azure upstream cools down after a 5xx: the next session goes to OpenAI too.
    await session_created(relay, "gpt-realtime")
    assert len(azure.sim.handshakes) == 1


async def test_a_stalled_upstream_costs_one_attempt_timeout_within_the_deadline(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    relay, azure, openai = await start_deployment(
        nursery, tmp_path, upstream_attempt_timeout_s=0.5, upstream_connect_timeout_s=5.0
    )
    azure.sim.faults.stall_next()
    started = trio.current_time()
    created = await session_created(relay, "gpt-realtime")
    assert created["type"] == "session.created"
    assert trio.current_time() - started < 5.0
    assert [r.status for r in azure.sim.handshakes] == [None]  # read, never answered
    assert [status for *_, status in statuses(openai)] == [101]
    counts = await handshakes_by_outcome(relay)
    assert counts[("azure-eu", "timeout")] == 1


async def test_a_revoked_azure_key_is_not_quoted_and_openai_takes_over(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay, azure, openai = await start_deployment(nursery, tmp_path)
    azure.sim.faults.revoke_key(AZURE_KEY)
    for _ in range(2):
        assert (await session_created(relay, "gpt-realtime"))["type"] == "session.created"
    assert [r.status for r in azure.sim.handshakes] == [401]  # marked bad: tried once
    assert len(openai.sim.handshakes) == 2
    assert AZURE_KEY not in caplog.text


async def test_an_azure_session_ends_at_the_upstream_s_cap(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    azure = await azure_simulator(nursery)
    # Azure's own is 1800 s (the default for kind = "azure"); a test cannot wait.
    relay = await azure_only_relay(nursery, azure, max_session_s=0.5)
    async with open_ws(
        f"ws://127.0.0.1:{relay.port}/v1/realtime?model=gpt-realtime", extra_headers=bearer()
    ) as ws:
        events, closed = await read_until_closed(ws)
    # The upstream's cap is the session's: the relay ends it like its own max_session_s.
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "session_expired"
    assert (closed.code, closed.reason) == (1008, "session_expired")


async def test_passthrough_client_secrets_need_an_openai_upstream(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    from relay.credentials.keyfiles import create_app_key

    azure = await azure_simulator(nursery)
    keys_file = tmp_path / "app-keys.json"
    app_key = create_app_key(keys_file, "voice", mode="passthrough")
    relay = await azure_only_relay(
        nursery, azure, models=(DEPLOYMENT,), serve_app_keys_file=str(keys_file)
    )
    import httpx

    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"http://127.0.0.1:{relay.port}/v1/realtime/client_secrets",
            headers={"Authorization": f"Bearer {app_key}"},
            json={"session": {"type": "realtime", "model": DEPLOYMENT}},
        )
    assert response.status_code == 501
    assert response.json()["error"]["code"] == "passthrough_unavailable"


async def test_azure_s_preview_form_through_the_relay(nursery: trio.Nursery) -> None:
    azure = await azure_simulator(nursery)
    relay = await azure_only_relay(
        nursery, azure, "/openai", azure_api_version="2025-04-01-preview"
    )
    assert (await session_created(relay, "gpt-realtime"))["session"]["model"] == DEPLOYMENT
    (record,) = azure.sim.handshakes
    assert (record.path, record.model, record.auth_scheme, record.status) == (
        "/openai/realtime",
        DEPLOYMENT,
        "api-key",
        101,
    )
