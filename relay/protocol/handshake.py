"""Sans-I/O HTTP/1.1 WebSocket handshakes (RFC 6455 §4), both roles. No trio, no sockets.

This module owns:

- reading a request head (:func:`parse_request_head`, h11 does the HTTP syntax) and
  checking it is a valid WebSocket upgrade (:func:`websocket_request_problem`);
- what the Realtime API reads from a handshake: the client credential
  (``Authorization: Bearer``, Azure-style ``api-key``, or the browser subprotocol
  ``openai-insecure-api-key.<key>``), the offered subprotocols, and the retired beta
  marker (``OpenAI-Beta: realtime=v1`` / ``openai-beta.realtime-v1``);
- the server's answers: ``101`` with exactly ``Sec-WebSocket-Protocol: realtime`` when
  it was offered (never the key-bearing entry) and never a ``Sec-WebSocket-Extensions``
  header, so permessage-deflate is always declined; or an ordinary HTTP error with
  OpenAI's JSON error envelope;
- the client role used to dial the upstream: the request bytes and the response head.

Secrets: nothing here logs; :class:`RequestHead` ``repr`` omits header values.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Final
from urllib.parse import unquote_plus, urlsplit

import h11

#: A request or response head larger than this is refused (431 / upstream error).
MAX_HEAD_BYTES: Final = 16 * 1024
#: An upstream error body is read up to this size and passed on to the client.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024
WEBSOCKET_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REALTIME_SUBPROTOCOL: Final = "realtime"
API_KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
BETA_SUBPROTOCOL: Final = "openai-beta.realtime-v1"
BETA_HEADER: Final = b"openai-beta"
_HEAD_END: Final = b"\r\n\r\n"
#: A ``Sec-WebSocket-Key`` decodes to this many random bytes.
WEBSOCKET_KEY_BYTES: Final = 16
#: Headers a WebSocket handshake may carry once only (two values mean two readings).
SINGLE_INSTANCE_HEADERS: Final = (b"sec-websocket-key", b"sec-websocket-version", b"upgrade")
MALFORMED_REQUEST: Final = "Malformed HTTP request."
ALLOW_GET: Final = (("Allow", "GET"),)
#: RFC 9110 §15.5.22 (426 names the protocol) and RFC 6455 §4.4 (the versions we speak).
UPGRADE_REQUIRED: Final = (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"))


# The common shape of a head, matched in C (h11 takes 70 us a head, this 6): CRLF
# lines, token names, values of visible characters and inner blanks. A head that
# does not fit exactly, or whose framing headers need h11's judgement, is parsed by
# h11, so this never accepts a head that h11 would refuse or read differently.
_FAST_REQUEST_LINE: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+) (/[\x21-\x7e]*) HTTP/(1\.[01])"
)
_FAST_STATUS_LINE: Final = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: [ \t\x21-\x7e\x80-\xff]*)?")
_FAST_HEADER: Final = re.compile(
    rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \t]*"
    rb"((?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?)[ \t]*"
)
#: The framing headers: one of them once, in the one shape h11 reads the same way
#: (:data:`_FAST_CONTENT_LENGTH`, ``chunked`` alone), is read here; anything else about
#: them (two of them, a list, an odd value) sends the head to h11.
_H11_JUDGED: Final = frozenset({b"content-length", b"transfer-encoding"})
#: A Content-Length h11 takes as it is (h11 allows at most 20 digits).
_FAST_CONTENT_LENGTH: Final = re.compile(rb"[0-9]{1,20}")


#: Header lines already matched, and their (lowercased name, value): a keep-alive
#: client sends the same lines request after request, and a dict lookup costs a tenth
#: of the match. What a line maps to depends on its bytes alone, so a hit reads it
#: exactly as the match would. Bounded: lines up to MAX_KNOWN_LINE_BYTES, at most
#: MAX_KNOWN_LINES of them (then the dict starts again), about 1 MiB at worst.
_KNOWN_LINES: Final[dict[bytes, tuple[bytes, bytes]]] = {}
MAX_KNOWN_LINE_BYTES: Final = 256
MAX_KNOWN_LINES: Final = 4096
#: Lines never kept: a credential's (kept past its request, it would outlive it in
#: memory) and a WebSocket key's (new each handshake: it would only fill the cache).
_UNKEPT_HEADER_NAMES: Final = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"api-key",
        b"cookie",
        b"sec-websocket-protocol",
        b"sec-websocket-key",
    }
)


def _fast_head(
    raw: bytes, first_line: re.Pattern[bytes]
) -> tuple[re.Match[bytes], list[tuple[bytes, bytes]]] | None:
    """The first line's match and the (lowercased name, value) headers, or None for h11."""
    lines = raw[: -len(_HEAD_END)].split(b"\r\n")
    start = first_line.fullmatch(lines[0])
    if start is None:
        return None
    headers: list[tuple[bytes, bytes]] = []
    hosts = 0
    framing: tuple[bytes, bytes] | None = None
    known = _KNOWN_LINES
    for line in lines[1:]:
        pair = known.get(line)
        if pair is None:
            field = _FAST_HEADER.fullmatch(line)
            if field is None:
                return None
            pair = (field[1].lower(), field[2])
            if len(line) <= MAX_KNOWN_LINE_BYTES and pair[0] not in _UNKEPT_HEADER_NAMES:
                if len(known) >= MAX_KNOWN_LINES:
                    known.clear()
                known[line] = pair
        name = pair[0]
        if name in _H11_JUDGED:
            if framing is not None:
                return None
            framing = pair
        if name == b"host":
            hosts += 1
        headers.append(pair)
    if first_line is _FAST_REQUEST_LINE and hosts != 1:
        return None  # h11: Host is required in HTTP/1.1 and never repeated
    if framing is not None and not _plain_framing(start, *framing):
        return None
    return start, headers


