"""The simulator speaking ``relay.audio.v1`` (docs/binary-audio.md), and its audio record.

Real sockets on 127.0.0.1, trio-websocket as the client. The opt-in is the
subprotocol; without it a binary message is answered ``invalid_event`` as before.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio_websocket

from relay.protocol import audio
from relay.protocol.binary_audio import (
    AUDIO_START_TYPE,
    AUDIO_SUBPROTOCOL,
    CODE_EMPTY,
    CODE_PARTIAL_SAMPLE,
    CODE_TOO_LARGE,
)
from relay.simulator.received_audio import RECEIVED_AUDIO_MAX_BYTES, RECEIVED_AUDIO_MAX_SESSIONS
from relay.simulator.server import BINARY_AUDIO_MAX_MESSAGE_BYTES
from tests.conftest import RunningSimulator, open_ws, start_simulator

MODEL = "gpt-realtime"
#: Each read waits at most this long (a missing event fails the test, never hangs it).
READ_TIMEOUT_S = 10.0
CHUNK_20MS = audio.speech_like(20, seed=3)


@asynccontextmanager
async def session(
    sim: RunningSimulator, *, binary: bool, mode: str = "echo"
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    protocols = ["realtime", f"openai-insecure-api-key.{sim.key}"]
    if binary:
        protocols.insert(1, AUDIO_SUBPROTOCOL)
    url = f"{sim.ws_base}/realtime?model={MODEL}&sim_mode={mode}"
    async with open_ws(url, subprotocols=protocols) as ws:
        assert ws.subprotocol == (AUDIO_SUBPROTOCOL if binary else "realtime")
        created = await next_message(ws)
        assert isinstance(created, str)
        assert json.loads(created)["type"] == "session.created"
        yield ws


async def next_message(ws: trio_websocket.WebSocketConnection) -> str | bytes:
    with trio.fail_after(READ_TIMEOUT_S):
        message: str | bytes = await ws.get_message()
    return message


async def next_event(ws: trio_websocket.WebSocketConnection) -> dict[str, object]:
    message = await next_message(ws)
    assert isinstance(message, str), message[:40]
    event: dict[str, object] = json.loads(message)
    return event


def append(pcm: bytes, event_id: str | None = None) -> str:
    event = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    if event_id is not None:
        event["event_id"] = event_id
    return json.dumps(event)


async def test_without_the_opt_in_a_binary_message_is_refused_as_before(
    simulator: RunningSimulator,
) -> None:
    async with session(simulator, binary=False) as ws:
        await ws.send_message(CHUNK_20MS)
        error = await next_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == "invalid_event"  # type: ignore[index]
        # The session goes on, on JSON: an append is echoed as a JSON delta.
        await ws.send_message(append(CHUNK_20MS, "evt_1"))
        delta = await next_event(ws)
        assert delta["type"] == "response.output_audio.delta"
        assert delta["event_id"] == "evt_1"
        assert base64.b64decode(str(delta["delta"])) == CHUNK_20MS


async def test_raw_echo_does_not_select_the_binary_path(simulator: RunningSimulator) -> None:
    protocols = ["realtime", AUDIO_SUBPROTOCOL, f"openai-insecure-api-key.{simulator.key}"]
    url = f"{simulator.ws_base}/realtime?model={MODEL}&sim_mode=raw-echo"
    async with open_ws(url, subprotocols=protocols) as ws:
        assert ws.subprotocol == "realtime"
        await ws.send_message(b"\x01\x02")
        assert await next_message(ws) == b"\x01\x02"


async def test_echo_mode_answers_binary_audio_with_a_marker_then_binary_frames(
    simulator: RunningSimulator,
) -> None:
    second = audio.speech_like(40, seed=4)
    async with session(simulator, binary=True) as ws:
        await ws.send_message(CHUNK_20MS)
        marker = await next_event(ws)
        assert list(marker) == [
            "type",
            "response_id",
            "item_id",
            "output_index",
            "content_index",
        ]
        assert marker["type"] == AUDIO_START_TYPE
        assert str(marker["response_id"]).startswith("resp_")
        assert str(marker["item_id"]).startswith("item_")
        assert await next_message(ws) == CHUNK_20MS
        # The same content part: no second marker. A text append is answered in binary too.
        await ws.send_message(second)
        assert await next_message(ws) == second
        await ws.send_message(append(CHUNK_20MS, "evt_text"))
        assert await next_message(ws) == CHUNK_20MS


@pytest.mark.parametrize(
    ("size", "code"),
    [
        (0, CODE_EMPTY),
        (961, CODE_PARTIAL_SAMPLE),
        (BINARY_AUDIO_MAX_MESSAGE_BYTES + 2, CODE_TOO_LARGE),
    ],
)
async def test_a_binary_message_that_is_not_audio_gets_the_relays_error(
    simulator: RunningSimulator, size: int, code: str
) -> None:
    async with session(simulator, binary=True) as ws:
        await ws.send_message(b"\x00" * size)
        error = await next_event(ws)
        assert error["type"] == "error"
        assert error["error"]["code"] == code  # type: ignore[index]
        assert error["error"]["type"] == "invalid_request_error"  # type: ignore[index]
        # Not appended (nothing was echoed for it), and the session goes on.
        await ws.send_message(CHUNK_20MS)
        assert (await next_event(ws))["type"] == AUDIO_START_TYPE
        assert await next_message(ws) == CHUNK_20MS


async def test_g711_input_takes_one_byte_samples(simulator: RunningSimulator) -> None:
    async with session(simulator, binary=True) as ws:
        update = {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        }
        await ws.send_message(json.dumps(update))
        assert (await next_event(ws))["type"] == "session.updated"
        await ws.send_message(b"\x7f" * 161)
        assert (await next_event(ws))["type"] == AUDIO_START_TYPE
        assert await next_message(ws) == b"\x7f" * 161


async def test_a_voice_turn_in_normal_mode_speaks_the_contract(
    simulator: RunningSimulator,
) -> None:
    async with session(simulator, binary=True, mode="normal") as ws:
        update = {"type": "session.update", "session": {"type": "realtime"}}
        update["session"]["audio"] = {"input": {"turn_detection": None}}  # type: ignore[index]
        await ws.send_message(json.dumps(update))
        assert (await next_event(ws))["type"] == "session.updated"
        for chunk in audio.split_chunks(audio.speech_like(300, seed=5), 20):
            await ws.send_message(bytes(chunk))
        await ws.send_message(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send_message(json.dumps({"type": "response.create"}))
        texts: list[dict[str, object]] = []
        binary_bytes = 0
        marker_seen_before_audio = False
        while not texts or texts[-1]["type"] != "response.done":
            message = await next_message(ws)
            if isinstance(message, bytes):
                assert marker_seen_before_audio
                binary_bytes += len(message)
                continue
            event = json.loads(message)
            if event["type"] == AUDIO_START_TYPE:
                marker_seen_before_audio = True
            texts.append(event)
        kinds = [event["type"] for event in texts]
        assert "response.output_audio.delta" not in kinds
        assert kinds.count(AUDIO_START_TYPE) == 1
        assert kinds.index(AUDIO_START_TYPE) < kinds.index("response.output_audio.done")
        assert "response.output_audio_transcript.delta" in kinds
        # The simulator's answer (tests/conftest: 400 ms of 24 kHz PCM16) arrived as binary.
        assert binary_bytes == audio.bytes_for_ms(400)


async def test_the_simulator_records_the_audio_each_session_received(
    nursery: trio.Nursery,
) -> None:
    sim = await start_simulator(nursery, record_audio=True)
    spoken = audio.speech_like(200, seed=9)
    chunks = [bytes(chunk) for chunk in audio.split_chunks(spoken, 20)]
    for binary in (False, True):
        async with session(sim, binary=binary) as ws:
            for number, chunk in enumerate(chunks):
                await ws.send_message(chunk if binary else append(chunk, f"evt_{number}"))
                while True:  # each append echoed once: then it was recorded
                    message = await next_message(ws)
                    if isinstance(message, bytes) or '"response.output_audio.delta"' in message:
                        break
    text_record, binary_record = sim.sim.received_audio
    for record, binary in ((text_record, False), (binary_record, True)):
        assert record.binary_path is binary
        assert record.appends == len(chunks)
        assert bytes(record.pcm) == spoken
        assert record.total_bytes == len(spoken)
        assert not record.truncated
        assert record.sha256() == hashlib.sha256(spoken).hexdigest()
        assert record.rms() == pytest.approx(audio.rms_pcm16(spoken))
        assert -40 < record.dbfs() < 0


async def test_records_are_bounded_per_session_and_in_number(nursery: trio.Nursery) -> None:
    sim = await start_simulator(nursery, record_audio=True)
    big = b"\x01\x00" * (BINARY_AUDIO_MAX_MESSAGE_BYTES // 2)
    async with session(sim, binary=True, mode="normal") as ws:
        sent = 0
        while sent <= RECEIVED_AUDIO_MAX_BYTES:
            await ws.send_message(big)
            sent += len(big)
        # An event answered after the appends: they were all handled by then.
        await ws.send_message(json.dumps({"type": "input_audio_buffer.clear"}))
        while (await next_event(ws))["type"] != "input_audio_buffer.cleared":
            pass
    record = sim.sim.received_audio[-1]
    assert len(record.pcm) == RECEIVED_AUDIO_MAX_BYTES
    assert record.total_bytes == sent
    assert record.truncated
    for _ in range(RECEIVED_AUDIO_MAX_SESSIONS):
        async with session(sim, binary=False):
            pass
    assert len(sim.sim.received_audio) == RECEIVED_AUDIO_MAX_SESSIONS
    assert all(kept is not record for kept in sim.sim.received_audio)


async def test_not_recording_unless_asked(simulator: RunningSimulator) -> None:
    async with session(simulator, binary=True) as ws:
        await ws.send_message(CHUNK_20MS)
        await next_message(ws)
    assert simulator.sim.received_audio == []
