"""The REST proxy's sans-I/O core, without an event loop: paths, the client's model,
upstream targets, headers, chunked framing fed every way, and usage from each shape."""

from __future__ import annotations

import json

import pytest

from relay.rest import messages
from relay.rest.messages import (
    ChunkedScanner,
    MultipartModel,
    RestRequestError,
    UpstreamFramingError,
    UsageReader,
)


@pytest.mark.parametrize(
    ("path", "proxied"),
    [
        ("/v1/chat/completions", True),
        ("/v1/responses", True),
        ("/v1/responses/resp_123", True),
        ("/v1/models/gpt-realtime", True),
        ("/v1/audio/transcriptions", True),
        ("/v1/chat/completionsX", False),
        ("/v1/files", False),
        ("/v1/realtime", False),
        ("/v1/realtime/client_secrets", False),
        ("/v1/realtime/calls", False),
        ("/v2/chat/completions", False),
    ],
)
def test_the_path_allowlist(path: str, proxied: bool) -> None:
    assert messages.is_proxied(path, messages.DEFAULT_REST_PATHS) is proxied


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"gpt-4.1","messages":[]}', "gpt-4.1"),
        (b'{"messages":[{"role":"user","content":"model"}]}', None),
        # A nested "model" key is not the request's model, and is no repeat.
        (b'{"model":"a","tools":[{"model":"b"}]}', "a"),
    ],
)
def test_the_json_model(body: bytes, expected: str | None) -> None:
    assert messages.json_model(body) == expected


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model":"cheap","model":"expensive"}', "invalid_request"),
        (b'{"model": 5}', "invalid_type"),
        (b"[1, 2]", "invalid_json"),
        (b"{not json", "invalid_json"),
    ],
)
def test_a_json_body_that_cannot_be_routed_is_refused(body: bytes, code: str) -> None:
    with pytest.raises(RestRequestError) as caught:
        messages.json_model(body)
    assert (caught.value.status, caught.value.code) == (400, code)


def test_an_alias_renames_the_model_and_keeps_the_rest() -> None:
    renamed = messages.json_with_model(b'{"model":"fast","stream":true}', "gpt-4.1-mini")
    assert json.loads(renamed) == {"model": "gpt-4.1-mini", "stream": True}


BOUNDARY = b"abc123"


def multipart(*parts: tuple[str, bytes, str | None]) -> bytes:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n"
        out += value + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def test_the_multipart_model_is_found_before_the_file_byte_by_byte() -> None:
    body = multipart(("model", b"whisper-1", None), ("file", b"\x00" * 1000, "a.wav"))
    finder = MultipartModel(BOUNDARY)
    for index in range(len(body)):
        finder.feed(body[index : index + 1])
        if finder.found is not None:
            break
    assert finder.found is not None
    assert finder.found.value == "whisper-1"
    assert body[finder.found.start : finder.found.end] == b"whisper-1"
    renamed = messages.multipart_with_model(body, finder.found, "gpt-4o-transcribe")
    assert b'name="model"\r\n\r\ngpt-4o-transcribe\r\n' in renamed


def test_a_file_before_the_model_is_hopeless_without_reading_the_file() -> None:
    body = multipart(("file", b"\x00" * 10, "a.wav"), ("model", b"whisper-1", None))
    finder = MultipartModel(BOUNDARY)
    finder.feed(body)
    assert finder.found is None
    assert finder.hopeless


def test_the_multipart_boundary() -> None:
    assert messages.multipart_boundary("multipart/form-data; boundary=xyz") == b"xyz"
    assert messages.multipart_boundary('multipart/form-data; boundary="a b"') == b"a b"
    assert messages.multipart_boundary("application/json") is None


@pytest.mark.parametrize(
    ("azure", "base", "path", "query", "deployment", "expected"),
    [
        (False, "/v1", "/v1/chat/completions", "", "gpt-4.1", "/v1/chat/completions"),
        (False, "", "/v1/models", "limit=2", None, "/models?limit=2"),
        (
            True,
            "",
            "/v1/chat/completions",
            "",
            "chat-prod",
            "/openai/deployments/chat-prod/chat/completions?api-version=2024-10-21",
        ),
        (True, "", "/v1/responses", "", "resp-prod", "/openai/v1/responses"),
        (True, "/openai/v1", "/v1/responses/resp_1", "x=1", "d", "/openai/v1/responses/resp_1?x=1"),
        (
            True,
            "/openai/v1",
            "/v1/audio/transcriptions",
            "api-version=evil&x=1",
            "whisper",
            "/openai/deployments/whisper/audio/transcriptions?api-version=2024-10-21&x=1",
        ),
    ],
)
def test_upstream_targets(
    azure: bool, base: str, path: str, query: str, deployment: str | None, expected: str
) -> None:
    target = messages.upstream_target(
        azure=azure,
        base_path=base,
        path=path,
        query=query,
        deployment=deployment,
        azure_api_version="2024-10-21",
    )
    assert target == expected