def _plain_framing(start: re.Match[bytes], name: bytes, value: bytes) -> bool:
    """A framing header h11 would read as it is: digits for a length, or ``chunked``
    (h11 lower-cases that value) on HTTP/1.1; never on an interim response."""
    if start.re is _FAST_REQUEST_LINE:
        version, interim = start[3], False
    else:
        version, interim = start[1], start[2].startswith(b"1")
    if interim:
        return False
    if name == b"content-length":
        return _FAST_CONTENT_LENGTH.fullmatch(value) is not None
    return value == b"chunked" and version == b"1.1"


class HandshakeError(Exception):
    """A head that cannot be answered with a WebSocket: ``status`` is the HTTP answer.

    ``message`` is ours, never text taken from the request, so an answer cannot echo
    a credential or header bytes back; ``headers`` go on the answer (``Allow``,
    ``Sec-WebSocket-Version``...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One parsed HTTP request head. Header names are lower-case bytes."""

    method: str
    target: str
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)
    #: ``1.1`` or ``1.0`` (h11 refuses anything else).
    http_version: str = "1.1"
    #: Bytes that followed the head in the same read (pipelined data).
    trailing: bytes = field(default=b"", repr=False)
    #: The exact bytes of the head, for handing the connection to another server.
    raw: bytes = field(default=b"", repr=False)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]

    def header(self, name: bytes) -> str | None:
        """The first value of a header, or ``None``."""
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    def header_count(self, name: bytes) -> int:
        """How many times a header was sent."""
        return sum(1 for key, _ in self.headers if key == name)

    def header_tokens(self, name: bytes) -> list[str]:
        """All comma-separated tokens of every instance of a header, stripped."""
        out: list[str] = []
        for key, value in self.headers:
            if key == name:
                out.extend(t.strip() for t in value.decode("latin-1").split(",") if t.strip())
        return out

    @property
    def subprotocols(self) -> list[str]:
        return self.header_tokens(b"sec-websocket-protocol")

    def is_websocket_upgrade(self) -> bool:
        return "websocket" in (t.lower() for t in self.header_tokens(b"upgrade"))


