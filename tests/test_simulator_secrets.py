"""``POST /v1/realtime/client_secrets`` logic: validation, minting, the bounded store."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from openai.types.realtime import ClientSecretCreateResponse
from pydantic import TypeAdapter

from relay.config import SimulatorConfig
from relay.protocol.client_secrets import DEFAULT_SECRET_TTL_S, INVALID_JSON_MESSAGE
from relay.simulator.engine import SimulatedSession
from relay.simulator.secrets import ClientSecretStore

NOW = 1_750_000_000.0
SECRET_RE = re.compile(r"^ek_[0-9a-f]{32}$")


def mint(store: ClientSecretStore, body: Any, now: float = NOW) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    status, payload = store.mint(raw, now)
    return status, orjson.loads(payload)


def test_a_minimal_request_gets_a_secret_and_a_full_ga_session() -> None:
    store = ClientSecretStore()
    status, body = mint(store, {"session": {"type": "realtime", "model": "gpt-realtime"}})
    assert status == 200
    assert list(body) == ["value", "expires_at", "session"]
    assert SECRET_RE.match(body["value"])
    assert body["expires_at"] == int(NOW) + DEFAULT_SECRET_TTL_S
    session = body["session"]
    assert session["type"] == "realtime"
    assert session["object"] == "realtime.session"
    assert session["id"].startswith("sess_")
    assert session["model"] == "gpt-realtime"
    assert session["audio"]["output"]["voice"] == "marin"
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    # The official SDK parses it into its own response type.
    parsed = TypeAdapter(ClientSecretCreateResponse).validate_python(body)
    assert parsed.value == body["value"]
    assert type(parsed.session).__name__ == "RealtimeSessionCreateResponse"


def test_the_attached_config_shows_in_the_session_and_is_what_lookup_returns() -> None:
    store = ClientSecretStore()
    request = {
        "expires_after": {"anchor": "created_at", "seconds": 60},
        "session": {
            "type": "realtime",
            "model": "gpt-realtime-2.1",
            "instructions": "You are a friendly assistant.",
            "audio": {"output": {"voice": "cedar"}},
        },
    }
    status, body = mint(store, request)
    assert status == 200
    assert body["expires_at"] == int(NOW) + 60
    assert body["session"]["instructions"] == "You are a friendly assistant."
    assert body["session"]["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "voice": "cedar",
        "speed": 1.0,
    }
    config = store.lookup(body["value"], NOW + 1)
    assert config == request["session"]
    # A copy: the caller cannot change the stored config.
    assert config is not None
    config["instructions"] = "changed"
    assert store.lookup(body["value"], NOW + 2) == request["session"]


def test_one_secret_opens_several_sessions_until_it_expires() -> None:
    store = ClientSecretStore()
    _, body = mint(store, {"expires_after": {"seconds": 10}, "session": {"type": "realtime"}})
    secret = body["value"]
    assert store.lookup(secret, NOW) is not None
    assert store.lookup(secret, NOW + 9.9) is not None
    assert store.lookup(secret, NOW + 10) is None
    assert store.lookup(secret, NOW) is None  # expired entries are gone for good
    assert store.lookup("ek_" + "0" * 32, NOW) is None
    assert len(store) == 0


def test_the_store_is_bounded_and_prunes_expired_secrets() -> None:
    store = ClientSecretStore(max_secrets=3)
    values = [mint(store, {"expires_after": {"seconds": 10 + i}})[1]["value"] for i in range(5)]
    assert len(store) == 3
    # The secrets closest to expiry went first.
    assert store.lookup(values[0], NOW) is None
    assert store.lookup(values[4], NOW) is not None
    assert store.prune(NOW + 13) == 2
    assert len(store) == 1
    with pytest.raises(ValueError, match="max_secrets"):
        ClientSecretStore(max_secrets=0)


def test_defaults_empty_body_object_and_transcription_sessions() -> None:
    store = ClientSecretStore()
    status, body = mint(store, {})
    assert status == 200
    assert body["session"]["model"] == "gpt-realtime"
    status, body = mint(
        store,
        {
            "session": {
                "type": "transcription",
                "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
            }
        },
    )
    assert status == 200
    session = body["session"]
    assert session["type"] == "transcription"
    assert session["object"] == "realtime.transcription_session"
    assert session["audio"]["input"]["transcription"] == {
        "model": "gpt-4o-mini-transcribe",
        "language": None,
        "prompt": None,
    }
    parsed = TypeAdapter(ClientSecretCreateResponse).validate_python(body)
    assert type(parsed.session).__name__ == "RealtimeTranscriptionSessionCreateResponse"


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"expires_after": {"seconds": 9}}, "integer_below_min_value", "expires_after.seconds"),
        ({"expires_after": {"seconds": 7201}}, "integer_above_max_value", "expires_after.seconds"),
        ({"expires_after": {"seconds": "60"}}, "invalid_type", "expires_after.seconds"),
        ({"expires_after": {"seconds": 60.5}}, "invalid_type", "expires_after.seconds"),
        ({"expires_after": {"seconds": True}}, "invalid_type", "expires_after.seconds"),
        ({"expires_after": {"anchor": "now"}}, "invalid_value", "expires_after.anchor"),
        ({"expires_after": {"anchor": 1}}, "invalid_type", "expires_after.anchor"),
        ({"expires_after": {"ttl": 5}}, "unknown_parameter", "expires_after.ttl"),
        ({"expires_after": 60}, "invalid_type", "expires_after"),
        ({"client_secret": {}}, "unknown_parameter", "client_secret"),
        ({"session": {"model": "gpt-realtime"}}, "missing_required_parameter", "session.type"),
        ({"session": {"type": "translation"}}, "invalid_value", "session.type"),
        (
            {"session": {"type": "realtime", "modalities": ["audio"]}},
            "unknown_parameter",
            "session.modalities",
        ),
        ({"session": {"type": "realtime", "voice": "alloy"}}, "unknown_parameter", "session.voice"),
        (
            {"session": {"type": "realtime", "audio": {"output": {"speed": 3}}}},
            "decimal_above_max_value",
            "session.audio.output.speed",
        ),
        ({"session": "realtime"}, "invalid_type", "session"),
    ],
)
def test_invalid_requests_get_openais_400_naming_the_field(
    body: Any, code: str, param: str
) -> None:
    store = ClientSecretStore()
    status, answer = mint(store, body)
    assert status == 400
    assert list(answer) == ["error"]
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert len(store) == 0


def test_error_messages_use_openais_wording() -> None:
    store = ClientSecretStore()
    _, answer = mint(store, {"expires_after": {"seconds": 5}})
    assert answer["error"]["message"] == (
        "Invalid 'expires_after.seconds': integer below minimum value. "
        "Expected a value >= 10, but got 5 instead."
    )
    _, answer = mint(store, {"expires_after": {"anchor": "now"}})
    assert answer["error"]["message"] == (
        "Invalid value: 'now'. Supported values are: 'created_at'."
    )
    for body in (b"not json", b"", b"{"):
        status, answer = mint(store, body)
        assert status == 400
        assert answer["error"] == {
            "message": INVALID_JSON_MESSAGE,
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    status, answer = mint(store, b"[]")
    assert (status, answer["error"]["code"]) == (400, "invalid_type")


def test_a_session_opened_with_the_secret_starts_with_its_config() -> None:
    store = ClientSecretStore()
    _, body = mint(
        store,
        {
            "session": {
                "type": "realtime",
                "model": "gpt-realtime",
                "instructions": "Be brief.",
                "audio": {"input": {"turn_detection": None}},
            }
        },
    )
    config = store.lookup(body["value"], NOW)
    engine = SimulatedSession(
        SimulatorConfig(), model="gpt-realtime-2.1", now=NOW, initial_session=config
    )
    engine.start(NOW)
    created = orjson.loads(engine.pop_due(NOW)[0])
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["instructions"] == "Be brief."
    assert session["audio"]["input"]["turn_detection"] is None
    # The connection's ?model= wins over the secret's, as OpenAI documents.
    assert session["model"] == "gpt-realtime-2.1"
