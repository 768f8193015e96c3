"""The upstream table from configuration, without an event loop: TOML, key pools, models,
the shorthand, and every refusal naming its setting but never a key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import config as cfg
from relay.credentials.secret import Secret
from relay.dataplane.admission import AdmissionPolicy, Occupancy, Refused, admit
from relay.upstreams.chooser import KeyRef
from relay.upstreams.table import (
    AZURE_MAX_SESSION_S,
    DEFAULT_UPSTREAM_NAME,
    LiveSessions,
    UpstreamTableError,
    build_upstream_table,
)
from relay.upstreams.urls import CredentialScheme, UpstreamKind
from tests.test_admission import STATIC, head

KEY_A = "sk-proj-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-proj-bbbbbbbbbbbbbbbbbbbb"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
ENV = {"OPENAI_KEY_A": KEY_A, "OPENAI_KEY_B": KEY_B, "AZURE_EAST_KEY": AZURE_KEY}

DEPLOYMENT_TOML = """
[serve]
client_key_sha256 = ["%s"]

[upstreams.azure-east]
kind = "azure"
url = "https://voice-east.openai.azure.com"
api_key_env = ["AZURE_EAST_KEY"]
models = { "gpt-realtime" = "voice-prod" }
priority = 0

[upstreams.openai]
kind = "openai"
url = "wss://api.openai.com/v1"
api_key_env = ["OPENAI_KEY_A", "OPENAI_KEY_B"]
models = ["gpt-realtime", "gpt-realtime-mini"]
priority = 10
""" % ("0" * 64)


def load_serve(tmp_path: Path, text: str) -> cfg.ServeConfig:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return cfg.load(cfg.ServeConfig, toml_path=path, environ={})


def test_the_readme_deployment_builds_two_upstreams_with_their_pools(tmp_path: Path) -> None:
    config = load_serve(tmp_path, DEPLOYMENT_TOML)
    table = build_upstream_table(config, environ=ENV)
    azure, openai = table.upstreams
    assert (azure.name, azure.spec.kind, azure.priority) == ("azure-east", UpstreamKind.AZURE, 0)
    assert azure.max_session_s == AZURE_MAX_SESSION_S  # Azure's 30 minutes by default
    assert [key.scheme for key in azure.keys] == [CredentialScheme.AZURE_API_KEY]
    assert azure.spec.model_names == {"gpt-realtime": "voice-prod"}
    assert len(openai.keys) == 2
    assert openai.max_session_s == 0
    assert {key.credential().value.reveal() for key in openai.keys} == {KEY_A, KEY_B}
    assert table.served_models == frozenset({"gpt-realtime", "gpt-realtime-mini"})
    assert [up.name for up in table.route("gpt-realtime")] == ["azure-east", "openai"]
    assert [up.name for up in table.route("gpt-realtime-mini")] == ["openai"]
    assert table.route("whisper-1") == ()
    assert table.route(None) == ()
    # Ids are digest prefixes: distinct, and nothing of the key.
    ids = [key.key_id for key in openai.keys]
    assert len(set(ids)) == 2
    assert all(len(i) == 8 for i in ids)
    shown = repr(table) + repr(config) + str(cfg.redacted(config))
    for key in ENV.values():
        assert key not in shown
        assert key[:8] not in shown


def test_serve_upstreams_and_top_level_upstreams_are_the_same_and_not_both(
    tmp_path: Path,
) -> None:
    nested = DEPLOYMENT_TOML.replace("[upstreams.", "[serve.upstreams.")
    assert load_serve(tmp_path, nested) == load_serve(tmp_path, DEPLOYMENT_TOML)
    both = DEPLOYMENT_TOML + '\n[serve.upstreams.extra]\nurl = "wss://x.example/v1"\n'
    with pytest.raises(cfg.ConfigError, match="both as"):
        load_serve(tmp_path, both)


def test_the_environment_cannot_set_a_table_of_tables() -> None:
    with pytest.raises(cfg.ConfigError, match="set it in the TOML file"):
        cfg.load(cfg.ServeConfig, environ={"RELAY_SERVE_UPSTREAMS": "x"})


def test_the_shorthand_is_one_upstream_serving_every_model() -> None:
    table = build_upstream_table(
        cfg.ServeConfig(upstream_url="wss://api.openai.com/v1", upstream_api_key=Secret(KEY_A))
    )
    (only,) = table.upstreams
    assert only.name == DEFAULT_UPSTREAM_NAME
    assert only.models is None
    assert table.served_models is None
    assert table.route("anything") == (only,)
    assert table.route(None) == (only,)
    # One key: nothing to fail over to, so the dial gets the whole connect deadline.
    assert table.policy.attempt_timeout_s == cfg.ServeConfig().upstream_connect_timeout_s


def test_a_key_file_is_re_read_when_it_changes_and_keeps_its_id(tmp_path: Path) -> None:
    token = tmp_path / "entra.token"
    token.write_text("eyJ-first-token\n")
    config = cfg.ServeConfig(
        upstreams={
            "azure": cfg.UpstreamSettings(
                kind="azure",
                url="https://res.openai.azure.com",
                auth="entra",
                api_key_file=(str(token),),
                models=("voice-prod",),
            )
        }
    )
    (key,) = build_upstream_table(config, environ={}).upstreams[0].keys
    first_id = key.key_id
    credential = key.credential()
    assert credential.scheme is CredentialScheme.BEARER  # Entra travels as Bearer
    assert credential.value.reveal() == "eyJ-first-token"
    token.write_text("eyJ-second-token\n")
    stat = token.stat()
    os.utime(token, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key.credential().value.reveal() == "eyJ-second-token"
    assert key.key_id == first_id
    token.unlink()  # a rotation half done keeps the last token
    assert key.credential().value.reveal() == "eyJ-second-token"


def upstream(**fields: object) -> cfg.ServeConfig:
    settings = {"url": "wss://api.openai.com/v1", "api_key_env": ("OPENAI_KEY_A",)} | fields
    return cfg.ServeConfig(upstreams={"up": cfg.UpstreamSettings(**settings)})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (upstream(url=""), "upstreams.up.url: not set"),
        (upstream(url="ftp://x"), "upstreams.up.url: upstream URL scheme"),
        (upstream(api_key_env=()), "upstreams.up: no key"),
        (upstream(api_key_env=("MISSING",)), "api_key_env[0]: the environment variable MISSING"),
        (
            upstream(api_key_env=("OPENAI_KEY_A", "OPENAI_KEY_A_AGAIN")),
            "env:OPENAI_KEY_A_AGAIN and env:OPENAI_KEY_A hold the same key",
        ),
        (upstream(api_key_env=("SPACEY",)), "api_key_env[0]: the key has spaces"),
        (upstream(api_key_file=("/nonexistent/key",)), "api_key_file[0]: cannot use"),
        (upstream(auth="api-key"), "upstreams.up.auth: 'api-key' is for Azure"),
        (upstream(azure_api_version="2025-04-01-preview"), "azure_api_version: only for"),
        (upstream(kind="azure"), "upstreams.up.models: an Azure upstream needs its deployments"),
        (upstream(models={"gpt-realtime": ""}), "empty model or deployment name"),
    ],
)
def test_a_table_that_cannot_be_used_names_the_setting_not_the_key(
    config: cfg.ServeConfig, message: str
) -> None:
    env = ENV | {"OPENAI_KEY_A_AGAIN": KEY_A, "SPACEY": "sk-proj with space"}
    with pytest.raises(UpstreamTableError) as caught:
        build_upstream_table(config, environ=env)
    assert message in str(caught.value)
    assert KEY_A not in str(caught.value)


def test_the_checks_refuse_the_shorthand_beside_tables_and_name_every_bad_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_KEY_A", KEY_A)
    config = cfg.ServeConfig(
        client_keys=(Secret("client-key"),),
        upstream_api_key=Secret(KEY_B),
        upstreams={
            "good": cfg.UpstreamSettings(url="wss://a.example/v1", api_key_env=("OPENAI_KEY_A",)),
            "bad1": cfg.UpstreamSettings(url="", api_key_env=("OPENAI_KEY_A",)),
            "bad2": cfg.UpstreamSettings(url="wss://b.example/v1", api_key_env=("NOPE",)),
        },
    )
    problems = cfg.serve_config_problems(config)
    assert any(p.startswith("serve.upstream_api_key: set, but [upstreams.NAME]") for p in problems)
    assert any("upstreams.bad1.url" in p for p in problems)
    assert any("upstreams.bad2.api_key_env[0]" in p for p in problems)
    assert not any("upstreams.good" in p for p in problems)
    assert all(KEY_A not in p and KEY_B not in p for p in problems)


MODELS_POLICY = AdmissionPolicy(max_sessions=10, served_models=frozenset({"gpt-realtime"}))


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("model=gpt-realtime", None),
        ("model=whisper-1", ("model_not_found", "The model 'whisper-1' does not exist")),
        ("", ("missing_model", "Name the model")),
        ("model=%0d%0aX-Evil:%201", ("model_not_found", "The model '??X-Evil: 1'")),
    ],
)
def test_admission_refuses_a_model_no_upstream_serves_before_any_dial(
    query: str, expected: tuple[str, str] | None
) -> None:
    decision = admit(
        head(target=f"/v1/realtime?{query}" if query else "/v1/realtime"),
        checker=STATIC,
        policy=MODELS_POLICY,
        occupancy=Occupancy(),
    )
    if expected is None:
        assert not isinstance(decision, Refused)
        return
    assert isinstance(decision, Refused)
    assert (decision.status, decision.param, decision.code) == (400, "model", expected[0])
    assert decision.message.startswith(expected[1])


def test_live_sessions_count_keys_and_upstreams_and_drop_zeros() -> None:
    live = LiveSessions()
    a, b = KeyRef("openai", "aaaa"), KeyRef("openai", "bbbb")
    live.add(a)
    live.add(a)
    live.add(b)
    assert live.counts().by_key == {a: 2, b: 1}
    assert live.counts().by_upstream == {"openai": 3}
    for key in (a, a, b):
        live.remove(key)
    assert not live.by_key
    assert not live.by_upstream
