"""The simulator engine, driven with explicit times: protocol shapes, order, pacing, VAD.

Every server event of every scenario goes through the official SDK's own
``RealtimeServerEvent`` union (pydantic, discriminated on ``type``); the parsed class
must be the one the ``type`` tag names, and no model may carry fields the SDK does
not know (apart from the few OpenAI itself sends: ``obfuscation`` and the session
object's ``id``/``object``/``expires_at``).
"""

from __future__ import annotations

import base64
import itertools
import math
import time
import typing
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from openai.types.realtime import RealtimeServerEvent
from pydantic import BaseModel, TypeAdapter

from relay.config import SimulatorConfig
from relay.protocol import audio
from relay.protocol.client_events import SUPPORTED_CLIENT_EVENT_TYPES
from relay.protocol.session_config import DEFAULT_INSTRUCTIONS
from relay.simulator.engine import SimulatedSession

T0 = 1_750_000_000.0
ADAPTER: TypeAdapter[Any] = TypeAdapter(RealtimeServerEvent)
#: Fields OpenAI sends that the SDK's models do not declare.
KNOWN_EXTRAS = {"obfuscation", "object", "id", "expires_at"}

VOICE_TURN_TYPES = [
    "input_audio_buffer.committed",
    "conversation.item.added",
    "conversation.item.done",
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]
RESPONSE_TAIL_AUDIO = [
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
    "rate_limits.updated",
]


def _walk(value: Any) -> Iterator[BaseModel]:
    if isinstance(value, BaseModel):
        yield value
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name))
    elif isinstance(value, list | tuple):
        for element in value:
            yield from _walk(element)


def validated(payload: bytes) -> dict[str, Any]:
    """Parse one server event with the SDK's union; fail on fallbacks and unknown fields."""
    event: dict[str, Any] = orjson.loads(payload)
    assert list(event)[:2] == ["type", "event_id"], "OpenAI puts type, then event_id first"
    parsed = ADAPTER.validate_python(event)
    tag = typing.get_args(type(parsed).model_fields["type"].annotation)
    assert tag == (event["type"],), (event["type"], type(parsed).__name__)
    for model in _walk(parsed):
        extras = set(model.model_extra or {})
        assert extras <= KNOWN_EXTRAS, (event["type"], type(model).__name__, extras)
    return event


def counting_ids() -> Any:
    counter = itertools.count()
    return lambda prefix: f"{prefix}{next(counter):021d}"


def new_session(
    *,
    pacing: bool = False,
    audio_ms: int = 400,
    delta_ms: int = 100,
    mode: str = "normal",
    initial_session: dict[str, object] | None = None,
    seed: int = 0,
    ids: Any = None,
) -> SimulatedSession:
    config = SimulatorConfig(
        realtime_pacing=pacing,
        response_audio_ms=audio_ms,
        delta_audio_ms=delta_ms,
        mode=mode,  # type: ignore[arg-type]
    )
    kwargs: dict[str, Any] = {"initial_session": initial_session, "seed": seed}
    if ids is not None:
        kwargs["id_factory"] = ids
    session = SimulatedSession(config, model="gpt-realtime", now=T0, **kwargs)
    session.start(T0)
    return session


def send(session: SimulatedSession, event: dict[str, Any] | bytes, now: float = T0) -> None:
    session.receive(event if isinstance(event, bytes) else orjson.dumps(event), now)


def drain(session: SimulatedSession, now: float = T0) -> list[dict[str, Any]]:
    return [validated(payload) for payload in session.pop_due(now)]


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def append(session: SimulatedSession, pcm: bytes, now: float = T0, chunk_ms: int = 20) -> None:
    for chunk in audio.split_chunks(pcm, chunk_ms):
        send(session, {"type": "input_audio_buffer.append", "audio": audio.b64encode(chunk)}, now)


def manual_session(**kwargs: Any) -> SimulatedSession:
    """A started session with turn detection off, its opening events drained."""
    session = new_session(**kwargs)
    send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        },
    )
    drain(session)
    return session


