"""The simulator's upstream flavors: an Azure OpenAI resource, and the models OpenAI serves.

Real sockets on 127.0.0.1 against an in-process simulator: the GA and preview URL
forms, ``api-key`` and Entra auth, Azure's refusals (never quoting a credential),
its 30-minute session cap on trio's autojump clock, and the official SDK as Azure
users call it. The openai flavor's ``models`` and configurable cap are here too.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
import trio
import trio.testing
from openai import AsyncAzureOpenAI, AsyncOpenAI
from trio_websocket import ConnectionClosed, WebSocketConnection

from relay import cli
from relay import config as cfg
from relay.simulator.engine import SimulatedSession
from relay.simulator.faults import AuthScheme, HandshakeRecord
from relay.simulator.flavors import AZURE_DEPLOYMENT_NOT_FOUND, AZURE_KEY_DENIED, AZURE_TOKEN_DENIED
from tests.conftest import SIM_KEY, RunningSimulator, open_ws, raw_handshake, run_asyncio
from tests.sdk_client import CHUNK_MS, SAMPLE_RATE_HZ, _speech_pcm16

DEPLOYMENT = "my-gpt-realtime"
ENTRA_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOi.entra-test-token.signature"
API_VERSION = "2025-04-01-preview"
GA_TARGET = f"/openai/v1/realtime?model={DEPLOYMENT}"
PREVIEW_TARGET = f"/openai/realtime?api-version={API_VERSION}&deployment={DEPLOYMENT}"
#: Seconds a virtual-clock test may wait past a cap for the close (autojump: no real time).
CAP_SLACK_S = 60


async def azure(nursery: trio.Nursery, **overrides: Any) -> RunningSimulator:
    from tests.conftest import start_simulator

    fields: dict[str, Any] = {
        "flavor": "azure",
        "entra_tokens": (ENTRA_TOKEN,),
        "azure_deployments": (DEPLOYMENT, "other-deployment"),
    }
    fields.update(overrides)
    return await start_simulator(nursery, **fields)


async def next_event(ws: WebSocketConnection, timeout_s: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout_s):
        message = await ws.get_message()
    assert isinstance(message, str)
    event: dict[str, Any] = json.loads(message)
    return event


def ws_url(sim: RunningSimulator, target: str) -> str:
    return f"ws://127.0.0.1:{sim.port}{target}"


# --- URL forms and auth ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path"),
    [(GA_TARGET, "/openai/v1/realtime"), (PREVIEW_TARGET, "/openai/realtime")],
    ids=["ga", "preview"],
)
async def test_both_url_forms_open_a_session_on_the_deployment(
    nursery: trio.Nursery, target: str, path: str
) -> None:
    sim = await azure(nursery)
    async with open_ws(ws_url(sim, target), extra_headers=[("api-key", SIM_KEY)]) as ws:
        created = await next_event(ws)
    assert created["type"] == "session.created"
    assert created["session"]["model"] == DEPLOYMENT
    assert sim.sim.handshakes == [HandshakeRecord(path, DEPLOYMENT, "api-key", 0, 101)]


async def test_preview_takes_the_key_as_a_query_too(nursery: trio.Nursery) -> None:
    sim = await azure(nursery)
    async with open_ws(ws_url(sim, f"{PREVIEW_TARGET}&api-key={SIM_KEY}")) as ws:
        assert (await next_event(ws))["type"] == "session.created"
    assert sim.sim.handshakes[-1].auth_scheme == "api-key"


async def test_an_entra_token_is_a_bearer(nursery: trio.Nursery) -> None:
    sim = await azure(nursery)
    auth = [("Authorization", f"Bearer {ENTRA_TOKEN}")]
    async with open_ws(ws_url(sim, GA_TARGET), extra_headers=auth) as ws:
        assert (await next_event(ws))["session"]["model"] == DEPLOYMENT
    record = sim.sim.handshakes[-1]
    assert (record.auth_scheme, record.key_index, record.status) == ("entra", None, 101)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ([], AZURE_KEY_DENIED),
        ([("api-key", "wrong-azure-key-0123456789")], AZURE_KEY_DENIED),
        ([("Authorization", "Bearer wrong-entra-token-0123456789")], AZURE_TOKEN_DENIED),
        # An API key is not an Entra token, nor the other way round.
        ([("Authorization", f"Bearer {SIM_KEY}")], AZURE_TOKEN_DENIED),
        ([("api-key", ENTRA_TOKEN)], AZURE_KEY_DENIED),
    ],
    ids=["none", "wrong-key", "wrong-token", "key-as-bearer", "token-as-key"],
)
async def test_401_in_azure_shape_never_quotes_the_credential(
    nursery: trio.Nursery, headers: list[tuple[str, str]], message: str
) -> None:
    sim = await azure(nursery)
    for target in (GA_TARGET, PREVIEW_TARGET):
        answer = await raw_handshake(sim.port, target, headers)
        assert answer.status == 401
        assert answer.json() == {"error": {"code": "401", "message": message}}
        answer_text = answer.body.decode() + json.dumps(answer.headers)
        for _, value in headers:
            credential = value.removeprefix("Bearer ")
            assert credential not in answer_text
            assert credential[-6:] not in answer_text
    assert [r.status for r in sim.sim.handshakes] == [401, 401]


async def test_preview_without_api_version_is_400(nursery: trio.Nursery) -> None:
    sim = await azure(nursery)
    answer = await raw_handshake(
        sim.port, f"/openai/realtime?deployment={DEPLOYMENT}", [("api-key", SIM_KEY)]
    )
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "MissingApiVersionParameter"
    assert set(answer.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    "target",
    ["/openai/v1/realtime?model=nope", f"/openai/realtime?api-version={API_VERSION}&deployment=no"],
    ids=["ga", "preview"],
)
async def test_unknown_deployment_is_404_deployment_not_found(
    nursery: trio.Nursery, target: str
) -> None:
    sim = await azure(nursery)
    answer = await raw_handshake(sim.port, target, [("api-key", SIM_KEY)])
    assert answer.status == 404
    assert answer.json() == {
        "error": {"code": "DeploymentNotFound", "message": AZURE_DEPLOYMENT_NOT_FOUND}
    }


async def test_no_deployment_list_means_any_name(nursery: trio.Nursery) -> None:
    sim = await azure(nursery, azure_deployments=())
    auth = [("api-key", SIM_KEY)]
    async with open_ws(ws_url(sim, "/openai/v1/realtime?model=anything"), extra_headers=auth) as ws:
        assert (await next_event(ws))["session"]["model"] == "anything"


async def test_azure_needs_a_deployment(nursery: trio.Nursery) -> None:
    sim = await azure(nursery)
    answer = await raw_handshake(sim.port, "/openai/v1/realtime", [("api-key", SIM_KEY)])
    assert answer.status == 400
    assert answer.json()["error"]["code"] == "BadRequest"


@pytest.mark.parametrize("path", ["/v1/realtime", "/realtime", "/v1/realtime/client_secrets"])
async def test_openai_paths_are_404_under_azure(nursery: trio.Nursery, path: str) -> None:
    sim = await azure(nursery)
    answer = await raw_handshake(sim.port, f"{path}?model={DEPLOYMENT}", [("api-key", SIM_KEY)])
    assert answer.status == 404
    assert answer.json() == {"error": {"code": "404", "message": "Resource not found"}}
    assert sim.sim.handshakes == []  # not a realtime handshake of this upstream


@pytest.mark.parametrize("target", [GA_TARGET, PREVIEW_TARGET])
async def test_azure_paths_are_404_under_openai(simulator: RunningSimulator, target: str) -> None:
    answer = await raw_handshake(
        simulator.port, target, [("Authorization", f"Bearer {simulator.key}")]
    )
    assert answer.status == 404
    assert answer.json()["error"]["code"] == "not_found"
    assert answer.json()["error"]["type"] == "invalid_request_error"


# --- the session cap -------------------------------------------------------------------


async def read_to_close(ws: WebSocketConnection) -> tuple[list[dict[str, Any]], int, str]:
    """Every event until the server closes, and its close code and reason."""
    events: list[dict[str, Any]] = []
    while True:
        try:
            message = await ws.get_message()
        except ConnectionClosed as closed:
            close = closed.reason
            break
        events.append(json.loads(message))
    assert close is not None
    return events, close.code, close.reason or ""


@pytest.mark.parametrize(
    ("flavor", "overrides", "cap_s", "words"),
    [
        ("azure", {}, 1800, "30 minutes"),
        ("openai", {}, 3600, "60 minutes"),
        ("azure", {"max_session_s": 90.0}, 90, "90 seconds"),
        ("openai", {"max_session_s": 600.0}, 600, "10 minutes"),
    ],
    ids=["azure-default", "openai-default", "azure-configured", "openai-configured"],
)
async def test_the_session_cap_sends_an_error_then_closes(
    autojump_clock: trio.testing.MockClock,
    nursery: trio.Nursery,
    flavor: str,
    overrides: dict[str, Any],
    cap_s: float,
    words: str,
) -> None:
    from tests.conftest import start_simulator

    if flavor == "azure":
        sim = await azure(nursery, **overrides)
        url, auth = ws_url(sim, GA_TARGET), [("api-key", SIM_KEY)]
    else:
        sim = await start_simulator(nursery, **overrides)
        url, auth = (
            f"{sim.ws_base}/realtime?model=gpt-realtime",
            [("Authorization", f"Bearer {SIM_KEY}")],
        )
    opened_at = trio.current_time()
    async with open_ws(url, extra_headers=auth) as ws:
        created = await next_event(ws)
        # session.expires_at shows the cap in whole seconds of the wall clock (which the
        # virtual clock does not move).
        assert created["session"]["expires_at"] == pytest.approx(time.time() + cap_s, abs=2)
        with trio.fail_after(cap_s + CAP_SLACK_S):
            events, code, reason = await read_to_close(ws)
    assert trio.current_time() - opened_at >= cap_s - 1  # virtual seconds, not real ones
    assert [e["type"] for e in events] == ["error"]
    error = events[0]["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "session_expired")
    assert error["message"] == f"Your session hit the maximum duration of {words}."
    assert (code, reason) == (4000, "invalid_request_error.session_expired")


def test_the_engine_schedules_the_flavors_cap() -> None:
    now = 1_750_000_000.0
    for config, cap_s in [
        (cfg.SimulatorConfig(flavor="azure"), 1800),
        (cfg.SimulatorConfig(), 3600),
        (cfg.SimulatorConfig(max_session_s=0.25), 0.25),
    ]:
        session = SimulatedSession(config, model="m", now=now)
        session.start(now)
        session.pop_due(now)
        assert session.next_due() == pytest.approx(now + cap_s)


# --- the official SDK, as Azure users call it -------------------------------------------


async def sdk_voice_turn(client: AsyncOpenAI, model: str) -> dict[str, Any]:
    """One push-to-talk voice turn through ``client.realtime.connect`` (asyncio)."""
    types: list[str] = []
    audio_deltas = 0
    async with client, client.realtime.connect(model=model) as connection:
        await connection.session.update(
            session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        )
        audio = _speech_pcm16(400)
        step = SAMPLE_RATE_HZ * 2 * CHUNK_MS // 1000
        for offset in range(0, len(audio), step):
            chunk = base64.b64encode(audio[offset : offset + step]).decode("ascii")
            await connection.input_audio_buffer.append(audio=chunk)
        await connection.input_audio_buffer.commit()
        await connection.response.create()
        created_model = ""
        async for event in connection:
            types.append(event.type)
            if event.type == "session.created":
                created_model = str(event.session.model)  # type: ignore[union-attr]
            if event.type == "error":
                raise AssertionError(f"error event: {event.error}")
            if event.type == "response.output_audio.delta":
                audio_deltas += 1
            if event.type == "response.done":
                break
    return {"types": types, "audio_deltas": audio_deltas, "model": created_model}


async def test_openai_sdk_voice_turn_with_an_entra_token(nursery: trio.Nursery) -> None:
    sim = await azure(nursery)

    async def turn() -> dict[str, Any]:
        # PY examples/realtime/azure_realtime.py: the plain client on the GA base URL.
        client = AsyncOpenAI(
            websocket_base_url=f"ws://127.0.0.1:{sim.port}/openai/v1", api_key=ENTRA_TOKEN
        )
        return await sdk_voice_turn(client, DEPLOYMENT)

    summary = await run_asyncio(turn)
    assert summary["model"] == DEPLOYMENT
    assert summary["audio_deltas"] > 0
    assert summary["types"][-1] == "response.done"
    assert sim.sim.handshakes == [
        HandshakeRecord("/openai/v1/realtime", DEPLOYMENT, "entra", None, 101)
    ]


@pytest.mark.parametrize("credential", ["api_key", "azure_ad_token"])
async def test_azure_sdk_client_voice_turn_on_the_preview_url(
    nursery: trio.Nursery, credential: str
) -> None:
    """``AsyncAzureOpenAI`` dials the preview form (``api-version`` + ``deployment``).

    Over ``ws://`` only with ``websocket_base_url``: from ``azure_endpoint`` alone
    the SDK forces ``wss://`` (``lib/azure.py::_configure_realtime``), which a
    plain loopback simulator does not serve; this test passes the base URL.
    """
    sim = await azure(nursery)
    secret = SIM_KEY if credential == "api_key" else ENTRA_TOKEN

    async def turn() -> dict[str, Any]:
        client = AsyncAzureOpenAI(  # type: ignore[call-overload]
            azure_endpoint=f"http://127.0.0.1:{sim.port}",
            api_version=API_VERSION,
            websocket_base_url=f"ws://127.0.0.1:{sim.port}/openai",
            **{credential: secret},
        )
        return await sdk_voice_turn(client, DEPLOYMENT)

    summary = await run_asyncio(turn)
    assert summary["model"] == DEPLOYMENT
    assert summary["audio_deltas"] > 0
    scheme: AuthScheme = "api-key" if credential == "api_key" else "entra"
    key_index = 0 if credential == "api_key" else None
    assert sim.sim.handshakes == [
        HandshakeRecord("/openai/realtime", DEPLOYMENT, scheme, key_index, 101)
    ]


# --- the openai flavor's models ----------------------------------------------------------


async def test_a_model_not_served_is_refused(nursery: trio.Nursery) -> None:
    from tests.conftest import start_simulator

    sim = await start_simulator(nursery, models=("gpt-realtime", "gpt-realtime-mini"))
    auth = [("Authorization", f"Bearer {SIM_KEY}")]
    async with open_ws(f"{sim.ws_base}/realtime?model=gpt-realtime-mini", extra_headers=auth) as ws:
        assert (await next_event(ws))["session"]["model"] == "gpt-realtime-mini"
    answer = await raw_handshake(sim.port, "/v1/realtime?model=gpt-realtime-2", auth)
    assert answer.status == 400
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert "gpt-realtime-2" in error["message"]
    assert [(r.model, r.status) for r in sim.sim.handshakes] == [
        ("gpt-realtime-mini", 101),
        ("gpt-realtime-2", 400),
    ]


# --- configuration and the command line ---------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"entra_tokens": ("t",)},
        {"azure_deployments": ("d",)},
        {"flavor": "azure", "models": ("gpt-realtime",)},
    ],
)
def test_settings_of_the_other_flavor_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(cfg.ConfigError, match="flavor"):
        cfg.load(cfg.SimulatorConfig, environ={}, overrides=fields)


def test_simulate_flags_reach_the_config() -> None:
    args = cli._parser().parse_args(
        [
            "simulate",
            "--flavor",
            "azure",
            "--deployment",
            "a",
            "--deployment",
            "b",
            "--entra-token",
            ENTRA_TOKEN,
            "--max-session-s",
            "120",
        ]
    )
    sim = cfg.load(
        cfg.SimulatorConfig,
        environ={},
        overrides=cli._overrides(args, cfg.SimulatorConfig.__struct_fields__),
    )
    assert (sim.flavor, sim.azure_deployments, sim.max_session_s) == ("azure", ("a", "b"), 120.0)
    assert sim.entra_tokens == (ENTRA_TOKEN,)
    assert ENTRA_TOKEN not in repr(sim)
    assert sim.session_cap_s() == 120.0
