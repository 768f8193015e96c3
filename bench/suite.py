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

Then the binary audio path against JSON (``relay.audio.v1``): ``stream`` sessions at
``--audio-sessions``, JSON and ``binary``, direct (the simulator speaks the binary
contract itself) and through the relay, all four interleaved in each round: the
relay's CPU per message and the client leg's bytes per second of audio, binary ÷ JSON
paired within the round, against issue 13's targets (bytes at most
:data:`AUDIO_BYTES_SHARE_TARGET` of JSON's, CPU at most :data:`AUDIO_CPU_RATIO_TARGET`
times). ``bench/stranger.py`` runs the same comparison with the Node client.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
from harness import ECHO_QUERY, REPO, Measured, Rig, Spread, measure, rig, rotated

from relay.cli import add_progress_option
from relay.loadgen import LatencyHistogram, LoadSpec, ProgressBar

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
DEFAULT_AUDIO_SESSIONS: Final = "50,200"
#: The binary-vs-JSON comparison's runs, (path, binary), in a round's order before rotation.
AUDIO_COMBINATIONS: Final = (("direct", False), ("direct", True), ("relay", False), ("relay", True))
#: Issue 13's targets for the binary path, relay, binary ÷ JSON: client-leg bytes per
#: second of audio at most this share, relay CPU per message at most this multiple.
AUDIO_BYTES_SHARE_TARGET: Final = 0.76
AUDIO_CPU_RATIO_TARGET: Final = 1.3


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
    #: Interleaved repetitions: each round runs every path once (rotated order) and the
    #: table shows the median over the rounds with its min-max spread.
    rounds: int = 1
    #: The binary-vs-JSON comparison: stream session counts (empty: skipped), window, warm-up.
    audio_sessions: list[int] = field(default_factory=list)
    audio_duration_s: float = 0.0
    audio_warmup_s: float = 0.0


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
    """Each scenario in ``--rounds`` short interleaved runs (3 by default, about as long
    in all as one long run each)."""
    every = PATH_ORDER
    rounds = max(1, args.rounds or 3)
    share = 3 / rounds
    scenarios = [
        # Idle first, on fresh processes: after the other scenarios a process reuses
        # the memory their sessions freed, and an idle session would look free.
        Scenario("idle", _spec("idle", 1000, 1, 0), every[1:]),
        Scenario("stream", _spec("stream", 50, 4 * share, 1), every),
        Scenario("stream", _spec("stream", 200, 4 * share, 1), every),
        Scenario(
            "voice", _spec("voice", 50, 6 * share, 1), ("direct", "relay", "relay/tls"), query=""
        ),
        Scenario("flat", _spec("flat", 16, 2 * share, 0.5, window=8), every),
        Scenario("churn", _spec("churn", 16, 2 * share, 0.5), every),
    ]
    return Plan(
        scenarios,
        _steps(args.ramp),
        ramp_duration_s=4 * share,
        ramp_warmup_s=1,
        rounds=rounds,
        audio_sessions=_steps(args.audio_sessions),
        audio_duration_s=4 * share,
        audio_warmup_s=1,
    )


def tiny_plan(args: argparse.Namespace) -> Plan:
    """Every scenario and the ramp at toy size: CI runs this so the suite cannot rot."""
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
    return Plan(
        scenarios,
        [2, 4],
        ramp_duration_s=0.5,
        ramp_warmup_s=0.2,
        rounds=args.rounds or 1,
        audio_sessions=[3],
        audio_duration_s=0.5,
        audio_warmup_s=0.2,
    )


def _steps(text: str) -> list[int]:
    return [int(step) for step in text.split(",")] if text else []


def estimate_s(plan: Plan) -> float:
    per_run_overhead_s = 1.5
    total = 0.0
    for scenario in plan.scenarios:
        run = scenario.spec.warmup_s + scenario.spec.duration_s + per_run_overhead_s
        total += run * len(scenario.paths)
    total += (
        2 * len(plan.ramp_steps) * (plan.ramp_duration_s + plan.ramp_warmup_s + per_run_overhead_s)
    )
    total += (
        len(AUDIO_COMBINATIONS)
        * len(plan.audio_sessions)
        * (plan.audio_duration_s + plan.audio_warmup_s + per_run_overhead_s)
    )
    return total * plan.rounds


