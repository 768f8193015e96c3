"""The credentials package's own pieces: the one digest comparison, the Secret type,
and key files re-read by a timer task instead of on every handshake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx
import msgspec
import pytest
import trio
import trio.testing

from relay import config as cfg
from relay import logs
from relay.credentials import digests, keyfiles
from relay.credentials.digests import digest, digest_hex, matches_any, parse_digest_hex
from relay.credentials.secret import REDACTED, Secret
from relay.credentials.watch import KEY_FILE_POLL_INTERVAL_S, KeyFilePoller
from relay.metrics import KEY_FILE_LABELS, RelayMetrics
from relay.upstreams.table import build_upstream_table
from tests.conftest import RunningSimulator, raw_handshake, start_relay

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
        cfg.SimulatorConfig: {"api_keys", "entra_tokens"},
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


def test_the_upstream_table_holds_the_key_as_a_secret() -> None:
    table = build_upstream_table(
        cfg.ServeConfig(upstream_url="wss://api.example/v1", upstream_api_key=Secret(VALUE))
    )
    (key,) = table.upstreams[0].keys
    assert type(key.credential().value) is Secret
    assert VALUE not in repr(table)


# ------------------------------------------------------------------ key files on a timer


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` the way ``relay keys`` and editors' safe-save do: a new file renamed."""
    temp = path.with_name(f".{path.name}.new")
    temp.write_bytes(data)
    os.replace(temp, path)


@dataclass
class Watched:
    """An app key file and a signing key file, their stores and a poller over both."""

    app_file: Path
    signing_file: Path
    app_key: str
    app_keys: keyfiles.AppKeyStore
    keyring: keyfiles.KeyringFile
    metrics: RelayMetrics
    poller: KeyFilePoller

    def failures(self, label: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relay_key_file_reload_failures_total", {"file": label}
        )
        assert value is not None
        return value


@pytest.fixture
def watched(tmp_path: Path) -> Watched:
    app_file, signing_file = tmp_path / "app-keys.json", tmp_path / "signing-keys.json"
    app_key = keyfiles.create_app_key(app_file, "voice-app")
    keyfiles.rotate_signing_key(signing_file, time.time())
    app_keys = keyfiles.AppKeyStore(str(app_file))
    keyring = keyfiles.KeyringFile(str(signing_file))
    metrics = RelayMetrics(live_sessions=lambda: 0, draining=lambda: 0, dropped_log_lines=lambda: 0)
    poller = KeyFilePoller(
        lambda: (app_keys, keyring), on_failure=metrics.count_key_file_reload_failure
    )
    return Watched(app_file, signing_file, app_key, app_keys, keyring, metrics, poller)


def reload_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "key_file_reload"]


def test_key_file_metric_labels_are_the_files_labels() -> None:
    assert (keyfiles.APP_KEYS_LABEL, keyfiles.SIGNING_KEYS_LABEL) == KEY_FILE_LABELS


