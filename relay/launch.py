"""Process entry points that assemble the pieces: relay, built-in simulator, demo.

This module owns what ``relay serve`` and ``relay demo`` start inside one
``trio.run``:

- :func:`run_relay`: the relay; with ``upstream_url = "simulator"`` (``relay
  serve --simulator``) it starts the built-in simulator on a loopback port first
  and points the relay at it, and says so loudly in the log (nothing leaves the
  machine). Without that explicit choice an upstream key is required
  (:func:`relay.config.serve_config_problems`); the simulator is never a silent
  fallback;
- :func:`run_demo_stack`: the README's main job: simulator + relay in-process and
  the demo voice session through the relay (or straight to the simulator, or to
  a given URL), printing the event flow and round-trip figures;
- :func:`run_browser_demo` (``relay demo --browser``): a relay with the browser
  voice page on (:func:`open_browser_demo`), in front of the built-in simulator on
  127.0.0.1, with the page's own origins as the relay's Origin allowlist; it
  prints the page's URL and runs until Ctrl-C.

Operator mistakes that only show when the relay starts (the port is taken, the
host is not an address here, a key file broke after the configuration check)
leave :func:`open_relay` as one :class:`StartupError` whose message names the
setting, never as an exception group; :func:`listen_problem` finds the listening
ones before anything is logged.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import trio

from relay.config import (
    DEFAULT_SIMULATOR_API_KEY,
    SIMULATOR_UPSTREAM,
    ConfigError,
    DemoConfig,
    ServeConfig,
    SimulatorConfig,
    check_serve_config,
    uses_builtin_simulator,
)
from relay.credentials.keyfiles import KeyFileError
from relay.credentials.secret import Secret
from relay.net.transport import open_listener
from relay.server import RelayServer
from relay.simulator.server import serve_simulator
from relay.upstreams.table import build_upstream_table

LOGGER = logging.getLogger("relay.launch")


class StartupError(Exception):
    """The relay could not start; ``str()`` is one line naming the setting."""


@dataclass(frozen=True, slots=True)
class BuiltinSimulator:
    """The loopback simulator ``relay serve --simulator`` relays to."""

    url: str
    api_key: str

    def __repr__(self) -> str:  # never show the key
        return f"BuiltinSimulator(url={self.url!r})"


@dataclass(frozen=True, slots=True)
class RunningRelay:
    port: int
    server: RelayServer
    #: Set when the upstream is the built-in simulator.
    simulator: BuiltinSimulator | None = None


async def _start_builtin_simulator(nursery: trio.Nursery) -> BuiltinSimulator:
    """Start a loopback simulator with a fresh key."""
    key = f"sk-sim-{secrets.token_hex(16)}"
    sim_config = SimulatorConfig(host="127.0.0.1", port=0, api_keys=(Secret(key),))
    port: int = await nursery.start(serve_simulator, sim_config)
    return BuiltinSimulator(url=f"ws://127.0.0.1:{port}/v1", api_key=key)


def _with_simulator(config: ServeConfig, simulator: BuiltinSimulator) -> ServeConfig:
    return msgspec.structs.replace(
        config, upstream_url=simulator.url, upstream_api_key=simulator.api_key
    )


def listen_problem(host: str, port: int) -> str | None:
    """Why ``relay serve`` could not listen on ``host:port``, or None (binds and closes)."""
    try:
        open_listener(host, port).close()
    except OSError as exc:
        return describe_listen_error(host, port, exc)
    return None


def describe_listen_error(host: str, port: int, exc: OSError) -> str:
    """One line naming the setting at fault for a failed bind."""
    reason = exc.strerror or str(exc)
    if isinstance(exc, socket.gaierror):
        return f"serve.host: cannot listen on {host!r}: {reason}"
    if exc.errno == errno.EADDRINUSE:
        return f"serve.port: cannot listen on {host}:{port}: the port is in use"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"serve.host: cannot listen on {host}: not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"serve.port: cannot listen on {host}:{port}: permission denied"
    return f"serve.host/serve.port: cannot listen on {host}:{port}: {reason}"


@asynccontextmanager
async def open_relay(config: ServeConfig) -> AsyncIterator[RunningRelay]:
    """Run a relay (and, for ``upstream_url = "simulator"``, the built-in simulator).

    Raises :class:`StartupError` (never an exception group) when the relay cannot
    start: a bind failure, or a file that broke after the configuration check.
    """
    simulated = uses_builtin_simulator(config)
    if not simulated and not config.upstream_api_key and not config.upstreams:
        raise ConfigError(
            "serve.upstream_api_key: not set (choose the built-in simulator explicitly "
            f'with upstream_url = "{SIMULATOR_UPSTREAM}")'
        )
    failure: str | None = None
    async with trio.open_nursery() as nursery:
        simulator: BuiltinSimulator | None = None
        if simulated:
            simulator = await _start_builtin_simulator(nursery)
            LOGGER.warning(
                "upstream is the BUILT-IN SIMULATOR at %s (--simulator): clients get "
                "fabricated audio and nothing leaves the machine; set upstream_url and "
                "upstream_api_key to relay to OpenAI",
                simulator.url,
            )
            config = _with_simulator(config, simulator)
        server: RelayServer | None = None
        try:
            server = RelayServer(config, upstreams=build_upstream_table(config))
        except (KeyFileError, ValueError, OSError) as exc:
            failure = f"cannot start: {exc}"
        if server is not None:
            try:
                port: int = await nursery.start(server.serve)
            except OSError as exc:
                failure = describe_listen_error(config.host, config.port, exc)
        if failure is not None or server is None:
            nursery.cancel_scope.cancel()
        else:
            try:
                yield RunningRelay(port=port, server=server, simulator=simulator)
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise StartupError(failure)


def freeze_startup_heap() -> None:
    """Move every object alive once the relay listens out of the collector's reach.

    The modules, the configuration, the upstream table and the server's caches live
    as long as the process; left tracked, every full collection walks all of them
    (about 60,000 objects) to free a session's few cycles. ``gc.freeze`` parks them
    in the permanent generation, so a collection walks only what sessions made:
    measured in README, "The collector". Collecting first keeps
    startup's garbage out of the frozen set.
    """
    gc.collect()
    gc.freeze()
    LOGGER.debug("froze %d startup objects out of the collector", gc.get_freeze_count())


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

        async def handle_signals(
            *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
                task_status.started()
                async for signum in rx:
                    if signum == signal.SIGHUP:
                        _reload(server, reload, running.simulator)
                    elif stop.is_set():
                        LOGGER.info("second stop signal: ending sessions now")
                        hurry.set()
                    else:
                        stop.set()

        async with trio.open_nursery() as nursery:
            # Signals are handled before systemd (or anyone) hears we are ready.
            await nursery.start(handle_signals)
            freeze_startup_heap()
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


def _reload(
    server: RelayServer,
    reload: Callable[[], ServeConfig] | None,
    simulator: BuiltinSimulator | None = None,
) -> None:
    """SIGHUP: check and adopt ``reload()``; a refused configuration keeps the old one."""
    if reload is None:
        LOGGER.warning("SIGHUP: this relay was not started from a reloadable configuration")
        return
    try:
        config = reload()
        check_serve_config(config)
        if uses_builtin_simulator(config):
            if simulator is None:
                raise ConfigError(
                    f'serve.upstream_url: "{SIMULATOR_UPSTREAM}" needs a restart (this relay '
                    "was started without the built-in simulator)"
                )
            config = _with_simulator(config, simulator)
        # Built whole before anything changes: a key file that broke refuses the reload.
        needs_restart = server.apply_config(config, build_upstream_table(config))
    except (ConfigError, KeyFileError, ValueError, OSError) as exc:
        server.metrics.config_reloads.labels(outcome="refused").inc()
        LOGGER.error("SIGHUP: new configuration refused, keeping the old one: %s", exc)
        return
    server.metrics.config_reloads.labels(outcome="applied").inc()
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
            config.api_key.reveal(),
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
            serve_config = ServeConfig(
                host="127.0.0.1",
                port=0,
                upstream_url=SIMULATOR_UPSTREAM,
                client_keys=(Secret(client_key),),
            )
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


#: Where the browser demo's page is, on its relay.
BROWSER_DEMO_PAGE_PATH: Final = "/demo/"


@dataclass(frozen=True, slots=True)
class BrowserDemo:
    """A running browser demo: its relay (and simulator) and the page's URL."""

    running: RunningRelay
    url: str


