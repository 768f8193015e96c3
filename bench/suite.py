"""The standard benchmark suite: every load profile through the relay and its baselines.

Run by ``scripts/bench`` (under 10 minutes on a 2-core machine). One rig
(``bench/harness.py``) holds the simulator, the relay, a relay whose upstream is
the simulator over verified ``wss://``, the raw Trio byte splice and nginx as a
plain WebSocket proxy; each scenario drives the same load through each path in
the same run, and the table shows:

- latency p50/p99/p99.9 (stream and flat: append to echo; voice: commit to first
  audio delta; churn and idle: handshake to ``session.created``) and the p99 added
  against the direct path;
- losses, messages/s and MB/s in the measured window;
- the proxy's CPU per message and in percent of a core (user+sys from /proc, all
  its processes) over exactly the measured window, its peak RSS over the row, its
  RSS per idle session, and handshakes/s (churn);
- the load side's own CPU, flagged when it saturated.

Then the concurrency limit: real-time ``stream`` sessions in steps until the p99
added latency exceeds a budget (default 20 ms) or a message is lost; the last step
that held is reported as sessions per core. Results go to ``--out`` as JSON, the
table as text, and PNG plots (latency CDF through each path; p99 and CPU against
sessions) drawn with matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from harness import ECHO_QUERY, REPO, Measured, Rig, measure, rig

from relay.cli import add_progress_option
from relay.loadgen import LoadSpec, ProgressBar

#: Paths in table order; "direct" is the simulator itself, the baseline for added latency.
PATH_ORDER: Final = ("direct", "relay", "relay/tls", "splice", "nginx")
LATENCY_OF: Final = {
    "stream": "rtt",
    "flat": "rtt",
    "voice": "first_delta",
    "churn": "handshake",
    "idle": "handshake",
}
DEFAULT_RAMP: Final = "100,200,300,400,500,600"
DEFAULT_BUDGET_MS: Final = 20.0


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: LoadSpec
    paths: tuple[str, ...]
    query: str = ECHO_QUERY


@dataclass
class Plan:
    scenarios: list[Scenario]
    ramp_steps: list[int]
    ramp_duration_s: float
    ramp_warmup_s: float
    notes: list[str] = field(default_factory=list)


def _spec(
    profile: str, sessions: int, duration_s: float, warmup_s: float, **extra: Any
) -> LoadSpec:
    return LoadSpec(
        profile=profile,  # type: ignore[arg-type]
        url="ws://unset/v1",
        key="unset",
        sessions=sessions,
        duration_s=duration_s,
        warmup_s=warmup_s,
        **extra,
    )


def standard_plan(args: argparse.Namespace) -> Plan:
    every = PATH_ORDER
    scenarios = [
        Scenario("stream", _spec("stream", 50, 10, 2), every),
        Scenario("stream", _spec("stream", 200, 10, 2), every),
        Scenario("voice", _spec("voice", 50, 12, 2), ("direct", "relay", "relay/tls"), query=""),
        Scenario("flat", _spec("flat", 16, 6, 1, window=8), every),
        Scenario("churn", _spec("churn", 16, 6, 1), every),
        Scenario("idle", _spec("idle", 1000, 1, 0), every[1:]),
    ]
    return Plan(
        scenarios,
        [int(step) for step in args.ramp.split(",")] if args.ramp else [],
        ramp_duration_s=8,
        ramp_warmup_s=2,
    )


def tiny_plan(args: argparse.Namespace) -> Plan:
    """Every scenario and the ramp at toy size: CI runs this so the suite cannot rot."""
    del args
    every = PATH_ORDER
    scenarios = [
        Scenario("stream", _spec("stream", 3, 0.5, 0.2), every),
        Scenario(
            "voice",
            _spec("voice", 2, 1.5, 0, speech_ms=200, pause_ms=50),
            ("direct", "relay"),
            query="",
        ),
        Scenario("flat", _spec("flat", 2, 0.5, 0.1, window=4), every),
        Scenario("churn", _spec("churn", 2, 0.5, 0.1), ("direct", "relay", "nginx")),
        Scenario("idle", _spec("idle", 20, 0.2, 0), ("relay", "splice")),
    ]
    return Plan(scenarios, [2, 4], ramp_duration_s=0.5, ramp_warmup_s=0.2)


def estimate_s(plan: Plan) -> float:
    per_run_overhead_s = 1.5
    total = 0.0
    for scenario in plan.scenarios:
        run = scenario.spec.warmup_s + scenario.spec.duration_s + per_run_overhead_s
        total += run * len(scenario.paths)
    total += (
        2 * len(plan.ramp_steps) * (plan.ramp_duration_s + plan.ramp_warmup_s + per_run_overhead_s)
    )
    return total


@dataclass
class Row:
    scenario: str
    measured: Measured
    direct: Measured | None

    @property
    def latency(self) -> dict[str, float]:
        return self.measured.result.latency(LATENCY_OF[self.measured.result.profile])

    @property
    def added_p99_ms(self) -> float:
        if self.direct is None or self.measured.target == "direct":
            return math.nan
        kind = LATENCY_OF[self.measured.result.profile]
        return self.latency["p99"] - self.direct.result.latency(kind)["p99"]

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "path": self.measured.target,
            "latency_kind": LATENCY_OF[self.measured.result.profile],
            "added_p99_ms": None if math.isnan(self.added_p99_ms) else self.added_p99_ms,
            **self.measured.to_json(),
        }


def _fmt(value: float, spec: str, blank: bool = False) -> str:
    if blank or math.isnan(value):
        return "-"
    return format(value, spec)


HEADER: Final = (
    ("scenario", "<14"),
    ("path", "<9"),
    ("msgs/s", ">7"),
    ("MB/s", ">6"),
    ("p50 ms", ">7"),
    ("p99 ms", ">7"),
    ("p99.9", ">7"),
    ("+p99", ">6"),
    ("lost", ">5"),
    ("us/msg", ">7"),
    ("CPU%", ">5"),
    ("peakMiB", ">7"),
    ("KiB/ses", ">7"),
    ("hs/s", ">6"),
    ("load%", ">5"),
)


def format_table(rows: list[Row]) -> list[str]:
    lines = [" ".join(format(name, spec) for name, spec in HEADER)]
    for row in rows:
        m, r = row.measured, row.measured.result
        direct = m.target == "direct"
        idle = r.profile == "idle"
        lat = row.latency
        cells = [
            row.scenario,
            m.target,
            _fmt(r.messages_per_s, ".0f", idle),
            _fmt(r.megabytes_per_s, ".2f", idle or r.profile == "churn"),
            _fmt(lat["p50"], ".2f"),
            _fmt(lat["p99"], ".2f"),
            _fmt(lat["p99.9"], ".2f"),
            _fmt(row.added_p99_ms, "+.2f"),
            str(r.lost),
            _fmt(m.us_per_message, ".1f", direct or idle),
            _fmt(m.cpu_percent, ".0f", direct),
            _fmt(m.peak_rss_kib / 1024, ".1f", direct),
            _fmt(m.kib_per_session, ".1f", not idle),
            _fmt(r.sessions_per_s, ".0f", r.profile != "churn"),
            f"{r.load_cpu_percent:.0f}{'!' if r.load_saturated else ''}",
        ]
        lines.append(
            " ".join(format(cell, spec) for cell, (_, spec) in zip(cells, HEADER, strict=True))
        )
        if r.errors:
            lines.append(f"{'':<14} errors: {r.errors}")
    churned = [
        f"{row.measured.target} "
        f"{row.measured.cpu_s / row.measured.result.sessions_completed * 1e3:.2f}"
        for row in rows
        if row.measured.result.profile == "churn"
        and row.measured.target != "direct"
        and row.measured.result.sessions_completed
    ]
    if churned:
        lines.append("churn: CPU ms per session opened, used and closed: " + ", ".join(churned))
    return lines


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def run_ramp(running: Rig, plan: Plan, *, budget_ms: float, load_procs: int) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    held: int | None = None
    direct, relay = running.targets["direct"], running.targets["relay"]
    for n in plan.ramp_steps:
        spec = _spec("stream", n, plan.ramp_duration_s, plan.ramp_warmup_s)
        base = measure(running, direct, spec, query=ECHO_QUERY, load_procs=load_procs)
        through = measure(running, relay, spec, query=ECHO_QUERY, load_procs=load_procs)
        added = through.result.latency("rtt")["p99"] - base.result.latency("rtt")["p99"]
        ok = added <= budget_ms and through.result.lost == 0 and not through.result.errors
        steps.append(
            {
                "sessions": n,
                "direct_p99_ms": base.result.latency("rtt")["p99"],
                "relay_p99_ms": through.result.latency("rtt")["p99"],
                "added_p99_ms": added,
                "lost": through.result.lost,
                "errors": through.result.errors,
                "relay_cpu_percent": through.cpu_percent,
                "relay_us_per_msg": through.us_per_message,
                "load_cpu_percent": through.result.load_cpu_percent,
                "load_saturated": through.result.load_saturated,
                "held": ok,
            }
        )
        print(
            f"ramp: {n} sessions: +p99 {added:.2f} ms, lost {through.result.lost}, relay "
            f"{through.cpu_percent:.0f}% CPU, {through.us_per_message:.1f} us/msg -> "
            f"{'held' if ok else 'over budget'}",
            flush=True,
        )
        if not ok:
            break
        held = n
    return {"budget_ms": budget_ms, "steps": steps, "sessions_at_budget": held}


def ramp_summary(ramp: dict[str, Any], pinned: bool) -> str:
    held = ramp["sessions_at_budget"]
    budget = ramp["budget_ms"]
    if held is None:
        return f"concurrency limit: no step held within {budget:g} ms p99 added latency"
    cores = "1 (pinned)" if pinned else f"{os.cpu_count()} shared, not pinned"
    per_core = f"{held} sessions per core at budget" if pinned else f"{held} sessions"
    last = ramp["steps"][-1]
    tail = (
        f"; the next step ({last['sessions']}) went over"
        if not last["held"]
        else "; every step held (raise --ramp to find the limit)"
    )
    return (
        f"concurrency limit: {per_core} ({budget:g} ms p99 added latency, no loss; relay "
        f"cores: {cores}){tail}"
    )


def plot(rows: list[Row], ramp: dict[str, Any] | None, out: Path, pinned: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    stream_rows = [row for row in rows if row.measured.result.profile == "stream"]
    if stream_rows:
        largest = max(row.measured.result.sessions_requested for row in stream_rows)
        chosen = [row for row in stream_rows if row.measured.result.sessions_requested == largest]
        figure, (cdf_axes, tail_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
        for row in chosen:
            points = row.measured.result.histogram("rtt").cdf()
            if not points:
                continue
            xs = [x for x, _ in points]
            ys = [y for _, y in points]
            cdf_axes.plot(xs, ys, label=row.measured.target, drawstyle="steps-post")
            tail_axes.plot(
                xs,
                [max(1e-6, 1 - y) for y in ys],
                label=row.measured.target,
                drawstyle="steps-post",
            )
        cdf_axes.set_xscale("log")
        cdf_axes.set_xlabel("round trip, ms (append to echoed delta)")
        cdf_axes.set_ylabel("fraction of messages")
        cdf_axes.set_title(f"Latency CDF, {largest} real-time stream sessions")
        cdf_axes.grid(True, which="both", alpha=0.3)
        cdf_axes.legend()
        tail_axes.set_xscale("log")
        tail_axes.set_yscale("log")
        tail_axes.set_xlabel("round trip, ms")
        tail_axes.set_ylabel("fraction slower (1 - CDF)")
        tail_axes.set_title("Tail")
        tail_axes.grid(True, which="both", alpha=0.3)
        figure.tight_layout()
        path = out / "latency-cdf.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    if ramp and ramp["steps"]:
        steps = ramp["steps"]
        sessions = [step["sessions"] for step in steps]
        figure, axes = plt.subplots(figsize=(7.5, 4.2))
        axes.plot(sessions, [s["relay_p99_ms"] for s in steps], "o-", label="relay p99")
        axes.plot(sessions, [s["direct_p99_ms"] for s in steps], "s--", label="direct p99")
        axes.plot(sessions, [s["added_p99_ms"] for s in steps], "^:", label="added p99")
        axes.axhline(ramp["budget_ms"], color="red", linewidth=0.8, label="budget")
        axes.set_xlabel("real-time stream sessions (50 appends/s each)")
        axes.set_ylabel("ms")
        axes.set_yscale("symlog", linthresh=1.0)
        cpu_axes = axes.twinx()
        cpu_axes.plot(
            sessions,
            [s["relay_cpu_percent"] for s in steps],
            "d-",
            color="gray",
            label="relay CPU %",
        )
        cpu_axes.set_ylabel("relay CPU, % of one core")
        cpu_axes.set_ylim(0, 110)
        handles = axes.get_legend_handles_labels()[0] + cpu_axes.get_legend_handles_labels()[0]
        axes.legend(handles=handles, loc="upper left", fontsize=8)
        axes.set_title(
            "p99 and relay CPU against sessions" + (" (relay pinned to 1 core)" if pinned else "")
        )
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        path = out / "ramp.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None (strict JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pin", action="store_true", help="relay and proxies on CPU 0; load and simulator on CPU 1"
    )
    parser.add_argument(
        "--tiny", action="store_true", help="toy sizes (CI): every scenario, seconds each"
    )
    parser.add_argument(
        "--ramp", default=DEFAULT_RAMP, help="session steps for the concurrency limit ('' to skip)"
    )
    parser.add_argument(
        "--budget-ms", type=float, default=DEFAULT_BUDGET_MS, help="p99 added latency budget"
    )
    parser.add_argument("--load-procs", type=int, default=1, help="load processes per run")
    parser.add_argument(
        "--out",
        default=str(REPO / "bench/results/latest"),
        help="directory for JSON, table and PNGs",
    )
    parser.add_argument("--relay-log-level", default="info")
    add_progress_option(parser)
    args = parser.parse_args()
    plan = tiny_plan(args) if args.tiny else standard_plan(args)
    show_progress = ProgressBar.wanted(args.progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    total_runs = sum(len(s.paths) for s in plan.scenarios)
    pinning = "relay and proxies on CPU 0, load + simulator on CPU 1" if args.pin else "none"
    print(
        f"suite: {len(plan.scenarios)} scenarios, {total_runs} runs, ramp "
        f"{plan.ramp_steps or 'skipped'}; about {estimate_s(plan) / 60:.1f} min; "
        f"pinning: {pinning}",
        flush=True,
    )
    rows: list[Row] = []
    ramp: dict[str, Any] | None = None
    with rig(pinned=args.pin, relay_log_level=args.relay_log_level) as running:
        sim_port = running.start_simulator()
        upstream = running.targets["direct"].url
        running.start_relay("relay", upstream)
        running.start_tls_relay()
        running.start_splice(sim_port)
        if running.start_nginx(sim_port) is None:
            plan.notes.append(
                "nginx is not installed: its rows are missing (scripts/bench installs it)"
            )
        run_number = 0
        for scenario in plan.scenarios:
            label = f"{scenario.name} {scenario.spec.sessions}"
            direct: Measured | None = None
            for path in scenario.paths:
                target = running.targets.get(path)
                if target is None:
                    continue
                run_number += 1
                print(
                    f"[{run_number}/{total_runs}] {label} via {path}", file=sys.stderr, flush=True
                )
                measured = measure(
                    running,
                    target,
                    scenario.spec,
                    query=scenario.query,
                    load_procs=args.load_procs,
                    progress_label=f"  {label} via {path}" if show_progress else None,
                )
                if path == "direct":
                    direct = measured
                rows.append(Row(label, measured, direct))
        if plan.ramp_steps:
            ramp = run_ramp(running, plan, budget_ms=args.budget_ms, load_procs=args.load_procs)
    elapsed = time.time() - started
    host = machine()
    lines = [
        f"machine: {host['cpus']} CPUs ({host['cpu_model'] or 'unknown model'}), Linux "
        f"{host['kernel']}, Python {host['python']}; pinning: {pinning}",
        "latency: stream/flat append to echo; voice commit to first audio delta; churn/idle "
        "handshake to session.created. us/msg, CPU%, peak RSS: the proxy (the row's path), "
        "user+sys from /proc over the measured window. load%: the busiest load process "
        "(! = saturated).",
        *format_table(rows),
    ]
    if ramp is not None:
        lines.append(ramp_summary(ramp, args.pin))
    lines.extend(f"note: {note}" for note in plan.notes)
    lines.append(f"suite time: {elapsed / 60:.1f} min; command: {' '.join(['python', *sys.argv])}")
    text = "\n".join(lines)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    (out / "suite.json").write_text(
        json.dumps(
            json_safe(
                {
                    "machine": machine(),
                    "pinned": args.pin,
                    "command": sys.argv,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "elapsed_s": elapsed,
                    "rows": [row.to_json() for row in rows],
                    "ramp": ramp,
                }
            ),
            indent=1,
            allow_nan=False,
            default=str,
        )
    )
    for written in plot(rows, ramp, out, args.pin):
        print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