def test_no_client_credential_account_or_hop_header_is_forwarded() -> None:
    headers = [
        (b"authorization", b"Bearer client-key"),
        (b"api-key", b"x"),
        (b"openai-organization", b"org-other"),
        (b"connection", b"keep-alive"),
        (b"content-type", b"application/json"),
        (b"x-stainless-lang", b"python"),
        (b"cookie", b"a=b"),
    ]
    assert messages.forwarded_request_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"x-stainless-lang", b"python"),
    ]
    response = [(b"set-cookie", b"__cf_bm=1"), (b"x-request-id", b"req_1"), (b"retry-after", b"3")]
    assert messages.forwarded_response_headers(response, keep_alive=True) == [
        (b"x-request-id", b"req_1"),
        (b"retry-after", b"3"),
    ]


CHUNKED = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nTrailer: x\r\n\r\n"


@pytest.mark.parametrize("with_view", [False, True], ids=["bytes", "view"])
@pytest.mark.parametrize("piece", [1, 2, 3, 7, len(CHUNKED)])
def test_the_chunked_scanner_finds_the_end_and_the_payload_however_it_is_cut(
    piece: int, with_view: bool
) -> None:
    scanner = ChunkedScanner()
    payload = b""
    for start in range(0, len(CHUNKED), piece):
        data = bytearray(CHUNKED[start : start + piece])
        view = memoryview(data) if with_view else None
        used, spans = scanner.feed(data, 0, len(data), view)
        payload += b"".join(data[a:b] for a, b in spans)
        assert used == len(data)
    assert scanner.done
    assert payload == b"Wiki" + b"pedia" + b" in\r\n\r\nchunks."


def test_the_chunked_scanner_stops_at_the_body_s_end() -> None:
    data = b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"
    used, _ = ChunkedScanner().feed(data, 0, len(data))
    assert data[used:] == b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n",
        b"3\r\nabcX\r\n",
        b"1" * 20 + b"\r\n",
        b"9" * 5000,
        b"0x3\r\nabc\r\n",
        b"+3\r\nabc\r\n",
    ],
)
def test_bad_upstream_framing_is_an_error(data: bytes) -> None:
    for _ in range(2):  # the second time with whatever the first left known
        with pytest.raises(UpstreamFramingError):
            ChunkedScanner().feed(data, 0, len(data))


def test_known_chunk_sizes_read_as_the_first_time_and_stay_bounded() -> None:
    known = messages._KNOWN_CHUNK_SIZES
    known.clear()
    body = b"".join(b"%x\r\n%s\r\n" % (size, b"a" * size) for size in (3, 3, 12, 3)) + b"0\r\n\r\n"
    for _ in range(2):
        scanner = ChunkedScanner()
        used, spans = scanner.feed(body, 0, len(body))
        assert (used, scanner.done) == (len(body), True)
        assert [b - a for a, b in spans] == [3, 3, 12, 3]
    assert known == {b"3": 3, b"c": 12, b"0": 0}
    # Past the bound the sizes known start again: never more than the bound.
    for size in range(1, messages.MAX_KNOWN_CHUNK_SIZES + 10):
        chunk = b"%x\r\n%s\r\n" % (size, b"a" * size)
        ChunkedScanner().feed(chunk, 0, len(chunk))
        assert len(known) <= messages.MAX_KNOWN_CHUNK_SIZES
    assert 0 < len(known) < messages.MAX_KNOWN_CHUNK_SIZES


def sse(*events: dict[str, object]) -> bytes:
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + (
        b"data: [DONE]\n\n"
    )


CHAT_USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 7,
    "total_tokens": 27,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {"audio_tokens": 2},
}


@pytest.mark.parametrize("piece", [1, 5, 64, 100_000])
def test_usage_from_the_final_chat_chunk_however_the_stream_is_cut(piece: int) -> None:
    stream = sse(
        # Every chunk of a stream that asked for usage says "usage": null but the last.
        {"object": "chat.completion.chunk", "choices": [{"delta": {}}], "usage": None},
        {"object": "chat.completion.chunk", "model": "gpt-4.1", "choices": [], "usage": CHAT_USAGE},
    )
    reader = UsageReader("text/event-stream; charset=utf-8")
    for start in range(0, len(stream), piece):
        reader.feed(stream[start : start + piece])
    reader.finish()
    assert reader.usage is not None
    assert reader.usage.as_kinds() == {
        "input_text": 20,
        "input_audio": 0,
        "input_cached": 4,
        "output_text": 5,
        "output_audio": 2,
    }
    assert reader.model == "gpt-4.1"