def only_error(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert types_of(events) == ["error"], types_of(events)
    error: dict[str, Any] = events[0]["error"]
    return error


def check_usage(usage: dict[str, Any]) -> None:
    inp, out = usage["input_token_details"], usage["output_token_details"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert usage["input_tokens"] == inp["text_tokens"] + inp["audio_tokens"] + inp["image_tokens"]
    assert usage["output_tokens"] == out["text_tokens"] + out["audio_tokens"]
    cached = inp["cached_tokens_details"]
    assert (
        inp["cached_tokens"]
        == cached["text_tokens"] + cached["audio_tokens"] + cached["image_tokens"]
    )
    assert inp["cached_tokens"] <= usage["input_tokens"]
    assert cached["text_tokens"] <= inp["text_tokens"]
    assert cached["audio_tokens"] <= inp["audio_tokens"]
    assert inp["cached_tokens"] % 64 == 0


# --- session ---------------------------------------------------------------------


def test_session_created_is_the_first_event_with_the_full_ga_session() -> None:
    session = new_session()
    events = drain(session)
    assert types_of(events) == ["session.created"]
    body = events[0]["session"]
    assert list(body) == [
        "type",
        "object",
        "id",
        "model",
        "output_modalities",
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "tracing",
        "truncation",
        "prompt",
        "expires_at",
        "audio",
        "include",
    ]
    assert body["type"] == "realtime"
    assert body["object"] == "realtime.session"
    assert body["id"].startswith("sess_")
    assert len(body["id"]) == 26
    assert body["model"] == "gpt-realtime"
    assert body["output_modalities"] == ["audio"]
    assert body["instructions"] == DEFAULT_INSTRUCTIONS
    assert (body["tools"], body["tool_choice"], body["max_output_tokens"]) == ([], "auto", "inf")
    assert (body["tracing"], body["prompt"], body["include"]) == (None, None, None)
    assert body["expires_at"] == int(T0) + 3600
    assert body["audio"] == {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": None,
            "noise_reduction": None,
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.5,
                "prefix_padding_ms": 300,
                "silence_duration_ms": 200,
                "idle_timeout_ms": None,
                "create_response": True,
                "interrupt_response": True,
            },
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin", "speed": 1.0},
    }
    assert session.close_request is None


def test_session_update_changes_only_present_fields_and_merges_audio() -> None:
    session = new_session()
    before = drain(session)[0]["session"]
    send(
        session,
        {
            "type": "session.update",
            "event_id": "evt_1",
            "session": {
                "type": "realtime",
                "instructions": "Answer briefly.",
                "audio": {"output": {"voice": "cedar"}, "input": {"turn_detection": None}},
                "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
                "max_output_tokens": 300,
            },
        },
    )
    events = drain(session)
    assert types_of(events) == ["session.updated"]
    after = events[0]["session"]
    assert events[0]["event_id"] != "evt_1"  # session.updated does not echo the client's id
    assert after["instructions"] == "Answer briefly."
    assert after["audio"]["output"] == {**before["audio"]["output"], "voice": "cedar"}
    assert after["audio"]["input"]["turn_detection"] is None
    assert after["audio"]["input"]["format"] == before["audio"]["input"]["format"]
    assert after["max_output_tokens"] == 300
    assert after["tools"][0]["name"] == "lookup"
    untouched = {"id", "model", "output_modalities", "tool_choice", "expires_at", "include"}
    assert {k: after[k] for k in untouched} == {k: before[k] for k in untouched}
    # Turn detection back on: a partial object is completed with the defaults.
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
                },
            },
        },
    )
    detection = drain(session)[0]["session"]["audio"]["input"]["turn_detection"]
    assert detection["silence_duration_ms"] == 500
    assert detection["threshold"] == 0.5
    assert detection["create_response"] is True


@pytest.mark.parametrize(
    ("session_body", "code", "param"),
    [
        ({"instructions": "x"}, "missing_required_parameter", "session.type"),
        ({"type": "realtime", "modalities": ["text"]}, "unknown_parameter", "session.modalities"),
        ({"type": "realtime", "voice": "alloy"}, "unknown_parameter", "session.voice"),
        (
            {"type": "realtime", "input_audio_format": "pcm16"},
            "unknown_parameter",
            "session.input_audio_format",
        ),
        (
            {"type": "realtime", "turn_detection": None},
            "unknown_parameter",
            "session.turn_detection",
        ),
        (
            {"type": "realtime", "input_audio_transcription": {"model": "whisper-1"}},
            "unknown_parameter",
            "session.input_audio_transcription",
        ),
        (
            {"type": "realtime", "max_response_output_tokens": 10},
            "unknown_parameter",
            "session.max_response_output_tokens",
        ),
        ({"type": "realtime", "temperature": 0.8}, "unknown_parameter", "session.temperature"),
        ({"type": "realtime", "model": "gpt-realtime-mini"}, "invalid_value", "session.model"),
        (
            {"type": "realtime", "output_modalities": ["text", "audio"]},
            "invalid_value",
            "session.output_modalities",
        ),
        (
            {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            },
            "integer_below_min_value",
            "session.audio.input.format.rate",
        ),
        (
            {"type": "realtime", "audio": {"input": {"turn_detection": {"threshold": 0.2}}}},
            "missing_required_parameter",
            "session.audio.input.turn_detection.type",
        ),
        ({"type": "realtime", "instructions": 5}, "invalid_type", "session.instructions"),
        (
            {"type": "realtime", "max_output_tokens": 0},
            "integer_below_min_value",
            "session.max_output_tokens",
        ),
        ({"type": "transcription"}, "invalid_value", "session.type"),
    ],
)
def test_session_update_errors_name_the_field_and_discard_the_update(
    session_body: dict[str, Any], code: str, param: str
) -> None:
    session = new_session()
    drain(session)
    send(session, {"type": "session.update", "event_id": "evt_upd", "session": session_body})
    error = only_error(drain(session))
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert error["event_id"] == "evt_upd"
    # Nothing changed: an empty update shows the original config.
    send(session, {"type": "session.update", "session": {"type": "realtime"}})
    updated = drain(session)[0]["session"]
    assert updated["instructions"] == DEFAULT_INSTRUCTIONS
    assert updated["audio"]["input"]["turn_detection"]["type"] == "server_vad"


