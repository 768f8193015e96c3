"""The ``relay`` command line: ``serve``, ``simulate``, ``demo``, ``keys``.

This module owns argument parsing and process start-up: flags are turned into
config overrides (:mod:`relay.config` merges them over TOML and environment and
validates), logging is configured, and the matching Trio entry point runs in one
``trio.run``. A bad setting exits with status 2 and a one-line message naming
the key; Ctrl-C exits quietly.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import trio

from relay import config as cfg

LOGGER = logging.getLogger("relay.cli")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with [serve]/[simulate]/[demo] tables"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay", description="A high-performance relay for the OpenAI Realtime API."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the relay (the built-in simulator is the upstream when no upstream key is set)",
    )
    _add_common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--upstream-url", dest="upstream_url")
    serve.add_argument("--upstream-ca-file", dest="upstream_ca_file")
    serve.add_argument(
        "--client-key",
        dest="client_keys",
        action="append",
        help="accept this client key (repeatable; prefer RELAY_SERVE_CLIENT_KEY_SHA256)",
    )
    serve.add_argument(
        "--no-auth",
        dest="no_auth",
        action="store_const",
        const=True,
        help="LOCAL DEVELOPMENT ONLY: accept clients without a credential",
    )
    serve.add_argument("--max-sessions", dest="max_sessions", type=int)
    serve.add_argument("--idle-timeout-s", dest="idle_timeout_s", type=float)
    serve.add_argument("--max-session-s", dest="max_session_s", type=float)
    serve.add_argument("--max-message-bytes", dest="max_message_bytes", type=int)
    serve.add_argument("--log-level", dest="log_level")

    simulate = sub.add_parser("simulate", help="run the upstream simulator alone")
    _add_common(simulate)
    simulate.add_argument("--host")
    simulate.add_argument("--port", type=int)
    simulate.add_argument("--mode", choices=["normal", "echo", "raw-echo"])
    simulate.add_argument(
        "--fast",
        dest="realtime_pacing",
        action="store_const",
        const=False,
        help="send audio deltas as fast as possible instead of at real time",
    )
    simulate.add_argument(
        "--api-key", dest="api_keys", action="append", help="accept this key (repeatable)"
    )
    simulate.add_argument(
        "--faults",
        dest="faults_enabled",
        action="store_const",
        const=True,
        help="honour the ?sim_fault= and ?sim_mode= test hooks",
    )

    demo = sub.add_parser(
        "demo",
        help="a scripted voice session printing the event flow (starts simulator and relay "
        "in-process when --url is not given)",
    )
    _add_common(demo)
    demo.add_argument("--url", help="ws:// or wss:// base, e.g. ws://127.0.0.1:8080/v1")
    demo.add_argument("--model")
    demo.add_argument("--turns", type=int)
    demo.add_argument(
        "--direct",
        action="store_true",
        help="without --url: talk to the simulator directly, no relay in between",
    )

    keys = sub.add_parser("keys", help="client key helpers")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser(
        "hash", help="read a key from stdin (or a prompt), print its SHA-256 digest"
    )
    return parser


def _overrides(args: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        runner = _dispatch(args)
    except cfg.ConfigError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return runner()
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> Callable[[], int]:
    if args.command == "simulate":
        sim = cfg.load(
            cfg.SimulatorConfig,
            toml_path=args.config,
            overrides=_overrides(args, cfg.SimulatorConfig.__struct_fields__),
        )
        _setup_logging("info")
        return lambda: _run_simulate(sim)
    if args.command == "serve":
        serve = cfg.load(
            cfg.ServeConfig,
            toml_path=args.config,
            overrides=_overrides(args, cfg.ServeConfig.__struct_fields__),
        )
        _setup_logging(serve.log_level)
        return lambda: _run_serve(serve)
    if args.command == "demo":
        demo = cfg.load(
            cfg.DemoConfig,
            toml_path=args.config,
            overrides=_overrides(args, cfg.DemoConfig.__struct_fields__),
        )
        _setup_logging("warning")
        return lambda: _run_demo(demo, direct=args.direct)
    if args.command == "keys":
        return _keys_hash
    raise AssertionError(args.command)


def _run_simulate(sim: cfg.SimulatorConfig) -> int:
    from relay.simulator.server import serve_simulator

    trio.run(serve_simulator, sim)
    return 0


def _run_serve(serve: cfg.ServeConfig) -> int:
    from relay.launch import run_relay

    trio.run(run_relay, serve)
    return 0


def _run_demo(demo: cfg.DemoConfig, *, direct: bool) -> int:
    from relay.launch import run_demo_stack

    ok: bool = trio.run(run_demo_stack, demo, direct)
    return 0 if ok else 1


def _keys_hash() -> int:
    from relay.dataplane.auth import key_digest

    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("key: ")
    if not key:
        print("relay: no key given", file=sys.stderr)
        return 2
    print(key_digest(key))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