@dataclass
class Row:
    """One path in one scenario: a run per round, each with the direct run of its round."""

    scenario: str
    runs: list[Measured]
    directs: list[Measured | None]

    @property
    def measured(self) -> Measured:
        """The first round's run: the row's path, profile and sizes."""
        return self.runs[0]

    @property
    def kind(self) -> str:
        return LATENCY_OF[self.measured.result.profile]

    def spread(self, figure: Callable[[Measured], float]) -> Spread:
        return Spread.of(figure(run) for run in self.runs)

    def latency(self, quantile: str) -> Spread:
        return self.spread(lambda run: run.result.latency(self.kind)[quantile])

    @property
    def added_p99_ms(self) -> Spread:
        """p99 against the direct run of the same round (nothing for direct itself)."""
        if self.measured.target == "direct":
            return Spread.of([])
        return Spread.of(
            run.result.latency(self.kind)["p99"] - direct.result.latency(self.kind)["p99"]
            for run, direct in zip(self.runs, self.directs, strict=True)
            if direct is not None
        )

    @property
    def lost(self) -> int:
        return sum(run.result.lost for run in self.runs)

    @property
    def errors(self) -> dict[str, int]:
        merged: dict[str, int] = {}
        for run in self.runs:
            for kind, count in run.result.errors.items():
                merged[kind] = merged.get(kind, 0) + count
        return merged

    def to_json(self) -> dict[str, Any]:
        """The first round's run as before (``result``...), with every round and spreads."""
        first = self.measured.to_json()
        first["result"] = {**first["result"], "lost": self.lost, "errors": self.errors}
        return {
            "scenario": self.scenario,
            "path": self.measured.target,
            "latency_kind": self.kind,
            "added_p99_ms": self.added_p99_ms.to_json(),
            "spread": {
                "p50_ms": self.latency("p50").to_json(),
                "p99_ms": self.latency("p99").to_json(),
                "p99.9_ms": self.latency("p99.9").to_json(),
                "us_per_msg": self.spread(lambda run: run.us_per_message).to_json(),
                "cpu_percent": self.spread(lambda run: run.cpu_percent).to_json(),
                "messages_per_s": self.spread(lambda run: run.result.messages_per_s).to_json(),
            },
            "rounds": [run.to_json() for run in self.runs],
            **first,
        }


def _cell(spread: Spread, spec: str, blank: bool = False) -> str:
    return "-" if blank or spread.n == 0 else spread.show(spec)


HEADER: Final = (
    "scenario",
    "path",
    "msgs/s",
    "MB/s",
    "p50 ms",
    "p99 ms",
    "p99.9",
    "+p99",
    "lost",
    "us/msg",
    "CPU%",
    "peakMiB",
    "KiB/ses",
    "hs/s",
    "load%",
)


