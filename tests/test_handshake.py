"""Sans-I/O handshake parsing and answers, without an event loop."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import handshake
from relay.protocol.handshake import HandshakeError


def request(*lines: str, target: str = "/v1/realtime?model=gpt-realtime") -> bytes:
    base = [
        f"GET {target} HTTP/1.1",
        "Host: relay.example",
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *lines,
    ]
    return ("\r\n".join(base) + "\r\n\r\n").encode()


def test_incomplete_head_needs_more() -> None:
    data = request()
    assert handshake.parse_request_head(data[:-3]) is None
    head = handshake.parse_request_head(data + b"extra")
    assert head is not None
    assert head.trailing == b"extra"
    assert head.path == "/v1/realtime"
    assert head.query == "model=gpt-realtime"
    assert handshake.websocket_request_problem(head) is None


def test_accept_token_matches_rfc_example() -> None:
    # RFC 6455 §1.3 worked example.
    assert handshake.accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_browser_subprotocols_give_key_and_realtime_only() -> None:
    head = handshake.parse_request_head(
        request(
            "Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.ek_abc123, "
            "openai-agents-sdk.0.3.1",
            "Sec-WebSocket-Protocol: openai-organization.org_1",
        )
    )
    assert head is not None
    assert handshake.client_credential(head) == "ek_abc123"
    answer = handshake.accept_response(head).decode()
    assert "Sec-WebSocket-Protocol: realtime\r\n" in answer
    assert "ek_abc123" not in answer
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
    assert "extensions" not in answer.lower()


def test_no_subprotocol_selected_when_none_offered() -> None:
    head = handshake.parse_request_head(request("Authorization: Bearer sk-1"))
    assert head is not None
    assert "Sec-WebSocket-Protocol" not in handshake.accept_response(head).decode()
    assert handshake.client_credential(head) == "sk-1"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Authorization: Bearer   tok  ", "tok"),
        ("authorization: bearer tok", "tok"),
        ("Authorization: Basic abc", None),
        ("api-key: azure-style", "azure-style"),
    ],
)
def test_credential_sources(line: str, expected: str | None) -> None:
    head = handshake.parse_request_head(request(line))
    assert head is not None
    assert handshake.client_credential(head) == expected


@pytest.mark.parametrize(
    ("line", "beta"),
    [
        ("OpenAI-Beta: realtime=v1", True),
        ("OpenAI-Beta: assistants=v2", False),
        ("Sec-WebSocket-Protocol: realtime, openai-beta.realtime-v1", True),
    ],
)
def test_beta_marker(line: str, beta: bool) -> None:
    head = handshake.parse_request_head(request(line))
    assert head is not None
    assert handshake.has_beta_marker(head) is beta


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (request("Sec-WebSocket-Version: 8").replace(b"Version: 13\r\n", b""), 426),
        (request().replace(b"GET", b"POST"), 405),
        (
            request().replace(
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Key: x"
            ),
            400,
        ),
        (request().replace(b"Upgrade: websocket\r\n", b""), 426),
    ],
)
def test_invalid_upgrades(data: bytes, status: int) -> None:
    head = handshake.parse_request_head(data)
    assert head is not None
    problem = handshake.websocket_request_problem(head)
    assert problem is not None
    assert problem.status == status


def test_oversized_and_malformed_heads() -> None:
    with pytest.raises(HandshakeError) as info:
        handshake.parse_request_head(b"GET / HTTP/1.1\r\nX: " + b"a" * 20_000)
    assert info.value.status == 431
    with pytest.raises(HandshakeError) as info:
        handshake.parse_request_head(b"NOT HTTP AT ALL\r\n\r\n")
    assert info.value.status == 400


def test_response_head_and_accept_check() -> None:
    key = handshake.new_websocket_key()
    good = (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {handshake.accept_token(key)}\r\n\r\n"
    ).encode() + b"\x81\x00"
    response = handshake.parse_response_head(good)
    assert response is not None
    assert response.trailing == b"\x81\x00"
    assert handshake.upgrade_response_problem(response, key) is None
    assert handshake.upgrade_response_problem(response, handshake.new_websocket_key()) is not None
    refused = handshake.parse_response_head(
        b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert refused is not None
    assert refused.status == 401
    assert refused.content_length == 2


def test_upstream_target_keeps_query_and_base_path() -> None:
    target = handshake.UpstreamTarget.from_url("wss://api.openai.com/v1/")
    assert (target.tls, target.host, target.port, target.base_path) == (
        True,
        "api.openai.com",
        443,
        "/v1",
    )
    assert target.host_header == "api.openai.com"
    plain = handshake.UpstreamTarget.from_url("ws://127.0.0.1:9000/openai/v1")
    assert plain.host_header == "127.0.0.1:9000"
    with pytest.raises(ValueError):
        handshake.UpstreamTarget.from_url("ftp://x")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_heads_never_raise_anything_but_handshake_error(data: bytes) -> None:
    try:
        head = handshake.parse_request_head(data)
    except HandshakeError:
        return
    if head is not None:
        handshake.websocket_request_problem(head)
        handshake.client_credential(head)
        handshake.has_beta_marker(head)


# ---------------------------------------------------------------- the fast head parser


_HEAD_PIECES = st.sampled_from(
    [
        b"GET",
        b"POST",
        b" ",
        b"  ",
        b"\t",
        b"/v1/realtime?model=x",
        b"/",
        b"*",
        b"http://a/",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/2.0",
        b"\r\n",
        b"\n",
        b"\r",
        b"Host: a",
        b"host:a",
        b"Host:",
        b"Upgrade: websocket",
        b"Content-Length: 5",
        b"Content-Length: x",
        b"Content-Length: 007",
        b"Content-Length: 1, 1",
        b"Content-Length: 123456789012345678901",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: Chunked",
        b"Transfer-Encoding: gzip, chunked",
        b"X-A: b c",
        b"X-A:  b  ",
        b" folded",
        b"Bad Name: v",
        b":",
        b"\x00",
        b"\x7f",
        b"\x80\xff",
        b"\x01",
        b"101",
        b"Switching Protocols",
    ]
)


def _slow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "_fast_head", lambda raw, first_line: None)


def _outcome(parse: Any, raw: bytes) -> object:
    try:
        head = parse(raw)
    except handshake.HandshakeError as exc:
        return ("refused", exc.status)
    if head is None:
        return None
    if isinstance(head, handshake.RequestHead):
        return (head.method, head.target, head.headers, head.http_version, head.trailing)
    return (head.status, head.headers, head.trailing)


@settings(max_examples=600, deadline=None)
@given(
    st.lists(_HEAD_PIECES, max_size=14),
    st.sampled_from([handshake.parse_request_head, handshake.parse_response_head]),
    st.sampled_from([b"101", b"100", b"200", b"204", b"429"]),
)
def test_the_fast_head_parser_reads_every_head_exactly_as_h11_does(
    pieces: list[bytes], parse: Any, status: bytes
) -> None:
    """Differential: any head, fast path on or off, the same head or the same refusal."""
    if parse is handshake.parse_response_head and pieces[:1] != [b"HTTP/1.1"]:
        pieces = [b"HTTP/1.1", b" ", status, *pieces]
    raw = b"".join(pieces) + b"\r\n\r\n"
    fast = _outcome(parse, raw)
    with pytest.MonkeyPatch.context() as patch:
        _slow_only(patch)
        slow = _outcome(parse, raw)
    assert fast == slow


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /v1/realtime HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        b"GET /v1/realtime HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Pad: \t v w \t\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 101\r\nUpgrade: websocket\r\n\r\n",
        # The REST proxy's usual heads: a JSON request with its length, an SSE answer.
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 139\r\n\r\n",
        b"HTTP/1.1 200 \r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_common_heads_take_the_fast_path(raw: bytes) -> None:
    assert handshake._fast_head(raw, handshake._FAST_REQUEST_LINE) is not None or (
        handshake._fast_head(raw, handshake._FAST_STATUS_LINE) is not None
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # h11 refuses two Hosts
        b"GET / HTTP/1.1\r\n\r\n",  # and none
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",  # h11's call
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",  # a control byte h11 allows
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    ],
)
def test_unusual_heads_go_to_h11(raw: bytes) -> None:
    assert handshake._fast_head(raw, handshake._FAST_REQUEST_LINE) is None


def test_an_interim_response_s_framing_headers_go_to_h11() -> None:
    raw = b"HTTP/1.1 103 Early Hints\r\nContent-Length: 0\r\n\r\n"
    assert handshake._fast_head(raw, handshake._FAST_STATUS_LINE) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_HEAD_PIECES, max_size=14),
    st.sampled_from([handshake.parse_request_head, handshake.parse_response_head]),
)
def test_a_head_reads_the_same_from_known_lines_as_from_the_match(
    pieces: list[bytes], parse: Any
) -> None:
    """The known-lines cache: a head read with its lines cached (twice, the second time
    from the cache) reads as with the cache empty, and holds only lines that matched."""
    if parse is handshake.parse_response_head and pieces[:1] != [b"HTTP/1.1"]:
        pieces = [b"HTTP/1.1 200 ", *pieces]
    raw = b"".join(pieces) + b"\r\n\r\n"
    handshake._KNOWN_LINES.clear()
    cold = _outcome(parse, raw)
    warm = _outcome(parse, raw)
    assert warm == cold
    for line, pair in handshake._KNOWN_LINES.items():
        field = handshake._FAST_HEADER.fullmatch(line)
        assert field is not None
        assert pair == (field[1].lower(), field[2])


def test_known_lines_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "MAX_KNOWN_LINES", 3)
    handshake._KNOWN_LINES.clear()
    long_value = b"v" * handshake.MAX_KNOWN_LINE_BYTES
    for index in range(10):
        raw = b"GET / HTTP/1.1\r\nHost: a\r\nX-Id: %d\r\nX-Long: %s\r\n\r\n" % (index, long_value)
        head = handshake.parse_request_head(raw)
        assert head is not None
        assert head.headers == ((b"host", b"a"), (b"x-id", b"%d" % index), (b"x-long", long_value))
        assert len(handshake._KNOWN_LINES) <= 3
    assert not any(line.startswith(b"X-Long") for line in handshake._KNOWN_LINES)


def test_known_lines_never_keep_a_credential_or_a_websocket_key() -> None:
    """A client's key outlives its request in no cache, and a handshake's fresh key does
    not churn it; the head still reads them (twice: the second parse is no different)."""
    handshake._KNOWN_LINES.clear()
    raw = (
        b"GET /v1/realtime HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-secret\r\n"
        b"api-key: sk-azure\r\nCookie: s=1\r\nProxy-Authorization: Basic eA==\r\n"
        b"Sec-WebSocket-Protocol: realtime, openai-insecure-api-key.sk-browser\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    for _ in range(2):
        head = handshake.parse_request_head(raw)
        assert head is not None
        assert head.header(b"authorization") == "Bearer sk-secret"
        assert head.header(b"sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    assert list(handshake._KNOWN_LINES) == [b"Host: a"]
