"""Shared fixtures: a simulator and a relay on 127.0.0.1, real sockets, ephemeral ports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import trio

from relay.config import ServeConfig, SimulatorConfig
from relay.dataplane.upstream import UpstreamEndpoint
from relay.server import RelayServer
from relay.simulator.server import Simulator

SIM_KEY = "sk-sim-test-key-0123456789"
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


async def start_simulator(nursery: trio.Nursery, **overrides: Any) -> RunningSimulator:
    fields: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "api_keys": (SIM_KEY,), "faults_enabled": True,
        "realtime_pacing": False, "response_audio_ms": 400, "delta_audio_ms": 100,
    }
    fields.update(overrides)
    sim = Simulator(SimulatorConfig(**fields))
    port: int = await nursery.start(sim.serve)
    return RunningSimulator(port=port, key=SIM_KEY, sim=sim)


async def start_relay(
    nursery: trio.Nursery, upstream_url: str, upstream_key: str = SIM_KEY, **overrides: Any
) -> RunningRelay:
    fields: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "upstream_url": upstream_url,
        "upstream_api_key": upstream_key, "client_keys": (CLIENT_KEY,),
        "upstream_connect_timeout_s": 5.0,
    }
    fields.update(overrides)
    config = ServeConfig(**fields)
    endpoint = UpstreamEndpoint.from_config(
        config.upstream_url, config.upstream_api_key, config.upstream_ca_file
    )
    server = RelayServer(config, upstream=endpoint)
    port: int = await nursery.start(server.serve)
    return RunningRelay(port=port, key=CLIENT_KEY, server=server)


@pytest.fixture
async def simulator(nursery: trio.Nursery) -> AsyncIterator[RunningSimulator]:
    yield await start_simulator(nursery)


@pytest.fixture
async def relay(nursery: trio.Nursery, simulator: RunningSimulator) -> AsyncIterator[RunningRelay]:
    yield await start_relay(nursery, simulator.ws_base)


async def run_asyncio(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio coroutine function (e.g. the openai SDK) in a worker thread."""

    def runner() -> T:
        return asyncio.run(fn())  # type: ignore[arg-type]

    return await trio.to_thread.run_sync(runner, abandon_on_cancel=True)


__all__ = ["CLIENT_KEY", "SIM_KEY", "RunningRelay", "RunningSimulator", "run_asyncio", "threading"]
