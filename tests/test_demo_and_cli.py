"""The README's main job (demo through the relay) and the command line's config errors."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trio

from relay import config as cfg
from relay.credentials.secret import Secret
from relay.demo import run_demo
from tests.conftest import RunningRelay


@pytest.mark.parametrize("auth", ["header", "subprotocol"])
async def test_demo_session_through_relay(relay: RunningRelay, auth: str) -> None:
    lines: list[str] = []
    report = await run_demo(
        relay.ws_base,
        relay.key,
        turns=1,
        speech_ms=100,
        auth=auth,  # type: ignore[arg-type]
        out=lines.append,
    )
    assert report.ok, report.error
    assert report.turns_completed == 1
    assert report.first_audio_ms
    assert report.usage_total_tokens > 0
    assert any("response.done" in line for line in lines)


async def test_demo_reports_refusal_in_one_line(relay: RunningRelay) -> None:
    lines: list[str] = []
    report = await run_demo(relay.ws_base, "wrong-key", turns=1, out=lines.append)
    # trio-websocket 0.12 drops its socket without closing it when a handshake is
    # refused; collect it here, where we know whose it is.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert not report.ok
    assert report.error is not None
    assert report.error.startswith("handshake refused with HTTP 401")


def test_config_layers_and_one_line_errors(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text('[serve]\nport = 9001\nmax_sessions = 5\n[simulate]\nmode = "echo"\n')
    serve = cfg.load(
        cfg.ServeConfig,
        toml_path=toml,
        environ={"RELAY_SERVE_MAX_SESSIONS": "7"},
        overrides={"idle_timeout_s": 3.0, "host": None},
    )
    assert (serve.port, serve.max_sessions, serve.idle_timeout_s, serve.host) == (
        9001,
        7,
        3.0,
        "127.0.0.1",
    )
    assert cfg.load(cfg.SimulatorConfig, toml_path=toml, environ={}).mode == "echo"
    toml.write_text("[serve]\nport = 9001\nidle_timeout = 3\n")
    with pytest.raises(cfg.ConfigError, match=r"^serve\.idle_timeout: unknown setting$"):
        cfg.load(cfg.ServeConfig, toml_path=toml, environ={})
    with pytest.raises(cfg.ConfigError, match=r"^serve\.idle_timeout_s: Expected `float` > 0"):
        cfg.load(cfg.ServeConfig, environ={"RELAY_SERVE_IDLE_TIMEOUT_S": "-1"})
    secret = cfg.ServeConfig(
        upstream_api_key=Secret("sk-very-secret"), client_keys=(Secret("ck-1"),)
    )
    shown = cfg.redacted(secret)
    assert "sk-very-secret" not in str(shown)
    assert "ck-1" not in str(shown)


def _relay_with(command: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """``relay COMMAND`` with ``environment`` added, to its end (bounded)."""
    return subprocess.run(
        [sys.executable, "-m", "relay", command],
        env={**os.environ, **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_bad_value_exits_2_with_one_line() -> None:
    result = _relay_with("serve", RELAY_SERVE_MAX_SESSIONS="lots")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["relay: configuration error: serve.max_sessions: Expected `int`, got `str`"]


@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_an_unknown_read_hub_dispatch_exits_2_with_one_line(command: str) -> None:
    result = _relay_with(command, RELAY_READ_HUB="threaded")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "relay: configuration error: RELAY_READ_HUB must be one of inline, nested, not 'threaded'"
    ]


def test_relay_demo_runs_on_the_builtin_simulator_without_a_key() -> None:
    # The README's main command: no upstream key, no setup, the simulator by default.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--turns", "1"],
        env={**env, "RELAY_DEMO_SPEECH_MS": "100"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "in front of the built-in simulator" in result.stdout
    assert "demo OK: 1 turns completed" in result.stdout


def test_cli_serve_without_upstream_key_refuses_to_start() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        env={**env, "RELAY_SERVE_CLIENT_KEYS": "k1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("relay: configuration error: serve.upstream_api_key: not set")


_ = trio