def test_session_update_error_wording() -> None:
    session = new_session()
    drain(session)
    send(session, {"type": "session.update", "session": {"type": "realtime", "bogus_field": 1}})
    assert only_error(drain(session))["message"] == "Unknown parameter: 'session.bogus_field'."
    send(session, {"type": "session.update", "session": {"instructions": "x"}})
    assert only_error(drain(session))["message"] == "Missing required parameter: 'session.type'."
    send(session, {"type": "session.update"})
    assert only_error(drain(session))["param"] == "session"


# --- a full voice turn -------------------------------------------------------------


def test_a_manual_voice_turn_has_openais_events_in_order_and_consistent_usage() -> None:
    session = manual_session(audio_ms=400, delta_ms=100)
    spoken = audio.speech_like(400, seed=5)
    append(session, spoken)
    assert drain(session) == []  # appends are never acknowledged
    send(session, {"type": "input_audio_buffer.commit", "event_id": "evt_commit"})
    send(session, {"type": "response.create", "event_id": "evt_create"})
    events = drain(session)
    kinds = types_of(events)
    assert kinds[: len(VOICE_TURN_TYPES)] == VOICE_TURN_TYPES
    assert kinds[-len(RESPONSE_TAIL_AUDIO) :] == RESPONSE_TAIL_AUDIO
    middle = kinds[len(VOICE_TURN_TYPES) : -len(RESPONSE_TAIL_AUDIO)]
    assert set(middle) == {"response.output_audio.delta", "response.output_audio_transcript.delta"}
    assert middle[0] == "response.output_audio_transcript.delta"  # the transcript leads

    committed, user_added, user_done, created, item_added, assistant_added, part_added = events[:7]
    user_id = committed["item_id"]
    assert committed["previous_item_id"] is None
    assert (
        user_added["item"]
        == user_done["item"]
        == {
            "id": user_id,
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
    )
    response = created["response"]
    assert response["status"] == "in_progress"
    assert response["output"] == []
    assert response["usage"] is None
    assert response["metadata"] is None
    assert response["conversation_id"].startswith("conv_")
    assert response["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "voice": "marin",
    }
    assistant_id = item_added["item"]["id"]
    assert item_added["item"] == {
        "id": assistant_id,
        "type": "message",
        "status": "in_progress",
        "role": "assistant",
        "content": [],
    }
    assert assistant_added["previous_item_id"] == user_id
    assert part_added["part"] == {"type": "audio", "transcript": ""}

    deltas = [e for e in events if e["type"] == "response.output_audio.delta"]
    assert len(deltas) == 4
    pcm = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    assert len(pcm) == 400 * audio.PCM16_BYTES_PER_MS
    assert all(len(base64.b64decode(d["delta"])) == 100 * 48 for d in deltas)
    assert {
        (d["response_id"], d["item_id"], d["output_index"], d["content_index"]) for d in deltas
    } == {(response["id"], assistant_id, 0, 0)}
    words = [e["delta"] for e in events if e["type"] == "response.output_audio_transcript.delta"]
    transcript = "".join(words)
    assert all(len(e["delta"] + e["obfuscation"]) % 16 == 0 for e in events if "obfuscation" in e)

    tail = dict(zip(RESPONSE_TAIL_AUDIO, events[-len(RESPONSE_TAIL_AUDIO) :], strict=True))
    assert tail["response.output_audio_transcript.done"]["transcript"] == transcript
    assert tail["response.content_part.done"]["part"] == {"type": "audio", "transcript": transcript}
    final_item = {
        "id": assistant_id,
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_audio", "transcript": transcript}],
    }
    assert tail["response.output_item.done"]["item"] == final_item
    assert tail["conversation.item.done"]["item"] == final_item
    done = tail["response.done"]["response"]
    assert (done["id"], done["status"], done["status_details"]) == (
        response["id"],
        "completed",
        None,
    )
    assert done["output"] == [final_item]
    usage = done["usage"]
    check_usage(usage)
    assert usage["input_token_details"]["audio_tokens"] == 4  # 400 ms of user audio
    assert usage["output_token_details"]["audio_tokens"] == 8  # 400 ms of assistant audio
    assert usage["output_token_details"]["text_tokens"] == math.ceil(len(transcript) / 4)
    assert usage["input_token_details"]["text_tokens"] >= len(DEFAULT_INSTRUCTIONS) // 4
    limits = tail["rate_limits.updated"]["rate_limits"]
    assert limits[0]["name"] == "tokens"
    assert limits[0]["limit"] - limits[0]["remaining"] == usage["total_tokens"]


def test_the_context_grows_and_is_cached_on_the_next_turn() -> None:
    session = manual_session()
    usages = []
    for _ in range(2):
        append(session, audio.speech_like(600, seed=1))
        send(session, {"type": "input_audio_buffer.commit"})
        send(session, {"type": "response.create"})
        done = [e for e in drain(session) if e["type"] == "response.done"]
        usages.append(done[0]["response"]["usage"])
    first, second = usages
    check_usage(first)
    check_usage(second)
    assert second["input_tokens"] > first["input_tokens"]
    assert second["input_token_details"]["audio_tokens"] == 6 + 8 + 6  # user, assistant, user
    assert (
        second["input_token_details"]["cached_tokens"]
        > first["input_token_details"]["cached_tokens"]
    )


def test_a_text_turn_uses_output_text_events() -> None:
    session = new_session()
    drain(session)
    send(
        session,
        {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}},
    )
    drain(session)
    send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi!"}],
            },
        },
    )
    send(session, {"type": "response.create"})
    events = drain(session)
    kinds = types_of(events)
    assert kinds[:6] == [
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
    ]
    assert kinds[-6:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
        "rate_limits.updated",
    ]
    assert set(kinds[6:-6]) == {"response.output_text.delta"}
    assert events[5]["part"] == {"type": "text", "text": ""}
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-6]["text"] == text
    done = events[-2]["response"]
    assert done["output_modalities"] == ["text"]
    assert done["output"][0]["content"] == [{"type": "output_text", "text": text}]
    check_usage(done["usage"])
    assert done["usage"]["output_token_details"]["audio_tokens"] == 0