def find_head_end(buffer: bytes | bytearray) -> int:
    """Index just past the blank line ending a head, or -1 if it has not arrived."""
    index = buffer.find(_HEAD_END)
    return -1 if index < 0 else index + len(_HEAD_END)


def parse_request_head(buffer: bytes | bytearray) -> RequestHead | None:
    """Parse a request head once complete; ``None`` means read more.

    Raises :class:`HandshakeError` (400, 431) for a malformed or oversized head.
    """
    end = find_head_end(buffer)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HandshakeError(431, "Request header fields too large.")
        return None
    if end > MAX_HEAD_BYTES:
        raise HandshakeError(431, "Request header fields too large.")
    raw = bytes(buffer[:end])
    fast = _fast_head(raw, _FAST_REQUEST_LINE)
    if fast is not None:
        start, fields = fast
        return RequestHead(
            method=start[1].decode("ascii"),
            target=start[2].decode("ascii"),
            headers=tuple(fields),
            http_version=start[3].decode("ascii"),
            trailing=bytes(buffer[end:]),
            raw=raw,
        )
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        conn.receive_data(raw)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        # h11's text quotes the offending line (which may carry a key): never echo it.
        raise HandshakeError(400, MALFORMED_REQUEST, code="malformed_request") from None
    if not isinstance(event, h11.Request):
        raise HandshakeError(400, MALFORMED_REQUEST, code="malformed_request")
    if event.http_version not in (b"1.0", b"1.1"):
        raise HandshakeError(505, "Only HTTP/1.1 is served here.", code="http_version")
    if not event.target.startswith(b"/"):
        # Only origin-form targets: this is a server, not a forward proxy.
        raise HandshakeError(400, MALFORMED_REQUEST, code="malformed_request")
    return RequestHead(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("ascii", "replace"),
        headers=tuple((bytes(k), bytes(v)) for k, v in event.headers),
        http_version=event.http_version.decode("ascii", "replace"),
        trailing=bytes(buffer[end:]),
        raw=raw,
    )


def websocket_request_problem(head: RequestHead) -> HandshakeError | None:
    """Why this request is not a valid RFC 6455 §4.2.1 opening handshake, or ``None``."""
    if head.method != "GET":
        return HandshakeError(
            405, "WebSocket upgrades must use GET.", code="method_not_allowed", headers=ALLOW_GET
        )
    if head.http_version != "1.1":
        return HandshakeError(400, "WebSocket upgrades need HTTP/1.1.", code="invalid_handshake")
    if not head.is_websocket_upgrade():
        return HandshakeError(
            426,
            "This endpoint requires a WebSocket upgrade.",
            code="upgrade_required",
            headers=UPGRADE_REQUIRED,
        )
    for name in SINGLE_INSTANCE_HEADERS:
        if head.header_count(name) > 1:
            return HandshakeError(
                400,
                f"The '{name.decode()}' header was sent more than once.",
                code="invalid_handshake",
            )
    if "upgrade" not in (t.lower() for t in head.header_tokens(b"connection")):
        return HandshakeError(
            400, "Missing 'Connection: Upgrade' header.", code="invalid_handshake"
        )
    if head.header(b"sec-websocket-version") != "13":
        return HandshakeError(
            426,
            "Unsupported WebSocket version; use 13.",
            code="upgrade_required",
            headers=UPGRADE_REQUIRED,
        )
    if not is_valid_websocket_key(head.header(b"sec-websocket-key")):
        return HandshakeError(
            400, "Missing or malformed 'Sec-WebSocket-Key' header.", code="invalid_handshake"
        )
    return None


def is_valid_websocket_key(key: str | None) -> bool:
    """A ``Sec-WebSocket-Key``: base64 of exactly 16 bytes (RFC 6455 §4.1, item 7)."""
    if key is None or not key.isascii():
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == WEBSOCKET_KEY_BYTES
    except (binascii.Error, ValueError):
        return False


