"""What the REST proxy decides about one request and its response. Sans-I/O.

This module owns, for a request under ``/v1/`` that is not the Realtime upgrade:

- whether the path is proxied (:func:`is_proxied`, against the configured allowlist);
- the client's model: the JSON body's top-level ``model`` (:func:`json_model`, a
  repeated key refused: the relay would route by one value while the upstream might
  read another), or the ``model`` field of a ``multipart/form-data`` upload
  (:class:`MultipartModel`, found in the body's first bytes without reading the file);
  and the body with the model renamed when the model map aliases it;
- the upstream request: its target for each upstream kind (:func:`upstream_target`:
  ``<base><path>`` for OpenAI-shaped upstreams, Azure's deployment form
  ``/openai/deployments/<deployment><path>?api-version=…``) and its headers
  (:func:`forwarded_request_headers`: the client's own, less hop-by-hop headers and
  anything that authenticates or selects an account);
- the response: which headers reach the client (:func:`forwarded_response_headers`),
  where a chunked body ends (:class:`ChunkedScanner`, which never copies the bytes it
  forwards), and the tokens it used (:class:`UsageReader`: the JSON ``usage`` object,
  the final chat completions chunk's ``usage``, or ``response.completed`` of a
  Responses stream).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from relay.protocol.handshake import reason_phrase

#: Paths proxied by default (each also with sub-paths: ``/v1/models/<id>``).
DEFAULT_REST_PATHS: Final = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/models",
)
#: The relay's own endpoints under /v1, never proxied.
RELAY_OWN_PATHS: Final = frozenset({"/v1/realtime", "/v1/realtime/client_secrets"})
#: Request headers the relay never forwards: hop-by-hop (RFC 9110 §7.6.1), framing it
#: sets itself, and anything that authenticates or picks an account or project (the
#: relay's key decides those).
DROPPED_REQUEST_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"expect",
        b"authorization",
        b"api-key",
        b"cookie",
        b"openai-organization",
        b"openai-project",
        b"x-forwarded-for",
        b"x-real-ip",
        b"forwarded",
    }
)
#: Response headers the client never sees: hop-by-hop and upstream cookies. The
#: framing header (``transfer-encoding``/``content-length``) is kept: the body is
#: forwarded in the upstream's own framing.
DROPPED_RESPONSE_HEADERS: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"set-cookie",
    }
)
#: The longest chunk-size line (hex size plus extensions) accepted from an upstream.
MAX_CHUNK_LINE_BYTES: Final = 4096
#: The longest Server-Sent Event kept whole to read usage from (``response.completed``
#: carries the whole response); a longer one is forwarded but not read.
MAX_SSE_EVENT_BYTES: Final = 1024 * 1024
#: The longest JSON response body kept to read ``usage`` from.
MAX_USAGE_JSON_BYTES: Final = 4 * 1024 * 1024
#: Where the ``model`` field of a multipart upload must be: before the file, within this.
MAX_MULTIPART_PREFIX_BYTES: Final = 64 * 1024
_BOUNDARY_RE: Final = re.compile(r'boundary=(?:"([^"]{1,70})"|([^;\s]{1,70}))', re.I)
_NAME_RE: Final = re.compile(rb'\bname="([^"]*)"', re.I)
_HEX_DIGITS: Final = b"0123456789abcdefABCDEF"
#: Chunk size lines already read (1-16 hex digits, no extension), and their sizes: a
#: stream's chunks repeat a few sizes, and a look-up instead of the check of the digits
#: and their parse was about 2k instructions fewer a chunk (callgrind, a two-digit
#: line). Bounded: cleared when full.
_KNOWN_CHUNK_SIZES: Final[dict[bytes, int]] = {}
MAX_KNOWN_CHUNK_SIZES: Final = 4096


class RestRequestError(Exception):
    """A request the relay answers itself: an HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


class UpstreamFramingError(Exception):
    """The upstream's response body is not valid HTTP/1.1 framing."""


def is_proxied(path: str, allowed: Iterable[str]) -> bool:
    """Whether ``path`` is one of ``allowed`` or below one of them (never the relay's own)."""
    if path in RELAY_OWN_PATHS or path.startswith("/v1/realtime/"):
        return False
    return any(path == prefix or path.startswith(prefix + "/") for prefix in allowed)


def is_json(content_type: str | None) -> bool:
    return content_type is not None and content_type.split(";")[0].strip().lower() in (
        "application/json",
        "text/json",
    )