def test_per_response_overrides_are_honoured() -> None:
    session = manual_session()
    send(
        session,
        {
            "type": "response.create",
            "response": {
                "instructions": "Summarise.",
                "output_modalities": ["text"],
                "audio": {"output": {"voice": "verse"}},
                "metadata": {"purpose": "summary"},
                "conversation": "none",
                "max_output_tokens": 200,
            },
        },
    )
    events = drain(session)
    kinds = types_of(events)
    assert "conversation.item.added" not in kinds
    assert "conversation.item.done" not in kinds
    done = events[kinds.index("response.done")]["response"]
    assert done["conversation_id"] is None  # out of band
    assert done["metadata"] == {"purpose": "summary"}
    assert done["audio"]["output"]["voice"] == "verse"
    assert done["max_output_tokens"] == 200
    assert done["output_modalities"] == ["text"]
    # Out-of-band output never joins the conversation.
    send(session, {"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
    assert only_error(drain(session))["code"] == "item_retrieve_invalid_item_id"


def test_max_output_tokens_cuts_the_answer_short() -> None:
    session = manual_session(audio_ms=2000, delta_ms=100)
    send(session, {"type": "response.create", "response": {"max_output_tokens": 12}})
    events = drain(session)
    done = events[types_of(events).index("response.done")]["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["output"][0]["status"] == "incomplete"
    assert done["usage"]["output_tokens"] <= 12
    check_usage(done["usage"])


def test_g711_output_format_streams_g711_bytes() -> None:
    session = manual_session(audio_ms=200, delta_ms=100)
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"output": {"format": {"type": "audio/pcmu"}}},
            },
        },
    )
    updated = drain(session)[0]["session"]
    assert updated["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    send(session, {"type": "response.create"})
    deltas = [e for e in drain(session) if e["type"] == "response.output_audio.delta"]
    assert [len(base64.b64decode(d["delta"])) for d in deltas] == [800, 800]


# --- pacing and cancel --------------------------------------------------------------


def test_realtime_pacing_spaces_deltas_by_their_duration() -> None:
    session = manual_session(pacing=True, audio_ms=400, delta_ms=100)
    send(session, {"type": "response.create"})
    first = drain(session)
    assert types_of(first)[-1] == "response.output_audio.delta"
    assert types_of(first).count("response.output_audio.delta") == 1
    assert session.next_due() == pytest.approx(T0 + 0.1)
    assert drain(session, T0 + 0.05) == []
    seen = [types_of(drain(session, T0 + step / 10)) for step in (1, 2, 3)]
    assert [kinds.count("response.output_audio.delta") for kinds in seen] == [1, 1, 1]
    assert seen[-1][-2:] == ["response.done", "rate_limits.updated"]
    # Only the session's 60-minute expiry is left.
    assert session.next_due() == pytest.approx(int(T0) + 3600)


def test_without_pacing_everything_is_due_at_once() -> None:
    session = manual_session(pacing=False, audio_ms=1000, delta_ms=100)
    send(session, {"type": "response.create"})
    kinds = types_of(drain(session))
    assert kinds.count("response.output_audio.delta") == 10
    assert kinds[-2] == "response.done"


def test_response_cancel_unschedules_pending_deltas() -> None:
    session = manual_session(pacing=True, audio_ms=1000, delta_ms=100)
    send(session, {"type": "response.create"})
    opening = drain(session)
    response_id = opening[0]["response"]["id"]
    drain(session, T0 + 0.25)  # chunks 2 and 3 are due by now
    send(session, {"type": "response.cancel", "event_id": "evt_cancel"}, T0 + 0.25)
    events = drain(session, T0 + 0.25)
    assert types_of(events) == RESPONSE_TAIL_AUDIO
    done = events[-2]["response"]
    assert (done["id"], done["status"]) == (response_id, "cancelled")
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["status"] == "incomplete"
    assert done["usage"]["output_token_details"]["audio_tokens"] == 6  # 300 ms were sent
    check_usage(done["usage"])
    # Nothing more of it ever arrives.
    assert drain(session, T0 + 5) == []
    send(session, {"type": "response.cancel", "event_id": "evt_again"}, T0 + 5)
    error = only_error(drain(session, T0 + 5))
    assert error["code"] == "response_cancel_not_active"
    assert error["message"] == "Cancellation failed: no active response found"
    assert error["event_id"] == "evt_again"


def test_only_one_response_at_a_time() -> None:
    session = manual_session(pacing=True, audio_ms=400)
    send(session, {"type": "response.create"})
    response_id = drain(session)[0]["response"]["id"]
    send(session, {"type": "response.create", "event_id": "evt_second"}, T0 + 0.1)
    events = drain(session, T0 + 0.1)
    error = next(e for e in events if e["type"] == "error")["error"]
    assert error["code"] == "conversation_already_has_active_response"
    assert response_id in error["message"]
    assert error["event_id"] == "evt_second"
    drain(session, T0 + 1)  # the first response finishes
    send(session, {"type": "response.create"}, T0 + 1)
    assert types_of(drain(session, T0 + 1))[0] == "response.created"


def test_the_voice_is_locked_once_assistant_audio_exists() -> None:
    session = manual_session()
    send(session, {"type": "response.create"})
    drain(session)
    send(
        session,
        {
            "type": "session.update",
            "event_id": "evt_voice",
            "session": {"type": "realtime", "audio": {"output": {"voice": "ash"}}},
        },
    )
    error = only_error(drain(session))
    assert (error["code"], error["event_id"]) == ("cannot_update_voice", "evt_voice")
    send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"output": {"voice": "marin"}}},
        },
    )
    assert types_of(drain(session)) == ["session.updated"]