#: Query parameters of ``/v1/realtime`` that OpenAI documents; only these (and an
#: operator's allowlist) reach the upstream, so ``api_key=`` or a test hook never does.
DOCUMENTED_QUERY_PARAMS: Final = frozenset({"model", "call_id", "intent"})
#: Parameters whose value decides something (model checks, routing): one value only.
SINGLE_VALUE_QUERY_PARAMS: Final = frozenset({"model", "call_id", "intent"})
#: Longest dropped parameter name quoted in a log line.
MAX_LOGGED_PARAM_CHARS: Final = 40


@dataclass(frozen=True, slots=True)
class RealtimeQuery:
    """The realtime query string as the relay reads it and as the upstream will get it."""

    #: The single ``model`` value, or None.
    model: str | None
    #: The allowed parameters, in their original order and encoding.
    forwarded: str
    #: Names of parameters not forwarded (for the log; never their values).
    dropped: tuple[str, ...]


def parse_realtime_query(query: str, extra_allowed: Iterable[str] = ()) -> RealtimeQuery:
    """Split a client's query into what is forwarded and what is dropped.

    Raises :class:`HandshakeError` (400) when a single-value parameter such as
    ``model`` is repeated: the relay would check one value while the upstream
    might read another.
    """
    allowed = DOCUMENTED_QUERY_PARAMS.union(extra_allowed)
    kept: list[str] = []
    dropped: list[str] = []
    seen: dict[str, str] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition("=")
        name = unquote_plus(raw_name)
        if name in SINGLE_VALUE_QUERY_PARAMS:
            if name in seen:
                raise HandshakeError(
                    400,
                    f"The query parameter '{name}' was given more than once.",
                    code="invalid_request",
                    param=name,
                )
            seen[name] = unquote_plus(raw_value)
        if name in allowed:
            kept.append(piece)
        else:
            dropped.append(name[:MAX_LOGGED_PARAM_CHARS].encode("ascii", "replace").decode())
    return RealtimeQuery(model=seen.get("model"), forwarded="&".join(kept), dropped=tuple(dropped))


def client_credential(head: RequestHead) -> str | None:
    """The key a Realtime client presented: header first, then the browser subprotocol."""
    authorization = head.header(b"authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = head.header(b"api-key")
    if api_key:
        return api_key.strip()
    for protocol in head.subprotocols:
        if protocol.startswith(API_KEY_SUBPROTOCOL_PREFIX):
            value = protocol[len(API_KEY_SUBPROTOCOL_PREFIX) :]
            return value or None
    return None


def offers_realtime(head: RequestHead) -> bool:
    return REALTIME_SUBPROTOCOL in head.subprotocols


def has_beta_marker(head: RequestHead) -> bool:
    """Whether the client sent the retired beta marker (header or subprotocol)."""
    beta = head.header(BETA_HEADER)
    if beta is not None and "realtime=v1" in beta.replace(" ", "").lower():
        return True
    return BETA_SUBPROTOCOL in head.subprotocols


def accept_token(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def accept_response(
    head: RequestHead,
    *,
    extra_headers: Iterable[tuple[str, str]] = (),
    selected_subprotocol: str | None = None,
) -> bytes:
    """The ``101`` answer: ``realtime`` selected if offered, no extensions ever.

    ``selected_subprotocol`` (one the client offered, such as the binary audio
    path's ``relay.audio.v1``) is selected instead of ``realtime``.
    """
    key = head.header(b"sec-websocket-key") or ""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_token(key)}",
    ]
    if selected_subprotocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {selected_subprotocol}")
    elif offers_realtime(head):
        lines.append(f"Sec-WebSocket-Protocol: {REALTIME_SUBPROTOCOL}")
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


