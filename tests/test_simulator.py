"""The simulator as a server: real sockets, the official SDK and plain WebSocket clients."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import RunningSimulator, close_reason, open_ws, raw_handshake
from tests.sdk_client import sdk_voice_turn

MODEL = "gpt-realtime"


async def next_event(ws: object) -> dict[str, object]:
    with trio.fail_after(10):
        message = await ws.get_message()  # type: ignore[attr-defined]
    assert isinstance(message, str)
    event: dict[str, object] = json.loads(message)
    return event


async def test_openai_sdk_voice_turn_direct(simulator: RunningSimulator) -> None:
    summary = await sdk_voice_turn(simulator.http_base, simulator.ws_base, simulator.key)
    assert summary["types"][0] == "session.created"
    assert "session.updated" in summary["types"]
    assert "input_audio_buffer.committed" in summary["types"]
    assert summary["audio_deltas"] > 0
    usage = summary["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_token_details"]["audio_tokens"] > 0


async def test_browser_subprotocols_answered_with_realtime_only(
    simulator: RunningSimulator,
) -> None:
    protocols = ["realtime", f"openai-insecure-api-key.{simulator.key}", "openai-agents-sdk.1.0"]
    async with open_ws(f"{simulator.ws_base}/realtime?model={MODEL}", subprotocols=protocols) as ws:
        assert ws.subprotocol == "realtime"
        assert (await next_event(ws))["type"] == "session.created"


@pytest.mark.parametrize(
    ("headers", "code"),
    [([], "missing_api_key"), ([("Authorization", "Bearer sk-nope")], "invalid_api_key")],
)
async def test_401_with_openai_envelope(
    simulator: RunningSimulator, headers: list[tuple[str, str]], code: str
) -> None:
    answer = await raw_handshake(simulator.port, f"/v1/realtime?model={MODEL}", headers)
    assert answer.status == 401
    assert answer.json()["error"]["code"] == code


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ('{"event_id":"c1"}', "missing_required_parameter", "type"),
        ('{"type":"no.such.event","event_id":"c2"}', "invalid_value", "type"),
    ],
)
async def test_bad_events_get_error_events_and_session_stays_open(
    simulator: RunningSimulator, message: str, code: str, param: str | None
) -> None:
    auth = [("Authorization", f"Bearer {simulator.key}")]
    async with open_ws(f"{simulator.ws_base}/realtime?model={MODEL}", extra_headers=auth) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        await ws.send_message(message)
        error = await next_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == code  # type: ignore[index]
        assert error["error"]["param"] == param  # type: ignore[index]
        # Still open: a valid event is answered.
        await ws.send_message('{"type":"input_audio_buffer.clear"}')
        assert (await next_event(ws))["type"] == "input_audio_buffer.cleared"


async def test_echo_mode_answers_each_append_with_same_event_id_and_audio(
    simulator: RunningSimulator,
) -> None:
    auth = [("Authorization", f"Bearer {simulator.key}")]
    url = f"{simulator.ws_base}/realtime?model={MODEL}&sim_mode=echo"
    async with open_ws(url, extra_headers=auth) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        for index in range(3):
            await ws.send_message(
                json.dumps(
                    {
                        "type": "input_audio_buffer.append",
                        "event_id": f"e{index}",
                        "audio": "AAAAAA==",
                    }
                )
            )
            delta = await next_event(ws)
            assert delta["type"] == "response.output_audio.delta"
            assert delta["event_id"] == f"e{index}"
            assert delta["delta"] == "AAAAAA=="


async def test_stall_fault_stops_answering(simulator: RunningSimulator) -> None:
    auth = [("Authorization", f"Bearer {simulator.key}")]
    url = f"{simulator.ws_base}/realtime?model={MODEL}&sim_fault=stall"
    async with open_ws(url, extra_headers=auth) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        await ws.send_message('{"type":"input_audio_buffer.clear"}')
        with trio.move_on_after(0.5) as scope:
            await ws.get_message()
        assert scope.cancelled_caught


async def test_close_fault_sends_the_given_code(simulator: RunningSimulator) -> None:
    auth = [("Authorization", f"Bearer {simulator.key}")]
    url = f"{simulator.ws_base}/realtime?model={MODEL}&sim_fault=close:4001:custom_reason"
    async with open_ws(url, extra_headers=auth) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert (close_reason(info.value).code, close_reason(info.value).reason) == (
        4001,
        "custom_reason",
    )


async def test_drop_fault_ends_without_close_frame(simulator: RunningSimulator) -> None:
    auth = [("Authorization", f"Bearer {simulator.key}")]
    url = f"{simulator.ws_base}/realtime?model={MODEL}&sim_fault=drop"
    async with open_ws(url, extra_headers=auth) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 1006


async def test_client_secret_minted_and_used(simulator: RunningSimulator) -> None:
    async with httpx.AsyncClient() as http:
        minted = await http.post(
            f"{simulator.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {simulator.key}"},
            json={
                "expires_after": {"anchor": "created_at", "seconds": 120},
                "session": {
                    "type": "realtime",
                    "model": MODEL,
                    "instructions": "Speak like a pirate.",
                },
            },
        )
        too_long = await http.post(
            f"{simulator.http_base}/realtime/client_secrets",
            headers={"Authorization": f"Bearer {simulator.key}"},
            json={"expires_after": {"anchor": "created_at", "seconds": 7201}},
        )
    assert minted.status_code == 200, minted.text
    secret = minted.json()
    assert secret["value"].startswith("ek_")
    assert secret["session"]["instructions"] == "Speak like a pirate."
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "expires_after.seconds"
    protocols = ["realtime", f"openai-insecure-api-key.{secret['value']}"]
    # The secret opens sessions, its config applied, and may open more than one.
    for _ in range(2):
        async with open_ws(f"{simulator.ws_base}/realtime", subprotocols=protocols) as ws:
            created = await next_event(ws)
            assert created["type"] == "session.created"
            assert created["session"]["instructions"] == "Speak like a pirate."  # type: ignore[index]
            assert created["session"]["model"] == MODEL  # type: ignore[index]