# --- input audio buffer --------------------------------------------------------------


def test_commit_needs_100ms_of_audio_and_clear_empties_the_buffer() -> None:
    session = manual_session()
    send(session, {"type": "input_audio_buffer.commit", "event_id": "evt_c"})
    error = only_error(drain(session))
    assert error["code"] == "input_audio_buffer_commit_empty"
    assert error["message"] == (
        "Error committing input audio buffer: buffer too small. Expected at least 100ms of "
        "audio, but buffer only has 0.00ms of audio."
    )
    assert error["event_id"] == "evt_c"
    append(session, audio.speech_like(50, seed=1))
    send(session, {"type": "input_audio_buffer.commit"})
    assert "50.00ms" in only_error(drain(session))["message"]
    append(session, audio.speech_like(200, seed=1))
    send(session, {"type": "input_audio_buffer.clear"})
    assert types_of(drain(session)) == ["input_audio_buffer.cleared"]
    send(session, {"type": "input_audio_buffer.commit"})
    assert only_error(drain(session))["code"] == "input_audio_buffer_commit_empty"


def test_bad_appends_are_refused() -> None:
    session = manual_session()
    send(session, {"type": "input_audio_buffer.append", "event_id": "evt_a", "audio": "%%%"})
    error = only_error(drain(session))
    assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "audio", "evt_a")
    send(session, {"type": "input_audio_buffer.append"})
    assert only_error(drain(session))["code"] == "missing_required_parameter"
    send(session, {"type": "input_audio_buffer.append", "audio": 5})
    assert only_error(drain(session))["code"] == "invalid_type"
    send(session, {"type": "input_audio_buffer.append", "audio": "", "extra": 1})
    assert only_error(drain(session))["param"] == "extra"


# --- server VAD ------------------------------------------------------------------------


