"""The handshake cost of a failover, beside a plain handshake, in one interleaved run.

Issue 14's figure: what a client pays when the first upstream the relay tries
refuses it. Four paths, each driven by the ``churn`` profile of our load tool
(``sessions`` workers that each open a session, exchange a few echoed appends and
close, again and again), round-robin over ``--rounds`` short repetitions:

- ``direct``: the simulator itself (the floor for the handshake);
- ``relay``: the relay with one upstream (the simulator) in an upstream table;
- ``relay/429``: the relay whose first upstream answers every handshake HTTP 429
  (``bench/refusing_upstream.py``) and whose second is the simulator: every session
  costs one refused HTTP exchange, then the successful dial;
- ``relay/refused``: the relay whose first upstream is a closed port (connection
  refused), then the simulator.

The failing upstreams are given ``Retry-After: 0`` and ``upstream_cool_down_s = 0``,
so that *every* handshake pays the failed attempt; in production the key or upstream
cools down after its first failure and the next handshakes go straight to the healthy
one (tests/test_upstream_failover.py shows that). Reported per path: handshake to
``session.created`` p50/p99 in ms (the client's view), the added p50 against
``relay``, and the relay's CPU in ms per session opened, used and closed (user+sys
from /proc over the measured window).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import sys
from pathlib import Path
from typing import Any, Final

from harness import ECHO_QUERY, Measured, Spread, measure, rig, rotated

from relay.loadgen import LoadSpec

PATHS: Final = ("direct", "relay", "relay/429", "relay/refused")
DEFAULT_ROUNDS: Final = 3
DEFAULT_SESSIONS: Final = 8
DEFAULT_DURATION_S: Final = 3.0
WARMUP_S: Final = 0.5

UPSTREAM_TABLE: Final = """
[serve]
upstream_cool_down_s = 0
upstream_query_params = ["sim_mode"]
{first}
[upstreams.healthy]
url = "ws://127.0.0.1:{healthy}/v1"
api_key_env = ["BENCH_UPSTREAM_KEY"]
priority = 1
"""
FIRST_UPSTREAM: Final = """
[upstreams.failing]
url = "ws://127.0.0.1:{port}/v1"
api_key_env = ["BENCH_UPSTREAM_KEY"]
priority = 0
"""


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_ms_per_session(run: Measured) -> float:
    done = run.result.sessions_completed
    return run.cpu_s / done * 1e3 if done else math.nan


def handshake_ms(run: Measured, quantile: str) -> float:
    summary = run.result.histogram("handshake").summary()
    value = summary.get(quantile)
    return float(value) if value is not None else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS)
    parser.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S)
    parser.add_argument("--pin", action="store_true", help="relay on CPU 0, the rest on CPU 1")
    parser.add_argument("--out", type=Path, help="write the runs as JSON here")
    args = parser.parse_args()
    spec = LoadSpec(
        profile="churn",
        url="ws://unset/v1",
        key="unset",
        sessions=args.sessions,
        duration_s=args.duration_s,
        warmup_s=WARMUP_S,
    )
    runs: dict[str, list[Measured]] = {path: [] for path in PATHS}
    with rig(pinned=args.pin, relay_log_level="warning") as running:
        healthy = running.start_simulator()
        refusing = running.start_refusing_upstream()
        tables = {
            "relay": "",
            "relay/429": FIRST_UPSTREAM.format(port=refusing),
            "relay/refused": FIRST_UPSTREAM.format(port=closed_port()),
        }
        for name, first in tables.items():
            running.start_relay_with_upstreams(
                name, UPSTREAM_TABLE.format(first=first, healthy=healthy)
            )
        for number in range(args.rounds):
            for path in rotated(list(PATHS), number):
                target = running.targets[path]
                print(f"round {number + 1}/{args.rounds}: {path}", file=sys.stderr)
                runs[path].append(measure(running, target, spec, query=ECHO_QUERY))
    lines = [
        f"handshake cost of a failover: churn, {args.sessions} workers, "
        f"{args.rounds} interleaved rounds of {args.duration_s:g} s; median (min-max)",
        f"{'path':<14} {'sessions':>9} {'p50 ms':>18} {'p99 ms':>18} "
        f"{'p50 added vs relay':>20} {'relay CPU ms/session':>22} errors",
    ]
    plain_p50 = Spread.of(handshake_ms(run, "p50") for run in runs["relay"]).median
    summary: dict[str, Any] = {}
    for path in PATHS:
        measured = runs[path]
        p50 = Spread.of(handshake_ms(run, "p50") for run in measured)
        p99 = Spread.of(handshake_ms(run, "p99") for run in measured)
        added = Spread.of(handshake_ms(run, "p50") - plain_p50 for run in measured)
        cpu = Spread.of(cpu_ms_per_session(run) for run in measured)
        sessions = sum(run.result.sessions_completed for run in measured)
        errors: dict[str, int] = {}
        for run in measured:
            for kind, count in run.result.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        lines.append(
            f"{path:<14} {sessions:>9} {p50.show('.2f'):>18} {p99.show('.2f'):>18} "
            f"{'' if path in ('direct', 'relay') else added.show('+.2f'):>20} "
            f"{'' if path == 'direct' else cpu.show('.2f'):>22} "
            f"{json.dumps(errors) if errors else '-'}"
        )
        summary[path] = {
            "handshake_p50_ms": p50.to_json(),
            "handshake_p99_ms": p99.to_json(),
            "added_p50_ms": added.to_json(),
            "cpu_ms_per_session": cpu.to_json(),
            "sessions": sessions,
            "errors": errors,
        }
    print("\n".join(lines))
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "summary": summary,
                    "runs": {path: [run.to_json() for run in runs[path]] for path in PATHS},
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
