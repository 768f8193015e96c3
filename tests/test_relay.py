"""The data plane end to end: real sockets on 127.0.0.1, the simulator as upstream.

Clients here are independent implementations (trio-websocket, raw sockets, the
official openai SDK), so the relay's own codec is checked against other peers.
"""

from __future__ import annotations

import json
import logging
import socket

import httpx
import orjson
import pytest
import trio
import trio.testing
import trio_websocket
from trio_websocket import ConnectionClosed

from relay.dataplane import policy
from relay.protocol import handshake
from tests.conftest import (
    CLIENT_KEY,
    SIM_KEY,
    RunningRelay,
    RunningSimulator,
    close_reason,
    open_ws,
    raw_handshake,
    start_relay,
    start_simulator,
)
from tests.doubles import wait_until

MODEL = "gpt-realtime"
BIG = 32 * 1024 * 1024


def realtime_url(base: str, query: str = f"model={MODEL}") -> str:
    return f"{base}/realtime?{query}"


def bearer(key: str = CLIENT_KEY) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


async def next_event(ws: trio_websocket.WebSocketConnection) -> dict[str, object]:
    with trio.fail_after(10):
        message = await ws.get_message()
    assert isinstance(message, str), "Realtime events must arrive as text frames"
    event: dict[str, object] = json.loads(message)
    return event


async def test_browser_subprotocol_auth_answers_realtime_only(relay: RunningRelay) -> None:
    protocols = ["realtime", f"openai-insecure-api-key.{CLIENT_KEY}", "openai-agents-sdk.0.3.0"]
    async with open_ws(
        realtime_url(relay.ws_base), subprotocols=protocols, max_message_size=BIG
    ) as ws:
        assert ws.subprotocol == "realtime"
        event = await next_event(ws)
        assert event["type"] == "session.created"


async def test_raw_handshake_never_echoes_the_key(relay: RunningRelay) -> None:
    key = handshake.new_websocket_key()
    request = handshake.upgrade_request(
        host_header=f"127.0.0.1:{relay.port}",
        target=f"/v1/realtime?model={MODEL}",
        key=key,
        subprotocols=["realtime", f"openai-insecure-api-key.{CLIENT_KEY}"],
        headers=[("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")],
    )
    with socket.create_connection(("127.0.0.1", relay.port)) as sock:
        sock.sendall(request)
        head = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in head:
                head += await trio.to_thread.run_sync(sock.recv, 4096)
    text = head.decode("latin-1")
    assert text.startswith("HTTP/1.1 101")
    assert "Sec-WebSocket-Protocol: realtime\r\n" in text
    assert CLIENT_KEY not in text
    # permessage-deflate is always declined.
    assert "sec-websocket-extensions" not in text.lower()


@pytest.mark.parametrize(
    ("headers", "code"),
    [([], "missing_api_key"), ([("Authorization", "Bearer wrong-key")], "invalid_api_key")],
)
async def test_refused_before_upgrade_with_openai_envelope(
    relay: RunningRelay, headers: list[tuple[str, str]], code: str
) -> None:
    answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", headers)
    assert answer.status == 401
    body = answer.json()
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert "wrong-key" not in answer.body.decode()


async def test_upstream_unreachable_is_502(nursery: trio.Nursery) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    relay = await start_relay(nursery, f"ws://127.0.0.1:{dead_port}/v1")
    answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", bearer())
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "upstream_unreachable"