def test_server_vad_detects_a_turn_commits_it_and_answers() -> None:
    session = new_session(audio_ms=200, delta_ms=100)
    drain(session)
    utterance = audio.silence(500) + audio.speech_like(800, seed=4) + audio.silence(400)
    append(session, utterance)
    events = drain(session)
    kinds = types_of(events)
    assert kinds[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    started, stopped, committed = events[:3]
    assert started["audio_start_ms"] == 500 - 300  # speech onset minus the prefix padding
    assert 1300 <= stopped["audio_end_ms"] <= 1300 + 200 + 10
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert kinds[3:5] == ["conversation.item.added", "conversation.item.done"]
    assert kinds[5] == "response.created"
    assert kinds[-2:] == ["response.done", "rate_limits.updated"]
    # The committed item holds the speech with its padding, not the leading silence.
    send(session, {"type": "conversation.item.retrieve", "item_id": committed["item_id"]})
    retrieved = drain(session)[0]["item"]
    held = base64.b64decode(retrieved["content"][0]["audio"])
    expected_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
    assert len(held) == pytest.approx(expected_ms * 48, abs=48 * 10)


def test_server_vad_without_create_response_only_commits() -> None:
    session = new_session()
    drain(session)
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "create_response": False,
                            "silence_duration_ms": 300,
                            "prefix_padding_ms": 100,
                        }
                    }
                },
            },
        },
    )
    drain(session)
    append(session, audio.silence(200) + audio.speech_like(600, seed=2) + audio.silence(500))
    events = drain(session)
    assert types_of(events) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert events[0]["audio_start_ms"] == 100


def test_quiet_audio_and_a_high_threshold_do_not_trigger_vad() -> None:
    session = new_session()
    drain(session)
    append(session, audio.tone(500, 300.0, amplitude=0.002))  # about -57 dBFS
    assert drain(session) == []
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.99}}},
            },
        },
    )
    drain(session)
    append(session, audio.speech_like(500, seed=1) + audio.silence(300))
    assert drain(session) == []


def test_speech_during_a_response_interrupts_it() -> None:
    session = new_session(pacing=True, audio_ms=2000, delta_ms=100)
    drain(session)
    append(session, audio.speech_like(500, seed=3) + audio.silence(300))
    first_turn = drain(session)
    assert "response.created" in types_of(first_turn)
    now = T0 + 0.5
    drain(session, now)
    append(session, audio.speech_like(200, seed=6), now)
    events = drain(session, now)
    kinds = types_of(events)
    assert kinds[0] == "input_audio_buffer.speech_started"
    assert kinds[1:] == RESPONSE_TAIL_AUDIO
    done = events[-2]["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}


def test_semantic_vad_ends_turns_by_eagerness() -> None:
    session = new_session()
    drain(session)
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "semantic_vad",
                            "eagerness": "high",
                            "create_response": False,
                        }
                    }
                },
            },
        },
    )
    detection = drain(session)[0]["session"]["audio"]["input"]["turn_detection"]
    assert detection == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": False,
        "interrupt_response": True,
    }
    # "high" eagerness ends a turn after 400 ms of quiet (the stand-in's mapping).
    append(session, audio.speech_like(400, seed=2) + audio.silence(300))
    assert types_of(drain(session)) == ["input_audio_buffer.speech_started"]
    append(session, audio.silence(200))
    assert types_of(drain(session))[:2] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]


def test_input_transcription_events_follow_the_commit() -> None:
    session = manual_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            },
        },
    )
    assert drain(session)[0]["session"]["audio"]["input"]["transcription"] == {
        "model": "gpt-4o-mini-transcribe",
        "language": None,
        "prompt": None,
    }
    append(session, audio.speech_like(1200, seed=1))
    send(session, {"type": "input_audio_buffer.commit"})
    events = drain(session)
    kinds = types_of(events)
    assert kinds[:3] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert set(kinds[3:-1]) == {"conversation.item.input_audio_transcription.delta"}
    completed = events[-1]
    assert completed["type"] == "conversation.item.input_audio_transcription.completed"
    assert completed["transcript"] == "".join(e["delta"] for e in events[3:-1])
    assert completed["usage"]["type"] == "tokens"
    assert completed["usage"]["input_token_details"]["audio_tokens"] == 12


# --- conversation items ------------------------------------------------------------------


