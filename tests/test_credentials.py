"""The credentials package's own pieces: the one digest comparison, the Secret type,
and key files re-read by a timer task instead of on every handshake."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from relay import config as cfg
from relay import logs
from relay.credentials import digests
from relay.credentials.digests import digest, digest_hex, matches_any, parse_digest_hex
from relay.credentials.secret import REDACTED, Secret
from relay.dataplane.upstream import UpstreamEndpoint

# ------------------------------------------------------------------ digests

ALPHA, BRAVO, CHARLIE = "key-alpha", "key-bravo", "key-charlie"


@dataclass(frozen=True)
class MatchCase:
    name: str
    candidate: str
    known: tuple[str, ...]
    index: int | None


MATCH_CASES = [
    MatchCase("only-key", ALPHA, (ALPHA,), 0),
    MatchCase("last-of-three", CHARLIE, (ALPHA, BRAVO, CHARLIE), 2),
    MatchCase("middle", BRAVO, (ALPHA, BRAVO, CHARLIE), 1),
    MatchCase("no-match", "key-delta", (ALPHA, BRAVO, CHARLIE), None),
    MatchCase("none-known", ALPHA, (), None),
    MatchCase("prefix-is-not-a-match", "key-alph", (ALPHA,), None),
    MatchCase("case-matters", ALPHA.upper(), (ALPHA,), None),
    MatchCase("empty-candidate", "", (ALPHA,), None),
    MatchCase("duplicate-gives-the-first", BRAVO, (ALPHA, BRAVO, BRAVO), 1),
    MatchCase("lone-surrogate-is-hashed-not-an-error", "k\udc80", ("k\udc80",), 0),
]


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda case: case.name)
def test_matches_any(case: MatchCase) -> None:
    assert matches_any(case.candidate, [digest(k) for k in case.known]) == case.index


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda case: case.name)
def test_matches_any_compares_every_digest_whatever_the_outcome(
    case: MatchCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(digests, "compare_digest", counting)
    known = [digest(k) for k in case.known]
    matches_any(case.candidate, known)
    # Each digest once, in order: no early exit after a match, none skipped before one.
    assert compared == known


def test_digest_is_sha256_of_utf8() -> None:
    assert digest("clé") == hashlib.sha256("clé".encode()).digest()
    assert digest_hex("clé") == hashlib.sha256("clé".encode()).hexdigest()
    assert parse_digest_hex(f"  {digest_hex('x').upper()}\n") == digest("x")


@pytest.mark.parametrize("text", ["", "abcd", "zz" * 32, "ab" * 33, "ab " * 32])
def test_parse_digest_hex_refuses_what_is_not_a_digest_without_quoting_it(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_digest_hex(text)
    assert str(caught.value) == "not a SHA-256 hex digest (64 hex characters)"


# ------------------------------------------------------------------ Secret

VALUE = "sk-the-real-value-0123456789"


def displays(secret: Secret) -> list[str]:
    """Every way code commonly turns a value into text."""
    return [
        str(secret),
        repr(secret),
        f"{secret}",
        f"{secret!s}",
        f"{secret!r}",
        f"{secret:>40}",
        "{}".format(secret),  # noqa: UP032 (str.format, not an f-string)
        "%s %r" % (secret, secret),  # noqa: UP031 (what logging does)
        str([secret]),
        str((secret,)),
        str({"key": secret}),
    ]


def test_secret_never_displays_its_value() -> None:
    secret = Secret(VALUE)
    for text in displays(secret):
        assert VALUE not in text
        assert REDACTED in text
    # ...yet it is the value wherever it is used rather than shown.
    assert secret == VALUE
    assert secret.encode() == VALUE.encode()
    assert digest(secret) == digest(VALUE)
    assert secret.reveal() == VALUE
    assert type(secret.reveal()) is str
    assert Secret(secret) is secret  # re-wrapping never goes through str()
    assert not Secret()
    assert Secret() == ""


def test_secret_never_reaches_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    secret = Secret("opaque-value-without-a-known-prefix")
    logger = logging.getLogger("relay.test")
    with caplog.at_level(logging.INFO, logger="relay.test"):
        logger.info("key %s, %r", secret, secret, extra={"fields": {"key": secret}})
    record = caplog.records[-1]
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(record)
        assert secret.reveal() not in line
        assert REDACTED in line
    assert json.loads(logs.JsonFormatter().format(record))["key"] == REDACTED


def test_config_secrets_are_secrets_however_the_config_is_built(tmp_path: Path) -> None:
    plain: dict[str, Any] = {"upstream_api_key": VALUE, "client_keys": ("ck-one",)}
    toml = tmp_path / "relay.toml"
    toml.write_text(f'[serve]\nupstream_api_key = "{VALUE}"\nclient_keys = ["ck-one"]\n')
    built = [
        cfg.load(cfg.ServeConfig, toml_path=toml, environ={}),
        cfg.load(
            cfg.ServeConfig,
            environ={"RELAY_SERVE_UPSTREAM_API_KEY": VALUE, "RELAY_SERVE_CLIENT_KEYS": "ck-one"},
        ),
        # Built directly with plain strings (tests, `relay demo`): wrapped all the same.
        cfg.ServeConfig(**plain),
        msgspec.structs.replace(cfg.ServeConfig(), upstream_api_key=VALUE, client_keys=("ck-one",)),
    ]
    for config in built:
        assert type(config.upstream_api_key) is Secret
        assert all(type(key) is Secret for key in config.client_keys)
        assert config.upstream_api_key.reveal() == VALUE
        for text in (repr(config), str(config), json.dumps(cfg.redacted(config))):
            assert VALUE not in text
            assert "ck-one" not in text
        assert cfg.redacted(config)["client_keys"] == [REDACTED]
        assert cfg.redacted(config)["admin_key_sha256"] == ""  # unset: shown as unset


def test_secret_fields_are_chosen_by_type() -> None:
    assert {
        cfg.SimulatorConfig: {"api_keys"},
        cfg.ServeConfig: {
            "upstream_api_key",
            "client_keys",
            "client_key_sha256",
            "admin_key_sha256",
        },
        cfg.DemoConfig: {"api_key"},
    } == cfg.SECRET_FIELDS


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # The same one-line messages as a plain `str` field gives.
        ("upstream_api_key = 5", "serve.upstream_api_key: Expected `str`, got `int`"),
        ("upstream_api_key = true", "serve.upstream_api_key: Expected `str`, got `bool`"),
        ("admin_key_sha256 = [1]", "serve.admin_key_sha256: Expected `str`, got `array`"),
        ('client_keys = "k"', "serve.client_keys: Expected `array`, got `str`"),
        ('client_keys = ["k", 2]', "serve.client_keys: Expected `str`, got `int`"),
        ("client_key_sha256 = [{a = 1}]", "serve.client_key_sha256: Expected `str`, got `object`"),
        (
            "upstream_api_key = 2020-01-01T00:00:00Z",
            "serve.upstream_api_key: Expected `str`, got `datetime`",
        ),
    ],
)
def test_a_secret_field_of_the_wrong_type_is_the_usual_one_line(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"[serve]\n{toml}\n")
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.load(cfg.ServeConfig, toml_path=path, environ={})
    assert str(caught.value) == message


def test_the_upstream_endpoint_holds_the_key_as_a_secret() -> None:
    endpoint = UpstreamEndpoint.from_config("wss://api.example/v1", VALUE)
    assert type(endpoint.api_key) is Secret
    assert VALUE not in repr(endpoint)
