"""First benchmark: relay CPU per message and added latency, against direct, in one run.

Starts the simulator (echo mode, ``--fast``) and the relay as separate processes, then
for each N drives N sessions of 20 ms PCM16 appends at real-time rate (50 per second
each) with ``relay.loadgen`` (its own process): first straight to the simulator, then
through the relay. Relay CPU is read from ``/proc/<pid>/stat`` (user + sys) exactly
over the load's measured window; peak RSS is the relay's ``VmHWM``.

With ``--baselines`` the same load also goes through a raw Trio byte splice
(``bench/raw_splice.py``: the floor for any Trio relay) and through nginx as a plain
WebSocket proxy; their rows report the proxy's own CPU in the relay columns.

Relay CPU per relayed message = relay CPU seconds in the window / (appends sent up +
deltas echoed down in the window) x 1e6: each direction's message counts once.

Usage: ``python bench/relay_throughput.py [--sessions 50,200] [--duration-s 20] [--pin]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from relay import appkeys

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
SIM_KEY = "sk-bench-simulator-key"
CLIENT_KEY = "bench-client-key"
STARTUP_TIMEOUT_S = 20.0
TARGET_US_PER_MESSAGE = {50: 100.0, 200: 60.0}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its direct children (nginx's workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the ")": state, ppid, ...; utime and stime are fields 14 and 15 of the line.
        own = stat.parent.name == str(pid)
        if own or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return total


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


def start_tls_pair(
    relay_env: dict[str, str],
    keys_dir: Path,
    load_cpus: set[int] | None,
    relay_cpus: set[int] | None,
) -> tuple[int, list[subprocess.Popen[bytes]]]:
    """A simulator serving wss:// and a second relay dialing it with TLS verified."""
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = keys_dir / "cert.pem", keys_dir / "key.pem", keys_dir / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    sim_port, relay_port = free_port(), free_port()
    env = {
        **relay_env,
        "RELAY_SIMULATE_TLS_CERT_FILE": str(cert),
        "RELAY_SIMULATE_TLS_KEY_FILE": str(key),
    }
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "simulate",
            "--mode",
            "echo",
            "--fast",
            "--port",
            str(sim_port),
            "--api-key",
            SIM_KEY,
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=REPO,
        env={
            **relay_env,
            "RELAY_SERVE_PORT": str(relay_port),
            "RELAY_SERVE_UPSTREAM_URL": f"wss://localhost:{sim_port}/v1",
            "RELAY_SERVE_UPSTREAM_CA_FILE": str(ca_file),
        },
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(sim_port, simulator)
    wait_for_port(relay_port, relay)
    pin(simulator.pid, load_cpus)
    pin(relay.pid, relay_cpus)
    return relay_port, [simulator, relay]


