"""The session policy as a table: every ending maps to both legs' closes. No event loop."""

from __future__ import annotations

import orjson
import pytest

from relay.dataplane.policy import (
    ClosePlan,
    Ending,
    EndKind,
    Side,
    UpstreamTap,
    plan_close,
)


def error_code(plan_event: bytes | None) -> str | None:
    if plan_event is None:
        return None
    event = orjson.loads(plan_event)
    assert event["type"] == "error"
    assert set(event["error"]) == {"type", "code", "message", "param", "event_id"}
    return str(event["error"]["code"])


@pytest.mark.parametrize("side", [Side.CLIENT, Side.UPSTREAM])
def test_close_frames_pass_verbatim(side: Side) -> None:
    plan = plan_close(Ending(EndKind.CLOSED, side, 4000, "invalid_request_error.x"))
    assert (plan.client.code, plan.client.reason) == (4000, "invalid_request_error.x")
    assert (plan.upstream.code, plan.upstream.reason) == (4000, "invalid_request_error.x")
    assert plan.client.error_event is None


def test_no_status_close_is_passed_as_no_status() -> None:
    plan = plan_close(Ending(EndKind.CLOSED, Side.UPSTREAM, 1005, ""))
    assert plan.client.code is None


@pytest.mark.parametrize(
    ("ending", "client_code", "told", "upstream_code"),
    [
        (Ending(EndKind.DROPPED, Side.UPSTREAM), 1011, "upstream_connection_lost", None),
        (Ending(EndKind.DROPPED, Side.CLIENT), None, None, 1001),
        (Ending(EndKind.TOO_BIG, Side.CLIENT, 1009, "x"), 1009, "message_too_big", 1001),
        (Ending(EndKind.TOO_BIG, Side.UPSTREAM, 1009, "x"), 1009, "message_too_big", 1009),
        (Ending(EndKind.PROTOCOL_ERROR, Side.CLIENT, 1002, "x"), 1002, None, 1001),
        (
            Ending(EndKind.PROTOCOL_ERROR, Side.UPSTREAM, 1002, "x"),
            1011,
            "upstream_protocol_error",
            1002,
        ),
        (Ending(EndKind.DEAD_PEER, Side.UPSTREAM), 1011, "upstream_timeout", None),
        (Ending(EndKind.IDLE_TIMEOUT), 1008, "idle_timeout", 1000),
        (Ending(EndKind.SESSION_EXPIRED), 1008, "session_expired", 1000),
        (Ending(EndKind.SHUTDOWN), 1001, "server_shutdown", 1001),
        (Ending(EndKind.INTERNAL_ERROR), 1011, "internal_error", 1001),
    ],
)
def test_relay_endings(
    ending: Ending, client_code: int | None, told: str | None, upstream_code: int | None
) -> None:
    plan: ClosePlan = plan_close(ending)
    if client_code is None:
        assert not plan.client.send_close
    else:
        assert plan.client.code == client_code
    assert error_code(plan.client.error_event) == told
    if upstream_code is None:
        assert not plan.upstream.send_close
    else:
        assert plan.upstream.code == upstream_code
    # Retryable codes (1011-1013) only where retrying can help.
    if ending.kind in (EndKind.IDLE_TIMEOUT, EndKind.SESSION_EXPIRED):
        assert plan.client.code not in (1011, 1012, 1013)


def test_tap_sums_usage_and_learns_session() -> None:
    tap = UpstreamTap()
    tap.observe_text(
        b'{"event_id":"e","type":"session.created","session":{"id":"sess_1","model":"gpt-realtime"}}'
    )
    done = {
        "type": "response.done",
        "response": {
            "status": "completed",
            "usage": {
                "total_tokens": 30,
                "input_tokens": 20,
                "output_tokens": 10,
                "input_token_details": {"text_tokens": 5, "audio_tokens": 15, "cached_tokens": 4},
                "output_token_details": {"text_tokens": 3, "audio_tokens": 7},
            },
        },
    }
    tap.observe_text(orjson.dumps(done))
    tap.observe_text(memoryview(orjson.dumps(done)))
    tap.observe_text(b'{"type":"response.output_audio.delta","delta":"AAAA"}')
    tap.observe_text(b'{"type":"error","error":{}}')
    tap.observe_text(b"not json")
    assert tap.upstream_session_id == "sess_1"
    assert tap.upstream_model == "gpt-realtime"
    assert tap.usage.responses == 2
    assert tap.usage.total_tokens == 60
    assert tap.usage.input_audio_tokens == 30
    assert tap.usage.output_audio_tokens == 14
    assert tap.usage.input_cached_tokens == 8
    assert tap.error_events == 1
    assert tap.undecodable_events == 1
