"""bench/c/sse_upstream.c, the REST bench's light upstream: the simulator's bytes.

Against the in-process simulator (``relay simulate``'s REST side) on the same request:
the same head and the same SSE events in the same HTTP chunks once ids and timestamps
are masked, with and without ``stream_options.include_usage``, on one keep-alive
connection; the official SDK's stream types accept it; a client that leaves mid-stream
does not stop it serving others; jittered waits (``--chunk-jitter-ms``) keep every
stream's bytes; and its refusals. Counts and bytes, never timings.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from openai import AsyncOpenAI

from tests.conftest import SIM_KEY, run_asyncio, start_simulator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness import (  # type: ignore[import-not-found,unused-ignore]
    build_light_sse,
    free_port,
    wait_for_port,
)

PIECES = 5
MODEL = "gpt-4o-mini"
#: What differs between two answers to the same request: ids and timestamps.
_VARYING = (
    (re.compile(rb"chatcmpl-[A-Za-z0-9]{21}"), b"chatcmpl-X"),
    (re.compile(rb"req_[A-Za-z0-9]{21}"), b"req_X"),
    (re.compile(rb'"created":\d+'), b'"created":0'),
)


def _start(*options: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([str(build_light_sse()), "--port", str(port), *options])
    wait_for_port(port, process)
    return process, port


@pytest.fixture
def sse_port() -> Iterator[int]:
    process, port = _start(
        *("--api-key", SIM_KEY, "--chunk-interval-ms", "1", "--stream-chunks", str(PIECES))
    )
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _request(
    body: dict[str, object], *, key: str = SIM_KEY, path: str = "/v1/chat/completions"
) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def _chat(*, include_usage: bool, content: object = "Say something short, é.") -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL,
        "stream": True,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": content},
        ],
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def _answers(port: int, requests: list[bytes]) -> list[bytes]:
    """Each request on one connection, in turn, and its whole answer (to the last chunk)."""
    answers = []
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        with trio.fail_after(10):
            for request in requests:
                await stream.send_all(request)
                received = b""
                while not received.endswith(b"\r\n0\r\n\r\n") and b"Content-Length" not in received:
                    chunk = await stream.receive_some()
                    assert chunk, received
                    received += chunk
                answers.append(received)
    return answers


def _masked(answer: bytes) -> bytes:
    for pattern, replacement in _VARYING:
        answer = pattern.sub(replacement, answer)
    return answer


async def test_it_answers_in_the_simulators_bytes(sse_port: int) -> None:
    requests = [
        _request(_chat(include_usage=True)),
        _request(_chat(include_usage=False)),
        _request(_chat(include_usage=True, content="x" * 37)),
    ]
    async with trio.open_nursery() as nursery:
        sim = await start_simulator(nursery, rest_chunk_interval_ms=1, rest_stream_chunks=PIECES)
        expected = await _answers(sim.port, requests)
        nursery.cancel_scope.cancel()
    got = await _answers(sse_port, requests)
    assert [_masked(answer) for answer in got] == [_masked(answer) for answer in expected]
    # One HTTP chunk per event: role, the deltas, finish, usage, [DONE], then the end.
    chunks = got[0].split(b"\r\n\r\n", 1)[1].count(b"\n\n\r\n")
    assert chunks == PIECES + 4
    assert b"Simulated answer to 32 characters." in got[0]  # 9 + 23 code points


async def test_the_official_sdk_reads_its_stream(sse_port: int) -> None:
    from openai.types.chat import ChatCompletionChunk

    async def stream() -> list[ChatCompletionChunk]:
        client = AsyncOpenAI(
            base_url=f"http://127.0.0.1:{sse_port}/v1", api_key=SIM_KEY, max_retries=0
        )
        async with client:
            events = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return [
                ChatCompletionChunk.model_validate(chunk.model_dump()) async for chunk in events
            ]

    chunks = await run_asyncio(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Simulated answer to 2 characters. Piece 2.")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == PIECES


async def test_a_client_that_leaves_mid_stream_does_not_stop_the_others() -> None:
    process, port = _start("--chunk-interval-ms", "50", "--stream-chunks", "50")
    try:
        for _ in range(3):
            async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                await stream.send_all(_request(_chat(include_usage=True)))
                with trio.fail_after(10):
                    assert b"200" in await stream.receive_some()
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(_request(_chat(include_usage=True)))
            with trio.fail_after(10):
                assert (await stream.receive_some()).startswith(b"HTTP/1.1 200 ")
        assert process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (_request(_chat(include_usage=True), key="sk-wrong"), b"401"),
        (_request(_chat(include_usage=True), path="/v1/embeddings"), b"404"),
        (_request({"model": MODEL, "messages": []}), b"400"),
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"411",
        ),
    ],
    ids=["wrong_key", "other_path", "not_streamed", "chunked_upload"],
)
async def test_its_refusals(sse_port: int, request_bytes: bytes, status: bytes) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", sse_port) as stream:
        await stream.send_all(request_bytes)
        with trio.fail_after(10):
            received = b""
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some()
        assert received.startswith(b"HTTP/1.1 " + status + b" ")
        assert b'{"error":{' in received or b"Content-Length: " in received


async def test_jittered_waits_keep_every_streams_bytes() -> None:
    """``--chunk-jitter-ms`` as large as the interval (waits of 0 to twice it): twenty
    streams at once, each on its own connection, get the same answer as without jitter
    (the pacing queue's ordered insert keeps every stream, whatever their due times)."""
    plain, plain_port = _start(
        *("--api-key", SIM_KEY, "--chunk-interval-ms", "2", "--stream-chunks", str(PIECES))
    )
    jittered, jittered_port = _start(
        *("--api-key", SIM_KEY, "--chunk-interval-ms", "2", "--chunk-jitter-ms", "2"),
        *("--stream-chunks", str(PIECES)),
    )
    request = _request(_chat(include_usage=True))
    try:
        (expected,) = await _answers(plain_port, [request])
        got: list[bytes] = []

        async def one() -> None:
            got.extend(await _answers(jittered_port, [request, request]))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len(got) == 40
        assert {_masked(answer) for answer in got} == {_masked(expected)}
        assert jittered.poll() is None
    finally:
        for process in (plain, jittered):
            process.terminate()
            process.wait(timeout=10)


@pytest.mark.parametrize("jitter_ms", ["-1", "3"], ids=["negative", "over_the_interval"])
def test_a_jitter_outside_zero_to_the_interval_is_refused(jitter_ms: str) -> None:
    command = [str(build_light_sse()), "--port", str(free_port()), "--chunk-interval-ms", "2"]
    result = subprocess.run(
        [*command, "--chunk-jitter-ms", jitter_ms],
        capture_output=True,
        timeout=10,
    )
    assert result.returncode == 2
    assert b"--chunk-jitter-ms 0 to the interval" in result.stderr
