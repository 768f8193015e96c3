"""A voice turn driven by the unmodified openai-agents SDK (asyncio, in a thread)."""

from __future__ import annotations

from typing import Any

from relay.protocol import audio
from tests.conftest import run_asyncio


async def agents_voice_turn(ws_url: str, api_key: str, *, instructions: str) -> dict[str, Any]:
    """Connect a RealtimeAgent, speak once, and wait for the spoken answer to end."""

    async def turn() -> dict[str, Any]:
        from agents.realtime import RealtimeAgent, RealtimeRunner
        from agents.realtime.model_inputs import RealtimeModelSendRawMessage

        agent = RealtimeAgent(name="assistant", instructions=instructions)
        runner = RealtimeRunner(
            starting_agent=agent,
            config={"model_settings": {"turn_detection": None}},
        )
        session = await runner.run(model_config={"api_key": api_key, "url": ws_url})
        kinds: list[str] = []
        errors: list[str] = []
        audio_chunks = 0
        async with session:
            await session.send_audio(audio.speech_like(400, seed=3), commit=True)
            # With turn detection off the app asks for the answer, through the SDK's own API.
            await session.model.send_event(
                RealtimeModelSendRawMessage(message={"type": "response.create"})
            )
            async for event in session:
                kinds.append(event.type)
                if event.type == "error":
                    errors.append(str(event.error))
                if event.type == "audio":
                    audio_chunks += 1
                if event.type == "audio_end":
                    break
        return {"kinds": kinds, "errors": errors, "audio_chunks": audio_chunks}

    return await run_asyncio(turn)