def test_conversation_items_create_retrieve_truncate_delete() -> None:
    session = manual_session(audio_ms=400)
    send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "A"}],
            },
        },
    )
    added, done = drain(session)
    first_id = added["item"]["id"]
    assert added["previous_item_id"] is None
    assert done["item"] == {
        "id": first_id,
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": "A"}],
    }
    send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "id": "item_mine",
                "type": "function_call_output",
                "call_id": "call_1",
                "output": "{}",
            },
        },
    )
    added, _ = drain(session)
    assert added["previous_item_id"] == first_id
    assert added["item"]["id"] == "item_mine"
    send(
        session,
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "S"}],
            },
        },
    )
    assert drain(session)[0]["previous_item_id"] is None

    send(session, {"type": "response.create"})
    assistant = next(e for e in drain(session) if e["type"] == "response.output_item.done")["item"]
    send(
        session,
        {
            "type": "conversation.item.truncate",
            "item_id": assistant["id"],
            "content_index": 0,
            "audio_end_ms": 150,
        },
    )
    truncated = drain(session)
    assert types_of(truncated) == ["conversation.item.truncated"]
    assert truncated[0]["audio_end_ms"] == 150
    send(session, {"type": "conversation.item.retrieve", "item_id": assistant["id"]})
    item = drain(session)[0]["item"]
    assert len(base64.b64decode(item["content"][0]["audio"])) == 150 * 48
    send(
        session,
        {
            "type": "conversation.item.truncate",
            "item_id": assistant["id"],
            "content_index": 0,
            "audio_end_ms": 5000,
        },
    )
    error = only_error(drain(session))
    assert error["message"] == "Audio content of 150ms is already shorter than 5000ms"

    send(session, {"type": "conversation.item.delete", "item_id": "item_mine"})
    assert types_of(drain(session)) == ["conversation.item.deleted"]
    send(session, {"type": "conversation.item.delete", "event_id": "evt_d", "item_id": "item_mine"})
    error = only_error(drain(session))
    assert error == {
        "type": "invalid_request_error",
        "code": "item_delete_invalid_item_id",
        "message": "Error deleting item: the item with id 'item_mine' does not exist.",
        "param": None,
        "event_id": "evt_d",
    }
    send(session, {"type": "conversation.item.retrieve", "item_id": "nope"})
    assert only_error(drain(session))["message"] == (
        "Error retrieving item: the item with id 'nope' does not exist."
    )
    send(
        session,
        {
            "type": "conversation.item.create",
            "previous_item_id": "item_gone",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "B"}],
            },
        },
    )
    assert only_error(drain(session))["param"] == "previous_item_id"
    send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "text", "text": "beta"}],
            },
        },
    )
    error = only_error(drain(session))
    assert (error["code"], error["param"]) == ("invalid_value", "item.content[0].type")


def test_delete_emits_deleted() -> None:
    session = manual_session()
    send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "A"}],
            },
        },
    )
    item_id = drain(session)[0]["item"]["id"]
    send(session, {"type": "conversation.item.delete", "item_id": item_id})
    events = drain(session)
    assert types_of(events) == ["conversation.item.deleted"]
    assert events[0]["item_id"] == item_id


# --- errors -------------------------------------------------------------------------------


def test_unknown_types_get_openais_invalid_value_and_the_session_stays_open() -> None:
    session = manual_session()
    send(session, {"type": "nope", "event_id": "evt_x"})
    error = only_error(drain(session))
    assert error["code"] == "invalid_value"
    assert error["param"] == "type"
    assert error["event_id"] == "evt_x"
    assert error["message"] == (
        "Invalid value: 'nope'. Supported values are: 'session.update', 'session.close', "
        "'input_audio_buffer.append', 'session.input_audio_buffer.append', "
        "'input_audio_buffer.commit', 'input_audio_buffer.clear', 'conversation.item.create', "
        "'conversation.item.truncate', 'conversation.item.delete', 'conversation.item.retrieve', "
        "'response.create', and 'response.cancel'."
    )
    assert len(SUPPORTED_CLIENT_EVENT_TYPES) == 12
    for legacy in (
        "transcription_session.update",
        "response.audio.delta",
        "output_audio_buffer.clear",
    ):
        send(session, {"type": legacy})
        assert only_error(drain(session))["code"] == "invalid_value"
    assert session.close_request is None
    send(session, {"type": "response.create"})
    assert "response.done" in types_of(drain(session))


@pytest.mark.parametrize(
    ("raw", "code", "param", "caused_by"),
    [
        (b"not json", "invalid_json", None, None),
        (b"[1, 2]", "invalid_event", None, None),
        (b'{"event_id": "evt_m"}', "missing_required_parameter", "type", "evt_m"),
        (b'{"type": 7, "event_id": "evt_t"}', "invalid_type", "type", "evt_t"),
        (b'{"type": "response.create", "event_id": 7}', "invalid_type", "event_id", None),
        (
            b'{"type": "response.create", "event_id": "' + b"e" * 513 + b'"}',
            "string_above_max_length",
            "event_id",
            "e" * 513,
        ),
        (
            b'{"type": "response.create", "bogus": 1, "event_id": "evt_b"}',
            "unknown_parameter",
            "bogus",
            "evt_b",
        ),
        (
            b'{"type": "response.create", "response": {"modalities": ["text"]}}',
            "unknown_parameter",
            "response.modalities",
            None,
        ),
    ],
)
def test_malformed_events_get_openai_shaped_errors(
    raw: bytes, code: str, param: str | None, caused_by: str | None
) -> None:
    session = manual_session()
    send(session, raw)
    error = only_error(drain(session))
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"], error["event_id"]) == (code, param, caused_by)
    assert session.close_request is None


# --- echo mode -----------------------------------------------------------------------------


