"""Mint-time limits end to end: ``POST /v1/realtime/client_secrets`` refuses what
``verify`` would refuse later, with OpenAI's error envelope."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import trio

from relay.credentials import keyfiles
from relay.credentials.tokens import MAX_CLAIMS_BYTES
from tests.conftest import RunningSimulator, start_relay


async def test_oversized_session_is_refused_at_mint_with_openai_envelope(
    nursery: trio.Nursery, simulator: RunningSimulator, tmp_path: Path
) -> None:
    app_file, signing_file = tmp_path / "app-keys.json", tmp_path / "signing.json"
    app_key = keyfiles.create_app_key(app_file, "voice-app")
    keyfiles.rotate_signing_key(signing_file, time.time())
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(app_file),
        signing_keys_file=str(signing_file),
    )
    # 40 KB of instructions: compresses to a short token, inflates past the limit.
    instructions = "be kind " * 5000
    assert len(instructions) > MAX_CLAIMS_BYTES
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{relay.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {app_key}"},
            json={"session": {"type": "realtime", "instructions": instructions}},
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "session_too_large",
            "session",
        )
        assert f"limit {MAX_CLAIMS_BYTES} bytes" in error["message"]
        fine = await http.post(
            f"{relay.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {app_key}"},
            json={"session": {"type": "realtime", "instructions": "be kind"}},
        )
        assert fine.status_code == 200