def browser_demo_origins(port: int) -> tuple[str, ...]:
    """The Origins a browser gives the page served on 127.0.0.1:``port``."""
    return (f"http://127.0.0.1:{port}", f"http://localhost:{port}")


@asynccontextmanager
async def open_browser_demo(port: int = 0, **serve_fields: Any) -> AsyncIterator[BrowserDemo]:
    """A relay on 127.0.0.1:``port`` with the browser page on, before the built-in simulator.

    The relay's ``allowed_origins`` become the page's own origins once the port is
    known (with port 0 it is known only after the bind), so the WebSocket Origin
    check and the demo token endpoint admit the page and nothing else.
    ``serve_fields`` are further :class:`ServeConfig` settings, or others in place of
    these (tests give their own simulator as ``upstream_url``).
    """
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "upstream_url": SIMULATOR_UPSTREAM,
        "browser_demo_enabled": True,
        "allowed_origins": browser_demo_origins(port) if port else (),
        "log_level": "warning",
    }
    config = ServeConfig(**(fields | serve_fields))
    async with open_relay(config) as running:
        server = running.server
        if not port:
            server.apply_config(
                msgspec.structs.replace(
                    server.config, allowed_origins=browser_demo_origins(running.port)
                ),
                server.router.table,
            )
        yield BrowserDemo(
            running=running, url=f"http://127.0.0.1:{running.port}{BROWSER_DEMO_PAGE_PATH}"
        )


async def run_browser_demo(config: DemoConfig) -> None:
    """``relay demo --browser``: serve the page until Ctrl-C (or SIGTERM); then exit 0."""
    try:
        async with open_browser_demo(config.browser_port) as demo:
            print(
                "demo: relay with the browser voice page, in front of the built-in simulator "
                "(no API key needed)"
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                print(f"demo: open {demo.url} in a browser (Ctrl-C stops)", flush=True)
                async for _ in signals:
                    break
        print("demo: stopped")
    except StartupError as exc:
        raise StartupError(f"{exc} (relay demo --browser: another --port, 0 = any)") from None