def test_echo_mode_answers_each_append_with_one_identical_delta() -> None:
    session = new_session(mode="echo")
    drain(session)
    chunk = audio.b64encode(audio.speech_like(20, seed=1))
    raw = orjson.dumps(
        {"event_id": "evt_echo_1", "type": "input_audio_buffer.append", "audio": chunk}
    )
    session.receive(raw, T0)
    [payload] = session.pop_due(T0)
    event = validated(payload)
    assert event["type"] == "response.output_audio.delta"
    assert event["event_id"] == "evt_echo_1"
    assert event["delta"] == chunk
    assert f'"delta":"{chunk}"}}'.encode() in payload  # the very same text, byte for byte
    # Without an event_id the delta gets a fresh one in OpenAI's shape.
    session.receive(orjson.dumps({"type": "input_audio_buffer.append", "audio": chunk}), T0)
    [payload] = session.pop_due(T0)
    assert validated(payload)["event_id"].startswith("event_")
    # Everything else behaves as in normal mode, and the echoed audio counts for a commit.
    for _ in range(5):
        session.receive(raw, T0)
    assert len(session.pop_due(T0)) == 5
    send(session, {"type": "input_audio_buffer.commit"})
    kinds = types_of(drain(session))
    assert kinds[:3] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    # The hot path does not decode the audio: every append gets its delta, whatever it holds.
    send(session, {"type": "input_audio_buffer.append", "audio": "%%%"})
    assert drain(session)[0]["delta"] == "%%%"
    # An append the probe cannot echo (audio not a string) gets the normal path's error.
    send(session, {"type": "input_audio_buffer.append", "audio": 5, "event_id": "evt_5"})
    assert only_error(drain(session))["event_id"] == "evt_5"


def test_echo_mode_micro_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    session = new_session(mode="echo")
    session.pop_due(T0)
    raw = orjson.dumps(
        {
            "type": "input_audio_buffer.append",
            "event_id": "event_0123456789",
            "audio": audio.b64encode(audio.speech_like(20, seed=1)),
        }
    )
    rounds = 20_000
    started = time.perf_counter()
    for _ in range(rounds):
        session.receive(raw, T0)
        session.pop_due(T0)
    per_append_us = (time.perf_counter() - started) / rounds * 1e6
    with capsys.disabled():
        print(f"\necho mode: {per_append_us:.2f} us per 20 ms append (receive + pop_due)")
    assert per_append_us < 200


# --- lifetime, determinism, transcription sessions --------------------------------------------


def test_the_session_expires_after_60_minutes() -> None:
    session = manual_session()
    assert session.next_due() == pytest.approx(int(T0) + 3600)
    assert drain(session, T0 + 3599) == []
    error = only_error(drain(session, T0 + 3600))
    assert error["code"] == "session_expired"
    assert error["message"] == "Your session hit the maximum duration of 60 minutes."
    assert session.close_request == (4000, "invalid_request_error.session_expired")
    send(session, {"type": "response.create"}, T0 + 3601)
    assert drain(session, T0 + 3601) == []


def test_output_is_deterministic_for_a_seed_and_id_factory() -> None:
    def run() -> list[bytes]:
        session = new_session(pacing=True, seed=42, ids=counting_ids())
        out = session.pop_due(T0)
        append(session, audio.silence(300) + audio.speech_like(600, seed=9) + audio.silence(300))
        out += session.pop_due(T0)
        out += session.pop_due(T0 + 10)
        return out

    assert run() == run()


def test_a_transcription_session_from_a_client_secret() -> None:
    session = new_session(
        initial_session={
            "type": "transcription",
            "audio": {
                "input": {
                    "transcription": {"model": "whisper-1"},
                    "turn_detection": {"type": "server_vad"},
                }
            },
        }
    )
    created = drain(session)[0]["session"]
    assert created["type"] == "transcription"
    assert created["object"] == "realtime.transcription_session"
    assert created["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
    }
    append(session, audio.silence(300) + audio.speech_like(600, seed=1) + audio.silence(300))
    events = drain(session)
    kinds = types_of(events)
    assert "response.created" not in kinds
    assert kinds[-1] == "conversation.item.input_audio_transcription.completed"
    assert events[-1]["usage"]["type"] == "duration"
    send(session, {"type": "response.create"})
    assert only_error(drain(session))["code"] == "invalid_value"
    send(session, {"type": "session.update", "session": {"type": "realtime"}})
    assert only_error(drain(session))["param"] == "session.type"


def test_sessions_without_a_seed_get_distinct_event_ids() -> None:
    config = SimulatorConfig()
    first = SimulatedSession(config, model="gpt-realtime", now=T0)
    second = SimulatedSession(config, model="gpt-realtime", now=T0)
    first.start(T0)
    second.start(T0)
    assert (
        validated(first.pop_due(T0)[0])["event_id"] != validated(second.pop_due(T0)[0])["event_id"]
    )


def test_an_invalid_initial_session_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"session\.modalities"):
        SimulatedSession(
            SimulatorConfig(),
            model="gpt-realtime",
            now=T0,
            initial_session={"type": "realtime", "modalities": ["text"]},
        )
