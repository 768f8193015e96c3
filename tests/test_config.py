"""Configuration: every setting through env and TOML, redaction by field, the
``[serve]`` checks (no event loop), and the real ``relay serve`` refusing operator
mistakes with one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trustme

from relay import config as cfg
from relay.credentials import keyfiles
from relay.credentials.digests import digest_hex
from relay.credentials.secret import Secret

# ------------------------------------------------------------------ files the settings name


@dataclass(frozen=True)
class Files:
    root: Path
    cert: Path
    key: Path
    both: Path
    other_key: Path
    ca: Path
    app_keys: Path
    signing_keys: Path
    garbage: Path
    directory: Path
    short_signing_keys: Path
    missing: Path = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "missing", self.root / "does-not-exist.json")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    root = tmp_path_factory.mktemp("config-files")
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    other = ca.issue_cert("other.example")
    made = Files(
        root=root,
        cert=root / "cert.pem",
        key=root / "key.pem",
        both=root / "both.pem",
        other_key=root / "other-key.pem",
        ca=root / "ca.pem",
        app_keys=root / "app-keys.json",
        signing_keys=root / "signing-keys.json",
        garbage=root / "garbage.json",
        directory=root / "a-directory",
        short_signing_keys=root / "short-signing-keys.json",
    )
    made.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(made.key))
    issued.private_key_and_cert_chain_pem.write_to_path(str(made.both))
    other.private_key_pem.write_to_path(str(made.other_key))
    ca.cert_pem.write_to_path(str(made.ca))
    keyfiles.create_app_key(made.app_keys, "voice-app")
    keyfiles.rotate_signing_key(made.signing_keys, time.time())
    made.garbage.write_text("this is not JSON {")
    made.directory.mkdir()
    made.short_signing_keys.write_text(
        json.dumps({"keys": [{"kid": "short-kid", "secret_b64": "c2hvcnQ="}]})
    )
    return made


# ------------------------------------------------------------------ plausible values


def plausible(files: Files) -> dict[type[cfg._Section], dict[str, tuple[str, Any]]]:
    """Every documented setting: (what the environment says, what it must load as).

    A new field without an entry here fails ``test_every_setting_has_a_plausible_value``.
    """
    return {
        cfg.ServeConfig: {
            "host": ("127.0.0.1", "127.0.0.1"),
            "port": ("8181", 8181),
            "tls_cert_file": (str(files.cert), str(files.cert)),
            "tls_key_file": (str(files.key), str(files.key)),
            "upstream_url": ("wss://upstream.example/v1", "wss://upstream.example/v1"),
            "upstream_api_key": ("sk-plausible-upstream-key", "sk-plausible-upstream-key"),
            "upstream_ca_file": (str(files.ca), str(files.ca)),
            "client_key_sha256": (digest_hex("client-one"), (digest_hex("client-one"),)),
            "client_keys": ("client-two, client-three", ("client-two", "client-three")),
            "no_auth": ("true", True),
            "app_keys_file": (str(files.app_keys), str(files.app_keys)),
            "signing_keys_file": (str(files.signing_keys), str(files.signing_keys)),
            "allowed_origins": (
                "https://app.example,http://localhost:3000",
                ("https://app.example", "http://localhost:3000"),
            ),
            "max_sessions_per_token": ("2", 2),
            "max_session_starts_per_token": ("5", 5),
            "replay_store_max_entries": ("5000", 5000),
            "max_message_bytes": ("1048576", 1048576),
            "handshake_timeout_s": ("5", 5.0),
            "upstream_connect_timeout_s": ("7.5", 7.5),
            "idle_timeout_s": ("120", 120.0),
            "max_session_s": ("1800", 1800.0),
            "max_sessions": ("200", 200),
            "ping_interval_s": ("15", 15.0),
            "pong_timeout_s": ("10", 10.0),
            "close_timeout_s": ("1", 1.0),
            "binary_audio_enabled": ("false", False),
            "binary_audio_max_message_bytes": ("32768", 32768),
            "drain_timeout_s": ("30", 30.0),
            "remask_plain_upstream": ("false", False),
            "log_level": ("warning", "warning"),
            "log_format": ("text", "text"),
            "trusted_proxies": ("127.0.0.1,::1", ("127.0.0.1", "::1")),
            "admin_key_sha256": (digest_hex("admin-key"), digest_hex("admin-key")),
            "upstream_query_params": ("api-version,deployment", ("api-version", "deployment")),
            "client_max_frames_per_s": ("500", 500),
            "client_frame_burst": ("2000", 2000),
            "client_max_bytes_per_s": ("4194304", 4194304),
            "client_byte_burst_bytes": ("33554432", 33554432),
            "browser_demo_enabled": ("true", True),
            "browser_demo_model": ("gpt-realtime-mini", "gpt-realtime-mini"),
            "upstream_attempt_timeout_s": ("3", 3.0),
            "upstream_cool_down_s": ("5", 5.0),
            "upstream_max_cool_down_s": ("120", 120.0),
            "upstream_max_attempts": ("3", 3),
            "rest_proxy_enabled": ("false", False),
            "rest_paths": ("/v1/responses,/v1/models", ("/v1/responses", "/v1/models")),
            "rest_max_json_body_bytes": ("1048576", 1048576),
            "rest_max_upload_bytes": ("26214400", 26214400),
            "rest_connect_timeout_s": ("5", 5.0),
            "rest_first_byte_timeout_s": ("120", 120.0),
            "rest_idle_timeout_s": ("30", 30.0),
            "rest_keep_alive_timeout_s": ("20", 20.0),
            "rest_pool_max_idle": ("8", 8),
            "rest_pool_idle_timeout_s": ("10", 10.0),
            "rest_azure_api_version": ("2025-04-01-preview", "2025-04-01-preview"),
        },
        cfg.SimulatorConfig: {
            "host": ("0.0.0.0", "0.0.0.0"),
            "port": ("9765", 9765),
            "api_keys": ("sk-sim-a,sk-sim-b", ("sk-sim-a", "sk-sim-b")),
            "mode": ("echo", "echo"),
            "realtime_pacing": ("false", False),
            "response_audio_ms": ("800", 800),
            "delta_audio_ms": ("50", 50),
            "max_message_bytes": ("1048576", 1048576),
            "faults_enabled": ("true", True),
            "tls_cert_file": (str(files.cert), str(files.cert)),
            "tls_key_file": (str(files.key), str(files.key)),
            "flavor": ("azure", "azure"),
            # The openai flavor's setting: empty, as an azure simulator requires.
            "models": ("", ()),
            "entra_tokens": ("entra-a,entra-b", ("entra-a", "entra-b")),
            "azure_deployments": ("dep-a,dep-b", ("dep-a", "dep-b")),
            "max_session_s": ("120.5", 120.5),
            "rest_chunk_interval_ms": ("0", 0),
            "rest_stream_chunks": ("5", 5),
            "rest_read_bytes_per_s": ("1000000", 1_000_000),
        },
        cfg.DemoConfig: {
            "url": ("ws://127.0.0.1:8080/v1", "ws://127.0.0.1:8080/v1"),
            "api_key": ("client-two", "client-two"),
            "model": ("gpt-realtime-mini", "gpt-realtime-mini"),
            "turns": ("3", 3),
            "speech_ms": ("400", 400),
            "chunk_ms": ("40", 40),
            "browser": ("true", True),
            "browser_port": ("8090", 8090),
        },
    }


SECTIONS: dict[str, type[cfg._Section]] = {
    "serve": cfg.ServeConfig,
    "simulate": cfg.SimulatorConfig,
    "demo": cfg.DemoConfig,
}


def env_for(section: str, values: dict[str, tuple[str, Any]]) -> dict[str, str]:
    return {f"RELAY_{section.upper()}_{name.upper()}": raw for name, (raw, _) in values.items()}


def toml_for(section: str, values: dict[str, Any]) -> str:
    def literal(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        if isinstance(value, str):
            return json.dumps(value)  # a TOML basic string for these values
        return repr(value)

    lines = [f"[{section}]", *(f"{name} = {literal(value)}" for name, value in values.items())]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("section", SECTIONS)
def test_every_setting_has_a_plausible_value(files: Files, section: str) -> None:
    section_type = SECTIONS[section]
    # Tables of tables (``[upstreams.NAME]``) have their own tests: no environment form.
    fields = set(section_type.__struct_fields__) - cfg.TOML_TABLE_FIELDS
    assert set(plausible(files)[section_type]) == fields
    assert cfg.SECRET_FIELDS[section_type] <= set(section_type.__struct_fields__)


@pytest.mark.parametrize("source", ["env", "toml"])
@pytest.mark.parametrize("section", SECTIONS)
def test_plausible_values_load_and_are_redacted_by_field(
    files: Files, tmp_path: Path, section: str, source: str
) -> None:
    section_type = SECTIONS[section]
    values = plausible(files)[section_type]
    loaded: cfg._Section
    if source == "env":
        loaded = cfg.load(section_type, environ=env_for(section, values))
    else:
        toml = tmp_path / "relay.toml"
        toml.write_text(toml_for(section, {name: typed for name, (_, typed) in values.items()}))
        loaded = cfg.load(section_type, toml_path=toml, environ={})
    for name, (_, typed) in values.items():
        assert getattr(loaded, name) == typed, name
    shown = cfg.redacted(loaded)
    text = json.dumps(shown)  # what the start-up log line carries
    for name, (_, typed) in values.items():
        items = typed if isinstance(typed, tuple) else (typed,)
        for item in items:
            if name in cfg.SECRET_FIELDS[section_type]:
                assert str(item) not in text, name
            else:
                assert shown[name] == msgspec.to_builtins(typed), name


def test_plausible_serve_settings_pass_the_checks(files: Files) -> None:
    values = plausible(files)[cfg.ServeConfig]
    serve = cfg.load(cfg.ServeConfig, environ=env_for("serve", values))
    assert cfg.serve_config_problems(serve) == []


def test_redaction_counts_secrets_and_keeps_limits_named_like_secrets() -> None:
    serve = cfg.ServeConfig(
        upstream_api_key=Secret("sk-very-secret"),
        client_keys=(Secret("ck-1"), Secret("ck-2")),
        max_sessions_per_token=2,
        max_session_starts_per_token=3,
        tls_key_file="/etc/relay/key.pem",
    )
    shown = cfg.redacted(serve)
    assert shown["upstream_api_key"] == "<redacted>"
    assert shown["client_keys"] == ["<redacted>", "<redacted>"]
    assert shown["admin_key_sha256"] == ""
    assert (shown["max_sessions_per_token"], shown["max_session_starts_per_token"]) == (2, 3)
    assert shown["tls_key_file"] == "/etc/relay/key.pem"  # a path, not a secret


# ------------------------------------------------------------------ [serve] checks, no loop


@dataclass(frozen=True)
class Case:
    """A configuration mistake and the setting its one line must name."""

    id: str
    settings: dict[str, Any]
    setting: str
    simulator: bool = True
    #: Text the message must contain besides the setting.
    says: str = ""


CASES: list[Case] = [
    Case("tls-cert-without-key", {"tls_cert_file": "{cert}"}, "tls_cert_file"),
    Case(
        "tls-key-without-cert",
        {"tls_key_file": "{key}"},
        "tls_key_file",
        says="plaintext",
    ),
    Case(
        "tls-key-mismatch",
        {"tls_cert_file": "{cert}", "tls_key_file": "{other_key}"},
        "tls_key_file",
    ),
    Case(
        "tls-cert-missing",
        {"tls_cert_file": "{missing}", "tls_key_file": "{key}"},
        "tls_cert_file",
    ),
    Case("bad-host", {"host": "not a host!"}, "host"),
    Case("bracketed-host", {"host": "[::1]"}, "host"),
    Case(
        "https-upstream",
        {"upstream_url": "https://api.openai.com/v1", "upstream_api_key": "sk-1"},
        "upstream_url",
        simulator=False,
    ),
    Case(
        "upstream-without-host",
        {"upstream_url": "wss:///v1", "upstream_api_key": "sk-1"},
        "upstream_url",
        simulator=False,
    ),
    Case("missing-ca-file", {"upstream_ca_file": "{missing}"}, "upstream_ca_file"),
    Case("garbage-ca-file", {"upstream_ca_file": "{garbage}"}, "upstream_ca_file"),
    Case(
        "non-hex-client-digest",
        {"client_key_sha256": ["zz" * 32]},
        "client_key_sha256[0]",
    ),
    Case("short-client-digest", {"client_key_sha256": ["abcd"]}, "client_key_sha256[0]"),
    Case("garbage-app-keys", {"app_keys_file": "{garbage}"}, "app_keys_file"),
    Case("directory-app-keys", {"app_keys_file": "{directory}"}, "app_keys_file"),
    Case(
        "missing-app-keys",
        {"app_keys_file": "{missing}"},
        "app_keys_file",
        says="relay keys create",
    ),
    Case("garbage-signing-keys", {"signing_keys_file": "{garbage}"}, "signing_keys_file"),
    Case(
        "directory-signing-keys",
        {"signing_keys_file": "{directory}"},
        "signing_keys_file",
    ),
    Case(
        "short-signing-secret",
        {"signing_keys_file": "{short_signing_keys}"},
        "signing_keys_file",
        says="'short-kid'",
    ),
    Case("admin-digest-not-hex", {"admin_key_sha256": "my-admin-key"}, "admin_key_sha256"),
    Case(
        "byte-burst-below-message",
        {"client_byte_burst_bytes": 1024, "max_message_bytes": 4096},
        "client_byte_burst_bytes",
    ),
    Case("proxy-name", {"trusted_proxies": ["nginx"]}, "trusted_proxies[0]"),
    Case("proxy-network", {"trusted_proxies": ["10.0.0.0/8"]}, "trusted_proxies[0]"),
    Case(
        "origin-star",
        {"allowed_origins": ["*"]},
        "allowed_origins[0]",
        says="leave allowed_origins empty",
    ),
    Case(
        "origin-with-path",
        {"allowed_origins": ["https://app.example/"]},
        "allowed_origins[0]",
    ),
    Case("non-ascii-client-key", {"client_keys": ["clé-secrète"]}, "client_keys[0]"),
    Case(
        "no-upstream-key",
        {
            "client_keys": ["k1"],
            "app_keys_file": "{app_keys}",
            "admin_key_sha256": digest_hex("admin"),
        },
        "upstream_api_key",
        simulator=False,
        says="--simulator",
    ),
    Case(
        "simulator-and-upstream-key",
        {"upstream_api_key": "sk-real-key"},
        "upstream_api_key",
        says="simulator",
    ),
    Case(
        "upstream-key-with-newline",
        {"upstream_url": "wss://api.openai.com/v1", "upstream_api_key": "sk-real-key\n"},
        "upstream_api_key",
        simulator=False,
    ),
]


def resolve(case: Case, files: Files) -> dict[str, Any]:
    """The case's settings with ``{cert}``-style placeholders replaced by the fixture's files."""
    names = {name: str(getattr(files, name)) for name in Files.__dataclass_fields__}

    def one(value: Any) -> Any:
        if isinstance(value, str):
            return value.format(**names)
        if isinstance(value, list):
            return tuple(one(v) for v in value)
        return value

    return {key: one(value) for key, value in case.settings.items()}


def _serve(files: Files, case: Case) -> cfg.ServeConfig:
    settings = resolve(case, files)
    if case.simulator:
        settings["upstream_url"] = cfg.SIMULATOR_UPSTREAM
    return cfg.load(cfg.ServeConfig, environ={}, overrides=settings)


def _secrets(case: Case) -> list[str]:
    values = [case.settings.get("upstream_api_key", ""), *case.settings.get("client_keys", ())]
    return [value.strip() for value in values if value]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_mistake_is_one_problem_naming_its_setting(files: Files, case: Case) -> None:
    problems = cfg.serve_config_problems(_serve(files, case))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"serve.{case.setting}: "), problems
    assert case.says in problems[0]
    for secret in _secrets(case):
        assert secret not in problems[0]


def test_the_simulator_is_never_a_silent_fallback() -> None:
    assert not cfg.uses_builtin_simulator(cfg.ServeConfig())
    assert cfg.serve_config_problems(cfg.ServeConfig(upstream_url="simulator")) == []
    assert cfg.serve_config_problems(cfg.ServeConfig(upstream_api_key=Secret("sk-1"))) == []
    with pytest.raises(cfg.ConfigError, match=r"^serve\.upstream_api_key: not set"):
        cfg.check_serve_config(cfg.ServeConfig(client_keys=(Secret("k1"),)))


def test_several_problems_are_one_line() -> None:
    with pytest.raises(cfg.ConfigError) as caught:
        cfg.check_serve_config(
            cfg.ServeConfig(upstream_url="simulator", host="bad host", trusted_proxies=("x",))
        )
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("serve.host: ")
    assert "; serve.trusted_proxies[0]: " in message


def test_keys_create_still_makes_a_new_app_key_file(tmp_path: Path) -> None:
    path = tmp_path / "new" / "app-keys.json"
    with pytest.raises(keyfiles.KeyFileError, match="no such file"):
        keyfiles.load_app_keys(path)
    assert keyfiles.AppKeyStore("").path is None  # unset stays "no app keys"
    with pytest.raises(keyfiles.KeyFileError, match="no such file"):
        keyfiles.AppKeyStore(str(path))
    keyfiles.create_app_key(path, "first")
    assert [key.name for key in keyfiles.load_app_keys(path).keys] == ["first"]


# ------------------------------------------------------------------ the real command line


def relay_cli(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], setting: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert "ExceptionGroup" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, result.stderr
    assert lines[0].startswith("relay: "), lines
    assert f"serve.{setting}" in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_relay_serve_refuses_each_mistake_with_one_line(
    files: Files, tmp_path: Path, case: Case
) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(toml_for("serve", resolve(case, files)))
    args = ["serve", "--config", str(toml), *(["--simulator"] if case.simulator else [])]
    line = assert_one_line(relay_cli(args), case.setting)
    assert line.startswith("relay: configuration error: ")
    for secret in _secrets(case):
        assert secret not in line


def test_relay_serve_refuses_the_same_mistakes_from_the_environment(files: Files) -> None:
    env = {
        "RELAY_SERVE_UPSTREAM_URL": "wss://api.openai.com/v1",
        "RELAY_SERVE_CLIENT_KEYS": "k1",
        "RELAY_SERVE_APP_KEYS_FILE": str(files.app_keys),
    }
    assert_one_line(relay_cli(["serve"], env), "upstream_api_key")
    env = {"RELAY_SERVE_UPSTREAM_API_KEY": "sk-real", "RELAY_SERVE_UPSTREAM_URL": "simulator"}
    assert_one_line(relay_cli(["serve"], env), "upstream_api_key")
    assert_one_line(
        relay_cli(["serve", "--simulator"], {"RELAY_SERVE_UPSTREAM_API_KEY": "sk-x"}),
        "upstream_api_key",
    )
    env = {"RELAY_SERVE_ALLOWED_ORIGINS": "*"}
    assert_one_line(relay_cli(["serve", "--simulator"], env), "allowed_origins[0]")


def test_relay_keys_create_and_rotate_signing_make_new_files(tmp_path: Path) -> None:
    app_file, signing_file = tmp_path / "app-keys.json", tmp_path / "signing.json"
    created = relay_cli(["keys", "create", "first", "--file", str(app_file)])
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith(keyfiles.APP_KEY_PREFIX)
    rotated = relay_cli(["keys", "rotate-signing", "--file", str(signing_file)])
    assert rotated.returncode == 0, rotated.stderr
    listed = relay_cli(["keys", "list", "--file", str(tmp_path / "missing.json")])
    assert listed.returncode == 1
    assert "no such file" in listed.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield int(held.getsockname()[1])


def test_relay_serve_port_in_use_is_one_line(busy_port: int) -> None:
    result = relay_cli(["serve", "--simulator", "--port", str(busy_port)])
    line = assert_one_line(result, "port")
    assert f"127.0.0.1:{busy_port}" in line
    assert "in use" in line


@pytest.mark.parametrize("host", ["192.0.2.1", "nonexistent.invalid"])
def test_relay_serve_host_it_cannot_listen_on_is_one_line(host: str) -> None:
    assert_one_line(relay_cli(["serve", "--simulator", "--host", host]), "host")


async def test_a_bind_failure_after_the_checks_is_a_startup_error(busy_port: int) -> None:
    from relay.launch import StartupError, open_relay

    config = cfg.ServeConfig(upstream_url="simulator", port=busy_port, client_keys=(Secret("k1"),))
    with pytest.raises(
        StartupError, match=rf"^serve\.port: cannot listen on 127\.0\.0\.1:{busy_port}"
    ):
        async with open_relay(config):
            pytest.fail("the relay started on a port in use")


# ------------------------------------------------------------------ plausible settings start


@pytest.mark.parametrize("source", ["env", "toml"])
def test_relay_serve_starts_with_every_plausible_setting(
    files: Files, tmp_path: Path, source: str
) -> None:
    values = plausible(files)[cfg.ServeConfig]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    # Port 0: any free port; --log-level info so the start-up line with the config shows.
    args = [sys.executable, "-m", "relay", "serve", "--port", "0", "--log-level", "info"]
    if source == "env":
        env = {**clean, **env_for("serve", values)}
    else:
        toml = tmp_path / "relay.toml"
        toml.write_text(toml_for("serve", {name: typed for name, (_, typed) in values.items()}))
        env, args = clean, [*args, "--config", str(toml)]
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(address))
        systemd.settimeout(30)
        process = subprocess.Popen(
            args,
            env={**env, "NOTIFY_SOCKET": str(address)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            # READY=1 is sent once the relay listens: start-up went all the way.
            assert "READY=1" in systemd.recv(4096).decode()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.stderr is not None
    log = process.stderr.read().decode()
    process.stderr.close()
    assert "Traceback" not in log
    assert '"max_sessions_per_token":2' in log
    assert '"max_session_starts_per_token":5' in log
    for secret in ("sk-plausible-upstream-key", "client-two", "client-three"):
        assert secret not in log


# ------------------------------------------------------------------ SIGHUP and the simulator


async def test_reload_keeps_the_builtin_simulator_and_checks_the_new_config() -> None:
    from relay.launch import _reload, open_relay

    started = cfg.ServeConfig(upstream_url="simulator", port=0, client_keys=(Secret("old"),))
    async with open_relay(started) as running:
        assert running.simulator is not None
        server = running.server
        assert server.config.upstream_url == running.simulator.url
        _reload(
            server,
            lambda: msgspec.structs.replace(started, client_keys=("new",)),
            running.simulator,
        )
        assert server.config.client_keys == ("new",)
        assert server.config.upstream_url == running.simulator.url
        # The checks run on a reload too: a broken one keeps the running config.
        bad = msgspec.structs.replace(started, admin_key_sha256="not-a-digest")
        _reload(server, lambda: bad, running.simulator)
        assert server.config.admin_key_sha256 == ""
        with_key = msgspec.structs.replace(started, upstream_api_key="sk-real")
        _reload(server, lambda: with_key, running.simulator)
        assert server.config.upstream_api_key == running.simulator.api_key


async def test_reload_to_the_simulator_needs_a_restart(nursery: trio.Nursery) -> None:
    from relay.launch import _reload, open_relay
    from tests.conftest import start_simulator

    upstream = await start_simulator(nursery)
    started = cfg.ServeConfig(
        upstream_url=upstream.ws_base,
        upstream_api_key=Secret(upstream.key),
        port=0,
        client_keys=(Secret("k"),),
    )
    async with open_relay(started) as running:
        assert running.simulator is None
        _reload(running.server, lambda: cfg.ServeConfig(upstream_url="simulator"), None)
        assert running.server.config.upstream_url == upstream.ws_base
