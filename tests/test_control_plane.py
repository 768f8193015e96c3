"""The control plane's connection discipline, on raw sockets (no nginx).

One request per connection (every answer carries ``Connection: close`` and the
socket is closed right after), authentication before a body is read, a 1 MiB
body cap, a deadline per request, a cap on concurrent control connections,
HTTP/1.1 only, and no request smuggling. Every refusal is OpenAI's envelope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from relay.control.hosting import ControlLimits
from relay.protocol import handshake
from tests.conftest import CLIENT_KEY, Keys, RunningRelay, RunningSimulator, start_relay
from tests.doubles import wait_until

MODEL = "gpt-realtime"
MIB = 1024 * 1024


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_answers(data: bytes) -> list[Answer]:
    """Every complete HTTP/1.1 response in ``data`` (Content-Length framed)."""
    answers: list[Answer] = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end >= 0, f"incomplete response head: {data[:200]!r}"
        lines = data[:end].decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 "), lines[0]
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        body = data[end + 4 : end + 4 + size]
        assert len(body) == size, "truncated body"
        answers.append(Answer(status, headers, body))
        data = data[end + 4 + size :]
    return answers


async def exchange(
    port: int, request: bytes, *, timeout_s: float = 5.0, then: bytes = b""
) -> tuple[bytes, float]:
    """Send ``request``, read until the server closes; the bytes and the seconds it took.

    ``then`` is sent after the first answer has arrived (a second request on the
    same connection, the way a keep-alive client or proxy would send it).
    """
    started = trio.current_time()
    data = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(timeout_s):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:  # reset after the answer
                    break
                if not chunk:
                    break
                data += chunk
                if then and b"\r\n\r\n" in data:
                    try:
                        await stream.send_all(then)
                    except trio.BrokenResourceError:
                        break
                    then = b""
    return data, trio.current_time() - started


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: relay.test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def upgrade() -> bytes:
    return handshake.upgrade_request(
        host_header="relay.test",
        target=f"/v1/realtime?model={MODEL}",
        key=handshake.new_websocket_key(),
        headers=[("Authorization", f"Bearer {CLIENT_KEY}")],
    )


def assert_envelope(answer: Answer, status: int) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.headers.get("connection", "").lower() == "close"
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


# ------------------------------------------------------------ one request per connection


async def test_every_control_answer_closes_the_connection(relay: RunningRelay) -> None:
    for path in ("/healthz", "/readyz", "/nope"):
        data, took = await exchange(relay.port, get(path))
        (answer,) = parse_answers(data)
        assert answer.status in (200, 404)
        assert answer.headers["connection"].lower() == "close"
        assert took < 2.0


async def test_connection_close_request_is_closed_at_once(relay: RunningRelay) -> None:
    data, took = await exchange(relay.port, get("/healthz", "Connection: close"))
    (answer,) = parse_answers(data)
    assert answer.status == 200
    assert took < 1.0  # was held ~30 s


async def test_a_half_closed_client_still_gets_its_answer(relay: RunningRelay) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    data = b""
    async with stream:
        await stream.send_all(get("/healthz"))
        await stream.send_eof()
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    assert [a.status for a in parse_answers(data)] == [200]


async def test_readyz_then_upgrade_on_the_same_connection_never_reaches_hypercorn(
    relay: RunningRelay,
) -> None:
    # A keep-alive client (or nginx's upstream pool) reuses the connection for an upgrade.
    data, _ = await exchange(relay.port, get("/readyz"), then=upgrade())
    answers = parse_answers(data)
    assert [a.status for a in answers] == [200]  # then the close; never a 404
    assert answers[0].headers["connection"].lower() == "close"


async def test_pipelined_requests_get_one_answer(relay: RunningRelay) -> None:
    data, _ = await exchange(relay.port, get("/readyz") + upgrade() + get("/healthz"))
    assert [a.status for a in parse_answers(data)] == [200]


# ------------------------------------------------------------------- HTTP/1.1 only


async def test_h2c_upgrade_is_answered_as_http11(relay: RunningRelay) -> None:
    request = get(
        "/healthz",
        "Connection: Upgrade, HTTP2-Settings",
        "Upgrade: h2c",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
    )
    data, _ = await exchange(relay.port, request)
    (answer,) = parse_answers(data)  # no 101, no HTTP/2 frames after it
    assert answer.status == 200
    assert answer.json() == {"status": "ok"}


async def test_h2_prior_knowledge_preface_is_refused(relay: RunningRelay) -> None:
    data, _ = await exchange(relay.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    (answer,) = parse_answers(data)
    error = assert_envelope(answer, 505)  # HTTP Version Not Supported
    assert "HTTP/1.1" in error["message"]


async def test_content_length_with_transfer_encoding_is_refused_and_closed(
    relay: RunningRelay,
) -> None:
    smuggled = get("/readyz")
    request = (
        b"POST /healthz HTTP/1.1\r\nHost: relay.test\r\n"
        + f"Content-Length: {5 + len(smuggled)}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        + smuggled
    )
    data, _ = await exchange(relay.port, request)
    (answer,) = parse_answers(data)  # the smuggled GET is never answered
    assert_envelope(answer, 400)
    assert b"readyz" not in data


async def test_bad_chunked_body_gets_the_envelope(token_relay: RunningRelay, keys: Keys) -> None:
    request = (
        b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: relay.test\r\n"
        + f"Authorization: Bearer {keys.app_key}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    data, _ = await exchange(token_relay.port, request)
    (answer,) = parse_answers(data)
    assert_envelope(answer, 400)


# ----------------------------------------------------------------------- bodies


@pytest.fixture
async def token_relay(
    nursery: trio.Nursery, simulator: RunningSimulator, keys: Keys
) -> RunningRelay:
    return await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
    )


def mint_head(length: int, key: str | None = None, *extra: str) -> bytes:
    lines = [
        "POST /v1/realtime/client_secrets HTTP/1.1",
        "Host: relay.test",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *([f"Authorization: Bearer {key}"] if key else []),
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def mint_body(size: int) -> bytes:
    """A valid mint request padded with whitespace to exactly ``size`` bytes."""
    document = json.dumps(
        {
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "model": MODEL},
        }
    ).encode()
    return document + b" " * (size - len(document))


async def post_while_reading(port: int, head: bytes, body: bytes) -> tuple[bytes, float]:
    """Send the head and stream the body while reading the answer, as a real client does."""
    started = trio.current_time()
    received = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:

        async def send_body() -> None:
            try:
                await stream.send_all(head)
                view = memoryview(body)
                for start in range(0, len(view), 256 * 1024):
                    await stream.send_all(view[start : start + 256 * 1024])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the relay answered and closed without reading it: that is the point

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_body)
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    received += chunk
                nursery.cancel_scope.cancel()
    return received, trio.current_time() - started


async def test_unauthenticated_big_body_is_refused_before_it_is_read(
    token_relay: RunningRelay,
) -> None:
    host = token_relay.server.control
    before = host.bytes_received
    body = b"x" * (15 * MIB)
    data, took = await post_while_reading(token_relay.port, mint_head(len(body)), body)
    (answer,) = parse_answers(data)
    error = assert_envelope(answer, 401)
    assert error["code"] == "invalid_api_key"
    assert took < 2.0
    # The relay read (and buffered) next to nothing of the 15 MiB.
    assert host.bytes_received - before < MIB  # ~130 KB in practice


async def test_parallel_unauthenticated_big_bodies_read_nothing_much(
    token_relay: RunningRelay,
) -> None:
    host = token_relay.server.control
    before = host.bytes_received
    body = b"x" * (15 * MIB)
    statuses: list[int] = []

    async def one() -> None:
        data, _ = await post_while_reading(token_relay.port, mint_head(len(body)), body)
        statuses.extend(a.status for a in parse_answers(data))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert statuses == [401] * 20
    assert host.bytes_received - before < 10 * MIB  # 300 MiB were offered; ~2.4 MB read


async def test_authenticated_body_over_one_mib_is_413(
    token_relay: RunningRelay, keys: Keys
) -> None:
    body = mint_body(2 * MIB)
    data, _ = await post_while_reading(token_relay.port, mint_head(len(body), keys.app_key), body)
    (answer,) = parse_answers(data)
    error = assert_envelope(answer, 413)
    assert error["code"] == "request_too_large"


async def test_authenticated_chunked_body_over_one_mib_is_413(
    token_relay: RunningRelay, keys: Keys
) -> None:
    head = (
        "POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: relay.test\r\n"
        f"Authorization: Bearer {keys.app_key}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
    body = chunk * (2 * MIB // 0x4000) + b"0\r\n\r\n"
    data, _ = await post_while_reading(token_relay.port, head, body)
    (answer,) = parse_answers(data)
    assert_envelope(answer, 413)


async def test_body_of_one_mib_minus_one_is_fine(token_relay: RunningRelay, keys: Keys) -> None:
    body = mint_body(MIB - 1)
    data, _ = await post_while_reading(token_relay.port, mint_head(len(body), keys.app_key), body)
    (answer,) = parse_answers(data)
    assert answer.status == 200, answer.body[:300]
    assert answer.json()["value"].startswith("ek_")


# -------------------------------------------------------- deadlines and the cap


async def test_slow_body_hits_the_request_deadline(token_relay: RunningRelay, keys: Keys) -> None:
    token_relay.server.control.limits = ControlLimits(request_deadline_s=0.5)
    started = trio.current_time()
    stream = await trio.open_tcp_stream("127.0.0.1", token_relay.port)
    data = b""
    async with stream:
        await stream.send_all(mint_head(100, keys.app_key) + b"{")
        with trio.fail_after(5):
            while True:
                # One byte now and then keeps an inactivity timer happy, not a deadline.
                with trio.move_on_after(0.1):
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not chunk:
                        break
                    data += chunk
                try:
                    await stream.send_all(b" ")
                except trio.BrokenResourceError:
                    break
    took = trio.current_time() - started
    (answer,) = parse_answers(data)
    assert_envelope(answer, 408)
    assert 0.4 < took < 2.0


async def test_an_unread_body_does_not_hold_the_connection(relay: RunningRelay) -> None:
    # A body that never comes, on a route that never reads it: answered and closed at once.
    data, took = await exchange(relay.port, get("/healthz", "Content-Length: 10"))
    (answer,) = parse_answers(data)
    assert answer.status == 200
    assert took < 1.0


async def test_connection_deadline_ends_everything(token_relay: RunningRelay, keys: Keys) -> None:
    token_relay.server.control.limits = ControlLimits(
        request_deadline_s=30, connection_deadline_s=0.3
    )
    data, took = await exchange(token_relay.port, mint_head(100, keys.app_key))
    assert data == b""  # closed, not held for the 30 s request deadline
    assert 0.25 < took < 1.5
    assert token_relay.server.control.open_connections == 0


async def test_control_connections_are_capped_and_realtime_still_flows(
    token_relay: RunningRelay, keys: Keys
) -> None:
    host = token_relay.server.control
    host.limits = ControlLimits(max_connections=2, request_deadline_s=30)
    async with trio.open_nursery() as nursery:
        held: list[trio.SocketStream] = []
        for _ in range(2):  # two slow bodies hold both control slots
            stream = await trio.open_tcp_stream("127.0.0.1", token_relay.port)
            held.append(stream)
            await stream.send_all(mint_head(100, keys.app_key))
        await wait_until(lambda: host.open_connections >= 2)
        data, _ = await exchange(token_relay.port, get("/metrics"))
        (answer,) = parse_answers(data)
        error = assert_envelope(answer, 503)
        assert error["code"] == "control_plane_busy"
        assert answer.headers["retry-after"] == "1"
        # A load balancer's probe is never capped.
        data, _ = await exchange(token_relay.port, get("/readyz"))
        assert [a.status for a in parse_answers(data)] == [200]
        # The data plane is not starved: an upgrade still gets its 101.
        stream = await trio.open_tcp_stream("127.0.0.1", token_relay.port)
        async with stream:
            await stream.send_all(upgrade())
            with trio.fail_after(5):
                first = await stream.receive_some(65536)
        assert first.startswith(b"HTTP/1.1 101 ")
        for stream in held:
            await stream.aclose()
        await wait_until(lambda: not host.open_connections)
        data, _ = await exchange(token_relay.port, get("/metrics"))
        assert [a.status for a in parse_answers(data)] == [200]
        nursery.cancel_scope.cancel()


async def test_refusals_never_echo_request_bytes(relay: RunningRelay) -> None:
    marker = "echo-marker-<script>"
    data, _ = await exchange(relay.port, get(f"/{marker}", f"X-Probe: {marker}"))
    (answer,) = parse_answers(data)
    assert answer.status == 404
    assert marker.encode() not in data
    assert b"<html" not in data.lower()
