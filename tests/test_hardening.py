"""Issue 10's findings, each against the peer that broke it: no input ends the process,
refusals are clean and never echo what the client sent, only documented parameters and
headers reach the upstream, and fragments in any TCP chunking pass byte-identical."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
import pytest
import trio

from relay.credentials.checkers import AuthGrant, AuthRefusal
from relay.protocol import frames, handshake
from relay.protocol.handshake import RequestHead
from tests.conftest import (
    CLIENT_KEY,
    RunningRelay,
    open_raw_session,
    open_ws,
    raw_handshake,
    read_until_closed,
    start_relay,
    start_simulator,
)
from tests.doubles import wait_until
from tests.scripted_upstream import start_scripted_upstream

MODEL = "gpt-realtime"
BEARER = [("Authorization", f"Bearer {CLIENT_KEY}")]


async def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the answer until the relay closes; (status, headers, body)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    data = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    response = handshake.parse_response_head(data)
    assert response is not None, data[:200]
    return (
        response.status,
        {k.decode(): v.decode() for k, v in response.headers},
        response.trailing,
    )


def upgrade_head(*extra: str, target: str = f"/v1/realtime?model={MODEL}") -> bytes:
    lines = [
        f"GET {target} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
        f"Authorization: Bearer {CLIENT_KEY}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def healthy(relay: RunningRelay) -> bool:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{relay.port}/healthz")).status_code == 200


# ------------------------------------------------------------ critical: the barrier


async def test_non_ascii_websocket_key_is_400_not_a_dead_process(relay: RunningRelay) -> None:
    """Finding 1: 24 bytes of 0xE9 as the key made base64 raise ValueError, which no one
    caught, and the whole process exited."""
    request = upgrade_head().replace(
        b"\r\n\r\n", b"\r\nSec-WebSocket-Key: " + b"\xe9" * 24 + b"\r\n\r\n"
    )
    status, _, body = await raw_request(relay.port, request)
    assert status == 400
    assert orjson.loads(body)["error"]["code"] == "invalid_handshake"
    assert await healthy(relay)


async def test_negative_usage_from_the_upstream_is_clamped(nursery: trio.Nursery) -> None:
    """Finding 2: ``text_tokens: -5`` in response.done made a Prometheus counter raise when
    the session ended, and the process with it."""
    usage = {
        "total_tokens": -7,
        "input_tokens": -1,
        "output_tokens": -6,
        "input_token_details": {"text_tokens": -5, "audio_tokens": 3},
        "output_token_details": {"text_tokens": -5, "audio_tokens": 10**15},
    }
    script = [
        orjson.dumps({"type": "session.created", "session": {"id": "sess_x", "model": MODEL}}),
        orjson.dumps(
            {"type": "response.done", "response": {"status": "completed", "usage": usage}}
        ),
        orjson.dumps(
            {"type": "response.done", "response": {"usage": {"input_token_details": None}}}
        ),
    ]
    upstream = await start_scripted_upstream(nursery, script)
    relay = await start_relay(nursery, upstream.ws_base)
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=BEARER) as ws:
        events, close = await read_until_closed(ws)
    assert [e["type"] for e in events] == ["session.created", "response.done", "response.done"]
    assert close.code == 1000
    await wait_until(lambda: not relay.server.sessions)
    metrics = relay.server.metrics.render().decode()
    assert 'relay_usage_tokens_total{kind="input_audio",model="gpt-realtime"} 3.0' in metrics
    assert 'kind="output_audio",model="gpt-realtime"} 1e+07' in metrics  # clamped
    assert 'kind="input_text"' not in metrics  # negative counts add nothing
    assert await healthy(relay)


class _BrokenChecker:
    def check(self, credential: str | None, head: RequestHead) -> AuthGrant | AuthRefusal:
        raise RuntimeError("a bug in a credential check")


async def test_a_bug_in_one_connection_is_a_500_logged_once_and_counted(
    relay: RunningRelay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.server.checker = _BrokenChecker()
    with caplog.at_level(logging.ERROR, logger="relay.server"):
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", BEARER)
    assert answer.status == 500
    assert answer.json()["error"] == {
        "message": "The relay failed while handling this request.",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    failures = [r for r in caplog.records if r.exc_info is not None]
    assert len(failures) == 1
    assert "a bug in a credential check" in caplog.text
    metrics = relay.server.metrics.render().decode()
    assert 'relay_errors_total{kind="connection_internal_error"} 1.0' in metrics
    assert await healthy(relay)


async def test_a_failing_session_end_record_is_counted_not_fatal(
    relay: RunningRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise ValueError("accounting bug")

    monkeypatch.setattr(relay.server.registry, "record_end", broken)
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=BEARER) as ws:
        await ws.get_message()
    await wait_until(
        lambda: 'kind="session_accounting_error"' in relay.server.metrics.render().decode()
    )
    assert await healthy(relay)


# ------------------------------------------------------------ handshake strictness


@pytest.mark.parametrize(
    ("request_bytes", "status", "header"),
    [
        pytest.param(
            upgrade_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==").replace(
                b"HTTP/1.1", b"HTTP/1.0", 1
            ),
            400,
            None,
            id="http-1.0-upgrade",
        ),
        pytest.param(
            upgrade_head(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==",
            ),
            400,
            None,
            id="duplicate-key",
        ),
        pytest.param(
            upgrade_head(
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"
            ),
            400,
            None,
            id="duplicate-version",
        ),
        pytest.param(
            upgrade_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Upgrade: websocket"),
            400,
            None,
            id="duplicate-upgrade",
        ),
        pytest.param(
            upgrade_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==").replace(
                b"Version: 13", b"Version: 8"
            ),
            426,
            ("sec-websocket-version", "13"),
            id="version-8",
        ),
        pytest.param(
            upgrade_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==").replace(b"GET", b"POST", 1),
            405,
            ("allow", "GET"),
            id="post",
        ),
        pytest.param(
            upgrade_head("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="),
            101,
            None,
            id="control-valid",
        ),
    ],
)
async def test_rfc6455_handshake_strictness(
    relay: RunningRelay, request_bytes: bytes, status: int, header: tuple[str, str] | None
) -> None:
    if status == 101:
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", BEARER)
        assert answer.status == 101
        return
    got, headers, body = await raw_request(relay.port, request_bytes)
    assert got == status
    assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}
    if header is not None:
        assert headers[header[0]] == header[1]


async def test_a_malformed_header_line_is_never_echoed(relay: RunningRelay) -> None:
    """Finding 15: h11's message quoted the bad line, key and all, in the 400 body."""
    request = (
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nAuthorization Bearer sk-secret-abcdef\r\n\r\n"
    )
    status, _, body = await raw_request(relay.port, request)
    assert status == 400
    assert b"sk-secret" not in body
    assert b"Authorization" not in body
    assert orjson.loads(body)["error"]["message"] == "Malformed HTTP request."


