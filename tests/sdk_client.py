"""A voice turn driven by the unmodified official ``openai`` SDK (asyncio, in a thread).

Every server event the SDK hands us is checked against the SDK's own event types:
``connection.recv()`` parses with the SDK's models; we additionally require that
each event parsed into the model class its ``type`` names, not a loose fallback.
"""

from __future__ import annotations

import base64
import math
import ssl
import struct
from typing import Any

from openai import AsyncOpenAI

from tests.conftest import run_asyncio

SAMPLE_RATE_HZ = 24_000
CHUNK_MS = 20


def _speech_pcm16(duration_ms: int) -> bytes:
    samples = SAMPLE_RATE_HZ * duration_ms // 1000
    return b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * 220 * i / SAMPLE_RATE_HZ)))
        for i in range(samples)
    )


async def sdk_voice_turn(
    http_base: str,
    ws_base: str,
    api_key: str,
    *,
    model: str = "gpt-realtime",
    ca_file: str | None = None,
) -> dict[str, Any]:
    """One voice turn: session.update, appends, commit, response.create, until response.done."""

    async def turn() -> dict[str, Any]:
        # Closed on the way out: an open HTTP pool or socket left to the garbage
        # collector becomes a ResourceWarning, an error in this suite.
        client = AsyncOpenAI(api_key=api_key, base_url=http_base, websocket_base_url=ws_base)
        async with client:
            return await _turn_with(client)

    async def _turn_with(client: AsyncOpenAI) -> dict[str, Any]:
        from openai.types.realtime import RealtimeServerEvent
        from pydantic import TypeAdapter

        adapter: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
        options: dict[str, Any] = {}
        if ca_file is not None:
            options["ssl"] = ssl.create_default_context(cafile=ca_file)
        types: list[str] = []
        audio_deltas = 0
        usage: dict[str, Any] = {}
        async with client.realtime.connect(
            model=model,
            websocket_connection_options=options,  # type: ignore[arg-type]
        ) as connection:
            await connection.session.update(
                session={
                    "type": "realtime",
                    "instructions": "Answer briefly.",
                    "audio": {"input": {"turn_detection": None}, "output": {"voice": "marin"}},
                }
            )
            audio = _speech_pcm16(400)
            step = SAMPLE_RATE_HZ * 2 * CHUNK_MS // 1000
            for offset in range(0, len(audio), step):
                await connection.input_audio_buffer.append(
                    audio=base64.b64encode(audio[offset : offset + step]).decode("ascii")
                )
            await connection.input_audio_buffer.commit()
            await connection.response.create()
            async for event in connection:
                # Re-validate the raw dict through the SDK's discriminated union.
                reparsed = adapter.validate_python(event.model_dump(mode="json"))
                assert type(reparsed) is type(event), (event.type, type(reparsed))
                assert getattr(type(event), "model_fields", {}).get("type") is not None
                types.append(event.type)
                if event.type == "error":
                    raise AssertionError(f"error event: {event.error}")
                if event.type == "response.output_audio.delta":
                    audio_deltas += 1
                if event.type == "response.done":
                    assert event.response.usage is not None
                    usage = event.response.usage.model_dump()
                    break
        return {"types": types, "audio_deltas": audio_deltas, "usage": usage}

    return await run_asyncio(turn)