def start_baselines(
    sim_port: int, env: dict[str, str], cpus: set[int] | None
) -> list[tuple[str, int, subprocess.Popen[bytes]]]:
    """The raw Trio splice and (when installed) nginx, both in front of the simulator."""
    started: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    splice_port = free_port()
    splice = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "bench/raw_splice.py"),
            "--port",
            str(splice_port),
            "--upstream-port",
            str(sim_port),
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    started.append(("splice", splice_port, splice))
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if nginx:
        tmp = Path(tempfile.mkdtemp(prefix="relay-bench-nginx-"))
        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(
            NGINX_CONF.format(tmp=tmp, port=nginx_port, upstream=sim_port)
        )
        process = subprocess.Popen(
            [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(("nginx", nginx_port, process))
    for _, port, process in started:
        wait_for_port(port, process)
        pin(process.pid, cpus)
    return started


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(pid, cpus)


def run_load(
    url: str,
    key: str,
    sessions: int,
    duration_s: float,
    warmup_s: float,
    cpus: set[int] | None,
    watched_pid: int | None,
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "relay.loadgen",
        "--url",
        url,
        "--key",
        key,
        "--sessions",
        str(sessions),
        "--duration-s",
        str(duration_s),
        "--warmup-s",
        str(warmup_s),
        "--announce",
    ]
    load = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO)
    pin(load.pid, cpus)
    assert load.stdout is not None
    cpu_start = cpu_end = 0.0
    window_start = window_end = 0.0
    result: dict[str, Any] = {}
    for raw in load.stdout:
        line = raw.decode().strip()
        if line == "MEASURE_START":
            window_start = time.monotonic()
            cpu_start = cpu_seconds(watched_pid) if watched_pid else 0.0
        elif line == "MEASURE_END":
            window_end = time.monotonic()
            cpu_end = cpu_seconds(watched_pid) if watched_pid else 0.0
        elif line.startswith("{"):
            result = json.loads(line)
    load.wait(timeout=60)
    result["watched_cpu_s"] = cpu_end - cpu_start
    result["watched_window_s"] = window_end - window_start
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="50,200")
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument(
        "--pin", action="store_true", help="relay on CPU 0; load and simulator on CPU 1"
    )
    parser.add_argument("--quick", action="store_true", help="N=5 for 3 s (used by the tests)")
    parser.add_argument("--json", help="write all results to this file")
    parser.add_argument(
        "--ramp",
        help="concurrency limit: comma-separated session steps (e.g. 25,50,100,150,200,300); "
        "stops at the first step whose p99 added latency exceeds --budget-ms or loses a message",
    )
    parser.add_argument(
        "--budget-ms",
        type=float,
        default=20.0,
        help="p99 added latency budget for --ramp (default one 20 ms audio frame)",
    )
    parser.add_argument(
        "--tls-upstream",
        action="store_true",
        help="also run each N through a relay whose upstream is the simulator over wss:// "
        "(a throwaway certificate, verified against its own CA)",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="also run each N through a raw Trio byte splice and through nginx",
    )
    parser.add_argument(
        "--relay-log-level",
        default="info",
        help="relay log level (info: one JSON line per session and per refused handshake)",
    )
    parser.add_argument(
        "--locked",
        action="store_true",
        help="also run each N with a relay token carrying a locked session config",
    )
    args = parser.parse_args()
    counts = [5] if args.quick else [int(n) for n in args.sessions.split(",")]
    duration_s = 3.0 if args.quick else args.duration_s
    warmup_s = 1.0 if args.quick else args.warmup_s
    relay_cpus = {0} if args.pin else None
    load_cpus = {1} if args.pin else None

    sim_port, relay_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    keys_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    app_keys_file, signing_keys_file = keys_dir / "app-keys.json", keys_dir / "signing.json"
    app_key = appkeys.create_app_key(app_keys_file, "bench")
    appkeys.rotate_signing_key(signing_keys_file, time.time())
    simulator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "simulate",
            "--mode",
            "echo",
            "--fast",
            "--port",
            str(sim_port),
            "--api-key",
            SIM_KEY,
        ],
        cwd=REPO,
        env=env,
        stderr=subprocess.DEVNULL,
    )
    relay_env = {
        **env,
        "RELAY_SERVE_PORT": str(relay_port),
        "RELAY_SERVE_UPSTREAM_URL": f"ws://127.0.0.1:{sim_port}/v1",
        "RELAY_SERVE_UPSTREAM_API_KEY": SIM_KEY,
        "RELAY_SERVE_CLIENT_KEYS": CLIENT_KEY,
        "RELAY_SERVE_MAX_SESSIONS": "10000",
        "RELAY_SERVE_LOG_LEVEL": args.relay_log_level,
        "RELAY_SERVE_APP_KEYS_FILE": str(app_keys_file),
        "RELAY_SERVE_SIGNING_KEYS_FILE": str(signing_keys_file),
    }
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=REPO,
        env=relay_env,
        stderr=subprocess.DEVNULL,
    )
    rows: list[dict[str, Any]] = []
    baselines: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    helpers: list[subprocess.Popen[bytes]] = []
    try:
        wait_for_port(sim_port, simulator)
        wait_for_port(relay_port, relay)
        pin(simulator.pid, load_cpus)
        pin(relay.pid, relay_cpus)
        if args.baselines:
            baselines = start_baselines(sim_port, env, relay_cpus)
        if args.tls_upstream:
            tls_relay_port, extra = start_tls_pair(relay_env, keys_dir, load_cpus, relay_cpus)
            baselines.append(("relay/tls", tls_relay_port, extra[-1]))
            helpers.extend(extra)
        if args.ramp:
            ramp = run_ramp(args, sim_port, relay_port, relay.pid, load_cpus, duration_s, warmup_s)
            print_ramp(ramp, pinned=args.pin, budget_ms=args.budget_ms)
            if args.json:
                Path(args.json).write_text(json.dumps({"pinned": args.pin, "ramp": ramp}, indent=2))
            return 0
        for n in counts:
            direct = run_load(
                f"ws://127.0.0.1:{sim_port}/v1",
                SIM_KEY,
                n,
                duration_s,
                warmup_s,
                load_cpus,
                simulator.pid,
            )
            through = run_load(
                f"ws://127.0.0.1:{relay_port}/v1",
                CLIENT_KEY,
                n,
                duration_s,
                warmup_s,
                load_cpus,
                relay.pid,
            )
            rows.append({"n": n, "path": "direct", **direct})
            rows.append(relay_row(n, "relay", through, direct, relay.pid))
            if args.locked:
                token = mint_locked_token(relay_port, app_key)
                locked = run_load(
                    f"ws://127.0.0.1:{relay_port}/v1",
                    token,
                    n,
                    duration_s,
                    warmup_s,
                    load_cpus,
                    relay.pid,
                )
                rows.append(relay_row(n, "locked", locked, direct, relay.pid))
            for name, port, process in baselines:
                measured = run_load(
                    f"ws://127.0.0.1:{port}/v1",
                    CLIENT_KEY if name == "relay/tls" else SIM_KEY,
                    n,
                    duration_s,
                    warmup_s,
                    load_cpus,
                    process.pid,
                )
                rows.append(relay_row(n, name, measured, direct, process.pid))
    finally:
        processes = [relay, simulator, *(process for _, _, process in baselines), *helpers]
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    print_table(rows, pinned=args.pin)
    if args.json:
        Path(args.json).write_text(json.dumps({"pinned": args.pin, "rows": rows}, indent=2))
    return 0