# ------------------------------------------------------------ what reaches the upstream


async def test_only_documented_query_parameters_reach_the_upstream(nursery: trio.Nursery) -> None:
    upstream = await start_scripted_upstream(nursery)
    relay = await start_relay(nursery, upstream.ws_base, upstream_query_params=())
    target = (
        f"/v1/realtime?model={MODEL}&api_key=sk-in-the-query&call_id=c1&sim_fault=drop&intent=x"
    )
    answer = await raw_handshake(relay.port, target, BEARER)
    assert answer.status == 101
    (head,) = upstream.heads
    assert head.target == f"/v1/realtime?model={MODEL}&call_id=c1&intent=x"


async def test_configured_query_parameters_are_forwarded_in_order(nursery: trio.Nursery) -> None:
    upstream = await start_scripted_upstream(nursery)
    relay = await start_relay(nursery, upstream.ws_base, upstream_query_params=("api-version",))
    answer = await raw_handshake(
        relay.port, f"/v1/realtime?api-version=2025-08&model={MODEL}", BEARER
    )
    assert answer.status == 101
    assert upstream.heads[0].target == f"/v1/realtime?api-version=2025-08&model={MODEL}"


@pytest.mark.parametrize(
    "query", ["model=a&model=b", "model=a&m%6Fdel=b", "model=a&intent=x&intent=y"]
)
async def test_a_repeated_single_value_parameter_is_refused(
    nursery: trio.Nursery, query: str
) -> None:
    """Finding 12: the relay checked the last model while forwarding both."""
    upstream = await start_scripted_upstream(nursery)
    relay = await start_relay(nursery, upstream.ws_base)
    answer = await raw_handshake(relay.port, f"/v1/realtime?{query}", BEARER)
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "invalid_request"
    assert upstream.heads == []


