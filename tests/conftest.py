"""Shared fixtures: a simulator and a relay on 127.0.0.1, real sockets, ephemeral ports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio
import trio_websocket

from relay.config import ServeConfig, SimulatorConfig
from relay.net import hub
from relay.server import RelayServer
from relay.simulator.server import Simulator

SIM_KEY = "sk-sim-test-key-0123456789"
#: Seconds between key-file polls in test relays: tests wait for a poll, not for 2 s.
TEST_KEY_FILE_POLL_INTERVAL_S = 0.05
CLIENT_KEY = "client-key-test-abcdef"

T = TypeVar("T")


@dataclass
class RunningSimulator:
    port: int
    key: str
    sim: Simulator

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@dataclass
class RunningRelay:
    port: int
    key: str
    server: RelayServer

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


async def start_simulator(
    nursery: trio.Nursery, *, record_audio: bool = False, **overrides: Any
) -> RunningSimulator:
    """A simulator on a free port; ``record_audio``: ``sim.received_audio`` is kept."""
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "api_keys": (SIM_KEY,),
        "faults_enabled": True,
        "realtime_pacing": False,
        "response_audio_ms": 400,
        "delta_audio_ms": 100,
    }
    fields.update(overrides)
    sim = Simulator(SimulatorConfig(**fields), record_audio=record_audio)
    port: int = await nursery.start(sim.serve)
    return RunningSimulator(port=port, key=SIM_KEY, sim=sim)


async def start_relay(
    nursery: trio.Nursery,
    upstream_url: str,
    upstream_key: str = SIM_KEY,
    *,
    key_file_poll_interval_s: float = TEST_KEY_FILE_POLL_INTERVAL_S,
    **overrides: Any,
) -> RunningRelay:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "upstream_url": upstream_url,
        "upstream_api_key": upstream_key,
        "client_keys": (CLIENT_KEY,),
        "upstream_connect_timeout_s": 5.0,
        # The simulator's per-connection test hooks; a production relay never forwards them.
        "upstream_query_params": ("sim_mode", "sim_fault", "sim_start"),
    }
    fields.update(overrides)
    config = ServeConfig(**fields)
    server = RelayServer(config, key_file_poll_interval_s=key_file_poll_interval_s)
    port: int = await nursery.start(server.serve)
    return RunningRelay(port=port, key=CLIENT_KEY, server=server)


@pytest.fixture
async def simulator(nursery: trio.Nursery) -> RunningSimulator:
    return await start_simulator(nursery)


@pytest.fixture
async def relay(nursery: trio.Nursery, simulator: RunningSimulator) -> RunningRelay:
    return await start_relay(nursery, simulator.ws_base)


async def run_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio coroutine function (e.g. the openai SDK) in a worker thread."""

    def runner() -> T:
        return asyncio.run(fn())  # type: ignore[arg-type]

    return await trio.to_thread.run_sync(runner, abandon_on_cancel=True)


__all__ = ["CLIENT_KEY", "SIM_KEY", "RunningRelay", "RunningSimulator", "run_asyncio", "threading"]


@dataclass
class HandshakeAnswer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body or b"{}")


async def raw_handshake(
    port: int,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    subprotocols: list[str] | None = None,
) -> HandshakeAnswer:
    """Send an opening handshake on a plain socket and read the HTTP answer.

    Used for refusals: trio-websocket leaves its socket open when a handshake is
    refused, which ResourceWarning (an error in this suite) would report.
    """
    from relay.protocol import handshake

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            handshake.upgrade_request(
                host_header=f"127.0.0.1:{port}",
                target=target,
                key=handshake.new_websocket_key(),
                headers=headers or [],
                subprotocols=subprotocols or [],
            )
        )
        data = b""
        with trio.fail_after(10):
            while True:
                response = handshake.parse_response_head(data)
                if response is not None and (
                    response.status == 101
                    or len(response.trailing) >= (response.content_length or 0)
                ):
                    break
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    assert response is not None
    return HandshakeAnswer(
        status=response.status,
        headers={k.decode(): v.decode() for k, v in response.headers},
        body=response.trailing if response.status != 101 else b"",
    )


@asynccontextmanager
async def open_ws(url: str, **kwargs: Any) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """trio-websocket's client, with its TCP stream always closed on exit.

    trio-websocket 0.12 leaves the client socket open when the *server* closes
    first (reproduced with trio-websocket on both ends), which this suite's
    ResourceWarning-as-error policy would report against the relay.
    """
    kwargs.setdefault("max_message_size", 32 * 1024 * 1024)
    # trio-websocket stops reading (and so never sees our close reply) when its queue
    # is full; tests that leave events unread must not hang in its close handshake.
    kwargs.setdefault("message_queue_size", 256)
    async with trio_websocket.open_websocket_url(url, **kwargs) as ws:
        try:
            yield ws
        finally:
            with trio.CancelScope(shield=True):
                await ws._stream.aclose()


def close_reason(exc: trio_websocket.ConnectionClosed) -> trio_websocket.CloseReason:
    assert exc.reason is not None
    return exc.reason


async def read_until_closed(
    ws: trio_websocket.WebSocketConnection, timeout_s: float = 10
) -> tuple[list[dict[str, Any]], trio_websocket.CloseReason]:
    """Every event until the server closes, and the close it sent."""
    import json

    events: list[dict[str, Any]] = []
    with trio.fail_after(timeout_s):
        while True:
            try:
                events.append(json.loads(await ws.get_message()))
            except trio_websocket.ConnectionClosed as closed:
                return events, close_reason(closed)


async def open_raw_session(
    port: int, query: str, *, receive_buffer_bytes: int | None = None
) -> tuple[trio.SocketStream, Any]:
    """A hand-driven realtime client: the 101 read, and a frame reader for what follows.

    For tests that need byte control (fragments, one octet per write, a client that
    stops reading: pass a small ``receive_buffer_bytes``). Returns (stream, FrameReader).
    """
    import socket

    from relay.protocol import frames, handshake

    sock = trio.socket.socket()
    if receive_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        handshake.upgrade_request(
            host_header="127.0.0.1",
            target=f"/v1/realtime?{query}",
            key=handshake.new_websocket_key(),
            headers=[("Authorization", f"Bearer {CLIENT_KEY}")],
        )
    )
    data = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            assert chunk, "connection closed during the handshake"
            data += chunk
    assert data.startswith(b"HTTP/1.1 101"), data[:100]
    reader = frames.FrameReader(expect_masked=False, max_message_bytes=1 << 26)
    reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
    return stream, reader


class Keys:
    """An app-key file (a relay-mode and a passthrough key) and a signing-key file."""

    def __init__(self, tmp: Any) -> None:
        import time

        from relay.credentials import keyfiles

        self.app_file = tmp / "app-keys.json"
        self.signing_file = tmp / "signing-keys.json"
        self.app_key = keyfiles.create_app_key(self.app_file, "voice-app")
        self.passthrough_key = keyfiles.create_app_key(self.app_file, "webrtc-app", "passthrough")
        keyfiles.rotate_signing_key(self.signing_file, time.time())


@pytest.fixture
def keys(tmp_path: Any) -> Keys:
    return Keys(tmp_path)


@pytest.fixture(params=hub.DISPATCH_MODES)
def hub_dispatch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the read hub learns of readiness (``RELAY_READ_HUB``): the tests of a
    module using this run once per way, each Trio run starting its hub that way."""
    mode: str = request.param
    monkeypatch.setenv(hub.DISPATCH_ENV, mode)
    return mode
