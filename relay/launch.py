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
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
import trio

from relay.appkeys import KeyFileError
from relay.config import (
    DEFAULT_SIMULATOR_API_KEY,
    ConfigError,
    DemoConfig,
    ServeConfig,
    SimulatorConfig,
)
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


def notify_systemd(message: str) -> None:
    """Send an sd_notify message (``READY=1``, ``STOPPING=1``) if systemd asked for them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        LOGGER.warning("could not notify systemd: %s", exc.strerror or exc)


async def run_relay(config: ServeConfig, reload: Callable[[], ServeConfig] | None = None) -> None:
    """``relay serve``: run until SIGTERM/SIGINT, then drain; SIGHUP reloads ``reload()``.

    First SIGTERM (or SIGINT): readiness answers 503 and new sessions are refused at
    once; live sessions continue for up to ``drain_timeout_s``, then get an ``error``
    event and 1001; the process exits 0 once every session is closed. A second signal
    skips the rest of the wait (close frames are still sent).
    """
    async with open_relay(config) as running:
        server = running.server
        stop = trio.Event()
        hurry = trio.Event()

        async def handle_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
                async for signum in rx:
                    if signum == signal.SIGHUP:
                        _reload(server, reload)
                    elif stop.is_set():
                        LOGGER.info("second stop signal: ending sessions now")
                        hurry.set()
                    else:
                        stop.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(handle_signals)
            notify_systemd("READY=1\nSTATUS=listening")
            await stop.wait()
            notify_systemd("STOPPING=1\nSTATUS=draining")
            LOGGER.info(
                "draining: %d live session(s), up to %.0f s",
                server.live_sessions,
                server.config.drain_timeout_s,
            )
            await server.drain(server.config.drain_timeout_s, hurry=hurry)
            LOGGER.info("drained; exiting")
            nursery.cancel_scope.cancel()


def _reload(server: RelayServer, reload: Callable[[], ServeConfig] | None) -> None:
    if reload is None:
        LOGGER.warning("SIGHUP: this relay was not started from a reloadable configuration")
        return
    try:
        config = reload()
        if not config.upstream_api_key:  # still the built-in simulator
            config = msgspec.structs.replace(
                config,
                upstream_url=server.config.upstream_url,
                upstream_api_key=server.config.upstream_api_key,
            )
        endpoint = UpstreamEndpoint.from_config(
            config.upstream_url, config.upstream_api_key, config.upstream_ca_file
        )
        needs_restart = server.apply_config(config, endpoint)
    except (ConfigError, KeyFileError, ValueError, OSError) as exc:
        LOGGER.error("SIGHUP: new configuration refused, keeping the old one: %s", exc)
        return
    LOGGER.info(
        "SIGHUP: configuration reloaded; new sessions use it, live sessions keep theirs%s",
        f" (restart needed for: {', '.join(needs_restart)})" if needs_restart else "",
    )


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
