"""Process entry points that assemble the pieces: relay, built-in simulator, demo.

This module owns what ``relay serve`` and ``relay demo`` start inside one
``trio.run``:

- :func:`run_relay`: the relay; when no upstream key is configured it starts the
  built-in simulator on a loopback port first and points the relay at it, and
  says so in the log (nothing leaves the machine);
- :func:`run_demo_stack`: the README's main job: simulator + relay in-process and
  the demo voice session through the relay (or straight to the simulator, or to
  a given URL), printing the event flow and round-trip figures.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
import trio

from relay.config import DEFAULT_SIMULATOR_API_KEY, DemoConfig, ServeConfig, SimulatorConfig
from relay.dataplane.upstream import UpstreamEndpoint
from relay.server import RelayServer
from relay.simulator.server import serve_simulator

LOGGER = logging.getLogger("relay.launch")


@dataclass(frozen=True, slots=True)
class RunningRelay:
    port: int
    server: RelayServer


async def _start_builtin_simulator(nursery: trio.Nursery) -> tuple[str, str]:
    """Start a loopback simulator; returns (upstream base URL, its key)."""
    key = f"sk-sim-{secrets.token_hex(16)}"
    sim_config = SimulatorConfig(host="127.0.0.1", port=0, api_keys=(key,))
    port: int = await nursery.start(serve_simulator, sim_config)
    return f"ws://127.0.0.1:{port}/v1", key


@asynccontextmanager
async def open_relay(config: ServeConfig) -> AsyncIterator[RunningRelay]:
    """Run a relay (and, without an upstream key, a built-in simulator) for a block."""
    async with trio.open_nursery() as nursery:
        if not config.upstream_api_key:
            url, key = await _start_builtin_simulator(nursery)
            LOGGER.warning(
                "no upstream API key configured: using the BUILT-IN SIMULATOR at %s "
                "(set RELAY_SERVE_UPSTREAM_API_KEY to relay to OpenAI)",
                url,
            )
            config = msgspec.structs.replace(config, upstream_url=url, upstream_api_key=key)
        endpoint = UpstreamEndpoint.from_config(
            config.upstream_url, config.upstream_api_key, config.upstream_ca_file
        )
        server = RelayServer(config, upstream=endpoint)
        port: int = await nursery.start(server.serve)
        try:
            yield RunningRelay(port=port, server=server)
        finally:
            nursery.cancel_scope.cancel()


async def run_relay(config: ServeConfig) -> None:
    """``relay serve``: run until interrupted."""
    async with open_relay(config):
        await trio.sleep_forever()


async def run_demo_stack(config: DemoConfig, direct: bool = False) -> bool:
    """``relay demo``: the demo voice session, through an in-process relay by default."""
    from relay.demo import run_demo

    if config.url:
        report = await run_demo(
            config.url,
            config.api_key,
            model=config.model,
            turns=config.turns,
            speech_ms=config.speech_ms,
            chunk_ms=config.chunk_ms,
        )
        return report.ok
    async with trio.open_nursery() as nursery:
        if direct:
            sim_port: int = await nursery.start(
                serve_simulator, SimulatorConfig(host="127.0.0.1", port=0)
            )
            url, key = f"ws://127.0.0.1:{sim_port}/v1", DEFAULT_SIMULATOR_API_KEY
            print(f"demo: simulator on 127.0.0.1:{sim_port}, no relay in between")
        else:
            client_key = f"demo-client-{secrets.token_hex(8)}"
            serve_config = ServeConfig(host="127.0.0.1", port=0, client_keys=(client_key,))
            running = await nursery.start(_serve_for_demo, serve_config)
            url, key = f"ws://127.0.0.1:{running}/v1", client_key
            print(
                f"demo: relay on 127.0.0.1:{running} in front of the built-in simulator "
                "(no API key needed)"
            )
        report = await run_demo(
            url,
            key,
            model=config.model,
            turns=config.turns,
            speech_ms=config.speech_ms,
            chunk_ms=config.chunk_ms,
        )
        nursery.cancel_scope.cancel()
    return report.ok


async def _serve_for_demo(
    config: ServeConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_relay(config) as running:
        task_status.started(running.port)
        await trio.sleep_forever()