def multipart_boundary(content_type: str | None) -> bytes | None:
    if content_type is None or not content_type.lower().startswith("multipart/form-data"):
        return None
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        return None
    return (match.group(1) or match.group(2)).encode("latin-1")


# ------------------------------------------------------------------ the client's model


def json_model(body: bytes) -> str | None:
    """The top-level ``model`` of a JSON body (None when absent); raises on a bad body."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise RestRequestError(400, "The request body is not valid JSON.", "invalid_json") from None
    if not isinstance(document, dict):
        raise RestRequestError(400, "The request body must be a JSON object.", "invalid_json")
    if body.count(b'"model"') > 1 and _top_level_keys(body).count("model") > 1:
        raise RestRequestError(
            400, "The field 'model' was given more than once.", "invalid_request", "model"
        )
    model = document.get("model")
    if model is None:
        return None
    if not isinstance(model, str):
        raise RestRequestError(400, "'model' must be a string.", "invalid_type", "model")
    return model


def _top_level_keys(body: bytes) -> list[str]:
    """Every top-level key in order, repeats kept (orjson keeps only the last). Only run
    when ``"model"`` occurs twice in the bytes: the slow parser for the rare body."""
    objects: list[list[tuple[str, Any]]] = []

    def capture(items: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(items)
        return dict(items)

    json.loads(body, object_pairs_hook=capture)
    # Objects close innermost first: the outermost is the last one built.
    return [key for key, _ in objects[-1]] if objects else []


def json_with_model(body: bytes, model: str) -> bytes:
    """``body`` with its top-level ``model`` set to ``model`` (for an aliased model)."""
    document = orjson.loads(body)
    document["model"] = model
    return orjson.dumps(document)


@dataclass(frozen=True, slots=True)
class MultipartField:
    """Where the ``model`` field's value sits in the buffered prefix of an upload."""

    value: str
    start: int
    end: int


class MultipartModel:
    """Finds the ``model`` field of a ``multipart/form-data`` body in its first bytes.

    Feed the body's bytes as they arrive; :attr:`found` is the field once its part is
    complete, :attr:`hopeless` once a file part or :data:`MAX_MULTIPART_PREFIX_BYTES`
    came first. The bytes themselves are the caller's (this keeps offsets only).
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._buffer = bytearray()
        self.found: MultipartField | None = None
        self.hopeless = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.found is not None or self.hopeless:
            return
        self._buffer += data
        self._scan()
        if self.found is None and len(self._buffer) > MAX_MULTIPART_PREFIX_BYTES:
            self.hopeless = True

    def _scan(self) -> None:
        buffer, delimiter = self._buffer, self._delimiter
        position = buffer.find(delimiter)
        while position >= 0:
            head_start = position + len(delimiter) + 2  # past the CRLF
            head_end = buffer.find(b"\r\n\r\n", head_start)
            if head_end < 0:
                return
            headers = bytes(buffer[head_start:head_end])
            value_start = head_end + 4
            next_part = buffer.find(b"\r\n" + delimiter, value_start)
            name = _NAME_RE.search(headers)
            if name is not None and b"filename=" in headers.lower():
                self.hopeless = True  # a file before the model: it would have to be read
                return
            if next_part < 0:
                return
            if name is not None and name.group(1) == b"model":
                value = bytes(buffer[value_start:next_part]).decode("utf-8", "replace")
                self.found = MultipartField(value, value_start, next_part)
                return
            position = next_part + 2


def multipart_with_model(prefix: bytes, field: MultipartField, model: str) -> bytes:
    """The buffered prefix with the model field's value replaced (the rest follows as is)."""
    return prefix[: field.start] + model.encode() + prefix[field.end :]


# ------------------------------------------------------------------ the upstream request


def upstream_target(
    *,
    azure: bool,
    base_path: str,
    path: str,
    query: str,
    deployment: str | None,
    azure_api_version: str,
) -> str:
    """The request target: OpenAI-shaped ``<base><path below /v1>?<query>``, or Azure's
    deployment form ``/openai/deployments/<deployment><path below /v1>?api-version=…``
    (chat, audio, embeddings), or for the Responses API, which Azure serves only in its
    v1 form, ``/openai/v1/responses…`` (the deployment then goes in the body's
    ``model``: :func:`azure_names_model_in_body`)."""
    below_v1 = path[len("/v1") :] if path.startswith("/v1/") else path
    if azure and azure_names_model_in_body(path):
        resource = _azure_resource(base_path)
        target = f"{resource}/openai{path}"
        return f"{target}?{query}" if query else target
    if azure:
        if deployment is None:
            raise RestRequestError(
                400, "This path needs a model to name its Azure deployment.", "missing_model"
            )
        resource = _azure_resource(base_path)
        rest = "&".join(
            piece for piece in query.split("&") if piece and not piece.startswith("api-version=")
        )
        ours = f"api-version={azure_api_version}"
        target = f"{resource}/openai/deployments/{deployment}{below_v1}?{ours}"
        return f"{target}&{rest}" if rest else target
    target = f"{base_path}{below_v1}"
    return f"{target}?{query}" if query else target