def run_ramp(
    args: argparse.Namespace,
    sim_port: int,
    relay_port: int,
    relay_pid: int,
    load_cpus: set[int] | None,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """Real-time stream sessions in steps until p99 added latency exceeds the budget."""
    steps: list[dict[str, Any]] = []
    held: int | None = None
    for n in [int(step) for step in args.ramp.split(",")]:
        direct = run_load(
            f"ws://127.0.0.1:{sim_port}/v1", SIM_KEY, n, duration_s, warmup_s, load_cpus, None
        )
        through = run_load(
            f"ws://127.0.0.1:{relay_port}/v1",
            CLIENT_KEY,
            n,
            duration_s,
            warmup_s,
            load_cpus,
            relay_pid,
        )
        row = relay_row(n, "relay", through, direct, relay_pid)
        ok = row["added_p99_ms"] <= args.budget_ms and row["lost"] == 0 and through["errors"] == {}
        steps.append({**row, "direct_p99_ms": direct["rtt_ms"]["p99"], "held": ok})
        print(
            f"ramp: {n} sessions: +p99 {row['added_p99_ms']:.2f} ms, lost {row['lost']}, "
            f"relay {row['relay_cpu_percent']:.0f}% CPU, {row['relay_us_per_msg']:.1f} us/msg"
            f" -> {'held' if ok else 'over budget'}",
            flush=True,
        )
        if not ok:
            break
        held = n
    return {"budget_ms": args.budget_ms, "steps": steps, "sessions_at_budget": held}


def print_ramp(ramp: dict[str, Any], *, pinned: bool, budget_ms: float) -> None:
    held = ramp["sessions_at_budget"]
    cores = "1 core (pinned)" if pinned else f"{os.cpu_count()} shared cores (not pinned)"
    if held is None:
        print(f"concurrency limit: no step held within {budget_ms:.0f} ms p99 added latency")
    else:
        print(
            f"concurrency limit: {held} real-time sessions held within {budget_ms:.0f} ms p99 "
            f"added latency and no loss, relay on {cores}"
        )
    last = ramp["steps"][-1]
    if not last["held"] and last["relay_cpu_percent"] < 90:
        print(
            f"note: at {last['n']} sessions the relay used {last['relay_cpu_percent']:.0f}% of "
            f"its core; the load side ({last['load_cpu_percent']:.0f}% CPU) or the shared "
            "machine may be the limit, not the relay"
        )


def relay_row(
    n: int, path: str, through: dict[str, Any], direct: dict[str, Any], pid: int
) -> dict[str, Any]:
    messages = through["window_sent"] + through["window_received"]
    relay_cpu = through["watched_cpu_s"]
    return {
        "n": n,
        "path": path,
        **through,
        "relay_cpu_s": relay_cpu,
        "relay_us_per_msg": relay_cpu / messages * 1e6 if messages else float("nan"),
        "relay_cpu_percent": 100 * relay_cpu / through["watched_window_s"],
        "relay_peak_rss_mib": peak_rss_mib(pid),
        "added_p50_ms": through["rtt_ms"]["p50"] - direct["rtt_ms"]["p50"],
        "added_p99_ms": through["rtt_ms"]["p99"] - direct["rtt_ms"]["p99"],
    }


def mint_locked_token(relay_port: int, app_key: str) -> str:
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
    request = urllib.request.Request(
        f"http://127.0.0.1:{relay_port}/v1/realtime/client_secrets",
        data=body,
        method="POST",
        headers={"Authorization": f"Bearer {app_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        token: str = json.loads(response.read())["value"]
    return token


def print_table(rows: list[dict[str, Any]], *, pinned: bool) -> None:
    print(
        f"machine: {os.cpu_count()} CPUs; pinning: "
        f"{'relay on CPU 0, load + simulator on CPU 1' if pinned else 'none'}"
    )
    print("relay CPU per message = relay user+sys in the window / (appends up + deltas down)")
    header = (
        f"{'N':>4} {'path':<9} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} "
        f"{'+p99':>6} {'lost':>5} {'relay us/msg':>12} {'relay CPU%':>10} "
        f"{'load CPU%':>9} {'RSS MiB':>8}"
    )
    print(header)
    for row in rows:
        rate = (row["window_sent"] + row["window_received"]) / max(row["window_s"], 1e-9)
        relay_cols = (
            f"{row['added_p50_ms']:>6.2f} {row['added_p99_ms']:>6.2f} {row['lost']:>5} "
            f"{row['relay_us_per_msg']:>12.1f} {row['relay_cpu_percent']:>10.1f}"
            if row["path"] != "direct"
            else f"{'':>6} {'':>6} {row['lost']:>5} {'':>12} {'':>10}"
        )
        rss = f"{row['relay_peak_rss_mib']:>8.1f}" if row["path"] != "direct" else f"{'':>8}"
        saturated = " (load saturated!)" if row["load_saturated"] else ""
        print(
            f"{row['n']:>4} {row['path']:<9} {rate:>8.0f} {row['rtt_ms']['p50']:>7.2f} "
            f"{row['rtt_ms']['p99']:>7.2f} {relay_cols} {row['load_cpu_percent']:>9.1f} "
            f"{rss}{saturated}"
        )
        if row["errors"]:
            print(f"     errors: {row['errors']}")
    for row in rows:
        target = TARGET_US_PER_MESSAGE.get(row["n"])
        if row["path"] == "relay" and target is not None:
            verdict = (
                "meets" if row["relay_us_per_msg"] <= target and row["lost"] == 0 else "MISSES"
            )
            print(
                f"N={row['n']}: {row['relay_us_per_msg']:.1f} us/msg, {row['lost']} lost: "
                f"{verdict} the target of <= {target:.0f} us with no losses"
            )


if __name__ == "__main__":
    raise SystemExit(main())
