"""Instructions per relayed message, counted by callgrind: a figure the machine's noise cannot move.

This module owns the instruction-count benchmark of the hot path. On a 2-core shared
VM, CPU time per message drifts by 10-20 % between runs, which hides the 1-3 µs
changes the hot path is tuned by. Valgrind's callgrind counts the instructions a
process executes, which is repeatable whatever else the machine does.

Per path (the byte splice, the relay, optionally the relay of another work tree):

- the proxy runs under ``valgrind --tool=callgrind --instr-atstart=no`` in front of
  the Node ``ws`` echo upstream (``bench/node/echo_upstream.mjs``);
- the Node load generator (``bench/node/loadgen.mjs --mode stream``) drives a few
  sessions, slowly enough for a proxy running ~50x slower under valgrind;
- instrumentation goes on before the warmup; the counters are zeroed at the load's
  ``window_start`` and dumped at ``window_end`` (``callgrind_control``);
- the figure is the dump's instruction total over the messages relayed in the
  window (sent plus received).

At this load every read holds one frame, the regime of a real-time session at low
concurrency, so the figure is the full per-message cost (wakeup, reads, parse,
write) without batching. It is a ratio between paths and between commits, not a
time.

``--rest`` counts the REST proxy instead: instructions per request, the relay under
callgrind in front of the C streamed chat completions upstream
(``bench/c/sse_upstream.c``, ``--stream-chunks`` SSE chunks per answer every
:data:`REST_CHUNK_INTERVAL_MS`), ``--sessions`` keep-alive loops (default one) of our
load client (``bench/rest_client.py``), requests counted by completion in the window
(at one stream no two requests share a wakeup, and the count repeats within 0.3 %; at
four it moves by 2-3 % with how the reads coalesce). Two runs,
``--stream-chunks 1`` and ``--stream-chunks 20``, split a request's fixed cost from
its cost per chunk. Usage::

    python bench/instructions.py [--sessions 4] [--duration-s 8] [--relay-before DIR]
    python bench/instructions.py --rest [--duration-s 10] [--stream-chunks 1] [--relay-before DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness import (
    CLIENT_KEY,
    NODE_DIR,
    RELAY_BEFORE,
    REPO,
    Rig,
    free_port,
    load_events,
    node_binary,
    wait_for_port,
)

#: Valgrind slows a Python process ~50x; its start-up (uninstrumented) takes seconds.
VALGRIND_STARTUP_TIMEOUT_S: Final = 120.0
#: Load per session (loadgen's --rate is per session): 40 appends/s keeps a proxy
#: under callgrind well ahead of it.
APPENDS_PER_S_PER_SESSION: Final = 40
LOAD_SLACK_S: Final = 60.0
DEFAULT_SESSIONS: Final = 4
#: ``--rest``: one stream, so that no two requests share a wakeup: the count per request
#: repeats within 0.3 % (at 4 streams it moves by 2-3 % with how reads coalesce).
DEFAULT_REST_STREAMS: Final = 1
#: ``--rest``: the C upstream's pacing (ms between its chunks) and the client's model.
REST_CHUNK_INTERVAL_MS: Final = 20
REST_MODEL: Final = "gpt-4o-mini"
#: ``--rest``: seconds the requests in flight get after the window, and per request
#: (a relay ~50x slower under valgrind still answers well within it).
REST_DRAIN_S: Final = 10.0
REST_REQUEST_TIMEOUT_S: Final = 60.0
_TOTALS: Final = re.compile(rb"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass
class Counted:
    path: str
    instructions: int
    messages: int
    lost: int
    #: ``--rest``: the SSE events the requests carried (``messages`` are the requests).
    chunks: int = 0

    @property
    def per_message(self) -> float:
        return self.instructions / self.messages if self.messages else float("nan")


def _callgrind(pid: int, *options: str) -> None:
    subprocess.run(["callgrind_control", *options, str(pid)], check=True, capture_output=True)


def _dumped_total(out_dir: Path, pid: int) -> int:
    """The instruction total of the newest dump of ``pid`` (the window's)."""
    dumps = sorted(out_dir.glob(f"cg.{pid}*"), key=lambda p: p.stat().st_mtime)
    for dump in reversed(dumps):
        match = _TOTALS.search(dump.read_bytes())
        if match:
            return int(match.group(1))
    raise RuntimeError(f"no callgrind dump with a total for {pid} in {out_dir}")


def count(
    rig: Rig,
    name: str,
    command: list[str],
    env: dict[str, str],
    port: int,
    *,
    sessions: int,
    warmup_s: float,
    duration_s: float,
    cwd: Path = REPO,
    load_args: tuple[str, ...] = (),
    churn: bool = False,
    rest: bool = False,
) -> Counted:
    out_dir = rig.work_dir / f"callgrind-{name.replace('/', '_').replace('@', '_')}"
    out_dir.mkdir()
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out_dir}/cg.%p",
    ]
    process = subprocess.Popen(
        [*valgrind, *command],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, process, VALGRIND_STARTUP_TIMEOUT_S)
        _callgrind(process.pid, "--instr=on")
        if rest:
            load_command = _rest_load(port, sessions, warmup_s, duration_s)
        else:
            load_command = _realtime_load(
                env, port, sessions, warmup_s, duration_s, churn, load_args
            )
        load = subprocess.Popen(
            load_command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert load.stdout is not None
        result: dict[str, object] = {}
        deadline = time.monotonic() + warmup_s + duration_s + LOAD_SLACK_S
        for event in load_events(load, deadline):
            if event.get("event") == "window_start":
                _callgrind(process.pid, "--zero")
            elif event.get("event") == "window_end":
                _callgrind(process.pid, "--dump")
            elif event.get("event") == "result":
                result = event
                break
        load.kill()
        _, stderr = load.communicate(timeout=10)
        if not result:
            raise RuntimeError(f"{name}: the load gave no result: {stderr[-400:]!r}")
        if rest:
            # A request is counted by its completion; its chunks are the per-chunk part.
            errors = result.get("errors")
            lost = sum(errors.values()) if isinstance(errors, dict) else 0
            return Counted(
                name,
                _dumped_total(out_dir, process.pid),
                int(str(result["requests"])),
                lost,
                chunks=int(str(result["chunks"])),
            )
        # Churn's unit is a session opened, used and closed inside the window.
        messages = (
            int(str(result["sessions_completed"]))
            if churn
            else int(str(result["window_sent"])) + int(str(result["window_received"]))
        )
        return Counted(
            name, _dumped_total(out_dir, process.pid), messages, int(str(result["lost"]))
        )
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _realtime_load(
    env: dict[str, str],
    port: int,
    sessions: int,
    warmup_s: float,
    duration_s: float,
    churn: bool,
    load_args: tuple[str, ...],
) -> list[str]:
    """The Node load generator's command: sessions streaming appends, or churning."""
    return [
        node_binary(),
        str(NODE_DIR / "loadgen.mjs"),
        "--url",
        f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime",
        "--key",
        env.get("RELAY_SERVE_CLIENT_KEYS", "sk-bench-simulator-key"),
        *(
            ("--mode", "churn", "--concurrency", str(sessions))
            if churn
            else ("--mode", "stream", "--sessions", str(sessions))
        ),
        "--rate",
        str(APPENDS_PER_S_PER_SESSION),
        "--warmup-s",
        str(warmup_s),
        "--duration-s",
        str(duration_s),
        "--open-timeout-s",
        "60",
        "--grace-s",
        "5",
        *load_args,
    ]


def _rest_load(port: int, streams: int, warmup_s: float, duration_s: float) -> list[str]:
    """``bench/rest_client.py``: ``streams`` keep-alive loops of streamed chat completions."""
    return [
        sys.executable,
        str(REPO / "bench/rest_client.py"),
        *("--port", str(port), "--key", CLIENT_KEY, "--model", REST_MODEL),
        *("--streams", str(streams), "--stagger-ms", str(REST_CHUNK_INTERVAL_MS)),
        *("--warmup-s", str(warmup_s), "--duration-s", str(duration_s)),
        *("--drain-s", str(REST_DRAIN_S), "--request-timeout-s", str(REST_REQUEST_TIMEOUT_S)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions",
        type=int,
        help=f"sessions (--rest: streams), default {DEFAULT_SESSIONS} ({DEFAULT_REST_STREAMS} "
        "with --rest)",
    )
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--paths", default="splice,relay")
    parser.add_argument(
        "--relay-before", type=Path, help="another work tree's relay, as relay@before"
    )
    parser.add_argument(
        "--audio",
        action="store_true",
        help="the binary audio path against JSON: the relay in front of an upstream "
        "answering each append with an audio delta, the client speaking JSON "
        "(relay/json) and relay.audio.v1 (relay/binary)",
    )
    parser.add_argument(
        "--churn",
        action="store_true",
        help="instructions per session instead of per message: --sessions closed loops, "
        "each opening a session, exchanging 5 appends and closing it (loadgen --mode churn)",
    )
    parser.add_argument(
        "--rest",
        action="store_true",
        help="instructions per REST request: --sessions keep-alive loops of streamed chat "
        "completions (bench/rest_client.py) through the REST proxy to the C upstream "
        "(bench/c/sse_upstream.c)",
    )
    parser.add_argument(
        "--stream-chunks",
        type=int,
        default=1,
        help="--rest: SSE chunks the upstream streams per answer (two runs, 1 and N, "
        "split the fixed cost per request from the cost per chunk)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--keep", type=Path, help="keep the callgrind dumps here (for callgrind_annotate)"
    )
    args = parser.parse_args()
    if args.sessions is None:
        args.sessions = DEFAULT_REST_STREAMS if args.rest else DEFAULT_SESSIONS
    with tempfile.TemporaryDirectory(prefix="instructions-") as tmp:
        work_dir = Path(tmp) if args.keep is None else args.keep
        work_dir.mkdir(parents=True, exist_ok=True)
        # The REST bench's relay logs at warning (bench/rest.py): no line per request.
        rig = Rig(work_dir, relay_log_level="warning" if args.rest else "info")
        try:
            if args.rest:
                upstream_port = rig.start_light_sse_upstream(
                    chunk_interval_ms=REST_CHUNK_INTERVAL_MS, stream_chunks=args.stream_chunks
                )
            else:
                upstream_port = rig.start_echo_upstream(mode="delta" if args.audio else "echo")
            upstream_url = f"ws://127.0.0.1:{upstream_port}/v1"
            plan: list[tuple[str, list[str], dict[str, str], int, Path, tuple[str, ...]]] = []
            relay_command = [sys.executable, "-m", "relay", "serve"]
            if args.rest:
                paths = ["relay"]
            elif args.audio:
                paths = ["relay/json", "relay/binary"]
            else:
                paths = args.paths.split(",")
            for path in paths:
                port = free_port()
                if path == "splice":
                    command = [
                        sys.executable,
                        str(REPO / "bench/raw_splice.py"),
                        "--port",
                        str(port),
                        "--upstream-port",
                        str(upstream_port),
                    ]
                    plan.append((path, command, dict(rig.env), port, REPO, ()))
                elif path.startswith("relay"):
                    load_args = ("--binary",) if path == "relay/binary" else ()
                    env = rig.relay_env(port, upstream_url)
                    plan.append((path, relay_command, env, port, REPO, load_args))
            if args.relay_before is not None:
                port = free_port()
                env = {**rig.relay_env(port, upstream_url), "PYTHONPATH": str(args.relay_before)}
                plan.append((RELAY_BEFORE, relay_command, env, port, args.relay_before, ()))
            counted = [
                count(
                    rig,
                    name,
                    command,
                    env,
                    port,
                    sessions=args.sessions,
                    warmup_s=args.warmup_s,
                    duration_s=args.duration_s,
                    cwd=cwd,
                    load_args=load_args,
                    churn=args.churn,
                    rest=args.rest,
                )
                for name, command, env, port, cwd, load_args in plan
            ]
        finally:
            rig.stop()
    if args.rest:
        print_rest(counted, args)
    else:
        print_messages(counted, args)
    if args.json is not None:
        args.json.write_text(
            json.dumps([{**c.__dict__, "per_message": c.per_message} for c in counted], indent=2)
        )
    return 0


def print_messages(counted: list[Counted], args: argparse.Namespace) -> None:
    floor_path = "relay/json" if args.audio else "splice"
    floor = next((c.per_message for c in counted if c.path == floor_path), float("nan"))
    unit = "session" if args.churn else "message"
    if args.churn:
        print(
            f"{args.sessions} churn loops (open, 5 appends echoed, close); "
            f"{args.duration_s:.0f} s window"
        )
    else:
        print(
            f"{args.sessions} sessions x {APPENDS_PER_S_PER_SESSION} appends/s each, echoed; "
            f"{args.duration_s:.0f} s window"
        )
    print(f"| path | instructions per {unit} | x {floor_path} | {unit}s | lost |")
    print("|---|---|---|---|---|")
    for c in counted:
        ratio = c.per_message / floor
        print(f"| {c.path} | {c.per_message:,.0f} | {ratio:.2f} | {c.messages} | {c.lost} |")


def print_rest(counted: list[Counted], args: argparse.Namespace) -> None:
    print(
        f"{args.sessions} REST streams, {args.stream_chunks} chunk(s) per answer every "
        f"{REST_CHUNK_INTERVAL_MS} ms; {args.duration_s:.0f} s window"
    )
    print("| path | instructions per request | requests | chunks per request | errors |")
    print("|---|---|---|---|---|")
    for c in counted:
        chunks = c.chunks / c.messages if c.messages else float("nan")
        print(f"| {c.path} | {c.per_message:,.0f} | {c.messages} | {chunks:.1f} | {c.lost} |")


if __name__ == "__main__":
    raise SystemExit(main())
