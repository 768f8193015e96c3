"""Logs, metrics and the admin API; and no secret anywhere they reach."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from relay import logs
from relay.credentials import keyfiles
from relay.credentials.digests import digest_hex
from tests.conftest import (
    CLIENT_KEY,
    RunningSimulator,
    open_ws,
    raw_handshake,
    read_until_closed,
    start_relay,
)
from tests.doubles import wait_until
from tests.sdk_client import sdk_voice_turn

MODEL = "gpt-realtime"
ADMIN_KEY = "admin-key-XYZ-0000-distinctive"


def test_redact_hides_credentials() -> None:
    text = (
        "Bearer sk-proj-ABCDEF123456 and ek_r1.kid.payload.mac and rk_abcdefghijk "
        "openai-insecure-api-key.secretvalue"
    )
    cleaned = logs.redact(text)
    for secret in ("ABCDEF123456", "kid.payload.mac", "abcdefghijk", "secretvalue"):
        assert secret not in cleaned
    assert "Bearer <redacted>" in cleaned


def test_redact_hides_keys_the_way_providers_quote_them() -> None:
    """An upstream 401 quotes the relay's key masked ("sk-proj-****abcd"): still a key."""
    cleaned = logs.redact("Incorrect API key provided: sk-proj-****abcd. You can find")
    assert "abcd" not in cleaned
    assert "****" not in cleaned


def test_full_queue_drops_and_counts_instead_of_blocking() -> None:
    gate = threading.Event()

    class BlockedStream(io.StringIO):
        def write(self, text: str) -> int:
            gate.wait(5)
            return super().write(text)

    handler = logs.QueueingHandler(BlockedStream(), max_lines=2)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("relay.test.blocked")
    logger.addHandler(handler)
    logger.propagate = False
    started = time.monotonic()
    for index in range(50):
        logger.warning("line %d", index)
    assert time.monotonic() - started < 1.0  # never waited for the stream
    assert handler.dropped >= 40
    gate.set()
    handler.flush_and_stop()
    logger.removeHandler(handler)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logs.QueueingHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    handler.flush_and_stop()
    root.removeHandler(handler)
    root.setLevel(previous)


async def test_no_secret_reaches_logs_metrics_or_errors(
    nursery: trio.Nursery, simulator: RunningSimulator, captured: io.StringIO, tmp_path: Path
) -> None:
    app_file, signing_file = tmp_path / "apps.json", tmp_path / "signing.json"
    app_key = keyfiles.create_app_key(app_file, "app")
    keyfiles.rotate_signing_key(signing_file, time.time())
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(app_file),
        signing_keys_file=str(signing_file),
        admin_key_sha256=digest_hex(ADMIN_KEY),
    )
    bodies: list[str] = []
    async with httpx.AsyncClient() as http:
        minted = await http.post(
            f"{relay.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {app_key}"},
            json={"session": {"type": "realtime", "model": MODEL}, "relay": {"user": "alice@x"}},
        )
        token = minted.json()["value"]
        bad_mint = await http.post(
            f"{relay.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {app_key}x"},
            json={},
        )
        bodies.append(bad_mint.text)
        metrics_refused = await http.get(f"http://127.0.0.1:{relay.port}/metrics")
        bodies.append(metrics_refused.text)
    summary = await sdk_voice_turn(relay.http_base, relay.ws_base, CLIENT_KEY)
    assert summary["usage"]["total_tokens"] > 0
    summary = await sdk_voice_turn(relay.http_base, relay.ws_base, token)
    for credential in (CLIENT_KEY + "x", token + "x", "sk-not-a-real-key-000111"):
        answer = await raw_handshake(
            relay.port, f"/v1/realtime?model={MODEL}", [("Authorization", f"Bearer {credential}")]
        )
        bodies.append(answer.body.decode())
    async with httpx.AsyncClient() as http:
        metrics = await http.get(
            f"http://127.0.0.1:{relay.port}/metrics",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
    assert metrics.status_code == 200
    # The log writer thread has written both end-of-session lines.
    await wait_until(lambda: captured.getvalue().count('"session_end"') >= 2)
    log_text = captured.getvalue()
    lines = [json.loads(line) for line in log_text.splitlines()]
    session_ends = [line for line in lines if line.get("event") == "session_end"]
    assert len(session_ends) == 2
    assert session_ends[0]["usage"]["total_tokens"] > 0
    assert session_ends[0]["credential_id"].startswith("key:")
    assert session_ends[1]["credential_id"].startswith("token:app:")
    assert any(line.get("event") == "access" for line in lines)
    secrets = [CLIENT_KEY, token, app_key, ADMIN_KEY, simulator.key, "alice@x"]
    for haystack in (log_text, metrics.text, *bodies):
        for secret in secrets:
            assert secret not in haystack


async def test_metrics_count_sessions_usage_and_refusals(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base)
    await sdk_voice_turn(relay.http_base, relay.ws_base, CLIENT_KEY)
    await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", [])
    await wait_until(lambda: not relay.server.live_sessions)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{relay.port}/metrics")).text
    assert 'relay_sessions_ended_total{close_code="1000",ended_by="client"} 1.0' in text
    assert 'relay_errors_total{kind="missing_api_key"} 1.0' in text
    assert 'relay_usage_tokens_total{kind="output_audio",model="gpt-realtime"}' in text
    assert "relay_handshake_seconds_count 1.0" in text
    assert 'relay_messages_total{direction="up"}' in text
    assert "relay_live_sessions 0.0" in text


async def test_admin_lists_and_ends_a_session(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, admin_key_sha256=digest_hex(ADMIN_KEY))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    url = f"{relay.ws_base}/realtime?model={MODEL}"
    async with open_ws(url, extra_headers=[("Authorization", f"Bearer {CLIENT_KEY}")]) as ws:
        await ws.get_message()
        async with httpx.AsyncClient() as http:
            refused = await http.get(f"http://127.0.0.1:{relay.port}/admin/sessions")
            listing = await http.get(f"http://127.0.0.1:{relay.port}/admin/sessions", headers=admin)
            (session,) = listing.json()["sessions"]
            ended = await http.post(
                f"http://127.0.0.1:{relay.port}/admin/sessions/{session['id']}/end", headers=admin
            )
        assert refused.status_code == 401
        assert session["credential_id"].startswith("key:")
        assert ended.status_code == 200
        events, closed = await read_until_closed(ws)
    assert events[-1]["error"]["code"] == "session_ended"
    assert closed.code == 1008