def test_an_unchanged_file_is_not_read_again(
    watched: Watched, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_read(path: Path, *args: object) -> NoReturn:
        raise AssertionError(f"{path} read again")

    monkeypatch.setattr(keyfiles, "load_app_keys", no_read)
    monkeypatch.setattr(keyfiles, "load_keyring", no_read)
    for _ in range(3):
        watched.poller.poll()
    assert reload_lines(caplog) == []


def test_a_changed_app_key_file_is_in_effect_after_one_poll(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.credentials")
    late_key = keyfiles.create_app_key(watched.app_file, "late-app")
    assert watched.app_keys.check(late_key) is None  # nothing re-read on a check
    watched.poller.poll()
    found = watched.app_keys.check(late_key)
    assert found is not None
    assert found.name == "late-app"
    [line] = reload_lines(caplog)
    assert line.levelno == logging.INFO
    assert "app_keys" in line.getMessage()
    assert "2 app key(s)" in line.getMessage()
    assert late_key not in line.getMessage()


def _garbage(watched: Watched) -> None:
    replace_file(watched.app_file, b"{not json")


def _deleted(watched: Watched) -> None:
    watched.app_file.unlink()


def _bad_digest(watched: Watched) -> None:
    replace_file(watched.app_file, b'{"keys": [{"name": "x", "sha256": "abcd"}]}')


def _unreadable(watched: Watched) -> None:
    watched.app_file.chmod(0)


def _short_signing_secret(watched: Watched) -> None:
    short = base64.b64encode(b"k" * 16).decode()
    replace_file(
        watched.signing_file, f'{{"keys": [{{"kid": "k", "secret_b64": "{short}"}}]}}'.encode()
    )


def _no_active_signing_key(watched: Watched) -> None:
    replace_file(watched.signing_file, b'{"keys": []}')


@dataclass(frozen=True)
class Breakage:
    name: str
    label: str
    apply: Callable[[Watched], None]
    reason: str


BREAKAGES = [
    Breakage("garbage", "app_keys", _garbage, "malformed"),
    Breakage("deleted", "app_keys", _deleted, "no such file"),
    Breakage("bad-digest", "app_keys", _bad_digest, "sha256 is not a SHA-256 hex digest"),
    Breakage("short-signing-secret", "signing_keys", _short_signing_secret, "16 bytes"),
    Breakage("no-signing-key", "signing_keys", _no_active_signing_key, "no signing key"),
]
if os.geteuid() != 0:  # root reads a mode-0 file anyway
    BREAKAGES.append(Breakage("unreadable", "app_keys", _unreadable, "ermission denied"))


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda b: b.name)
def test_a_broken_key_file_keeps_the_old_keys_logs_once_counts_once_and_recovers(
    watched: Watched, caplog: pytest.LogCaptureFixture, breakage: Breakage
) -> None:
    caplog.set_level(logging.INFO, logger="relay.credentials")
    active = watched.keyring.current().active
    app_file_before, signing_file_before = (
        watched.app_file.read_bytes(),
        watched.signing_file.read_bytes(),
    )
    breakage.apply(watched)
    for _ in range(5):
        watched.poller.poll()
    # The previous keys still work.
    assert watched.app_keys.check(watched.app_key) is not None
    assert watched.keyring.current().active == active
    # One line naming the file and the reason, never a secret; counted once.
    [failed] = reload_lines(caplog)
    assert failed.levelno == logging.WARNING
    message = failed.getMessage()
    assert breakage.label in message
    assert breakage.reason in message
    assert watched.app_key not in message
    assert base64.b64encode(active.secret).decode() not in message
    assert watched.failures(breakage.label) == 1
    other = "signing_keys" if breakage.label == "app_keys" else "app_keys"
    assert watched.failures(other) == 0
    # Fixed: one line saying so, and nothing more on later polls.
    if watched.app_file.exists():
        watched.app_file.chmod(0o600)
    replace_file(watched.app_file, app_file_before)
    replace_file(watched.signing_file, signing_file_before)
    for _ in range(3):
        watched.poller.poll()
    lines = reload_lines(caplog)
    recovered = [line for line in lines[1:] if "after a failed reload" in line.getMessage()]
    assert len(recovered) == 1
    assert recovered[0].levelno == logging.INFO
    assert watched.failures(breakage.label) == 1
    assert watched.app_keys.check(watched.app_key) is not None


def test_a_new_reason_is_a_new_failure_and_the_same_reason_is_not(
    watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    _garbage(watched)
    watched.poller.poll()
    replace_file(watched.app_file, b"{still not json")  # changed, same reason
    watched.poller.poll()
    _deleted(watched)  # a different reason
    watched.poller.poll()
    watched.poller.poll()
    assert [("no such file" in r.getMessage()) for r in reload_lines(caplog)] == [False, True]
    assert watched.failures("app_keys") == 2


async def test_the_poller_reloads_within_its_interval(
    watched: Watched, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(watched.poller.run)
        changed_at = trio.current_time()
        late_key = keyfiles.create_app_key(watched.app_file, "late-app")
        await watched.poller.wait_polled()
        # In effect within one interval (virtual time: the clock jumps when all wait).
        assert trio.current_time() - changed_at <= KEY_FILE_POLL_INTERVAL_S
        assert watched.app_keys.check(late_key) is not None
        _garbage(watched)
        for _ in range(4):
            await watched.poller.wait_polled()
        assert watched.failures("app_keys") == 1
        assert watched.app_keys.check(late_key) is not None
        nursery.cancel_scope.cancel()
    assert watched.poller.polls == 5


async def test_no_key_file_syscall_per_handshake_or_mint(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.conftest import Keys
    from tests.test_relay_tokens import MODEL, auth, mint, token_for

    keys = Keys(tmp_path)
    key_files = {os.fspath(keys.app_file), os.fspath(keys.signing_file)}
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
        key_file_poll_interval_s=3600,  # no poll inside this test
    )
    touched: list[str] = []
    real_stat = os.stat
    real_open = io.open

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if isinstance(path, str | os.PathLike) and os.fspath(path) in key_files:
            touched.append(f"stat {path}")
        return real_stat(path, *args, **kwargs)

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(path, str | os.PathLike) and os.fspath(path) in key_files:
            touched.append(f"open {path}")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(io, "open", counting_open)
    for _ in range(5):
        token = await token_for(relay, keys)
        answer = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", auth(token))
        assert answer.status == 101
    assert (await mint(relay, "rk_not-a-key", {})).status_code == 401
    assert touched == []


async def test_a_running_relay_keeps_serving_a_broken_app_key_file_and_says_so_in_metrics(
    nursery: trio.Nursery, simulator: RunningSimulator, tmp_path: Path
) -> None:
    from tests.conftest import Keys
    from tests.test_relay_tokens import mint

    keys = Keys(tmp_path)
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        app_keys_file=str(keys.app_file),
        signing_keys_file=str(keys.signing_file),
    )
    replace_file(keys.app_file, b"{not json")
    for _ in range(3):
        await relay.server.key_files.wait_polled()
    assert (await mint(relay, keys.app_key, {})).status_code == 200
    async with httpx.AsyncClient() as http:
        scraped = (await http.get(f"http://127.0.0.1:{relay.port}/metrics")).text
    assert 'relay_key_file_reload_failures_total{file="app_keys"} 1.0' in scraped
    assert 'relay_key_file_reload_failures_total{file="signing_keys"} 0.0' in scraped
