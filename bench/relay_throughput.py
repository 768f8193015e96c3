"""Focused benchmark: real-time ``stream`` sessions through the relay against direct.

The first benchmark, now on the shared rig (``bench/harness.py``): for each N, N
sessions each append 20 ms of PCM16 every 20 ms (50 appends/s) and time the echo,
first straight to the simulator, then through the relay, and optionally through
a relay with a locked token, a relay with a ``wss://`` upstream, the raw Trio
splice and nginx. Relay CPU per relayed message = relay user+sys in the measured
window / (appends up + deltas down in the window) x 1e6. ``--ramp`` finds the
concurrency limit as ``bench/suite.py`` does. The whole suite is ``scripts/bench``.

Usage: ``python bench/relay_throughput.py [--sessions 50,200] [--duration-s 20] [--pin]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any, Final

from harness import ECHO_QUERY, Measured, Target, measure, rig
from suite import Plan, json_safe, ramp_summary, run_ramp

from relay.loadgen import LoadSpec

TARGET_US_PER_MESSAGE: Final = {50: 100.0, 200: 60.0}


def mint_locked_token(relay_url: str, app_key: str) -> str:
    """A relay token whose session config (instructions, voice, tools) is locked."""
    body = json.dumps(
        {
            "expires_after": {"anchor": "created_at", "seconds": 600},
            "session": {
                "type": "realtime",
                "model": "gpt-realtime",
                "instructions": "You are the bench's locked assistant.",
                "audio": {"output": {"voice": "marin"}},
                "tools": [{"type": "function", "name": "noop", "parameters": {"type": "object"}}],
            },
        }
    ).encode()
    base = relay_url.replace("ws://", "http://", 1)
    request = urllib.request.Request(
        f"{base}/realtime/client_secrets",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {app_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token: str = json.loads(response.read())["value"]
    return token


def row(n: int, measured: Measured, direct: Measured) -> dict[str, Any]:
    result = measured.result
    return {
        "n": n,
        "path": measured.target,
        "lost": result.lost,
        "errors": result.errors,
        "msgs_per_s": result.messages_per_s,
        "rtt_ms": result.latency("rtt"),
        "added_p50_ms": result.latency("rtt")["p50"] - direct.result.latency("rtt")["p50"],
        "added_p99_ms": result.latency("rtt")["p99"] - direct.result.latency("rtt")["p99"],
        "relay_us_per_msg": measured.us_per_message,
        "relay_cpu_percent": measured.cpu_percent,
        "relay_peak_rss_mib": measured.peak_rss_kib / 1024,
        "load_cpu_percent": result.load_cpu_percent,
        "load_saturated": result.load_saturated,
    }


def print_table(rows: list[dict[str, Any]], *, pinned: bool) -> None:
    print(f"pinning: {'relay on CPU 0, load + simulator on CPU 1' if pinned else 'none'}")
    print("relay CPU per message = relay user+sys in the window / (appends up + deltas down)")
    print(
        f"{'N':>4} {'path':<9} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} "
        f"{'+p99':>6} {'lost':>5} {'relay us/msg':>12} {'relay CPU%':>10} "
        f"{'load CPU%':>9} {'RSS MiB':>8}"
    )
    for r in rows:
        direct = r["path"] == "direct"
        relay_cols = (
            f"{'':>6} {'':>6} {r['lost']:>5} {'':>12} {'':>10}"
            if direct
            else f"{r['added_p50_ms']:>6.2f} {r['added_p99_ms']:>6.2f} {r['lost']:>5} "
            f"{r['relay_us_per_msg']:>12.1f} {r['relay_cpu_percent']:>10.1f}"
        )
        rss = f"{'':>8}" if direct else f"{r['relay_peak_rss_mib']:>8.1f}"
        print(
            f"{r['n']:>4} {r['path']:<9} {r['msgs_per_s']:>8.0f} {r['rtt_ms']['p50']:>7.2f} "
            f"{r['rtt_ms']['p99']:>7.2f} {relay_cols} {r['load_cpu_percent']:>9.1f} {rss}"
            + (" (load saturated!)" if r["load_saturated"] else "")
        )
        if r["errors"]:
            print(f"     errors: {r['errors']}")
    for r in rows:
        target = TARGET_US_PER_MESSAGE.get(r["n"])
        if r["path"] == "relay" and target is not None:
            verdict = "meets" if r["relay_us_per_msg"] <= target and r["lost"] == 0 else "MISSES"
            print(
                f"N={r['n']}: {r['relay_us_per_msg']:.1f} us/msg, {r['lost']} lost: "
                f"{verdict} the target of <= {target:.0f} us with no losses"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="50,200")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--pin", action="store_true", help="relay on CPU 0; load, simulator CPU 1")
    parser.add_argument("--quick", action="store_true", help="N=5 for 3 s (used by the tests)")
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument("--ramp", help="concurrency limit: session steps, e.g. 50,100,150,200")
    parser.add_argument("--budget-ms", type=float, default=20.0, help="p99 added latency budget")
    parser.add_argument("--load-procs", type=int, default=1, help="load processes per run")
    parser.add_argument("--tls-upstream", action="store_true", help="also a wss:// upstream")
    parser.add_argument("--baselines", action="store_true", help="also the splice and nginx")
    parser.add_argument("--locked", action="store_true", help="also a locked relay token")
    parser.add_argument("--relay-log-level", default="info")
    args = parser.parse_args()
    counts = [5] if args.quick else [int(n) for n in args.sessions.split(",")]
    duration_s = 3.0 if args.quick else args.duration_s
    warmup_s = 1.0 if args.quick else args.warmup_s
    rows: list[dict[str, Any]] = []
    with rig(pinned=args.pin, relay_log_level=args.relay_log_level) as running:
        sim_port = running.start_simulator()
        relay = running.start_relay("relay", running.targets["direct"].url)
        paths = ["direct", "relay"]
        if args.locked:
            token = mint_locked_token(relay.url, running.app_key)
            running.targets["locked"] = Target("locked", relay.url, token, relay.pid)
            paths.append("locked")
        if args.tls_upstream:
            running.start_tls_relay()
            paths.append("relay/tls")
        if args.baselines:
            running.start_splice(sim_port)
            paths.append("splice")
            if running.start_nginx(sim_port) is not None:
                paths.append("nginx")
        if args.ramp:
            plan = Plan([], [int(n) for n in args.ramp.split(",")], duration_s, warmup_s)
            ramp = run_ramp(running, plan, budget_ms=args.budget_ms, load_procs=args.load_procs)
            print(ramp_summary(ramp, args.pin))
            if args.json:
                Path(args.json).write_text(
                    json.dumps(json_safe({"pinned": args.pin, "ramp": ramp}), indent=2)
                )
            return 0
        for n in counts:
            spec = LoadSpec(
                profile="stream",
                url="ws://unset/v1",
                key="unset",
                sessions=n,
                duration_s=duration_s,
                warmup_s=warmup_s,
            )
            direct: Measured | None = None
            for path in paths:
                measured = measure(
                    running,
                    running.targets[path],
                    spec,
                    query=ECHO_QUERY,
                    load_procs=args.load_procs,
                )
                direct = direct or measured
                rows.append(row(n, measured, direct))
    print_table(rows, pinned=args.pin)
    if args.json:
        Path(args.json).write_text(
            json.dumps(json_safe({"pinned": args.pin, "rows": rows}), indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