def format_table(rows: list[Row]) -> list[str]:
    """One line per path and scenario: medians over the rounds, ``(min–max)`` beside them."""
    table: list[list[str]] = [list(HEADER)]
    extra: dict[int, str] = {}
    for row in rows:
        m, r = row.measured, row.measured.result
        direct = m.target == "direct"
        idle = r.profile == "idle"
        saturated = any(run.result.load_saturated for run in row.runs)
        table.append(
            [
                row.scenario,
                m.target,
                _cell(row.spread(lambda run: run.result.messages_per_s), ".0f", idle),
                _cell(
                    row.spread(lambda run: run.result.megabytes_per_s),
                    ".2f",
                    idle or r.profile == "churn",
                ),
                _cell(row.latency("p50"), ".2f"),
                _cell(row.latency("p99"), ".2f"),
                _cell(row.latency("p99.9"), ".2f"),
                _cell(row.added_p99_ms, "+.2f"),
                str(row.lost),
                _cell(row.spread(lambda run: run.us_per_message), ".1f", direct or idle),
                _cell(row.spread(lambda run: run.cpu_percent), ".0f", direct),
                _cell(row.spread(lambda run: run.peak_rss_kib / 1024), ".1f", direct),
                # The first round only: later ones reuse what the first freed.
                _cell(Spread.of([row.runs[0].kib_per_session]), ".1f", not idle),
                _cell(
                    row.spread(lambda run: run.result.sessions_per_s),
                    ".0f",
                    r.profile != "churn",
                ),
                _cell(row.spread(lambda run: run.result.load_cpu_percent), ".0f")
                + ("!" if saturated else ""),
            ]
        )
        if row.errors:
            extra[len(table) - 1] = f"errors: {row.errors}"
    widths = [max(len(line[column]) for line in table) for column in range(len(HEADER))]
    lines: list[str] = []
    for number, cells in enumerate(table):
        lines.append(
            " ".join(
                cell.ljust(width) if column < 2 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
        )
        if number in extra:
            lines.append(f"{'':<{widths[0]}} {extra[number]}")
    churned = [
        f"{row.measured.target} "
        + row.spread(
            lambda run: (
                run.cpu_s / run.result.sessions_completed * 1e3
                if run.result.sessions_completed
                else math.nan
            )
        ).show(".2f")
        for row in rows
        if row.measured.result.profile == "churn" and row.measured.target != "direct"
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
    """Stream sessions in steps through the relay, direct in the same step; with rounds,
    both run once per round (rotated order) and the step's figures are medians."""
    steps: list[dict[str, Any]] = []
    held: int | None = None
    direct, relay = running.targets["direct"], running.targets["relay"]
    for n in plan.ramp_steps:
        spec = _spec("stream", n, plan.ramp_duration_s, plan.ramp_warmup_s)
        pairs: list[tuple[Measured, Measured]] = []
        for round_number in range(max(1, plan.rounds)):
            got = {
                target.name: measure(running, target, spec, query=ECHO_QUERY, load_procs=load_procs)
                for target in ((direct, relay) if round_number % 2 == 0 else (relay, direct))
            }
            pairs.append((got["direct"], got["relay"]))

        def of(
            figure: Callable[[Measured, Measured], float],
            pairs: list[tuple[Measured, Measured]] = pairs,
        ) -> Spread:
            return Spread.of(figure(base, through) for base, through in pairs)

        base_p99 = of(lambda base, _: base.result.latency("rtt")["p99"])
        relay_p99 = of(lambda _, through: through.result.latency("rtt")["p99"])
        added = of(
            lambda base, through: (
                through.result.latency("rtt")["p99"] - base.result.latency("rtt")["p99"]
            )
        )
        cpu = of(lambda _, through: through.cpu_percent)
        us = of(lambda _, through: through.us_per_message)
        lost = sum(through.result.lost for _, through in pairs)
        errors: dict[str, int] = {}
        for _, through in pairs:
            for kind, count in through.result.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        load_saturated = any(through.result.load_saturated for _, through in pairs)
        rig_saturated = base_p99.median > budget_ms or load_saturated
        ok = not rig_saturated and added.median <= budget_ms and lost == 0 and not errors
        steps.append(
            {
                "sessions": n,
                "direct_p99_ms": base_p99.median,
                "relay_p99_ms": relay_p99.median,
                "added_p99_ms": added.median,
                "lost": lost,
                "errors": errors,
                "relay_cpu_percent": cpu.median,
                "relay_us_per_msg": us.median,
                "load_cpu_percent": of(lambda _, through: through.result.load_cpu_percent).median,
                "load_saturated": load_saturated,
                # Direct alone is over budget (or the load side is flat out): the step
                # measures the rig, not the relay, and the ramp stops there.
                "rig_saturated": rig_saturated,
                "held": ok,
                "spread": {
                    "direct_p99_ms": base_p99.to_json(),
                    "relay_p99_ms": relay_p99.to_json(),
                    "added_p99_ms": added.to_json(),
                    "relay_cpu_percent": cpu.to_json(),
                    "relay_us_per_msg": us.to_json(),
                },
            }
        )
        print(
            f"ramp: {n} sessions: relay p99 {relay_p99.show('.2f')} ms, +p99 "
            f"{added.show('+.2f')} ms, lost {lost}, relay {cpu.show('.0f')}% CPU, "
            f"{us.show('.1f')} us/msg -> "
            f"{'rig saturated' if rig_saturated else 'held' if ok else 'over budget'}",
            flush=True,
        )
        if not ok:
            break
        held = n
    return {"budget_ms": budget_ms, "steps": steps, "sessions_at_budget": held}


def _audio_bytes(measured: Measured) -> float:
    value = measured.result.client_bytes_per_audio_s
    return value if value > 0 else math.nan


def _summed_errors(runs: list[Measured]) -> dict[str, int]:
    summed: dict[str, int] = {}
    for run in runs:
        for kind, count in run.result.errors.items():
            summed[kind] = summed.get(kind, 0) + count
    return summed


def run_audio(running: Rig, plan: Plan, *, load_procs: int) -> list[dict[str, Any]]:
    """The binary-vs-JSON comparison: ``stream`` sessions JSON and ``binary``, direct and
    through the relay, all four once per round (rotated); ratios paired per round."""
    scenarios: list[dict[str, Any]] = []
    for sessions in plan.audio_sessions:
        spec = _spec("stream", sessions, plan.audio_duration_s, plan.audio_warmup_s)
        got: dict[tuple[str, bool], list[Measured]] = {key: [] for key in AUDIO_COMBINATIONS}
        for round_number in range(plan.rounds):
            for path, binary in rotated(list(AUDIO_COMBINATIONS), round_number):
                print(
                    f"audio {sessions} via {path}, {'binary' if binary else 'JSON'}"
                    + (f" (round {round_number + 1})" if plan.rounds > 1 else ""),
                    file=sys.stderr,
                    flush=True,
                )
                got[(path, binary)].append(
                    measure(
                        running,
                        running.targets[path],
                        msgspec.structs.replace(spec, binary=binary),
                        query=ECHO_QUERY,
                        load_procs=load_procs,
                    )
                )
        rows: list[dict[str, Any]] = []
        for (path, binary), runs in got.items():
            json_runs = got[(path, False)]

            def ratio(
                figure: Callable[[Measured], float],
                runs: list[Measured] = runs,
                json_runs: list[Measured] = json_runs,
            ) -> Spread:
                # A short run can read no CPU tick for the JSON path (/proc counts in
                # 10 ms ticks): that pair has no ratio, not a ZeroDivisionError.
                return Spread.of(
                    figure(mine) / figure(theirs) if figure(theirs) else math.nan
                    for mine, theirs in zip(runs, json_runs, strict=True)
                )

            rows.append(
                {
                    "path": path,
                    "encoding": "binary" if binary else "json",
                    "us_per_msg": Spread.of(run.us_per_message for run in runs),
                    "us_per_msg_x_json": ratio(lambda run: run.us_per_message),
                    "client_bytes_per_audio_s": Spread.of(_audio_bytes(run) for run in runs),
                    "client_bytes_x_json": ratio(_audio_bytes),
                    "p50_ms": Spread.of(run.result.latency("rtt")["p50"] for run in runs),
                    "p99_ms": Spread.of(run.result.latency("rtt")["p99"] for run in runs),
                    "lost": sum(run.result.lost for run in runs),
                    "errors": _summed_errors(runs),
                    "load_saturated": any(run.result.load_saturated for run in runs),
                    "rounds": [run.to_json() for run in runs],
                }
            )
        relay = next(row for row in rows if row["path"] == "relay" and row["encoding"] == "binary")
        scenarios.append(
            {
                "sessions": sessions,
                "rows": rows,
                "client_bytes_met": relay["client_bytes_x_json"].median <= AUDIO_BYTES_SHARE_TARGET,
                "us_per_msg_met": relay["us_per_msg_x_json"].median <= AUDIO_CPU_RATIO_TARGET,
            }
        )
    return scenarios


def audio_lines(scenarios: list[dict[str, Any]]) -> list[str]:
    """The comparison as text: one line per (path, encoding), then the targets."""
    lines: list[str] = []
    header = ["path", "client", "us/msg", "x JSON", "bytes/s of audio", "x JSON", "p50 ms"]
    header += ["p99 ms", "lost", "load%"]
    for scenario in scenarios:
        lines.append(
            f"binary audio path against JSON, stream {scenario['sessions']} (relay.audio.v1; "
            "bytes: client sockets, both ways, per second of audio sent; x JSON paired per "
            "round):"
        )
        table = [header]
        for row in scenario["rows"]:
            direct = row["path"] == "direct"
            table.append(
                [
                    row["path"],
                    row["encoding"],
                    _cell(row["us_per_msg"], ".1f", direct),
                    _cell(row["us_per_msg_x_json"], ".2f", direct),
                    _cell(row["client_bytes_per_audio_s"], ",.0f"),
                    _cell(row["client_bytes_x_json"], ".2f"),
                    _cell(row["p50_ms"], ".2f"),
                    _cell(row["p99_ms"], ".2f"),
                    str(row["lost"]) + (f" {row['errors']}" if row["errors"] else ""),
                    "saturated!" if row["load_saturated"] else "ok",
                ]
            )
        widths = [max(len(cells[column]) for cells in table) for column in range(len(header))]
        lines.extend(
            "  "
            + " ".join(
                cell.ljust(width) if column < 2 else cell.rjust(width)
                for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()
            for cells in table
        )
        relay = next(
            r for r in scenario["rows"] if r["path"] == "relay" and r["encoding"] == "binary"
        )
        lines.append(
            f"  targets (issue 13), relay binary / JSON: client bytes "
            f"{relay['client_bytes_x_json'].median:.2f} (<= {AUDIO_BYTES_SHARE_TARGET:.2f}: "
            f"{'met' if scenario['client_bytes_met'] else 'MISSED'}), CPU per message "
            f"{relay['us_per_msg_x_json'].median:.2f}x (<= {AUDIO_CPU_RATIO_TARGET:.1f}x: "
            f"{'met' if scenario['us_per_msg_met'] else 'MISSED'})"
        )
    return lines


def audio_json(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            **scenario,
            "rows": [
                {k: v.to_json() if isinstance(v, Spread) else v for k, v in row.items()}
                for row in scenario["rows"]
            ],
        }
        for scenario in scenarios
    ]


def ramp_summary(ramp: dict[str, Any], pinned: bool) -> str:
    held = ramp["sessions_at_budget"]
    budget = ramp["budget_ms"]
    if held is None:
        return f"concurrency limit: no step held within {budget:g} ms p99 added latency"
    cores = "1 (pinned)" if pinned else f"{os.cpu_count()} shared, not pinned"
    per_core = f"{held} sessions per core at budget" if pinned else f"{held} sessions"
    last = ramp["steps"][-1]
    if last.get("rig_saturated"):
        tail = (
            f"; at {last['sessions']} the rig saturated (direct p99 "
            f"{last['direct_p99_ms']:.1f} ms): that step measures the rig, not the relay"
        )
    elif not last["held"]:
        tail = f"; the next step ({last['sessions']}) went over"
    else:
        tail = "; every step held (raise --ramp to find the limit)"
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
            merged = LatencyHistogram()
            for run in row.runs:
                merged.merge(run.result.histogram("rtt"))
            points = merged.cdf()
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
        # Added p99 is a difference of two noisy tails and can come out below zero; the
        # axis starts at 0 (a relay adds no negative time), such points sit on it, hollow.
        added = [s["added_p99_ms"] for s in steps]
        axes.plot(sessions, [max(0.0, a) for a in added], "^:", label="added p99 (≥ 0)")
        below = [(x, 0.0) for x, a in zip(sessions, added, strict=True) if a < 0]
        if below:
            axes.plot(
                [x for x, _ in below],
                [y for _, y in below],
                "^",
                markerfacecolor="none",
                color="gray",
                label="added p99 < 0 (noise)",
            )
        axes.axhline(ramp["budget_ms"], color="red", linewidth=0.8, label="budget")
        axes.set_xlabel("real-time stream sessions (50 appends/s each)")
        axes.set_ylabel("ms")
        axes.set_yscale("symlog", linthresh=1.0)
        axes.set_ylim(bottom=0)
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
        "--audio-sessions",
        default=DEFAULT_AUDIO_SESSIONS,
        help="binary-vs-JSON comparison: stream session counts ('' to skip)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved repetitions per scenario (default 3; --tiny: 1); median + spread",
    )
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
    total_runs = plan.rounds * sum(len(s.paths) for s in plan.scenarios)
    pinning = "relay and proxies on CPU 0, load + simulator on CPU 1" if args.pin else "none"
    print(
        f"suite: {len(plan.scenarios)} scenarios, {total_runs} runs, ramp "
        f"{plan.ramp_steps or 'skipped'}, {plan.rounds} interleaved round(s); "
        f"about {estimate_s(plan) / 60:.1f} min; "
        f"pinning: {pinning}",
        flush=True,
    )
    rows: list[Row] = []
    ramp: dict[str, Any] | None = None
    audio: list[dict[str, Any]] = []
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
            paths = [path for path in scenario.paths if path in running.targets]
            by_path: dict[str, list[Measured]] = {path: [] for path in paths}
            directs: list[Measured | None] = []
            for round_number in range(plan.rounds):
                direct: Measured | None = None
                for path in rotated(paths, round_number):
                    run_number += 1
                    print(
                        f"[{run_number}/{total_runs}] {label} via {path}"
                        + (f" (round {round_number + 1})" if plan.rounds > 1 else ""),
                        file=sys.stderr,
                        flush=True,
                    )
                    measured = measure(
                        running,
                        running.targets[path],
                        scenario.spec,
                        query=scenario.query,
                        load_procs=args.load_procs,
                        progress_label=f"  {label} via {path}" if show_progress else None,
                    )
                    by_path[path].append(measured)
                    if path == "direct":
                        direct = measured
                directs.append(direct)
            rows.extend(Row(label, by_path[path], directs) for path in paths)
        if plan.audio_sessions:
            audio = run_audio(running, plan, load_procs=args.load_procs)
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
        "(! = saturated). With rounds: median over the rounds (min–max); +p99 paired with "
        "direct within each round.",
        *format_table(rows),
        *audio_lines(audio),
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
                    "audio": audio_json(audio),
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