NULL_CHUNK = b'data: {"object":"chat.completion.chunk","choices":[],"usage":null}\n\n'
USAGE_CHUNK = (
    b'data: {"object":"chat.completion.chunk","model":"gpt-4.1","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
)


@pytest.mark.parametrize(
    ("spans", "tokens"),
    [
        ([NULL_CHUNK], None),  # every chunk but the last: not parsed
        ([USAGE_CHUNK], (5, 2)),  # the last, parsed where it lies
        ([USAGE_CHUNK + NULL_CHUNK], (5, 2)),  # a usage object before a null one
        ([NULL_CHUNK + USAGE_CHUNK], (5, 2)),
        ([USAGE_CHUNK[:30], USAGE_CHUNK[30:]], (5, 2)),  # an event over two spans
        ([b"event: x\n" + USAGE_CHUNK], (5, 2)),  # two lines
        ([b"data: {\ndata: " + USAGE_CHUNK[7:]], (5, 2)),  # the JSON over two data lines
        ([NULL_CHUNK[:-1], b"\n"], None),
    ],
)
def test_usage_from_spans_of_a_stream(spans: list[bytes], tokens: tuple[int, int] | None) -> None:
    reader = UsageReader("text/event-stream")
    for span in spans:
        padded = b"xx" + span + b"yy"  # the span inside a bigger buffer, as the pump's
        reader.feed_span(bytearray(padded), 2, 2 + len(span))
    reader.finish()
    got = None if reader.usage is None else (reader.usage.input_text, reader.usage.output_text)
    assert got == tokens


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("piece", [1, 3, 100_000])
def test_usage_from_a_stream_whatever_its_line_ends(line_end: bytes, piece: int) -> None:
    usage = b'{"model":"gpt-4.1","usage":{"prompt_tokens":5,"completion_tokens":2}}'
    stream = line_end.join(
        [b"event: x", b'data: {"usage":null}', b"", b"data: " + usage, b"", b"data: [DONE]", b""]
    )
    reader = UsageReader("text/event-stream")
    for start in range(0, len(stream), piece):  # cut between a CR and its LF too
        span = bytearray(stream[start : start + piece])
        reader.feed_span(span, 0, len(span))
    reader.finish()
    assert reader.usage is not None
    assert (reader.usage.input_text, reader.usage.output_text) == (5, 2)
    assert reader.model == "gpt-4.1"


def test_usage_from_response_completed_and_from_json_bodies() -> None:
    completed = {
        "type": "response.completed",
        "response": {
            "model": "gpt-4.1",
            "usage": {"input_tokens": 9, "output_tokens": 3, "total_tokens": 12},
        },
    }
    stream = b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n"
    reader = UsageReader("text/event-stream")
    reader.feed(stream)
    assert reader.usage is not None
    assert (reader.usage.input_text, reader.usage.output_text) == (9, 3)
    body = json.dumps({"model": "text-embedding-3-small", "usage": {"prompt_tokens": 8}}).encode()
    reader = UsageReader("application/json")
    reader.feed(body[:10])
    reader.feed(body[10:])
    reader.finish()
    assert reader.usage is not None
    assert reader.usage.input_text == 8
    audio = UsageReader("audio/mpeg")
    audio.feed(b"\xff\xfb" * 100)
    audio.finish()
    assert audio.usage is None


def test_a_chat_stream_without_usage_and_an_oversized_event_read_nothing() -> None:
    reader = UsageReader("text/event-stream")
    reader.feed(sse({"choices": [{"delta": {"content": "usage"}}]}))
    reader.feed(b"data: " + b"x" * (messages.MAX_SSE_EVENT_BYTES + 10))
    reader.feed(b"\n\n")
    reader.finish()
    assert reader.usage is None


@pytest.mark.parametrize(
    ("event", "start", "end", "expected"),
    [
        (b'{"usage":null}', 0, None, False),  # every chunk of an upstream's stream but one
        (b'{"usage": null}', 0, None, False),
        (b'{"usage":null,"choices":[],"usage":{"total_tokens":3}}', 0, None, True),
        (b'data: {"usage":null}\n\ndata: {"usage":{"total_tokens":3}}\n\n', 0, None, True),
        (b'{"usage" : {"total_tokens":3}}', 0, None, True),
        (b'{"usage":{}}', 1, None, True),
        # The span ends inside the null: what follows it is not looked at.
        (b'{"usage":nu{"usage":{}}', 0, 11, False),
        (b'{"usage":{"a":1}}', 0, 8, False),
        (b'{"x":{"usage":{"a":1}}}', 7, None, False),  # the span starts past the key
    ],
)
def test_only_a_usage_key_with_an_object_inside_the_span_counts(
    event: bytes, start: int, end: int | None, expected: bool
) -> None:
    assert messages._has_usage_object(event, start, len(event) if end is None else end) is expected