async def test_a_static_key_clients_safety_identifier_is_dropped(nursery: trio.Nursery) -> None:
    """Finding 13: the relay derives the identifier; a client cannot pick one."""
    upstream = await start_scripted_upstream(nursery)
    relay = await start_relay(nursery, upstream.ws_base)
    answer = await raw_handshake(
        relay.port,
        f"/v1/realtime?model={MODEL}",
        [*BEARER, ("OpenAI-Safety-Identifier", "someone-else")],
    )
    assert answer.status == 101
    assert upstream.heads[0].header(b"openai-safety-identifier") is None


# ------------------------------------------------------------ fragments in small pieces


async def _receive_frames(
    stream: trio.SocketStream, reader: frames.FrameReader, count: int
) -> tuple[list[tuple[int, bool, bytes]], int]:
    """``count`` data frames (opcode, fin, payload) and how many pongs came with them."""
    got: list[tuple[int, bool, bytes]] = []
    pongs = 0
    start: frames.FrameStart | None = None
    parts: list[bytes] = []
    with trio.fail_after(30):
        while len(got) < count:
            event = reader.next_event()
            if event is None:
                data = await stream.receive_some(1 << 20)
                assert data, "relay closed the connection"
                reader.feed(data)
            elif isinstance(event, frames.Frame):
                if event.opcode == frames.OP_PONG:
                    pongs += 1
                elif event.opcode < frames.OP_CLOSE:
                    got.append((event.opcode, event.fin, event.payload()))
                else:
                    raise AssertionError(f"closed: {frames.decode_close_payload(event.payload())}")
            elif isinstance(event, frames.FrameStart):
                start, parts = event, []
            else:
                parts.append(bytes(event.data))
                if event.last:
                    assert start is not None
                    got.append((start.opcode, start.fin, b"".join(parts)))
    return got, pongs


def _fragments(opcode: int, payload: bytes, size: int) -> list[tuple[int, bool, bytes]]:
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    return [
        (opcode if i == 0 else frames.OP_CONTINUATION, i == len(pieces) - 1, piece)
        for i, piece in enumerate(pieces)
    ]


CASES = {
    "two-fragments-one-octet-per-write": (
        _fragments(frames.OP_TEXT, b'{"type":"x.frag","n":1}', 12),
        1,
        False,
    ),
    "two-fragments-ping-between-one-octet-per-write": (
        _fragments(frames.OP_TEXT, b'{"type":"x.frag","n":2}', 12),
        1,
        True,
    ),
    "64KiB-in-1300-byte-fragments": (
        _fragments(frames.OP_TEXT, b'{"type":"x","a":"' + b"A" * 65_000 + b'"}', 1300),
        1400,
        False,
    ),
    "4MiB-text-in-64KiB-fragments": (
        _fragments(frames.OP_TEXT, b'{"a":"' + b"B" * (4 << 20) + b'"}', 64 << 10),
        16 << 10,
        False,
    ),
    "4MiB-binary-in-100KB-fragments-cut-through": (
        _fragments(frames.OP_BINARY, bytes(range(256)) * (4 << 12), 100_000),
        48 << 10,
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_fragmented_messages_in_small_tcp_pieces_pass_byte_identical(
    nursery: trio.Nursery, case: str
) -> None:
    """Finding 10: up through the relay to an echoing upstream and back down, every frame
    arrives with its opcode, FIN bit and payload intact, whatever the TCP chunking."""
    sent, write_bytes, ping_between = CASES[case]
    simulator = await start_simulator(nursery)
    relay = await start_relay(nursery, simulator.ws_base)
    stream, reader = await open_raw_session(relay.port, f"model={MODEL}&sim_mode=raw-echo")
    async with stream:
        wire = b""
        for index, (opcode, fin, payload) in enumerate(sent):
            wire += frames.encode_frame(
                opcode, payload, fin=fin, mask_key=bytes([index % 256, 1, 2, 3])
            )
            if ping_between and not fin:
                wire += frames.encode_frame(frames.OP_PING, b"between", mask_key=b"wxyz")

        async def write() -> None:
            for offset in range(0, len(wire), write_bytes):
                await stream.send_all(wire[offset : offset + write_bytes])

        async with trio.open_nursery() as inner:
            inner.start_soon(write)
            got, pongs = await _receive_frames(stream, reader, len(sent))
    assert got == sent
    assert pongs == (sum(1 for _, fin, _ in sent if not fin) if ping_between else 0)