#: RFC 9110's reason phrases by code: ``HTTPStatus(code)`` is an enum call per response.
_REASON_PHRASES: Final = {int(status): status.phrase for status in HTTPStatus}


def reason_phrase(status: int) -> str:
    """The status line's reason phrase (RFC 9110's), or ``Error`` for an unlisted code."""
    return _REASON_PHRASES.get(status, "Error")


def http_response(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    extra_headers: Iterable[tuple[str, str]] = (),
    keep_alive: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response with a body (used for handshake refusals)."""
    lines = [
        f"HTTP/1.1 {status} {reason_phrase(status)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: keep-alive" if keep_alive else "Connection: close",
    ]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---------------------------------------------------------------- client role


def new_websocket_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where a ``ws://`` or ``wss://`` URL points."""

    tls: bool
    host: str
    port: int
    #: Path prefix of the base URL, without a trailing slash (``/v1``).
    base_path: str

    @classmethod
    def from_url(cls, url: str) -> UpstreamTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss", "http", "https"):
            raise ValueError(f"upstream URL scheme must be ws:// or wss://, not {parts.scheme!r}")
        tls = parts.scheme in ("wss", "https")
        if not parts.hostname:
            raise ValueError("upstream URL has no host")
        return cls(
            tls=tls,
            host=parts.hostname,
            port=parts.port or (443 if tls else 80),
            base_path=parts.path.rstrip("/"),
        )

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def upgrade_request(
    *,
    host_header: str,
    target: str,
    key: str,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
) -> bytes:
    """The client's opening handshake (no ``Sec-WebSocket-Extensions``: no compression)."""
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(repr=False)
    trailing: bytes = field(default=b"", repr=False)

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None

    @property
    def content_length(self) -> int | None:
        value = self.header(b"content-length")
        if value is None or not value.strip().isdigit():
            return None
        return int(value.strip())

    @property
    def retry_after_s(self) -> float | None:
        """``Retry-After`` in seconds (RFC 9110 §10.2.3 delay-seconds); None if absent or
        a date: OpenAI and Azure send seconds, and a cool-down default covers the rest."""
        text = self.header(b"retry-after")
        if text is None:
            return None
        try:
            seconds = float(text.strip())
        except ValueError:
            return None
        return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_response_head(buffer: bytes | bytearray) -> ResponseHead | None:
    """Parse the upstream's response head once complete; ``None`` means read more.

    Raises :class:`HandshakeError` (502) when the upstream does not speak HTTP.
    """
    end = find_head_end(buffer)
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise HandshakeError(502, "Upstream sent an oversized response head.")
        return None
    fast = _fast_head(bytes(buffer[:end]), _FAST_STATUS_LINE)
    if fast is not None:
        start, fields = fast
        return ResponseHead(
            status=int(start[2]), headers=tuple(fields), trailing=bytes(buffer[end:])
        )
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    # h11 only parses a response after it has seen its own request go out.
    conn.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("Host", "upstream"), ("Connection", "Upgrade"), ("Upgrade", "websocket")],
        )
    )
    try:
        conn.receive_data(bytes(buffer[:end]))
        event = conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(502, f"Upstream sent a malformed response: {exc}") from None
    if not isinstance(event, h11.InformationalResponse | h11.Response):
        raise HandshakeError(502, "Upstream sent a malformed response.")
    return ResponseHead(
        status=event.status_code,
        headers=tuple((bytes(k), bytes(v)) for k, v in event.headers),
        trailing=bytes(buffer[end:]),
    )


def upgrade_response_problem(response: ResponseHead, key: str) -> str | None:
    """Why a ``101`` answer is not a valid acceptance of our handshake, or ``None``."""
    if response.status != 101:
        return f"upstream answered HTTP {response.status}"
    if response.header(b"sec-websocket-accept") != accept_token(key):
        return "upstream sent a wrong Sec-WebSocket-Accept"
    if response.header(b"sec-websocket-extensions"):
        return "upstream negotiated an extension we did not offer"
    return None
