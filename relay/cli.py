"""The ``relay`` command line: ``serve``, ``simulate``, ``demo``, ``keys``.

This module owns argument parsing and process start-up: flags are turned into
config overrides (:mod:`relay.config` merges them over TOML and environment and
validates), logging is configured, and the matching Trio entry point runs in one
``trio.run``. A bad setting exits with status 2 and a one-line message naming
the key, never a traceback: ``relay serve`` checks its whole configuration
(:func:`relay.config.check_serve_config`) and tries its port before it logs
anything, and a start-up failure inside the loop
(:class:`relay.launch.StartupError`) is one line too. Ctrl-C exits quietly.
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
from relay.net import hub

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
        help="run the relay (needs serve.upstream_api_key, or --simulator for local runs)",
    )
    _add_common(serve)
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    upstream = serve.add_mutually_exclusive_group()
    upstream.add_argument("--upstream-url", dest="upstream_url")
    upstream.add_argument(
        "--simulator",
        dest="upstream_url",
        action="store_const",
        const=cfg.SIMULATOR_UPSTREAM,
        help=f"relay to the built-in simulator (upstream_url = {cfg.SIMULATOR_UPSTREAM!r}): "
        "local runs, no upstream key, nothing leaves the machine",
    )
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
    serve.add_argument(
        "--allowed-origin",
        dest="allowed_origins",
        action="append",
        metavar="ORIGIN",
        help="a browser Origin allowed to open sessions, e.g. https://app.example "
        "(repeatable; none set allows any Origin)",
    )
    serve.add_argument(
        "--browser-demo",
        dest="browser_demo_enabled",
        action="store_const",
        const=True,
        help="serve the browser voice page at /demo/ and its token endpoint, which mints "
        "single-use tokens for the --allowed-origin pages (off by default)",
    )

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
    simulate.add_argument(
        "--flavor",
        choices=["openai", "azure"],
        help="the upstream to play: OpenAI (/v1/realtime) or an Azure OpenAI resource "
        "(/openai/v1/realtime, /openai/realtime; api-key or Entra auth)",
    )
    simulate.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="openai: serve this model (repeatable)",
    )
    simulate.add_argument(
        "--deployment",
        dest="azure_deployments",
        action="append",
        metavar="NAME",
        help="azure: this deployment exists (repeatable; none given = any name)",
    )
    simulate.add_argument(
        "--entra-token",
        dest="entra_tokens",
        action="append",
        metavar="TOKEN",
        help="azure: accept this Entra token as Authorization: Bearer (repeatable)",
    )
    simulate.add_argument(
        "--max-session-s",
        dest="max_session_s",
        type=float,
        metavar="SECONDS",
        help="end sessions after this many seconds (0: OpenAI's 60 min, Azure's 30)",
    )
    simulate.add_argument(
        "--rest-chunk-interval-ms",
        dest="rest_chunk_interval_ms",
        type=int,
        metavar="MS",
        help="REST streams (SSE, speech audio): milliseconds between chunks (0: no pause)",
    )
    simulate.add_argument(
        "--rest-stream-chunks",
        dest="rest_stream_chunks",
        type=int,
        metavar="N",
        help="REST answers: content pieces (text deltas, audio chunks) per answer",
    )
    simulate.add_argument(
        "--rest-read-bytes-per-s",
        dest="rest_read_bytes_per_s",
        type=int,
        metavar="BYTES",
        help="read REST request bodies at most this fast, like a slow upstream (0: no limit)",
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
    demo.add_argument(
        "--browser",
        dest="browser",
        action="store_const",
        const=True,
        help="serve the browser voice page (relay in front of the built-in simulator on "
        "127.0.0.1) and print its URL; runs until Ctrl-C",
    )
    demo.add_argument(
        "--port",
        dest="browser_port",
        type=int,
        help="with --browser: the relay's port on 127.0.0.1 (default 8080; 0: any free port)",
    )

    bench = sub.add_parser(
        "bench",
        help="load-test a relay (or any Realtime endpoint): stream, voice, flat, churn or idle "
        "sessions, timed; results as text and JSON",
    )
    bench.add_argument("--url", required=True, help="ws:// or wss:// base ending in /v1")
    bench.add_argument(
        "--key", help="client key or relay token (default: environment RELAY_BENCH_KEY)"
    )
    bench.add_argument(
        "--profile",
        choices=["stream", "voice", "flat", "churn", "idle"],
        default="stream",
        help="stream: real-time appends timed against echoes (echo-mode upstream); voice: "
        "turn-taking, commit to first audio delta and jitter (a model upstream); flat: echoes "
        "as fast as a window allows (MB/s); churn: open/use/close in parallel (sessions/s, "
        "handshake p50/p99); idle: hold silent sessions open",
    )
    bench.add_argument("--sessions", type=int, default=10, help="sessions (churn: workers)")
    bench.add_argument("--duration-s", type=float, default=10.0, help="measured window")
    bench.add_argument("--warmup-s", type=float, default=0.0, help="load before the window")
    bench.add_argument("--chunk-ms", type=int, default=20, help="audio per append")
    bench.add_argument("--window", type=int, default=8, help="flat: appends in flight/session")
    bench.add_argument("--speech-ms", type=int, default=1000, help="voice: speech per turn")
    bench.add_argument("--pause-ms", type=int, default=300, help="voice: pause after answers")
    bench.add_argument(
        "--load-procs",
        type=int,
        default=1,
        help="spread the load over this many processes (use more when the load side "
        "reports itself saturated)",
    )
    bench.add_argument("--ca-file", help="CA bundle for a wss:// URL with a private CA")
    bench.add_argument(
        "--binary",
        action="store_true",
        help="offer relay.audio.v1: audio as binary frames both ways (docs/binary-audio.md); "
        "fails when the server does not select it",
    )
    bench.add_argument("--json", help="write the result to this file")
    add_progress_option(bench)

    keys = sub.add_parser("keys", help="app keys, signing keys, client key digests")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser(
        "hash", help="read a key from stdin (or a prompt), print its SHA-256 digest"
    )
    create = keys_sub.add_parser("create", help="create an app key; prints it once")
    create.add_argument("name")
    create.add_argument(
        "--passthrough",
        action="store_true",
        help="this key mints real OpenAI ek_ secrets from the upstream",
    )
    create.add_argument(
        "--max-concurrent-sessions",
        type=int,
        default=0,
        help="sessions this key's tokens may hold open at once (0 = no limit)",
    )
    revoke = keys_sub.add_parser("revoke", help="revoke an app key (live sessions continue)")
    revoke.add_argument("name")
    listing = keys_sub.add_parser("list", help="list app keys (names and modes, never the keys)")
    rotate = keys_sub.add_parser(
        "rotate-signing",
        help="new relay-token signing key; the old one verifies until its tokens expire",
    )
    for managed in (create, revoke, listing, rotate):
        managed.add_argument(
            "--file",
            help="key file (default: serve.app_keys_file or serve.signing_keys_file)",
        )
        _add_common(managed)
    return parser


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--progress``/``--no-progress`` (``relay bench``, ``bench/suite.py``): see
    :meth:`relay.loadgen.ProgressBar.wanted`."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )


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
        hub.dispatch_mode()  # (read when a run's hub starts: refused here, before any)
    except ValueError as exc:
        print(f"relay: configuration error: {exc}", file=sys.stderr)
        return 2
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
        cfg.check_serve_config(serve)
        from relay.launch import listen_problem

        problem = listen_problem(serve.host, serve.port)
        if problem is not None:
            return lambda: _fail(problem)
        from relay.logs import setup_logging

        setup_logging(serve.log_level, serve.log_format)
        LOGGER.info(
            "relay starting", extra={"fields": {"event": "startup", "config": cfg.redacted(serve)}}
        )

        def reload() -> cfg.ServeConfig:
            return cfg.load(
                cfg.ServeConfig,
                toml_path=args.config,
                overrides=_overrides(args, cfg.ServeConfig.__struct_fields__),
            )

        return lambda: _run_serve(serve, reload)
    if args.command == "demo":
        demo = cfg.load(
            cfg.DemoConfig,
            toml_path=args.config,
            overrides=_overrides(args, cfg.DemoConfig.__struct_fields__),
        )
        if demo.browser and (demo.url or args.direct):
            raise cfg.ConfigError(
                "demo.browser: --browser runs its own relay and simulator; drop --url/--direct"
            )
        _setup_logging("warning")
        if demo.browser:
            return lambda: _run_browser_demo(demo)
        return lambda: _run_demo(demo, direct=args.direct)
    if args.command == "bench":
        return lambda: _run_bench(args)
    if args.command == "keys":
        if args.keys_command == "hash":
            return _keys_hash
        serve = cfg.load(cfg.ServeConfig, toml_path=getattr(args, "config", None))
        return lambda: _keys_manage(args, serve)
    raise AssertionError(args.command)


def _run_simulate(sim: cfg.SimulatorConfig) -> int:
    from relay.simulator.server import serve_simulator

    trio.run(serve_simulator, sim)
    return 0


def _fail(message: str) -> int:
    print(f"relay: {message}", file=sys.stderr)
    return 2


def _run_serve(serve: cfg.ServeConfig, reload: Callable[[], cfg.ServeConfig]) -> int:
    from relay.credentials.keyfiles import KeyFileError
    from relay.launch import StartupError, run_relay

    try:
        trio.run(run_relay, serve, reload)
    except (StartupError, KeyFileError) as exc:
        return _fail(str(exc))
    except cfg.ConfigError as exc:
        return _fail(f"configuration error: {exc}")
    return 0


def _run_demo(demo: cfg.DemoConfig, *, direct: bool) -> int:
    from relay.launch import run_demo_stack

    ok: bool = trio.run(run_demo_stack, demo, direct)
    return 0 if ok else 1


def _run_browser_demo(demo: cfg.DemoConfig) -> int:
    from relay.launch import StartupError, run_browser_demo

    try:
        trio.run(run_browser_demo, demo)
    except StartupError as exc:
        return _fail(str(exc))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    import json
    import os

    import msgspec

    from relay.loadgen import LoadError, LoadSpec, ProgressBar, run_load
    from relay.loadgen.report import describe, passed

    key = args.key or os.environ.get("RELAY_BENCH_KEY", "")
    if not key:
        print("relay: give --key or set RELAY_BENCH_KEY", file=sys.stderr)
        return 2
    try:
        spec = msgspec.convert(
            {
                "profile": args.profile,
                "url": args.url,
                "key": key,
                "sessions": args.sessions,
                "duration_s": args.duration_s,
                "warmup_s": args.warmup_s,
                "chunk_ms": args.chunk_ms,
                "window": args.window,
                "speech_ms": args.speech_ms,
                "pause_ms": args.pause_ms,
                "ca_file": args.ca_file or "",
                "binary": args.binary,
            },
            LoadSpec,
        )
    except msgspec.ValidationError as exc:
        print(f"relay: bench: {exc}", file=sys.stderr)
        return 2
    if args.load_procs < 1:
        print("relay: bench: --load-procs must be at least 1", file=sys.stderr)
        return 2
    progress = (
        ProgressBar(args.profile, spec.warmup_s + spec.duration_s, sys.stderr)
        if ProgressBar.wanted(args.progress)
        else None
    )
    print(
        f"bench: {args.profile}, {spec.sessions} session(s), {spec.warmup_s:g} s warm-up + "
        f"{spec.duration_s:g} s measured, against {args.url.split('?')[0]}"
        + (", binary audio (relay.audio.v1)" if spec.binary else "")
        + (f", {args.load_procs} load processes" if args.load_procs > 1 else ""),
        file=sys.stderr,
    )
    processes = args.load_procs if args.load_procs > 1 else 0
    try:
        result = trio.run(lambda: run_load(spec, processes=processes, progress=progress))
    except LoadError as exc:
        print(f"relay: bench: {exc}", file=sys.stderr)
        return 1
    print(describe(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result.to_json(), handle, indent=2)
    return 0 if passed(result) else 1


def _keys_hash() -> int:
    from relay.credentials.digests import digest_hex

    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass("key: ")
    if not key:
        print("relay: no key given", file=sys.stderr)
        return 2
    print(digest_hex(key))
    return 0


def _keys_manage(args: argparse.Namespace, serve: cfg.ServeConfig) -> int:
    import time
    from pathlib import Path

    from relay.credentials import keyfiles

    command = args.keys_command
    default = serve.signing_keys_file if command == "rotate-signing" else serve.app_keys_file
    path_text = args.file or default
    if not path_text:
        setting = "signing_keys_file" if command == "rotate-signing" else "app_keys_file"
        print(f"relay: give --file or set serve.{setting}", file=sys.stderr)
        return 2
    path = Path(path_text)
    try:
        if command == "create":
            key = keyfiles.create_app_key(
                path,
                args.name,
                "passthrough" if args.passthrough else "relay",
                max_concurrent_sessions=args.max_concurrent_sessions,
            )
            print(key)
            print(f"app key {args.name!r} created; it is shown only now", file=sys.stderr)
        elif command == "revoke":
            if not keyfiles.revoke_app_key(path, args.name):
                print(f"relay: no app key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"app key {args.name!r} revoked", file=sys.stderr)
        elif command == "list":
            for app_key in keyfiles.load_app_keys(path).keys:
                created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(app_key.created_at))
                print(
                    f"{app_key.name}\t{app_key.mode}\tcreated {created} UTC\t"
                    f"sha256 {app_key.sha256[:12]}…"
                )
        else:
            kid = keyfiles.rotate_signing_key(path, time.time())
            print(f"new signing key {kid!r} is active; older keys verify until their tokens expire")
    except keyfiles.KeyFileError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
