"""Upstream handshake targets, without an event loop: each kind's URL, query and headers."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from relay.credentials.digests import digest_hex
from relay.credentials.secret import REDACTED, Secret
from relay.protocol import handshake
from relay.upstreams.urls import (
    KEY_ID_HEX_CHARS,
    CredentialScheme,
    UpstreamCredential,
    UpstreamKind,
    UpstreamSpec,
    handshake_target,
    upstream_model,
)

KEY = "sk-proj-0123456789abcdef"
BEARER = UpstreamCredential(Secret(KEY))
AZURE_KEY = UpstreamCredential(Secret(KEY), CredentialScheme.AZURE_API_KEY)
AZURE_MODELS = {"gpt-realtime": "voice-prod", "gpt-realtime-mini": "voice mini/eu"}


def query(raw: str, extra_allowed: tuple[str, ...] = ()) -> handshake.RealtimeQuery:
    """The query as admission hands it over (the same parser)."""
    return handshake.parse_realtime_query(raw, extra_allowed)


@dataclass(frozen=True)
class TargetCase:
    name: str
    spec: UpstreamSpec
    client_query: str
    expected_target: str
    expected_model: str | None
    credential: UpstreamCredential = BEARER
    extra_allowed: tuple[str, ...] = ()
    expected_host: tuple[bool, str, int, str] = field(
        default=(True, "api.openai.com", 443, "api.openai.com")
    )


OPENAI = UpstreamSpec(UpstreamKind.OPENAI, "wss://api.openai.com/v1")
AZURE_GA = UpstreamSpec(UpstreamKind.AZURE, "https://acme-eu.openai.azure.com", AZURE_MODELS)
AZURE_PREVIEW = UpstreamSpec(
    UpstreamKind.AZURE,
    "wss://acme-eu.openai.azure.com",
    AZURE_MODELS,
    azure_api_version="2024-10-01-preview",
)
AZURE_HOST = (True, "acme-eu.openai.azure.com", 443, "acme-eu.openai.azure.com")

TARGET_CASES = [
    TargetCase(
        "openai: the client's query as sent, order and encoding kept",
        OPENAI,
        "call_id=rtc%5F1&model=gpt-realtime&intent=transcription",
        "/v1/realtime?call_id=rtc%5F1&model=gpt-realtime&intent=transcription",
        "gpt-realtime",
    ),
    TargetCase(
        "openai: no query, no question mark",
        OPENAI,
        "",
        "/v1/realtime",
        None,
    ),
    TargetCase(
        "openai: a mapped model replaces the value in place",
        UpstreamSpec(
            UpstreamKind.OPENAI,
            "wss://api.openai.com/v1",
            {"voice": "gpt-realtime-2025-08-28"},
        ),
        "intent=x&model=voice&call_id=c",
        "/v1/realtime?intent=x&model=gpt-realtime-2025-08-28&call_id=c",
        "gpt-realtime-2025-08-28",
    ),
    TargetCase(
        "openai: an unmapped model keeps the client's own spelling",
        UpstreamSpec(UpstreamKind.OPENAI, "wss://api.openai.com/v1", {"other": "x"}),
        "model=gpt+rt",
        "/v1/realtime?model=gpt+rt",
        "gpt rt",
    ),
    TargetCase(
        "compatible: its own base URL, plain ws, a port",
        UpstreamSpec(UpstreamKind.COMPATIBLE, "ws://10.0.0.7:8000/api/v1/"),
        "model=local-voice",
        "/api/v1/realtime?model=local-voice",
        "local-voice",
        expected_host=(False, "10.0.0.7", 8000, "10.0.0.7:8000"),
    ),
    TargetCase(
        "azure GA: the deployment as model, the api-key header",
        AZURE_GA,
        "model=gpt-realtime",
        "/openai/v1/realtime?model=voice-prod",
        "voice-prod",
        credential=AZURE_KEY,
        expected_host=AZURE_HOST,
    ),
    TargetCase(
        "azure GA: the client's model is dropped wherever it stood, the rest kept in order",
        AZURE_GA,
        "call_id=c1&model=gpt-realtime-mini&intent=transcription",
        "/openai/v1/realtime?model=voice%20mini%2Feu&call_id=c1&intent=transcription",
        "voice mini/eu",
        credential=AZURE_KEY,
        expected_host=AZURE_HOST,
    ),
    TargetCase(
        "azure GA: a model not in the map is the deployment's name",
        AZURE_GA,
        "model=my-deployment",
        "/openai/v1/realtime?model=my-deployment",
        "my-deployment",
        expected_host=AZURE_HOST,
    ),
    TargetCase(
        "azure GA: a base URL with the SDK's /openai/v1 path is not doubled",
        UpstreamSpec(
            UpstreamKind.AZURE, "https://acme-eu.openai.azure.com/openai/v1/", AZURE_MODELS
        ),
        "model=gpt-realtime",
        "/openai/v1/realtime?model=voice-prod",
        "voice-prod",
        expected_host=AZURE_HOST,
    ),
    TargetCase(
        "azure GA behind a gateway path",
        UpstreamSpec(UpstreamKind.AZURE, "https://gw.acme.example/eu/", AZURE_MODELS),
        "model=gpt-realtime",
        "/eu/openai/v1/realtime?model=voice-prod",
        "voice-prod",
        expected_host=(True, "gw.acme.example", 443, "gw.acme.example"),
    ),
    TargetCase(
        "azure preview: api-version and deployment first, no model",
        AZURE_PREVIEW,
        "model=gpt-realtime&call_id=c1",
        "/openai/realtime?api-version=2024-10-01-preview&deployment=voice-prod&call_id=c1",
        "voice-prod",
        credential=AZURE_KEY,
        expected_host=AZURE_HOST,
    ),
    TargetCase(
        "azure: the client's own deployment and api-version never reach Azure",
        AZURE_PREVIEW,
        "deployment=other&model=gpt-realtime&api-version=1999&x=1",
        "/openai/realtime?api-version=2024-10-01-preview&deployment=voice-prod&x=1",
        "voice-prod",
        extra_allowed=("deployment", "api-version", "x"),
        expected_host=AZURE_HOST,
    ),
]


@pytest.mark.parametrize("case", TARGET_CASES, ids=lambda case: case.name)
def test_handshake_targets(case: TargetCase) -> None:
    target = handshake_target(
        case.spec, query(case.client_query, case.extra_allowed), case.credential
    )
    assert target.request_target == case.expected_target
    assert target.upstream_model == case.expected_model
    assert (target.tls, target.host, target.port, target.host_header) == case.expected_host
    if case.spec.kind is UpstreamKind.AZURE:
        parsed = query(target.request_target.partition("?")[2], ("deployment", "api-version"))
        names = [piece.partition("=")[0] for piece in parsed.forwarded.split("&")]
        # One model (GA) or one deployment (preview), never a client's beside it.
        assert names.count("model") + names.count("deployment") == 1


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        (BEARER, ("Authorization", f"Bearer {KEY}")),
        (AZURE_KEY, ("api-key", KEY)),
    ],
)
def test_the_credential_header_for_each_scheme(
    credential: UpstreamCredential, expected: tuple[str, str]
) -> None:
    target = handshake_target(AZURE_GA, query("model=gpt-realtime"), credential)
    assert target.wire_headers()[0] == expected


def test_extra_headers_follow_the_credential_and_the_bytes_carry_the_key() -> None:
    safety = ("OpenAI-Safety-Identifier", "u-digest")
    target = handshake_target(OPENAI, query("model=m"), BEARER, extra_headers=[safety])
    assert target.headers == (safety,)
    assert target.wire_headers() == [("Authorization", f"Bearer {KEY}"), safety]
    request = handshake.upgrade_request(
        host_header=target.host_header,
        target=target.request_target,
        key=handshake.new_websocket_key(),
        headers=target.wire_headers(),
    )
    assert f"Authorization: Bearer {KEY}\r\n".encode() in request
    assert b"GET /v1/realtime?model=m HTTP/1.1\r\n" in request


@pytest.mark.parametrize("credential", [BEARER, AZURE_KEY])
def test_no_repr_shows_the_key(credential: UpstreamCredential) -> None:
    target = handshake_target(AZURE_GA, query("model=gpt-realtime"), credential)
    for shown in (repr(target), str(target), repr(credential), f"{target}", repr(target.headers)):
        assert KEY not in shown
    assert str(credential.value) == REDACTED


def test_a_key_id_is_a_short_digest_prefix_not_the_key() -> None:
    assert BEARER.key_id == digest_hex(KEY)[:KEY_ID_HEX_CHARS]
    assert len(BEARER.key_id) == KEY_ID_HEX_CHARS
    assert AZURE_KEY.key_id == BEARER.key_id  # the key decides, not how it travels
    assert UpstreamCredential(Secret(KEY + "x")).key_id != BEARER.key_id
    assert BEARER.key_id not in KEY


@pytest.mark.parametrize(
    ("spec", "client_query", "credential", "problem"),
    [
        (OPENAI, "model=m", AZURE_KEY, "only a Bearer credential"),
        (
            UpstreamSpec(UpstreamKind.COMPATIBLE, "http://local:1"),
            "",
            AZURE_KEY,
            "only a Bearer credential",
        ),
        (AZURE_GA, "intent=transcription", AZURE_KEY, "needs the client's model"),
        (UpstreamSpec(UpstreamKind.OPENAI, "ftp://x"), "", BEARER, "scheme"),
    ],
)
def test_what_cannot_be_dialed_is_an_error(
    spec: UpstreamSpec, client_query: str, credential: UpstreamCredential, problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        handshake_target(spec, query(client_query), credential)


@pytest.mark.parametrize(
    ("client_model", "expected"),
    [("gpt-realtime", "voice-prod"), ("unmapped", "unmapped"), (None, None)],
)
def test_the_model_map(client_model: str | None, expected: str | None) -> None:
    assert upstream_model(AZURE_GA, client_model) == expected
