"""Relay tokens end to end: minting over HTTP, using them, refusals, rotation, locked config."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from relay.credentials import keyfiles
from relay.demo import run_demo
from tests.conftest import (
    Keys,
    RunningRelay,
    RunningSimulator,
    close_reason,
    open_ws,
    raw_handshake,
    start_relay,
)
from tests.sdk_client import sdk_voice_turn

MODEL = "gpt-realtime"
ORIGIN = "https://app.example"


@pytest.fixture
async def token_relay(
    nursery: trio.Nursery, simulator: RunningSimulator, keys: Keys
) -> RunningRelay:
    return await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
        allowed_origins=(ORIGIN, "https://other.example"),
        max_sessions_per_token=1,
    )


async def mint(relay: RunningRelay, key: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{relay.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {key}"},
            json=body,
        )


async def token_for(target: RunningRelay, keys: Keys, **extra: Any) -> str:
    body: dict[str, Any] = {
        "expires_after": {"anchor": "created_at", "seconds": 60},
        "session": {"type": "realtime", "model": MODEL, "max_output_tokens": 300},
    }
    body.update(extra)
    response = await mint(target, keys.app_key, body)
    assert response.status_code == 200, response.text
    value: str = response.json()["value"]
    return value


def auth(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


async def test_mint_answers_in_openai_shape(token_relay: RunningRelay, keys: Keys) -> None:
    response = await mint(
        token_relay,
        keys.app_key,
        {
            "expires_after": {"anchor": "created_at", "seconds": 120},
            "session": {"type": "realtime", "model": MODEL, "instructions": "Be brief."},
        },
    )
    assert response.status_code == 200
    secret = response.json()
    assert secret["value"].startswith("ek_")
    assert abs(secret["expires_at"] - (time.time() + 120)) < 5
    assert secret["session"]["instructions"] == "Be brief."
    assert secret["session"]["object"] == "realtime.session"
    bad_ttl = await mint(token_relay, keys.app_key, {"expires_after": {"seconds": 5}})
    assert bad_ttl.status_code == 400
    assert bad_ttl.json()["error"]["param"] == "expires_after.seconds"
    wrong_key = await mint(token_relay, "rk_wrong", {})
    assert wrong_key.status_code == 401
    assert wrong_key.json()["error"]["code"] == "invalid_api_key"


async def test_openai_sdk_turn_with_relay_token(token_relay: RunningRelay, keys: Keys) -> None:
    token = await token_for(token_relay, keys)
    summary = await sdk_voice_turn(token_relay.http_base, token_relay.ws_base, token)
    assert summary["types"][-1] == "response.done"
    assert summary["audio_deltas"] > 0


async def test_browser_subprotocol_turn_with_relay_token(
    token_relay: RunningRelay, keys: Keys
) -> None:
    token = await token_for(token_relay, keys)
    report = await run_demo(
        token_relay.ws_base, token, turns=1, speech_ms=100, auth="subprotocol", out=lambda _: None
    )
    assert report.ok, report.error


async def test_refusals_before_upgrade(token_relay: RunningRelay, keys: Keys) -> None:
    port = token_relay.port
    target = f"/v1/realtime?model={MODEL}"
    token = await token_for(token_relay, keys)
    head, kid, body, mac = token.split(".")
    tampered = ".".join((head, kid, body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1], mac))
    answer = await raw_handshake(port, target, auth(tampered))
    assert (answer.status, answer.json()["error"]["code"]) == (401, "invalid_api_key")
    assert token not in answer.body.decode()

    wrong_model = await raw_handshake(port, "/v1/realtime?model=gpt-realtime-2", auth(token))
    assert (wrong_model.status, wrong_model.json()["error"]["code"]) == (403, "model_not_allowed")

    bound = await token_for(token_relay, keys, relay={"origins": [ORIGIN]})
    other_origin = await raw_handshake(
        port, target, [*auth(bound), ("Origin", "https://other.example")]
    )
    assert (other_origin.status, other_origin.json()["error"]["code"]) == (
        403,
        "origin_not_allowed",
    )
    foreign = await raw_handshake(port, target, [*auth(token), ("Origin", "https://evil.example")])
    assert foreign.status == 403  # the global allowlist, whatever the credential

    once = await token_for(token_relay, keys, relay={"single_use": True})
    async with open_ws(f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(once)):
        pass
    replay = await raw_handshake(port, target, auth(once))
    assert (replay.status, replay.json()["error"]["code"]) == (401, "token_used")


async def test_expired_token_refused(
    nursery: trio.Nursery, simulator: RunningSimulator, keys: Keys
) -> None:
    from relay.credentials.tokens import TokenClaims
    from relay.credentials.tokens import mint as mint_token

    relay = await start_relay(
        nursery,
        simulator.ws_base,
        signing_keys_file=str(keys.signing_file),
        app_keys_file=str(keys.app_file),
    )
    ring = keyfiles.load_keyring(keys.signing_file, time.time())
    past = int(time.time()) - 100
    expired = mint_token(
        TokenClaims(jti="j", app="voice-app", issued_at=past - 60, expires_at=past), ring.active
    )
    answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", auth(expired))
    assert (answer.status, answer.json()["error"]["code"]) == (401, "expired_api_key")


async def test_signing_key_rotation_keeps_old_tokens_and_live_sessions(
    token_relay: RunningRelay, keys: Keys
) -> None:
    old_token = await token_for(token_relay, keys)
    url = f"{token_relay.ws_base}/realtime?model={MODEL}&sim_mode=raw-echo&sim_start=session"
    async with open_ws(url, extra_headers=auth(old_token)) as live:
        await live.get_message()  # session.created, carrying the lock
        keyfiles.rotate_signing_key(keys.signing_file, time.time())
        await token_relay.server.key_files.wait_polled()
        new_token = await token_for(token_relay, keys)
        assert new_token.split(".")[1] != old_token.split(".")[1]
        for token in (new_token,):
            async with open_ws(
                f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(token)
            ) as ws:
                assert json.loads(await ws.get_message())["type"] == "session.created"
        # The old token still opens sessions (a second, concurrent one is over this
        # relay's per-token limit of 1, so check it with the live one closed below).
        await live.send_message('{"type":"still.here"}')
        assert json.loads(await live.get_message())["type"] == "still.here"
    async with open_ws(
        f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(old_token)
    ) as ws:
        assert json.loads(await ws.get_message())["type"] == "session.created"


async def test_per_token_concurrency_limit_is_429(token_relay: RunningRelay, keys: Keys) -> None:
    token = await token_for(token_relay, keys)
    async with open_ws(f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(token)):
        answer = await raw_handshake(token_relay.port, f"/v1/realtime?model={MODEL}", auth(token))
        assert (answer.status, answer.json()["error"]["code"]) == (429, "rate_limit_exceeded")


async def test_token_max_session_seconds(token_relay: RunningRelay, keys: Keys) -> None:
    token = await token_for(token_relay, keys, relay={"max_session_s": 1})
    async with open_ws(
        f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(token)
    ) as ws:
        seen: list[str] = []

        async def read_until_closed() -> None:
            with trio.fail_after(10):
                while True:
                    seen.append(json.loads(await ws.get_message())["type"])

        with pytest.raises(ConnectionClosed) as info:
            await read_until_closed()
    assert "error" in seen
    assert close_reason(info.value).code == 1008
    assert close_reason(info.value).reason == "session_expired"


async def test_locked_fields_cannot_be_changed(token_relay: RunningRelay, keys: Keys) -> None:
    token = await token_for(
        token_relay,
        keys,
        session={
            "type": "realtime",
            "model": MODEL,
            "instructions": "LOCKED",
            "audio": {"output": {"voice": "marin"}},
        },
    )
    # raw-echo shows exactly what the relay forwarded upstream.
    url = f"{token_relay.ws_base}/realtime?model={MODEL}&sim_mode=raw-echo&sim_start=session"
    async with open_ws(url, extra_headers=auth(token)) as ws:
        # The lock was applied before the 101: the client's first event is the
        # session.created carrying it, and no session.updated it did not ask for.
        applied = json.loads(await ws.get_message())
        assert applied["type"] == "session.created"
        assert applied["session"]["instructions"] == "LOCKED"
        await ws.send_message(
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": "c1",
                    "session": {
                        "type": "realtime",
                        "instructions": "HACKED",
                        "audio": {"output": {"voice": "ash"}, "input": {"turn_detection": None}},
                    },
                }
            )
        )
        got = [json.loads(await ws.get_message()) for _ in range(2)]
        notice = next(e for e in got if e["type"] == "error")
        forwarded = next(e for e in got if e["type"] == "session.update")
        assert notice["error"]["code"] == "locked_field"
        assert notice["error"]["param"] == "session.instructions"
        assert notice["error"]["event_id"] == "c1"
        assert "instructions" not in forwarded["session"]
        assert forwarded["session"]["audio"] == {"output": {}, "input": {"turn_detection": None}}
        await ws.send_message(
            json.dumps(
                {
                    "type": "response.create",
                    "response": {"instructions": "HACKED", "metadata": {"k": "v"}},
                }
            )
        )
        got = [json.loads(await ws.get_message()) for _ in range(2)]
        forwarded = next(e for e in got if e["type"] == "response.create")
        assert forwarded["response"] == {"metadata": {"k": "v"}}
        # Appends pass untouched, byte for byte.
        append = '{"type":"input_audio_buffer.append","audio":"AAAA"}'
        await ws.send_message(append)
        assert await ws.get_message() == append


async def test_passthrough_mints_a_real_upstream_secret(
    token_relay: RunningRelay, keys: Keys, simulator: RunningSimulator
) -> None:
    response = await mint(
        token_relay,
        keys.passthrough_key,
        {"session": {"type": "realtime", "model": MODEL, "instructions": "Direct."}},
    )
    assert response.status_code == 200, response.text
    secret = response.json()["value"]
    assert secret.startswith("ek_")
    assert not secret.startswith("ek_r1.")
    # It is the simulator's own secret: it opens a session there directly.
    protocols = ["realtime", f"openai-insecure-api-key.{secret}"]
    async with open_ws(f"{simulator.ws_base}/realtime", subprotocols=protocols) as ws:
        created = json.loads(await ws.get_message())
        assert created["session"]["instructions"] == "Direct."


async def test_openai_agents_sdk_completes_a_locked_session(
    token_relay: RunningRelay, keys: Keys
) -> None:
    from tests.agents_client import agents_voice_turn

    token = await token_for(
        token_relay,
        keys,
        session={"type": "realtime", "model": MODEL, "instructions": "App's instructions."},
    )
    summary = await agents_voice_turn(
        f"{token_relay.ws_base}/realtime?model={MODEL}", token, instructions="Agent's own."
    )
    # The agent's own session.update tried to change the locked instructions: it was told.
    assert any("locked_field" in error for error in summary["errors"])
    assert summary["audio_chunks"] > 0
    assert "audio_end" in summary["kinds"]


async def test_app_keys_reload_without_restart_or_touching_sessions(
    token_relay: RunningRelay, keys: Keys
) -> None:
    token = await token_for(token_relay, keys)
    url = f"{token_relay.ws_base}/realtime?model={MODEL}&sim_mode=raw-echo&sim_start=session"
    async with open_ws(url, extra_headers=auth(token)) as live:
        await live.get_message()
        late_key = keyfiles.create_app_key(keys.app_file, "late-app")
        await token_relay.server.key_files.wait_polled()
        assert (await mint(token_relay, late_key, {})).status_code == 200
        assert keyfiles.revoke_app_key(keys.app_file, "voice-app")
        await token_relay.server.key_files.wait_polled()
        refused = await mint(token_relay, keys.app_key, {})
        assert refused.status_code == 401
        # The live session, opened with a token from the revoked key, is untouched.
        await live.send_message('{"type":"x.after"}')
        assert json.loads(await live.get_message())["type"] == "x.after"


async def test_app_key_concurrency_starts_per_token_and_safety_identifier(
    nursery: trio.Nursery, simulator: RunningSimulator, tmp_path: Path
) -> None:
    app_file, signing_file = tmp_path / "apps.json", tmp_path / "signing.json"
    app_key = keyfiles.create_app_key(app_file, "small-app", max_concurrent_sessions=1)
    keyfiles.rotate_signing_key(signing_file, time.time())
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(app_file),
        signing_keys_file=str(signing_file),
        max_session_starts_per_token=2,
    )
    body = {"session": {"type": "realtime", "model": MODEL}, "relay": {"user": "user-42"}}
    first = (await mint(relay, app_key, body)).json()["value"]
    second = (await mint(relay, app_key, body)).json()["value"]
    target = f"/v1/realtime?model={MODEL}"
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(first)) as ws:
        await ws.get_message()
        # The upstream got a hashed end-user id, never the raw one.
        sent = simulator.sim.last_safety_identifier
        assert sent is not None
        assert sent != "user-42"
        assert len(sent) == 32
        # Another token from the same app key: over the app key's limit of 1.
        busy = await raw_handshake(relay.port, target, auth(second))
        assert (busy.status, busy.json()["error"]["code"]) == (429, "rate_limit_exceeded")
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(first)):
        pass
    # Two sessions started with `first`: its third is refused.
    spent = await raw_handshake(relay.port, target, auth(first))
    assert spent.status == 429


async def test_a_client_waiting_for_its_own_session_updated_gets_it(
    token_relay: RunningRelay, keys: Keys
) -> None:
    """Issue 11, defect 4: the relay applied the token's config after session.created,
    so the client saw an extra session.updated first and took it for the answer to its
    own update (wrong instructions, server VAD still on). Now the config is applied
    before the 101 and the client's first session.updated is the one it asked for."""
    token = await token_for(
        token_relay,
        keys,
        session={"type": "realtime", "model": MODEL, "instructions": "LOCKED"},
    )
    async with open_ws(
        f"{token_relay.ws_base}/realtime?model={MODEL}", extra_headers=auth(token)
    ) as ws:
        created = json.loads(await ws.get_message())
        assert created["type"] == "session.created"
        assert created["session"]["instructions"] == "LOCKED"
        await ws.send_message(
            json.dumps(
                {
                    "type": "session.update",
                    "event_id": "mine",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
                }
            )
        )
        while (event := json.loads(await ws.get_message()))["type"] != "session.updated":
            assert event["type"] != "error", event
        assert event["session"]["audio"]["input"]["turn_detection"] is None
        assert event["session"]["instructions"] == "LOCKED"
