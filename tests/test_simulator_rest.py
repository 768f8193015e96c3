"""The simulator's REST endpoints, driven by the official ``openai`` SDK and by httpx.

Real sockets on 127.0.0.1 against an in-process simulator. Every answer the SDK
parses is validated again through the SDK's pydantic types (the SDK itself builds
its objects without validation), and streams are read event by event. Keep-alive,
chunked uploads, the request log, faults and the Azure forms are here too.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import trio
from openai import AsyncAzureOpenAI, AsyncOpenAI
from pydantic import TypeAdapter

from relay import cli
from relay import config as cfg
from relay.simulator import rest_payloads
from relay.simulator.flavors import AZURE_DEPLOYMENT_NOT_FOUND, AZURE_KEY_DENIED
from relay.simulator.multipart import MultipartError, MultipartReader, PartData, PartStart
from relay.simulator.rest import REST_JSON_MAX_BODY_BYTES
from tests.conftest import SIM_KEY, RunningSimulator, run_asyncio, start_simulator

PIECES = 6
DEPLOYMENT = "chat-prod"
API_VERSION = "2024-10-21"
ENTRA_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi.rest-entra-token.signature"
#: The multi-megabyte upload of the transcription tests (bytes).
UPLOAD_BYTES = 3 * 1024 * 1024 + 17


async def rest_sim(nursery: trio.Nursery, **overrides: Any) -> RunningSimulator:
    fields: dict[str, Any] = {"rest_chunk_interval_ms": 1, "rest_stream_chunks": PIECES}
    fields.update(overrides)
    return await start_simulator(nursery, **fields)


def sdk(sim: RunningSimulator, *, key: str = SIM_KEY) -> AsyncOpenAI:
    # No retries: a refused request must show as the refusal, not as a second try.
    return AsyncOpenAI(base_url=sim.http_base, api_key=key, max_retries=0)


def strict(model_type: Any, obj: Any) -> Any:
    """Validate what the SDK built (without validation) through its pydantic type."""
    reparsed = TypeAdapter(model_type).validate_python(obj.model_dump(mode="json"))
    assert type(reparsed) is type(obj), (type(reparsed), type(obj))
    return reparsed


def answer(prompt_chars: int) -> str:
    return "".join(rest_payloads.answer_pieces(prompt_chars, PIECES))


def upload(seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(UPLOAD_BYTES)


# --- chat completions and responses ----------------------------------------------------


async def test_chat_completion_with_and_without_streaming(nursery: trio.Nursery) -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    sim = await rest_sim(nursery)
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello there"}]},
    ]
    prompt_chars = len("Be brief.") + len("Hello there")

    async def calls() -> tuple[Any, list[Any], list[Any]]:
        async with sdk(sim) as client:
            whole = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
            streams: list[list[Any]] = []
            for include_usage in (True, False):
                stream = await client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=messages,
                    stream=True,
                    stream_options={"include_usage": include_usage},
                )
                streams.append([chunk async for chunk in stream])
            return whole, streams[0], streams[1]

    whole, with_usage, without_usage = await run_asyncio(calls)
    strict(ChatCompletion, whole)
    assert whole.choices[0].message.content == answer(prompt_chars)
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None
    tokens = math.ceil(prompt_chars / rest_payloads.CHARS_PER_TOKEN)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (tokens, PIECES)
    assert whole.usage.total_tokens == tokens + PIECES
    for chunks in (with_usage, without_usage):
        for chunk in chunks:
            strict(ChatCompletionChunk, chunk)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer(prompt_chars)
        assert chunks[0].choices[0].delta.role == "assistant"
    # Role chunk, one per piece, the finish_reason chunk, then (asked for) the usage chunk.
    assert len(with_usage) == PIECES + 3
    assert with_usage[-2].choices[0].finish_reason == "stop"
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage.completion_tokens == PIECES
    assert all(c.usage is None for c in with_usage[:-1])
    assert len(without_usage) == PIECES + 2
    assert without_usage[-1].choices[0].finish_reason == "stop"
    assert [r.status for r in sim.sim.rest_requests] == [200, 200, 200]


async def test_chat_stream_is_one_http_chunk_per_sse_event_ending_in_done(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    async with (
        httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http,
        http.stream(
            "POST",
            f"{sim.http_base}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["transfer-encoding"] == "chunked"
        raw = [piece async for piece in response.aiter_raw()]
    events = b"".join(raw).split(b"\n\n")[:-1]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == PIECES + 3  # role, pieces, finish_reason, [DONE]
    assert sim.sim.rest_requests[0].response_bytes == len(b"".join(raw))


async def test_responses_stream_and_whole_match_the_sdk_types(nursery: trio.Nursery) -> None:
    from openai.types.responses import Response, ResponseStreamEvent

    sim = await rest_sim(nursery)
    prompt: Any = [{"role": "user", "content": [{"type": "input_text", "text": "Tell me more"}]}]
    prompt_chars = len("Tell me more") + len("Short.")

    async def calls() -> tuple[Any, list[Any]]:
        async with sdk(sim) as client:
            whole = await client.responses.create(
                model="gpt-4.1", input=prompt, instructions="Short."
            )
            stream = await client.responses.create(
                model="gpt-4.1", input=prompt, instructions="Short.", stream=True
            )
            return whole, [event async for event in stream]

    whole, events = await run_asyncio(calls)
    strict(Response, whole)
    assert whole.output_text == answer(prompt_chars)
    assert whole.status == "completed"
    tokens = math.ceil(prompt_chars / rest_payloads.CHARS_PER_TOKEN)
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (tokens, PIECES)
    for event in events:
        strict(ResponseStreamEvent, event)
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * PIECES,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == answer(prompt_chars)
    completed = events[-1].response
    assert completed.output_text == answer(prompt_chars)
    usage = completed.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        tokens,
        PIECES,
        tokens + PIECES,
    )
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


async def test_a_chunked_request_body_is_read_and_logged(nursery: trio.Nursery) -> None:
    sim = await rest_sim(nursery)
    body = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 100_000}]}
    ).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, len(body), 7_000):
            yield body[offset : offset + 7_000]

    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
        response = await http.post(f"{sim.http_base}/chat/completions", content=pieces())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == answer(100_000)
    record = sim.sim.rest_requests[0]
    assert record.request_bytes == len(body)
    assert record.request_sha256 == hashlib.sha256(body).hexdigest()
    assert record.model == "gpt-4o-mini"


# --- audio, embeddings, models ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "usage_type"), [("gpt-4o-transcribe", "tokens"), ("whisper-1", "duration")]
)
async def test_a_multi_megabyte_transcription_upload_arrives_intact(
    nursery: trio.Nursery, model: str, usage_type: str
) -> None:
    from openai.types.audio import Transcription

    sim = await rest_sim(nursery)
    audio = upload()

    async def call() -> Any:
        async with sdk(sim) as client:
            return await client.audio.transcriptions.create(
                model=model, file=("speech.wav", audio, "audio/wav")
            )

    result = await run_asyncio(call)
    strict(Transcription, result)
    digest = hashlib.sha256(audio).hexdigest()
    assert result.text == f"Received {len(audio)} bytes with SHA-256 {digest[:16]}."
    assert result.usage.type == usage_type
    if usage_type == "duration":
        assert result.usage.seconds == math.ceil(len(audio) / 32_000)
    else:
        assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens
    record = sim.sim.rest_requests[0]
    assert record.model == model
    assert record.request_bytes > len(audio)  # the file plus the form around it
    assert (record.status, record.client_disconnected) == (200, False)


async def test_a_transcription_streams_its_text(nursery: trio.Nursery) -> None:
    from openai.types.audio import TranscriptionStreamEvent

    sim = await rest_sim(nursery)

    async def call() -> list[Any]:
        async with sdk(sim) as client:
            stream = await client.audio.transcriptions.create(
                model="gpt-4o-mini-transcribe", file=("a.wav", b"\x00" * 1000), stream=True
            )
            return [event async for event in stream]

    events = await run_asyncio(call)
    for event in events:
        strict(TranscriptionStreamEvent, event)
    assert events[-1].type == "transcript.text.done"
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    assert events[-1].text.startswith("Received 1000 bytes")


@pytest.mark.parametrize("response_format", ["pcm", "wav", "mp3"])
async def test_speech_streams_deterministic_audio_in_several_chunks(
    nursery: trio.Nursery, response_format: str
) -> None:
    sim = await rest_sim(nursery, rest_chunk_interval_ms=5)
    text = "The quick brown fox."

    async def call() -> tuple[str, list[bytes]]:
        async with (
            sdk(sim) as client,
            client.audio.speech.with_streaming_response.create(
                model="gpt-4o-mini-tts",
                voice="alloy",
                input=text,
                response_format=response_format,  # type: ignore[arg-type]
            ) as response,
        ):
            return response.headers["content-type"], [c async for c in response.iter_bytes()]

    content_type, chunks = await run_asyncio(call)
    audio = b"".join(chunks)
    assert len(chunks) > 1
    expected = rest_payloads.speech_audio(text, response_format)
    assert content_type == expected.content_type
    assert audio == expected.read(0, expected.total_bytes)
    pcm_bytes = len(text) * rest_payloads.SPEECH_MS_PER_CHAR * 24 * 2  # 24 samples a ms
    if response_format == "pcm":
        assert len(audio) == pcm_bytes
    elif response_format == "wav":
        assert (audio[:4], audio[8:12]) == (b"RIFF", b"WAVE")
        assert struct.unpack("<I", audio[40:44])[0] == pcm_bytes == len(audio) - 44
    else:
        assert audio.startswith(b"ID3")
    assert sim.sim.rest_requests[0].response_bytes == len(audio)


async def test_embeddings_are_deterministic_unit_vectors(nursery: trio.Nursery) -> None:
    from openai.types import CreateEmbeddingResponse

    sim = await rest_sim(nursery)

    async def calls() -> tuple[Any, Any]:
        async with sdk(sim) as client:
            # The SDK asks for base64 by default and decodes it.
            encoded = await client.embeddings.create(
                model="text-embedding-3-small", input=["alpha", "beta"]
            )
            floats = await client.embeddings.create(
                model="text-embedding-3-large",
                input="alpha",
                dimensions=256,
                encoding_format="float",
            )
            return encoded, floats

    encoded, floats = await run_asyncio(calls)
    strict(CreateEmbeddingResponse, encoded)
    strict(CreateEmbeddingResponse, floats)
    alpha = rest_payloads.embedding_vector("alpha", 1536)
    assert len(encoded.data) == 2
    assert encoded.data[0].embedding == pytest.approx(alpha, abs=1e-6)
    assert encoded.data[1].embedding != encoded.data[0].embedding
    assert encoded.usage.prompt_tokens == math.ceil(5 / 4) + math.ceil(4 / 4)
    assert floats.data[0].embedding == rest_payloads.embedding_vector("alpha", 256)
    assert math.fsum(v * v for v in floats.data[0].embedding) == pytest.approx(1.0)


async def test_models_list_and_retrieve(nursery: trio.Nursery) -> None:
    from openai.types import Model

    default = await rest_sim(nursery)
    configured = await rest_sim(nursery, models=("gpt-realtime", "gpt-4o-mini"))

    async def calls() -> tuple[list[str], list[str], Any, Any]:
        async with sdk(default) as a, sdk(configured) as b:
            listed = [m.id for m in (await a.models.list()).data]
            served = [m.id for m in (await b.models.list()).data]
            one = await b.models.retrieve("gpt-4o-mini")
            try:
                await b.models.retrieve("gpt-4.1")
            except openai.NotFoundError as exc:
                return listed, served, one, exc.body
            raise AssertionError("an unserved model was found")

    listed, served, one, missing = await run_asyncio(calls)
    assert listed == list(rest_payloads.DEFAULT_REST_MODELS)
    assert served == ["gpt-realtime", "gpt-4o-mini"]
    assert strict(Model, one).id == "gpt-4o-mini"
    assert missing["code"] == "model_not_found"


# --- the connection ----------------------------------------------------------------------


async def test_requests_share_a_keep_alive_connection_until_connection_close(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
        answers = [
            await http.get(f"{sim.http_base}/models"),
            await http.post(f"{sim.http_base}/chat/completions", json=chat),
            await http.post(f"{sim.http_base}/chat/completions", json={**chat, "stream": True}),
            await http.post(f"{sim.http_base}/embeddings", json={"model": "e", "input": "x"}),
            await http.get(f"{sim.http_base}/models", headers={"Connection": "close"}),
            await http.get(f"{sim.http_base}/models"),
        ]
    assert [a.status_code for a in answers] == [200] * 6
    assert answers[4].headers["connection"] == "close"
    assert [r.connection for r in sim.sim.rest_requests] == [1, 1, 1, 1, 1, 2]
    assert sim.sim.rest_connections == 2


async def test_a_realtime_upgrade_after_rest_requests_on_one_connection(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    stream = await trio.open_tcp_stream("127.0.0.1", sim.port)
    async with stream:
        await stream.send_all(
            f"GET /v1/models HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer {SIM_KEY}\r\n\r\n"
            "GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: sim\r\n"
            f"Authorization: Bearer {SIM_KEY}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            "".encode()
        )
        data = b""
        with trio.fail_after(10):
            while b"session.created" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, data
                data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 101 Switching Protocols" in data
    assert sim.sim.handshakes[0].status == 101


async def test_an_oversized_json_body_is_read_through_and_refused_413(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    big = b'{"model": "m", "input": "' + b"x" * REST_JSON_MAX_BODY_BYTES + b'"}'
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
        refused = await http.post(f"{sim.http_base}/embeddings", content=big)
        after = await http.get(f"{sim.http_base}/models")
    assert refused.status_code == 413
    assert after.status_code == 200
    assert [r.connection for r in sim.sim.rest_requests] == [1, 1]
    assert sim.sim.rest_requests[0].request_bytes == len(big)


async def test_a_large_upload_is_never_held_whole(nursery: trio.Nursery) -> None:
    import tracemalloc

    sim = await rest_sim(nursery)
    block = random.Random(5).randbytes(64 * 1024)
    blocks = 24 * 16  # 24 MiB, sent chunked from one block so the client holds 64 KiB
    head = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
    )
    digest = hashlib.sha256()
    for _ in range(blocks):
        digest.update(block)

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(blocks):
            yield block
        yield b"\r\n--B--\r\n"

    tracemalloc.start()
    try:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
            response = await http.post(
                f"{sim.http_base}/audio/transcriptions",
                content=body(),
                headers={"Content-Type": "multipart/form-data; boundary=B"},
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert response.status_code == 200, response.text
    expected = rest_payloads.transcript_text(blocks * len(block), digest.hexdigest())
    assert response.json()["text"] == expected
    assert peak < 4 * 1024 * 1024, peak


async def test_reads_are_paced_by_rest_read_bytes_per_s(nursery: trio.Nursery) -> None:
    rate = 2_000_000
    sim = await rest_sim(nursery, rest_read_bytes_per_s=rate)
    audio = random.Random(3).randbytes(400_000)
    started = trio.current_time()
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
        response = await http.post(
            f"{sim.http_base}/audio/transcriptions",
            files={"file": ("a.wav", audio)},
            data={"model": "whisper-1"},
        )
    elapsed = trio.current_time() - started
    assert response.status_code == 200, response.text
    assert elapsed >= len(audio) / rate * 0.9
    assert hashlib.sha256(audio).hexdigest()[:16] in response.json()["text"]


# --- errors and faults -----------------------------------------------------------------


async def test_bad_and_missing_keys_are_401_without_quoting_the_key(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery)
    wrong = "sk-wrong-key-abcdefghijklmnop"
    async with httpx.AsyncClient() as http:
        bad = await http.get(
            f"{sim.http_base}/models", headers={"Authorization": f"Bearer {wrong}"}
        )
        missing = await http.get(f"{sim.http_base}/models")
        sim.sim.faults.revoke_key(SIM_KEY)
        revoked = await http.get(
            f"{sim.http_base}/models", headers={"Authorization": f"Bearer {SIM_KEY}"}
        )
    assert (bad.status_code, missing.status_code, revoked.status_code) == (401, 401, 401)
    assert bad.json()["error"]["code"] == "invalid_api_key"
    assert wrong not in bad.text
    assert "sk-wrong****mnop" in bad.text
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    assert [(r.key_index, r.status) for r in sim.sim.rest_requests] == [
        (None, 401),
        (None, 401),
        (0, 401),
    ]


async def test_an_unknown_model_and_a_programmed_429(nursery: trio.Nursery) -> None:
    sim = await rest_sim(nursery, models=("gpt-4o-mini",))
    sim.sim.rest_faults.refuse_next(429, retry_after_s=1.5)
    chat: Any = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {SIM_KEY}"}) as http:
        limited = await http.post(f"{sim.http_base}/chat/completions", json=chat)
        served = await http.post(f"{sim.http_base}/chat/completions", json=chat)
        unknown = await http.post(
            f"{sim.http_base}/chat/completions", json={**chat, "model": "gpt-9"}
        )
    assert limited.status_code == 429
    assert (limited.headers["retry-after"], limited.headers["retry-after-ms"]) == ("2", "1500")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert served.status_code == 200
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    # The refused request still named its model, and all three shared one connection.
    assert [(r.model, r.status, r.connection) for r in sim.sim.rest_requests] == [
        ("gpt-4o-mini", 429, 1),
        ("gpt-4o-mini", 200, 1),
        ("gpt-9", 404, 1),
    ]

    async def sdk_call() -> Any:
        async with sdk(sim) as client:
            try:
                await client.chat.completions.create(**chat)
            except openai.RateLimitError as exc:
                return exc.response.headers["retry-after"]
        raise AssertionError("not refused")

    sim.sim.rest_faults.refuse_next(429, retry_after_s=3)
    assert await run_asyncio(sdk_call) == "3"


async def test_a_client_leaving_mid_stream_is_logged_as_disconnected(
    nursery: trio.Nursery,
) -> None:
    sim = await rest_sim(nursery, rest_chunk_interval_ms=20, rest_stream_chunks=50)
    body = json.dumps({"model": "gpt-4.1", "input": "hi", "stream": True}).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", sim.port)
    async with stream:
        await stream.send_all(
            f"POST /v1/responses HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer {SIM_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        data = b""
        with trio.fail_after(10):
            while data.count(b"\n\n") < 3:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
    # Closed after three events of 60: the simulator notices at once, not at its next write.
    with trio.fail_after(5):
        await sim.sim.wait_rest_requests(1)
    record = sim.sim.rest_requests[0]
    assert (record.status, record.client_disconnected, record.finished) == (200, True, True)
    assert 0 < record.response_bytes < 10_000


async def test_drop_and_stall_faults(nursery: trio.Nursery) -> None:
    sim = await rest_sim(nursery)
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    headers = {"Authorization": f"Bearer {SIM_KEY}"}
    sim.sim.rest_faults.drop_next()
    sim.sim.rest_faults.drop_next(after_chunks=2)
    async with httpx.AsyncClient(headers=headers) as http:
        with pytest.raises(httpx.TransportError):
            await http.post(f"{sim.http_base}/chat/completions", json=chat)
        with pytest.raises(httpx.TransportError):
            await http.post(f"{sim.http_base}/chat/completions", json=chat)
        sim.sim.rest_faults.drop_next(after_chunks=1)
        with pytest.raises(httpx.TransportError):
            await http.get(f"{sim.http_base}/models")
    before, midway, whole = sim.sim.rest_requests
    assert (before.status, before.response_bytes) == (None, 0)
    assert midway.status == 200
    assert 0 < midway.response_bytes < 1000  # two chunk events of about 300 bytes
    assert (whole.status, whole.response_bytes) == (200, 0)  # reset after the head

    sim.sim.rest_faults.stall_next()

    async def stalled_client(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope:
            async with httpx.AsyncClient(headers=headers) as http:
                await http.get(f"{sim.http_base}/models")

    scope = trio.CancelScope()
    nursery.start_soon(stalled_client, scope)
    with trio.fail_after(5):
        await sim.sim.wait_rest_requests(4, started=True)
        # Started, never answered: the client gives up and the simulator sees it go.
        assert sim.sim.rest_requests[3].finished is False
        scope.cancel()
        await sim.sim.wait_rest_requests(4)
    assert sim.sim.rest_requests[3].client_disconnected is True
    assert sim.sim.rest_requests[3].status is None


# --- azure -------------------------------------------------------------------------------


async def azure_sim(nursery: trio.Nursery) -> RunningSimulator:
    return await rest_sim(
        nursery,
        flavor="azure",
        azure_deployments=(DEPLOYMENT, "embed-prod", "whisper", "voice"),
        entra_tokens=(ENTRA_TOKEN,),
    )


async def test_azure_deployment_forms_with_the_azure_sdk(nursery: trio.Nursery) -> None:
    sim = await azure_sim(nursery)

    async def calls() -> dict[str, Any]:
        client = AsyncAzureOpenAI(
            azure_endpoint=f"http://127.0.0.1:{sim.port}",
            api_version=API_VERSION,
            api_key=SIM_KEY,
            max_retries=0,
        )
        entra = AsyncAzureOpenAI(
            azure_endpoint=f"http://127.0.0.1:{sim.port}",
            api_version=API_VERSION,
            azure_ad_token=ENTRA_TOKEN,
            max_retries=0,
        )
        async with client, entra:
            chat = await client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}]
            )
            stream = await entra.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            streamed = [c async for c in stream]
            embedded = await client.embeddings.create(model="embed-prod", input="x")
            heard = await client.audio.transcriptions.create(
                model="whisper", file=("a.wav", b"\x01" * 5000)
            )
            async with client.audio.speech.with_streaming_response.create(
                model="voice", voice="alloy", input="hi", response_format="pcm"
            ) as speech:
                audio = await speech.read()
            responded = await client.responses.create(model=DEPLOYMENT, input="hi")
            try:
                await client.chat.completions.create(
                    model="missing", messages=[{"role": "user", "content": "hi"}]
                )
            except openai.NotFoundError as exc:
                missing = exc.body
            return {
                "chat": chat,
                "streamed": streamed,
                "embedded": embedded,
                "heard": heard,
                "audio": audio,
                "responded": responded,
                "missing": missing,
            }

    got = await run_asyncio(calls)
    assert got["chat"].choices[0].message.content == answer(2)
    assert "".join(c.choices[0].delta.content or "" for c in got["streamed"] if c.choices)
    assert len(got["embedded"].data[0].embedding) == 1536
    assert got["heard"].text.startswith("Received 5000 bytes")
    assert len(got["audio"]) == 2 * rest_payloads.SPEECH_MS_PER_CHAR * 48
    assert got["responded"].output_text == answer(2)
    assert got["missing"] == {"code": "DeploymentNotFound", "message": AZURE_DEPLOYMENT_NOT_FOUND}
    records = [(r.path, r.model, r.auth_scheme, r.status) for r in sim.sim.rest_requests]
    assert records == [
        (f"/openai/deployments/{DEPLOYMENT}/chat/completions", DEPLOYMENT, "api-key", 200),
        (f"/openai/deployments/{DEPLOYMENT}/chat/completions", DEPLOYMENT, "entra", 200),
        ("/openai/deployments/embed-prod/embeddings", "embed-prod", "api-key", 200),
        ("/openai/deployments/whisper/audio/transcriptions", "whisper", "api-key", 200),
        ("/openai/deployments/voice/audio/speech", "voice", "api-key", 200),
        ("/openai/responses", DEPLOYMENT, "api-key", 200),
        ("/openai/deployments/missing/chat/completions", "missing", "api-key", 404),
    ]


async def test_azure_v1_form_and_refusals(nursery: trio.Nursery) -> None:
    sim = await azure_sim(nursery)

    async def v1_call() -> Any:
        # Azure's v1 API as Microsoft documents it: the plain SDK, the key as a bearer.
        base = f"http://127.0.0.1:{sim.port}/openai/v1"
        async with AsyncOpenAI(base_url=base, api_key=SIM_KEY, max_retries=0) as client:
            return await client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "hello"}]
            )

    chat = await run_asyncio(v1_call)
    assert chat.choices[0].message.content == answer(5)
    target = f"http://127.0.0.1:{sim.port}/openai/deployments/{DEPLOYMENT}/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as http:
        no_version = await http.post(target, json=body, headers={"api-key": SIM_KEY})
        bad_key = await http.post(
            target + f"?api-version={API_VERSION}", json=body, headers={"api-key": "nope"}
        )
        sim.sim.rest_faults.refuse_next(429, retry_after_s=2)
        limited = await http.post(
            target + f"?api-version={API_VERSION}", json=body, headers={"api-key": SIM_KEY}
        )
    assert no_version.status_code == 400
    assert no_version.json()["error"]["code"] == "MissingApiVersionParameter"
    assert bad_key.status_code == 401
    assert bad_key.json() == {"error": {"code": "401", "message": AZURE_KEY_DENIED}}
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "2"
    assert "ChatCompletions_Create" in limited.json()["error"]["message"]
    v1 = sim.sim.rest_requests[0]
    assert (v1.path, v1.model, v1.auth_scheme, v1.key_index) == (
        "/openai/v1/chat/completions",
        DEPLOYMENT,
        "bearer",
        0,
    )


# --- pieces ------------------------------------------------------------------------------


def test_multipart_reader_handles_any_split_and_refuses_garbage() -> None:
    body = (
        b"preamble\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a \\"b\\".wav"\r\n'
        b"Content-Type: audio/wav\r\n\r\n" + b"\r\n--Xy" * 50 + b"\r\n--XyZ--\r\nepilogue"
    )
    for step in (1, 3, 64, len(body)):
        reader = MultipartReader(b"XyZ")
        events = [e for i in range(0, len(body), step) for e in reader.feed(body[i : i + step])]
        starts = [e for e in events if isinstance(e, PartStart)]
        assert [(s.name, s.filename) for s in starts] == [("model", None), ("file", 'a "b".wav')]
        file_data = b"".join(
            e.data for e in events[events.index(starts[1]) :] if isinstance(e, PartData)
        )
        assert file_data == b"\r\n--Xy" * 50
        assert reader.complete
    with pytest.raises(MultipartError):
        MultipartReader(b"XyZ").feed(b"--XyZ\r\nno colon here\r\n\r\n")


def test_simulate_flags_set_the_rest_knobs() -> None:
    args = cli._parser().parse_args(
        [
            "simulate",
            "--rest-chunk-interval-ms",
            "0",
            "--rest-stream-chunks",
            "3",
            "--rest-read-bytes-per-s",
            "1000",
        ]
    )
    sim = cfg.load(
        cfg.SimulatorConfig, overrides=cli._overrides(args, cfg.SimulatorConfig.__struct_fields__)
    )
    assert (sim.rest_chunk_interval_ms, sim.rest_stream_chunks, sim.rest_read_bytes_per_s) == (
        0,
        3,
        1000,
    )