def azure_names_model_in_body(path: str) -> bool:
    """Whether Azure takes this path in its v1 form, the deployment as the body's model."""
    return path == "/v1/responses" or path.startswith("/v1/responses/")


def _azure_resource(base_path: str) -> str:
    """The base path without Azure's API suffix, so ``…/openai/v1`` is not doubled."""
    for suffix in ("/openai/v1", "/openai"):
        if base_path.endswith(suffix):
            return base_path[: -len(suffix)]
    return base_path


def forwarded_request_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> list[tuple[bytes, bytes]]:
    """The client's headers the upstream may see (the relay adds Host, auth and length)."""
    return [(name, value) for name, value in headers if name not in DROPPED_REQUEST_HEADERS]


def request_head(
    method: str,
    target: str,
    *,
    host_header: str,
    headers: Sequence[tuple[bytes, bytes]],
    credential: tuple[str, str],
    content_length: int | None,
) -> bytes:
    """One HTTP/1.1 request head, keep-alive."""
    lines = [f"{method} {target} HTTP/1.1".encode(), b"Host: " + host_header.encode()]
    lines.append(f"{credential[0]}: {credential[1]}".encode("latin-1"))
    lines.extend(name + b": " + value for name, value in headers)
    if content_length is not None:
        lines.append(b"Content-Length: " + str(content_length).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n"


def forwarded_response_headers(
    headers: Iterable[tuple[bytes, bytes]], *, keep_alive: bool
) -> list[tuple[bytes, bytes]]:
    kept = [(name, value) for name, value in headers if name not in DROPPED_RESPONSE_HEADERS]
    if not keep_alive:
        kept.append((b"connection", b"close"))
    return kept


def response_head(status: int, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        # At most one per three-digit code (the parsers take no other): a bounded cache.
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s" % (status, reason_phrase(status).encode())
    lines = [line]
    lines.extend(name + b": " + value for name, value in headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


#: Status lines by code, built on first use.
_STATUS_LINES: dict[int, bytes] = {}


def header_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def wants_close(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    value = header_value(headers, b"connection")
    return value is not None and b"close" in value.lower()


def is_chunked(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    value = header_value(headers, b"transfer-encoding")
    return value is not None and value.strip().lower().endswith(b"chunked")


# ------------------------------------------------------------------ response framing


#: A chunked body's reading states (module constants: a class attribute read through
#: ``self`` is a type look-up each time).
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedScanner:
    """Where a ``Transfer-Encoding: chunked`` body ends, and its payload, without copies.

    :meth:`feed` takes ``buffer[start:end]`` (the bytes just read) and returns
    ``(used, payload)``: the position in ``buffer`` where this body's bytes stop (the
    rest is not this response's) and the payload's ``(start, stop)`` spans inside them,
    for the usage reader. :attr:`done` once the last chunk and its trailers have passed.
    ``view``, a memoryview of ``buffer`` when the caller has one, saves a copy per chunk.
    """

    __slots__ = ("_line", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._line = bytearray()
        self.done = False

    def feed(
        self,
        buffer: bytes | bytearray,
        start: int,
        end: int,
        view: memoryview | None = None,
    ) -> tuple[int, list[tuple[int, int]]]:
        payload: list[tuple[int, int]] = []
        position = start
        known = _KNOWN_CHUNK_SIZES
        while position < end and not self.done:
            state = self._state
            if state == _SIZE and not self._line:
                # The usual case, a whole chunk in the buffer: size line, data, CRLF.
                newline = buffer.find(b"\r\n", position, end)
                if 0 < newline - position <= 16:
                    line = (
                        view[position:newline].tobytes()
                        if view is not None
                        else bytes(buffer[position:newline])
                    )
                    size = known.get(line)
                    # (All hex digits when deleting them leaves nothing: no set per line.)
                    if size is None and not line.translate(None, _HEX_DIGITS):
                        if len(known) >= MAX_KNOWN_CHUNK_SIZES:
                            known.clear()
                        size = known[line] = int(line, 16)
                    if size:  # (not hex, or the last chunk: the general way below)
                        data_start = newline + 2
                        data_end = data_start + size
                        # (Two indexings: a bytes method call builds a tuple of its
                        # arguments, several times their cost.)
                        if (
                            data_end + 2 <= end
                            and buffer[data_end] == 13  # \r
                            and buffer[data_end + 1] == 10  # \n
                        ):
                            payload.append((data_start, data_end))
                            position = data_end + 2
                            continue
            if state == _DATA:
                take = min(self._remaining, end - position)
                payload.append((position, position + take))
                position += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = _DATA_END
                continue
            newline = buffer.find(b"\n", position, end)
            if newline < 0:
                self._line += buffer[position:end]
                position = end
                if len(self._line) > MAX_CHUNK_LINE_BYTES:
                    raise UpstreamFramingError("chunk line too long")
                break
            self._line += buffer[position:newline]
            position = newline + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            if state == _SIZE:
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or size_text.translate(None, _HEX_DIGITS) or len(size_text) > 16:
                    raise UpstreamFramingError("bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._remaining = size
                    self._state = _DATA
            elif state == _DATA_END:
                if line:
                    raise UpstreamFramingError("chunk data not followed by CRLF")
                self._state = _SIZE
            elif not line:  # the empty line after the trailers
                self.done = True
        return position, payload


# ------------------------------------------------------------------ usage


@dataclass(frozen=True, slots=True)
class UsageCounts:
    """Tokens by the kinds of ``relay_usage_tokens`` (the Realtime sessions' kinds)."""

    input_text: int = 0
    input_audio: int = 0
    input_cached: int = 0
    output_text: int = 0
    output_audio: int = 0

    def as_kinds(self) -> dict[str, int]:
        return {
            "input_text": self.input_text,
            "input_audio": self.input_audio,
            "input_cached": self.input_cached,
            "output_text": self.output_text,
            "output_audio": self.output_audio,
        }


#: An SSE event's end: a line's end and an empty line's, each CRLF, LF or CR (WHATWG's
#: event stream; OpenAI's streams use LF alone, other compatible servers may not). A CR
#: is a line's end alone only when no LF follows it.
_SSE_LINE_END: Final = rb"(?:\r\n|\n|\r(?!\n))"
_SSE_EVENT_END: Final = re.compile(_SSE_LINE_END + _SSE_LINE_END)
_MAX_SSE_EVENT_END_BYTES: Final = len(b"\r\n\r\n")
#: How a chat chunk's event ends when usage was asked for and this is not the last one.
_NULL_USAGE_END: Final = b'"usage":null}\n\n'


def _has_usage_object(event: bytes | bytearray, start: int, end: int) -> bool:
    """Whether ``event[start:end]`` has a ``"usage"`` key whose value is an object: chat
    chunks carry ``"usage": null`` on every event when usage was asked for, and only
    the last one is worth parsing."""
    position = event.find(b'"usage"', start, end)
    while position >= 0:
        if event.startswith(b'"usage":null', position, end):  # every chunk's but the last
            position = event.find(b'"usage"', position + len(b'"usage":null'), end)
            continue
        after = position + len(b'"usage"')
        while after < end and event[after] in b" \t\r\n:":
            after += 1
        if after < end and event[after] == 0x7B:  # "{"
            return True
        position = event.find(b'"usage"', after, end)
    return False


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def _details(usage: Mapping[str, Any], *names: str) -> Mapping[str, Any]:
    for name in names:
        found = usage.get(name)
        if type(found) is dict:
            return found
    return _NO_DETAILS


_NO_DETAILS: Final[Mapping[str, Any]] = {}


def usage_counts(usage: Mapping[str, Any]) -> UsageCounts:
    """Chat/completions (``prompt_tokens``…), Responses and transcriptions
    (``input_tokens``…) and embeddings usage objects, in one set of kinds."""
    inputs = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    outputs = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    in_details = _details(
        usage, "prompt_tokens_details", "input_tokens_details", "input_token_details"
    )
    out_details = _details(usage, "completion_tokens_details", "output_tokens_details")
    input_audio = min(inputs, _count(in_details.get("audio_tokens")))
    output_audio = min(outputs, _count(out_details.get("audio_tokens")))
    return UsageCounts(
        input_text=inputs - input_audio,
        input_audio=input_audio,
        input_cached=min(inputs, _count(in_details.get("cached_tokens"))),
        output_text=outputs - output_audio,
        output_audio=output_audio,
    )


class UsageReader:
    """Reads the tokens a response used from its payload as it streams past.

    ``text/event-stream``: each event is kept (bounded by :data:`MAX_SSE_EVENT_BYTES`)
    only until its end, and parsed only when it mentions ``"usage"``: the chat
    completions chunk whose ``usage`` is set, or ``response.completed``. JSON: the body
    (bounded by :data:`MAX_USAGE_JSON_BYTES`) is parsed once at the end. Anything
    else (audio) carries no usage.
    """

    __slots__ = ("_event", "_json", "_kind", "_oversized", "model", "usage")

    def __init__(self, content_type: str | None) -> None:
        base = (content_type or "").split(";")[0].strip().lower()
        self._kind = "sse" if base == "text/event-stream" else "json" if is_json(base) else ""
        self._event = bytearray()
        self._json = bytearray()
        self._oversized = False
        self.usage: UsageCounts | None = None
        #: The model the upstream says it used (``model`` of the usage's object).
        self.model: str | None = None

    def feed_span(self, buffer: bytes | bytearray, start: int, stop: int) -> None:
        """:meth:`feed` of ``buffer[start:stop]``, without copying the common case: an
        SSE span of whole events, none with a usage object, while nothing is pending."""
        if self._kind == "sse" and not self._event:
            # A chat chunk when usage was asked for: one event ending in a null usage, and
            # no other "usage" before it. One scan in C, no Python walk.
            if buffer.endswith(_NULL_USAGE_END, start, stop) and (
                buffer.find(b'"usage"', start, stop - len(_NULL_USAGE_END)) < 0
            ):
                return
            if stop - start >= 2 and buffer.endswith(b"\n\n", start, stop):  # whole events
                if not _has_usage_object(buffer, start, stop):
                    return
                if buffer.startswith(b"data:", start) and buffer.find(b"\n", start, stop - 2) < 0:
                    # One event of one data line (the usage chunk): parsed where it lies.
                    self._read_data(memoryview(buffer)[start + len(b"data:") : stop - 2])
                    return
        self.feed(memoryview(buffer)[start:stop])

    def feed(self, payload: bytes | memoryview) -> None:
        kind = self._kind
        if kind == "sse":
            self._feed_sse(payload)
        elif kind == "json" and not self._oversized:
            self._json += payload
            if len(self._json) > MAX_USAGE_JSON_BYTES:
                self._oversized = True
                self._json.clear()

    def finish(self) -> None:
        if self._kind == "json" and self._json and not self._oversized:
            try:
                document = orjson.loads(self._json)
            except orjson.JSONDecodeError:
                return
            self._take(document)

    def _feed_sse(self, payload: bytes | memoryview) -> None:
        event = self._event
        # An end not found before lies in the new bytes, or begins in the last few held
        # (a blank line is at most four bytes): searched from there, an event trickled a
        # byte at a time costs its length once, not its length at every byte.
        searched_from = max(0, len(event) - (_MAX_SSE_EVENT_END_BYTES - 1))
        event += payload
        while True:
            blank = _SSE_EVENT_END.search(event, searched_from)
            if blank is None:
                if len(event) > MAX_SSE_EVENT_BYTES:
                    event.clear()  # too long to read; its end is still found later
                return
            end = blank.start()
            if _has_usage_object(event, 0, end):
                self._read_event(bytes(event[:end]))
            del event[: blank.end()]
            searched_from = 0

    def _read_event(self, text: bytes) -> None:
        self._read_data(
            b"\n".join(
                line[5:].lstrip(b" ") for line in text.splitlines() if line.startswith(b"data:")
            )
        )

    def _read_data(self, data: bytes | memoryview) -> None:
        """An event's data (JSON; the space after ``data:`` may lead it)."""
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(document, dict):
            return
        if document.get("type") == "response.completed" and isinstance(
            document.get("response"), dict
        ):
            document = document["response"]
        self._take(document)

    def _take(self, document: object) -> None:
        if not isinstance(document, dict):
            return
        usage = document.get("usage")
        if isinstance(usage, dict):
            self.usage = usage_counts(usage)
            model = document.get("model")
            if isinstance(model, str):
                self.model = model
