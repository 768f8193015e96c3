"""The REST proxy end to end: the unmodified official SDK through the relay to simulators
on 127.0.0.1, streamed both ways, accounted, routed by model, failing over, and the
adverse peers: a client that leaves mid-stream, a slow upstream under a 25 MB upload, a
slow reader of a long stream."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import msgspec
import pytest
import trio
import trio.lowlevel
from openai import AsyncOpenAI

from relay.config import UpstreamSettings
from relay.credentials.keyfiles import create_app_key, rotate_signing_key
from relay.protocol import handshake
from relay.rest import proxy as proxy_module
from relay.simulator import rest_payloads
from relay.upstreams.table import build_upstream_table
from tests.conftest import (
    CLIENT_KEY,
    SIM_KEY,
    RunningRelay,
    RunningSimulator,
    run_asyncio,
    start_relay,
    start_simulator,
)
from tests.test_upstream_failover import ADMIN_KEY, start_routed_relay

KEY_A = "sk-sim-rest-key-a-000000"
KEY_B = "sk-sim-rest-key-b-111111"
AZURE_KEY = "fedcba9876543210fedcba9876543210"
MESSAGES: Any = [{"role": "user", "content": "Hello there"}]


async def rest_sim(nursery: trio.Nursery, **overrides: Any) -> RunningSimulator:
    fields: dict[str, Any] = {"rest_chunk_interval_ms": 0, "rest_stream_chunks": 8}
    return await start_simulator(nursery, **(fields | overrides))


@asynccontextmanager
async def sdk(relay: RunningRelay, key: str = CLIENT_KEY) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=relay.http_base, api_key=key, max_retries=0)
    async with client:
        yield client


async def metrics_text(relay: RunningRelay, admin: bool = False) -> str:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"} if admin else {}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{relay.port}/metrics", headers=headers)
    return response.text


def usage_metric(text: str, model: str, kind: str) -> float:
    prefix = f'relay_usage_tokens_total{{kind="{kind}",model="{model}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


async def test_the_sdk_s_rest_calls_work_unchanged_through_the_relay(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base)
    audio = random.Random(3).randbytes(3 * 1024 * 1024)

    async def calls() -> dict[str, Any]:
        async with sdk(relay) as client:
            stream = await client.chat.completions.create(
                model="gpt-4.1-mini",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in stream]
            responses = await client.responses.create(model="gpt-4.1", input="hi", stream=True)
            events = [event async for event in responses]
            transcription = await client.audio.transcriptions.create(
                model="gpt-4o-transcribe", file=("speech.wav", audio, "audio/wav")
            )
            async with client.audio.speech.with_streaming_response.create(
                model="gpt-4o-mini-tts",
                voice="alloy",
                input="The quick brown fox.",
                response_format="pcm",
            ) as speech:
                speech_chunks = [c async for c in speech.iter_bytes()]
            embedding = await client.embeddings.create(model="text-embedding-3-small", input="x")
            models = [m.id async for m in client.models.list()]
            return {
                "chunks": chunks,
                "events": events,
                "transcription": transcription,
                "speech": speech_chunks,
                "embedding": embedding,
                "models": models,
            }

    with caplog.at_level(logging.INFO, logger="relay.rest"):
        got = await run_asyncio(calls)
    text = "".join(c.choices[0].delta.content or "" for c in got["chunks"] if c.choices)
    assert text == "".join(rest_payloads.answer_pieces(len("Hello there"), 8))
    assert got["chunks"][-1].usage.completion_tokens == 8
    assert got["events"][-1].type == "response.completed"
    digest = hashlib.sha256(audio).hexdigest()[:16]
    assert got["transcription"].text == f"Received {len(audio)} bytes with SHA-256 {digest}."
    speech = rest_payloads.speech_audio("The quick brown fox.", "pcm")
    assert b"".join(got["speech"]) == speech.read(0, speech.total_bytes)
    assert len(got["embedding"].data[0].embedding) > 0
    assert got["models"]  # the shorthand upstream serves every model: its own list
    # Every request reached the simulator with the relay's key, never the client's.
    records = sim.sim.rest_requests
    assert [r.status for r in records] == [200] * 6
    assert {r.key_index for r in records} == {0}
    # Keep-alive upstream connections from the pool: one carried the five held bodies;
    # the streamed upload (no second chance if a pooled connection had died) took a
    # fresh one, which went back to the pool for the requests after it.
    assert len({r.connection for r in records}) == 2
    # Usage: the chat chunk's, response.completed's, the transcription's, the embedding's.
    text_metrics = await metrics_text(relay)
    assert usage_metric(text_metrics, "gpt-4.1-mini", "output_text") == 8
    assert usage_metric(text_metrics, "gpt-4.1", "output_text") > 0
    assert usage_metric(text_metrics, "text-embedding-3-small", "input_text") > 0
    assert 'relay_rest_requests_total{status="200",upstream="default"} 6.0' in text_metrics
    logged = [r for r in caplog.records if r.getMessage() == "rest request"]
    assert len(logged) == 6
    first = logged[0].__dict__["fields"]
    assert (first["path"], first["model"], first["status"]) == (
        "/v1/chat/completions",
        "gpt-4.1-mini",
        200,
    )
    assert first["usage"]["output_text"] == 8
    assert first["credential_id"].startswith("key:")
    assert SIM_KEY not in caplog.text
    assert CLIENT_KEY not in caplog.text


async def test_a_client_leaving_mid_stream_cancels_the_upstream_request(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery, rest_chunk_interval_ms=20, rest_stream_chunks=200)
    relay = await start_relay(nursery, sim.ws_base)
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "stream": True}).encode()
    stream = await raw_request(relay.port, post_head("/v1/chat/completions", len(body)), body)
    async with stream:
        data = b""
        with trio.fail_after(10):
            while data.count(b"\n\n") < 4:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
        assert data.startswith(b"HTTP/1.1 200")
    # The client left after a few of 200 events (4 s of them): the upstream sees it at once.
    with trio.fail_after(2):
        await sim.sim.wait_rest_requests(1)
    (record,) = sim.sim.rest_requests
    assert record.client_disconnected
    assert record.response_bytes < 20_000


async def test_failover_before_the_first_byte_and_the_last_refusal_passed_on(
    nursery: trio.Nursery,
) -> None:
    first = await rest_sim(nursery, api_keys=(KEY_A,))
    second = await rest_sim(nursery, api_keys=(KEY_B,))
    relay = await start_routed_relay(
        nursery,
        {
            "first": UpstreamSettings(url=first.ws_base, api_key_env=("KEY_A",), priority=0),
            "second": UpstreamSettings(url=second.ws_base, api_key_env=("KEY_B",), priority=1),
        },
        {"KEY_A": KEY_A, "KEY_B": KEY_B},
    )
    first.sim.rest_faults.refuse_next(429, retry_after_s=30)

    async def chat() -> str:
        async with sdk(relay) as client:
            completion = await client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
            return completion.choices[0].message.content or ""

    assert await run_asyncio(chat)
    assert [r.status for r in first.sim.rest_requests] == [429]
    assert [r.status for r in second.sim.rest_requests] == [200]
    # first cools down for its 429's Retry-After: second goes first now, and when it
    # fails (503) the cooled-down first is the last resort, within the same request.
    second.sim.rest_faults.refuse_next(503, retry_after_s=4)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{relay.http_base}/chat/completions",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "gpt-4.1", "messages": MESSAGES},
        )
    assert response.status_code == 200
    assert [r.status for r in second.sim.rest_requests] == [200, 503]
    assert [r.status for r in first.sim.rest_requests] == [429, 200]


async def test_all_upstreams_refusing_passes_on_the_last_refusal(nursery: trio.Nursery) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base)
    sim.sim.rest_faults.refuse_next(429, retry_after_s=7)
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{relay.http_base}/chat/completions",
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            json={"model": "gpt-4.1", "messages": MESSAGES},
        )
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


async def test_routing_by_model_to_azure_s_deployment_form_and_the_model_map(
    nursery: trio.Nursery,
) -> None:
    azure = await rest_sim(
        nursery, flavor="azure", api_keys=(AZURE_KEY,), azure_deployments=("chat-prod",)
    )
    openai = await rest_sim(nursery, api_keys=(KEY_A,))
    relay = await start_routed_relay(
        nursery,
        {
            "azure": UpstreamSettings(
                kind="azure",
                url=f"http://127.0.0.1:{azure.port}",
                api_key_env=("AZURE_KEY",),
                models={"gpt-4.1": "chat-prod"},
            ),
            "openai": UpstreamSettings(
                url=openai.ws_base, api_key_env=("KEY_A",), models={"fast": "gpt-4.1-mini"}
            ),
        },
        {"AZURE_KEY": AZURE_KEY, "KEY_A": KEY_A},
    )

    async def calls() -> tuple[str, str, list[str]]:
        async with sdk(relay) as client:
            one = await client.chat.completions.create(model="gpt-4.1", messages=MESSAGES)
            two = await client.chat.completions.create(model="fast", messages=MESSAGES)
            models = [m.id async for m in client.models.list()]
            await client.responses.create(model="gpt-4.1", input="hi")
            return one.model, two.model, models

    azure_model, alias_model, models = await run_asyncio(calls)
    azure_record, responses_record = azure.sim.rest_requests
    assert azure_record.path == "/openai/deployments/chat-prod/chat/completions"
    assert azure_record.auth_scheme == "api-key"
    # Azure serves the Responses API in its v1 form only: the deployment as the model.
    assert (responses_record.path, responses_record.model) == ("/openai/v1/responses", "chat-prod")
    assert responses_record.status == 200
    (openai_record,) = openai.sim.rest_requests
    assert openai_record.model == "gpt-4.1-mini"  # the alias renamed in the body
    assert alias_model == "gpt-4.1-mini"
    assert azure_model
    assert sorted(models) == ["fast", "gpt-4.1"]  # from the model map, no upstream call
    async with httpx.AsyncClient() as client:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        unknown = await client.post(
            f"{relay.http_base}/chat/completions",
            headers=headers,
            json={"model": "gpt-5", "messages": MESSAGES},
        )
        twice = await client.post(
            f"{relay.http_base}/chat/completions",
            headers={**headers, "Content-Type": "application/json"},
            content=b'{"model":"fast","model":"gpt-4.1","messages":[]}',
        )
        files = await client.get(f"{relay.http_base}/files", headers=headers)
        anonymous = await client.post(
            f"{relay.http_base}/chat/completions", json={"model": "fast", "messages": MESSAGES}
        )
    assert (unknown.status_code, unknown.json()["error"]["param"]) == (400, "model")
    assert (twice.status_code, twice.json()["error"]["param"]) == (400, "model")
    assert (files.status_code, files.json()["error"]["code"]) == (404, "not_found")
    assert anonymous.status_code == 401
    assert len(azure.sim.rest_requests) + len(openai.sim.rest_requests) == 3


async def test_relay_tokens_call_rest_only_when_minted_for_it(
    nursery: trio.Nursery, tmp_path: Any
) -> None:
    sim = await rest_sim(nursery)
    app_keys, signing = tmp_path / "app-keys.json", tmp_path / "signing.json"
    app_key = create_app_key(app_keys, "voice-app")
    import time

    rotate_signing_key(signing, time.time())
    relay = await start_relay(
        nursery, sim.ws_base, app_keys_file=str(app_keys), signing_keys_file=str(signing)
    )

    async def token(rest: bool, single_use: bool = False) -> str:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{relay.http_base}/realtime/client_secrets",
                headers={"Authorization": f"Bearer {app_key}"},
                json={
                    "session": {"type": "realtime", "model": "gpt-realtime"},
                    "relay": {"rest": rest, "models": ["gpt-4.1-mini"], "single_use": single_use},
                },
            )
        assert response.status_code == 200, response.text
        return str(response.json()["value"])

    async with httpx.AsyncClient() as client:
        for rest, single_use, model, expected in (
            (False, False, "gpt-4.1-mini", 403),
            (True, False, "gpt-4.1-mini", 200),
            (True, False, "gpt-4.1", 403),  # not one of the token's models
            (True, True, "gpt-4.1-mini", 403),  # single use is for one Realtime session
        ):
            response = await client.post(
                f"{relay.http_base}/chat/completions",
                headers={"Authorization": f"Bearer {await token(rest, single_use)}"},
                json={"model": model, "messages": MESSAGES},
            )
            assert response.status_code == expected, (rest, model, response.text)
    assert len(sim.sim.rest_requests) == 1


async def test_memory_stays_bounded_under_a_big_upload_to_a_slow_upstream_and_a_slow_reader(
    nursery: trio.Nursery,
) -> None:
    # 25 MB through an upstream reading 25 MB/s: a second of backpressure on the upload.
    sim = await rest_sim(nursery, rest_read_bytes_per_s=25_000_000, rest_stream_chunks=4000)
    relay = await start_relay(nursery, sim.ws_base)
    audio = random.Random(5).randbytes(25_000_000)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()

        async def upload() -> str:
            async with sdk(relay) as client:
                result = await client.audio.transcriptions.create(
                    model="whisper-1", file=("big.wav", audio, "audio/wav")
                )
                return result.text

        before, _ = tracemalloc.get_traced_memory()
        text = await run_asyncio(upload)
        _, peak = tracemalloc.get_traced_memory()
        assert text.startswith(f"Received {len(audio)} bytes")
        # The SDK's own copy of the file is in this process too: the relay adds little to it.
        assert peak - before < len(audio) * 2.5
        # A slow reader of a long stream (4000 events): the relay holds little of it.
        body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "stream": True}).encode()
        stream = await raw_request(relay.port, post_head("/v1/chat/completions", len(body)), body)
        async with stream:
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            received = 0
            with trio.fail_after(30):
                while True:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    received += len(chunk)
                    if chunk.endswith(b"0\r\n\r\n"):
                        break
                    await trio.lowlevel.checkpoint()  # a reader that takes its time, 4 KiB at a go
            _, peak = tracemalloc.get_traced_memory()
        assert received > 500_000
        assert peak - before < 4 * 1024 * 1024
    finally:
        tracemalloc.stop()


async def raw_request(port: int, head: bytes, body: bytes = b"") -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head + body)
    return stream


async def read_all(stream: trio.SocketStream, timeout_s: float = 10) -> bytes:
    data = b""
    with trio.fail_after(timeout_s):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return data
            data += chunk


def post_head(path: str, length: int, content_type: str = "application/json") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


def upstream_outcomes(relay: RunningRelay) -> dict[str, int]:
    (upstream,) = relay.server.list_upstreams()
    (key,) = cast(list[dict[str, dict[str, int]]], upstream["keys"])
    return dict(key["handshakes"])


async def test_a_body_trickled_a_byte_at_a_time_goes_through(nursery: trio.Nursery) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base)
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    async with stream:
        for byte in [bytes([b]) for b in post_head("/v1/chat/completions", len(body)) + body]:
            await stream.send_all(byte)
        answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"chat.completion"' in answer
    assert [r.request_sha256 for r in sim.sim.rest_requests] == [hashlib.sha256(body).hexdigest()]


async def test_a_body_trickled_while_another_response_streams_arrives_whole(
    nursery: trio.Nursery,
) -> None:
    """A JSON body that did not come with its head is read through the buffer the
    response bodies of the thread share: trickled in small pieces, each sent as the
    streaming response of another request brings a read, it reaches the upstream byte
    for byte, and the stream it was interleaved with arrives whole."""
    sim = await rest_sim(nursery, rest_chunk_interval_ms=5, rest_stream_chunks=120)
    relay = await start_relay(nursery, sim.ws_base)
    streamed = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "stream": True}).encode()
    trickled = json.dumps({"model": "gpt-4.1", "messages": MESSAGES * 4}).encode()
    piece_bytes = len(trickled) // 40 + 1
    pieces = [trickled[at : at + piece_bytes] for at in range(0, len(trickled), piece_bytes)]
    streaming = await trio.open_tcp_stream("127.0.0.1", relay.port)
    trickling = await trio.open_tcp_stream("127.0.0.1", relay.port)
    async with streaming, trickling:
        await streaming.send_all(post_head("/v1/chat/completions", len(streamed)) + streamed)
        await trickling.send_all(post_head("/v1/chat/completions", len(trickled)))
        stream_answer = b""
        with trio.fail_after(30):
            while not stream_answer.endswith(b"0\r\n\r\n"):
                data = await streaming.receive_some(65536)
                assert data, "the stream ended early"
                stream_answer += data
                if pieces and b"data: " in data:  # a body read of the other response
                    await trickling.send_all(pieces.pop(0))
        assert not pieces, "the stream ended before the trickled body was sent"
        trickled_answer = await read_all(trickling)
    assert stream_answer.startswith(b"HTTP/1.1 200")
    assert b"data: [DONE]" in stream_answer
    assert trickled_answer.startswith(b"HTTP/1.1 200")
    assert b'"chat.completion"' in trickled_answer
    assert sorted(r.request_sha256 for r in sim.sim.rest_requests) == sorted(
        hashlib.sha256(body).hexdigest() for body in (streamed, trickled)
    )


async def test_a_client_silent_or_gone_mid_body_is_not_the_upstream_s_fault(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base, rest_idle_timeout_s=0.3)
    # Silent: half a JSON body, then nothing. 408, and nothing reached the upstream.
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES}).encode()
    stream = await raw_request(relay.port, post_head("/v1/chat/completions", len(body)), body[:10])
    async with stream:
        answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "timeout"
    # Silent and then gone in the middle of a streamed upload (the file part), after the
    # relay started sending it upstream: the upstream is neither cooled down nor blamed.
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    ).encode() + b"\x00" * 1000
    for ending in ("silent", "gone"):
        stream = await raw_request(
            relay.port,
            post_head(
                "/v1/audio/transcriptions",
                len(form) + 1_000_000,
                f"multipart/form-data; boundary={boundary}",
            ),
            form,
        )
        async with stream:
            await sim.sim.wait_rest_requests(len(sim.sim.rest_requests) + 1, started=True)
            if ending == "silent":
                answer = await read_all(stream)
                assert answer.startswith(b"HTTP/1.1 408")
    with trio.fail_after(5):
        await sim.sim.wait_rest_requests(2)
    assert upstream_outcomes(relay) == {}
    (upstream,) = relay.server.list_upstreams()
    assert upstream["keys"][0]["cool_down_s"] == 0  # type: ignore[index]


async def test_framing_and_size_limits_are_refused_before_any_upstream_call(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(
        nursery, sim.ws_base, rest_max_json_body_bytes=1000, rest_max_upload_bytes=5000
    )
    chunked = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ).encode()
    for head, status in (
        (chunked, b"411"),
        (post_head("/v1/chat/completions", 1001), b"413"),
        (post_head("/v1/audio/transcriptions", 5001, "multipart/form-data; boundary=x"), b"413"),
    ):
        stream = await raw_request(relay.port, head)
        async with stream:
            answer = await read_all(stream)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:80]
        assert b'"error"' in answer
    assert sim.sim.rest_requests == []


async def test_an_upstream_silent_mid_stream_is_cut_after_the_idle_timeout(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery, rest_chunk_interval_ms=60_000, rest_stream_chunks=3)
    relay = await start_relay(nursery, sim.ws_base, rest_idle_timeout_s=0.3)
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "stream": True}).encode()
    stream = await raw_request(relay.port, post_head("/v1/chat/completions", len(body)), body)
    async with stream:
        started = trio.current_time()
        answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 200")
    assert not answer.endswith(b"0\r\n\r\n")  # cut, not ended: the client can tell
    assert trio.current_time() - started < 5


async def test_an_upstream_that_never_answers_is_a_504_after_the_first_byte_timeout(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base, rest_first_byte_timeout_s=0.3)
    sim.sim.rest_faults.stall_next()
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES}).encode()
    stream = await raw_request(relay.port, post_head("/v1/chat/completions", len(body)), body)
    async with stream:
        answer = await read_all(stream)
    assert answer.startswith(b"HTTP/1.1 504")
    assert b"upstream_timeout" in answer
    assert upstream_outcomes(relay) == {"timeout": 1}


async def test_a_pooled_connection_that_fails_before_any_answer_is_retried_fresh(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base)

    async def chat() -> int:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{relay.http_base}/chat/completions",
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                json={"model": "gpt-4.1", "messages": MESSAGES},
            )
        return response.status_code

    assert await chat() == 200  # leaves its upstream connection in the pool
    # The upstream drops the pooled connection under the next request, before its head:
    # the relay sends it again on a fresh connection, and the client never knows.
    sim.sim.rest_faults.drop_next()
    assert await chat() == 200
    first, dropped, retried = sim.sim.rest_requests
    assert dropped.connection == first.connection
    assert dropped.status is None
    assert retried.connection != first.connection
    assert retried.status == 200
    assert upstream_outcomes(relay) == {"success": 2}


async def test_a_reload_reroutes_the_next_request_and_a_cool_down_is_honoured_at_once(
    nursery: trio.Nursery,
) -> None:
    """The proxy keeps each model's route (upstreams, candidates, pool keys) while the
    upstream table lasts: a reload must take effect on the next request, and what a
    route does not hold (cool-downs) must still change the order request by request."""
    first = await rest_sim(nursery, api_keys=(KEY_A,))
    second = await rest_sim(nursery, api_keys=(KEY_B,))
    environ = {"KEY_A": KEY_A, "KEY_B": KEY_B}
    relay = await start_routed_relay(
        nursery,
        {"first": UpstreamSettings(url=first.ws_base, api_key_env=("KEY_A",), models=("m",))},
        environ,
    )

    async def chat(model: str = "m") -> int:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{relay.http_base}/chat/completions",
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                json={"model": model, "messages": MESSAGES},
            )
        return response.status_code

    assert await chat() == 200
    assert await chat("n") == 400  # not served: refused without an upstream call
    config = msgspec.structs.replace(
        relay.server.config,
        upstreams={
            "first": UpstreamSettings(
                url=first.ws_base, api_key_env=("KEY_A",), models=("m",), priority=0
            ),
            "second": UpstreamSettings(
                url=second.ws_base, api_key_env=("KEY_B",), models=("m", "n"), priority=1
            ),
        },
    )
    relay.server.apply_config(config, build_upstream_table(config, environ=environ))
    assert await chat("n") == 200  # the new table's route, not the cached refusal
    assert [r.status for r in second.sim.rest_requests] == [200]
    # A 429 cools "first" down: the very next request of the same route goes to "second".
    first.sim.rest_faults.refuse_next(429, retry_after_s=30)
    assert await chat() == 200
    assert await chat() == 200
    assert [r.status for r in first.sim.rest_requests] == [200, 429]
    assert [r.status for r in second.sim.rest_requests] == [200, 200, 200]


async def test_routes_kept_are_bounded_when_an_upstream_serves_every_model(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Model names are the client's: with an upstream serving every model, each new name
    would keep a route for ever without the bound."""
    monkeypatch.setattr(proxy_module, "MAX_CACHED_ROUTES", 2)
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base)
    async with httpx.AsyncClient() as client:
        for model in ("gpt-4.1", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini"):
            response = await client.post(
                f"{relay.http_base}/chat/completions",
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
                json={"model": model, "messages": MESSAGES},
            )
            assert response.status_code == 200
            assert len(relay.server.rest._routes) <= 2


async def read_until(stream: trio.SocketStream, end: bytes, timeout_s: float = 10) -> bytes:
    data = b""
    with trio.fail_after(timeout_s):
        while not data.endswith(end):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            data += chunk
    return data


async def test_the_first_byte_and_keep_alive_timers_end_with_their_reads(
    nursery: trio.Nursery,
) -> None:
    """Both timeouts are timers that close the connection when they come due: each must
    be off once its read is done, or it would cut a response that streams for longer
    than the timeout (the first byte's the upstream's, the keep-alive's the client's)."""
    sim = await rest_sim(nursery, rest_chunk_interval_ms=60, rest_stream_chunks=8)
    relay = await start_relay(
        nursery, sim.ws_base, rest_first_byte_timeout_s=0.2, rest_keep_alive_timeout_s=0.2
    )
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES, "stream": True}).encode()
    head = post_head("/v1/chat/completions", len(body)).replace(b"Connection: close\r\n", b"")
    stream = await raw_request(relay.port, head, body)
    async with stream:
        for _ in range(2):  # the second on the same client and upstream connections
            answer = await read_until(stream, b"0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200")
            assert answer.endswith(b"0\r\n\r\n")  # whole, past both timeouts
            assert b"data: [DONE]" in answer
            await stream.send_all(head + body)
        answer = await read_until(stream, b"0\r\n\r\n")
    first, second, third = sim.sim.rest_requests
    assert first.connection == second.connection == third.connection
    assert [r.status for r in sim.sim.rest_requests] == [200, 200, 200]


async def test_a_keep_alive_client_silent_past_the_timeout_is_closed(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    relay = await start_relay(nursery, sim.ws_base, rest_keep_alive_timeout_s=0.2)
    body = json.dumps({"model": "gpt-4.1", "messages": MESSAGES}).encode()
    head = post_head("/v1/chat/completions", len(body)).replace(b"Connection: close\r\n", b"")
    stream = await raw_request(relay.port, head, body)
    async with stream:
        answer = await read_all(stream)  # the answer, then the relay's close
    assert answer.startswith(b"HTTP/1.1 200")
    response = handshake.parse_response_head(answer)
    assert response is not None
    assert len(response.trailing) == response.content_length  # whole, then closed