async def test_upstream_refusing_the_relays_key_is_502_without_its_body(
    nursery: trio.Nursery, simulator: RunningSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenAI's 401 quotes the key's ends ("sk-wrong****-key") and blames the caller: the
    client gets a generic 502; the upstream's words go to the relay's log only."""
    relay = await start_relay(nursery, simulator.ws_base, upstream_key="sk-wrong-upstream-key")
    with caplog.at_level(logging.INFO, logger="relay.server"):
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", bearer())
    assert answer.status == 502
    body = answer.json()
    assert body["error"] == {
        "message": "The relay could not authenticate with the upstream Realtime API.",
        "type": "server_error",
        "param": None,
        "code": "upstream_auth_failed",
    }
    assert b"sk-" not in answer.body
    assert b"****" not in answer.body
    logged = [r.getMessage() for r in caplog.records if "refused a session" in r.getMessage()]
    assert logged
    assert "invalid_api_key" in logged[0]
    assert "401" in logged[0]


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_auth_refusals_become_502(relay: RunningRelay, status: int) -> None:
    answer = await raw_handshake(
        relay.port, f"/v1/realtime?model={MODEL}&sim_fault=refuse:{status}", bearer()
    )
    assert answer.status == 502
    assert answer.json()["error"]["code"] == "upstream_auth_failed"


@pytest.mark.parametrize("status", [400, 404, 429])
async def test_upstream_refusals_are_passed_on(relay: RunningRelay, status: int) -> None:
    answer = await raw_handshake(
        relay.port, f"/v1/realtime?model={MODEL}&sim_fault=refuse:{status}", bearer()
    )
    assert answer.status == status
    assert answer.json()["error"]["code"] == "simulated"


async def test_upstream_handshake_timeout_is_504(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, upstream_connect_timeout_s=0.3)
    answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}&sim_fault=hang", bearer())
    assert answer.status == 504
    assert answer.json()["error"]["code"] == "upstream_timeout"


async def test_upstream_close_code_and_reason_reach_client_verbatim(relay: RunningRelay) -> None:
    reason = "invalid_request_error.beta_api_shape_disabled"
    async with open_ws(
        realtime_url(relay.ws_base, f"model={MODEL}&sim_fault=close:4000:{reason}"),
        extra_headers=bearer(),
    ) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 4000
    assert close_reason(info.value).reason == reason


async def test_client_close_code_reaches_upstream(relay: RunningRelay) -> None:
    async with open_ws(
        realtime_url(relay.ws_base, f"model={MODEL}&sim_mode=raw-echo"), extra_headers=bearer()
    ) as ws:
        await ws.send_message("ping")
        assert await ws.get_message() == "ping"
        await ws.aclose(code=4321, reason="client says bye")
    # raw-echo mode echoes the close code back; the relay must have passed it through.
    assert ws.closed is not None
    assert ws.closed.code == 4321
    assert ws.closed.reason == "client says bye"


async def test_beta_marker_stripped_by_relay(
    relay: RunningRelay, simulator: RunningSimulator
) -> None:
    beta = [("OpenAI-Beta", "realtime=v1")]
    # Straight to the simulator: refused like OpenAI does.
    async with open_ws(
        realtime_url(simulator.ws_base), extra_headers=[*bearer(simulator.key), *beta]
    ) as ws:
        assert (await next_event(ws))["type"] == "error"
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
        assert close_reason(info.value).code == 4000
    # Through the relay: stripped, the session works.
    async with open_ws(
        realtime_url(relay.ws_base),
        extra_headers=[*bearer(), *beta],
        subprotocols=["realtime", "openai-beta.realtime-v1"],
    ) as ws:
        assert (await next_event(ws))["type"] == "session.created"


async def test_unknown_event_passes_byte_for_byte(relay: RunningRelay) -> None:
    odd = '{ "event_id" : "e1",\n  "type":"x.future_event" , "z":[1, 2.50, "\\u00e9"] }'
    async with open_ws(
        realtime_url(relay.ws_base, f"model={MODEL}&sim_mode=raw-echo"),
        extra_headers=bearer(),
        max_message_size=BIG,
    ) as ws:
        await ws.send_message(odd)
        assert await ws.get_message() == odd
        blob = bytes(range(256)) * 10
        await ws.send_message(blob)
        assert await ws.get_message() == blob
        # A message larger than the codec's whole-frame limit goes the cut-through way.
        large = "x" * (300 * 1024)
        await ws.send_message(large)
        assert await ws.get_message() == large


async def test_oversize_message_closes_1009_and_tells_client(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, max_message_bytes=64 * 1024)
    async with open_ws(
        realtime_url(relay.ws_base), extra_headers=bearer(), max_message_size=BIG
    ) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        await ws.send_message("y" * (100 * 1024))
        error = await next_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == "message_too_big"  # type: ignore[index]
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 1009


async def test_upstream_drop_gives_error_event_and_1011(relay: RunningRelay) -> None:
    async with open_ws(
        realtime_url(relay.ws_base, f"model={MODEL}&sim_fault=drop"), extra_headers=bearer()
    ) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        error = await next_event(ws)
        assert error["error"]["code"] == "upstream_connection_lost"  # type: ignore[index]
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 1011


async def test_upstream_garbage_is_a_protocol_error(relay: RunningRelay) -> None:
    async with open_ws(
        realtime_url(relay.ws_base, f"model={MODEL}&sim_fault=garbage"), extra_headers=bearer()
    ) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        error = await next_event(ws)
        assert error["error"]["code"] == "upstream_protocol_error"  # type: ignore[index]
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 1011


@pytest.mark.parametrize(
    ("limit", "code"),
    [({"idle_timeout_s": 0.4}, "idle_timeout"), ({"max_session_s": 0.6}, "session_expired")],
)
async def test_limits_send_error_then_close_1008(
    nursery: trio.Nursery, simulator: RunningSimulator, limit: dict[str, float], code: str
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, SIM_KEY, **limit)
    async with open_ws(realtime_url(relay.ws_base), extra_headers=bearer()) as ws:
        assert (await next_event(ws))["type"] == "session.created"
        error = await next_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == code  # type: ignore[index]
        with pytest.raises(ConnectionClosed) as info:
            await next_event(ws)
    assert close_reason(info.value).code == 1008
    assert close_reason(info.value).reason == code


async def test_session_limit_gives_503(nursery: trio.Nursery, simulator: RunningSimulator) -> None:
    relay = await start_relay(nursery, simulator.ws_base, max_sessions=1)
    async with open_ws(realtime_url(relay.ws_base), extra_headers=bearer()) as first:
        assert (await next_event(first))["type"] == "session.created"
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", bearer())
        assert answer.status == 503
        assert answer.json()["error"]["code"] == "server_busy"
        async with httpx.AsyncClient() as http:
            ready = await http.get(f"http://127.0.0.1:{relay.port}/readyz")
        assert ready.status_code == 503


async def test_control_plane_shares_the_port(relay: RunningRelay) -> None:
    async with httpx.AsyncClient() as http:
        health = await http.get(f"http://127.0.0.1:{relay.port}/healthz")
        ready = await http.get(f"http://127.0.0.1:{relay.port}/readyz")
        missing = await http.get(f"http://127.0.0.1:{relay.port}/nope")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"


async def test_a_crashing_session_leaves_others_running(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = policy.UpstreamTap.observe_text

    def exploding(self: policy.UpstreamTap, payload: bytes | memoryview) -> None:
        if b"CRASH" in bytes(payload):
            raise RuntimeError("injected failure")
        original(self, payload)

    monkeypatch.setattr(policy.UpstreamTap, "observe_text", exploding)
    echo = realtime_url(relay.ws_base, f"model={MODEL}&sim_mode=raw-echo")
    async with (
        open_ws(echo, extra_headers=bearer()) as healthy,
        open_ws(echo, extra_headers=bearer()) as doomed,
    ):
        # A type the tap reads (untapped types are skipped before it is called).
        await doomed.send_message('{"type":"error","note":"CRASH"}')
        # The tap reads a run of frames as it is scanned, before the write: the
        # echo that blew it up is not forwarded, the error event says why.
        error = await next_event(doomed)
        assert error["error"]["code"] == "internal_error"  # type: ignore[index]
        with pytest.raises(ConnectionClosed) as info:
            await doomed.get_message()
        assert close_reason(info.value).code == 1011
        await healthy.send_message('{"type":"still.alive"}')
        assert await healthy.get_message() == '{"type":"still.alive"}'


def _task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


async def test_no_task_outlives_its_session(relay: RunningRelay) -> None:
    await trio.testing.wait_all_tasks_blocked()  # the relay's own start-up tasks settled
    baseline = _task_count()
    for query in (
        f"model={MODEL}",
        f"model={MODEL}&sim_fault=drop",
        f"model={MODEL}&sim_mode=raw-echo",
    ):
        async with open_ws(realtime_url(relay.ws_base, query), extra_headers=bearer()) as ws:
            if "raw-echo" in query:
                await ws.send_message("x")
            with trio.fail_after(10):
                await ws.get_message()
    await wait_until(lambda: not relay.server.live_sessions and _task_count() <= baseline)


async def test_client_that_stops_reading_keeps_relay_memory_bounded(
    nursery: trio.Nursery,
) -> None:
    # A long answer streamed as fast as possible to a client that never reads.
    simulator = await start_simulator(nursery, response_audio_ms=60_000, delta_audio_ms=100)
    relay = await start_relay(nursery, simulator.ws_base)
    key = handshake.new_websocket_key()
    sock = trio.socket.socket()
    # A small receive window so the kernel cannot absorb the whole stream for us.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        handshake.upgrade_request(
            host_header="relay",
            target=f"/v1/realtime?model={MODEL}",
            key=key,
            headers=bearer(),
        )
    )
    from relay.protocol import frames

    create = frames.encode_frame(frames.OP_TEXT, b'{"type":"response.create"}', mask_key=b"abcd")
    await stream.send_all(create)
    await wait_until(lambda: bool(relay.server.sessions))
    (session,) = relay.server.sessions.values()
    # Wait (bounded) until the relay has stopped moving the answer: backpressure holds
    # it, however long filling the buffers takes on a busy machine.
    with trio.fail_after(20):
        last = -1
        while session.stats.messages_down != last:
            last = session.stats.messages_down
            await trio.sleep(0.25)
    held = session.client.reader.buffered_bytes + session.upstream.reader.buffered_bytes
    from relay.net.transport import RECEIVE_BYTES
    from relay.protocol.frames import WHOLE_FRAME_MAX_BYTES

    bound = 2 * (RECEIVE_BYTES + WHOLE_FRAME_MAX_BYTES)
    assert held <= bound
    # The simulator is being held back: most of the 600-delta answer was never sent.
    assert session.stats.messages_down < 600 - 10
    await stream.aclose()


async def test_openai_sdk_voice_turn_through_relay(relay: RunningRelay) -> None:
    from tests.sdk_client import sdk_voice_turn

    summary = await sdk_voice_turn(relay.http_base, relay.ws_base, CLIENT_KEY)
    assert summary["audio_deltas"] > 0
    assert summary["usage"]["total_tokens"] > 0
    assert summary["types"][0] == "session.created"
    assert "session.updated" in summary["types"]
    assert summary["types"][-1] == "response.done"


async def test_binary_unmasked_client_frame_is_refused(relay: RunningRelay) -> None:
    """A client frame without a mask breaks RFC 6455 §5.1: close 1002."""
    from relay.protocol import frames

    key = handshake.new_websocket_key()
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(
        handshake.upgrade_request(
            host_header="relay", target=f"/v1/realtime?model={MODEL}", key=key, headers=bearer()
        )
    )
    await stream.send_all(frames.encode_frame(frames.OP_TEXT, b'{"type":"x"}'))
    received = b""
    with trio.fail_after(5):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    reader = frames.FrameReader(expect_masked=False, max_message_bytes=BIG)
    reader.feed(received[received.index(b"\r\n\r\n") + 4 :])
    codes = []
    while (event := reader.next_event()) is not None:
        assert isinstance(event, frames.Frame)
        if event.opcode == frames.OP_CLOSE:
            codes.append(frames.decode_close_payload(event.payload())[0])
    assert codes == [1002]
    await stream.aclose()


_ = orjson
