"""bench/rest.py's LiteLLM path and stream check, without LiteLLM: its config, a failed
install reported with pip's reason, and the check that an answer streams, against the C
upstream (streamed, refused) and a server that sends the whole answer at once.

No package is downloaded here: the install that fails, fails on its requirements file.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SIM_KEY

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from harness import (  # type: ignore[import-not-found,unused-ignore]
    build_light_sse,
    free_port,
    wait_for_port,
)
from litellm_proxy import (  # type: ignore[import-not-found,unused-ignore]
    ENV,
    MASTER_KEY,
    LiteLLMUnavailable,
    config_yaml,
    ensure_installed,
    proxy_env,
)
from rest import (  # type: ignore[import-not-found,unused-ignore]
    StreamCheckFailed,
    check_stream,
)

CHUNKS = 3
INTERVAL_MS = 20


@pytest.fixture
def sse_port() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            str(build_light_sse()),
            *("--port", str(port), "--api-key", SIM_KEY),
            *("--chunk-interval-ms", str(INTERVAL_MS), "--stream-chunks", str(CHUNKS)),
        ]
    )
    try:
        wait_for_port(port, process)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_config_routes_the_model_to_the_upstream_with_a_master_key() -> None:
    text = config_yaml(upstream_port=4321, model="gpt-4o-mini", upstream_key="k")
    assert text.splitlines() == [
        "model_list:",
        '  - model_name: "gpt-4o-mini"',
        "    litellm_params:",
        '      model: "openai/gpt-4o-mini"',
        '      api_base: "http://127.0.0.1:4321/v1"',
        '      api_key: "k"',
        "general_settings:",
        f'  master_key: "{MASTER_KEY}"',
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
        "litellm_settings:",
        "  set_verbose: false",
    ]
    assert MASTER_KEY.startswith("sk-")  # LiteLLM's rule for master keys


def test_config_quotes_what_it_is_given() -> None:
    text = config_yaml(upstream_port=1, model='a"b', upstream_key="c\\d")
    assert '  - model_name: "a\\"b"' in text.splitlines()
    assert '      api_key: "c\\\\d"' in text.splitlines()


def test_proxy_env_drops_pythonpath_and_sets_error_logging() -> None:
    env = proxy_env({"PATH": "/bin", "PYTHONPATH": "/work/relay"})
    assert "PYTHONPATH" not in env
    assert env["PATH"] == "/bin"
    assert env["LITELLM_LOG"] == ENV["LITELLM_LOG"] == "ERROR"


def test_missing_requirements_are_unavailable(tmp_path: Path) -> None:
    with pytest.raises(LiteLLMUnavailable, match="missing"):
        ensure_installed(venv=tmp_path / "venv", requirements=tmp_path / "none.txt")


def test_a_failed_install_says_why(tmp_path: Path) -> None:
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("litellm[proxy] === = not a requirement\n")
    log = tmp_path / "log.txt"
    with log.open("w") as stream, pytest.raises(LiteLLMUnavailable) as raised:
        ensure_installed(venv=tmp_path / "venv", requirements=requirements, log=stream)
    assert "pip install -r" in str(raised.value)
    assert "exited" in str(raised.value)
    assert not (tmp_path / "venv" / "bench-requirements.sha256").exists()
    assert "installing LiteLLM" in log.read_text()


def test_check_stream_accepts_the_streamed_answer(sse_port: int) -> None:
    check = check_stream(sse_port, SIM_KEY, stream_chunks=CHUNKS, chunk_interval_ms=INTERVAL_MS)
    # role, the deltas, finish, usage, [DONE]
    assert check.events == CHUNKS + 4
    assert check.reads_with_events >= CHUNKS + 1
    assert check.usage is not None
    assert check.usage["completion_tokens"] == CHUNKS


def test_check_stream_refuses_an_error(sse_port: int) -> None:
    with pytest.raises(StreamCheckFailed, match="not a chunked 200"):
        check_stream(sse_port, "wrong-key", stream_chunks=CHUNKS, chunk_interval_ms=INTERVAL_MS)


def _event(data: str) -> bytes:
    payload = f"data: {data}\n\n".encode()
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"


@pytest.fixture
def buffering_port() -> Iterator[int]:
    """A server answering every request with the whole stream in one send."""
    listener = socket.create_server(("127.0.0.1", 0))
    chunk = '{"choices":[{"index":0,"delta":{"content":"x"}}]}'
    usage = '{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3,"total_tokens":4}}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(_event(chunk) for _ in range(CHUNKS + 2))
        + _event(usage)
        + _event("[DONE]")
        + b"0\r\n\r\n"
    )

    def serve() -> None:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.recv(65536)
            connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
        thread.join(timeout=5)


def test_check_stream_refuses_an_answer_sent_at_once(buffering_port: int) -> None:
    with pytest.raises(StreamCheckFailed, match="held back"):
        check_stream(buffering_port, "any", stream_chunks=CHUNKS, chunk_interval_ms=INTERVAL_MS)
