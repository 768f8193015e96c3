"""Measure like a stranger would: the relay and its alternatives under a load tool not ours.

Every figure of ``bench/suite.py`` comes from our own load tool (``relay.loadgen``),
which could share a blind spot with the relay it measures. This benchmark drives the
same kind of load with a client written on Node's ``ws`` package
(``bench/node/loadgen.mjs``: a fresh random mask on every frame, as a browser does)
against a Node ``ws`` echo upstream standing in for OpenAI
(``bench/node/echo_upstream.mjs``), through each path:

- ``direct``: the load straight to the echo upstream (the baseline for added latency);
- ``splice``: the raw Trio byte splice (``bench/raw_splice.py``), the Trio floor;
- ``relay``: our relay (``python -m relay serve``); ``relay/tls``: the same to a TLS
  echo upstream (``wss://``, a throwaway CA from trustme);
- ``nginx``: nginx as a plain WebSocket proxy;
- ``websockets+uvloop`` (``bench/websockets_relay.py``) and ``node-ws``
  (``bench/node/ws_relay.mjs``): the ~50-line relays a user would write instead, each
  parsing every message as JSON and forwarding the original.

The proxy under test runs on CPU 0, the load and the echo upstream on CPU 1 (``--pin``).
Scenarios: ``stream`` at 50 and 200 sessions (50 appends/s each, 1.36 KB), ``churn``
(CPU per session opened, used for 5 echoed appends and closed) and ``idle`` (RSS per
idle session, 200 open). The paths are interleaved: several short rounds, each running
every path once (in a rotated order), and every figure is reported as the median over
the rounds with its min-max spread, the added latency and the ratio to the splice
computed within each round. Then a concurrency ramp through ``relay`` (and ``direct`` in
the same step): the limit is the last step whose p99 stayed under the budget with no
loss, and a step where the direct path is already over budget, or the load side is
saturated, stops the ramp as measuring the rig, not the relay.

The binary audio path against JSON (``relay.audio.v1``, docs/binary-audio.md): stream
sessions at ``--audio-sessions`` with the Node client speaking JSON and (``--binary``)
binary, ``direct`` and through ``relay``, all four interleaved in each round. Both go to
one upstream that answers each append with an audio delta carrying its audio
(``echo_upstream.mjs --mode delta``, which speaks the binary contract itself for the
direct rows), through one relay process, so the two paths differ only on the client
leg. Per row: the relay's CPU per message, and the client leg's bytes per second of
audio (bytes on the load's sockets both ways over the window / seconds of audio the
appends carried), each as binary ÷ JSON paired within the round, against the targets
of issue 13 (bytes at most :data:`AUDIO_BYTES_SHARE_TARGET` of JSON's, CPU at most
:data:`AUDIO_CPU_RATIO_TARGET` times). ``--audio-only`` runs just this comparison.

Results: ``--out`` (default ``bench/results/stranger``) gets ``stranger.json`` (every
run, the comparison under ``audio``) and ``table.md``. ``--tiny`` is a one-round smoke
run of a few seconds per path.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from harness import (
    NODE_DIR,
    RELAY_BEFORE,
    REPO,
    Rig,
    Spread,
    Target,
    cpu_seconds,
    load_events,
    memory_kib,
    node_binary,
    rig,
    rotated,
)
from suite import json_safe, machine

PATHS: Final = (
    "direct",
    "splice",
    "relay",
    RELAY_BEFORE,
    "relay/tls",
    "nginx",
    "websockets+uvloop",
    "node-ws",
)
REALTIME_PATH: Final = "/realtime?model=gpt-realtime"
DEFAULT_RAMP: Final = "100,200,300,400,500"
DEFAULT_BUDGET_MS: Final = 20.0
#: The load side (or the load core, load + echo upstream) counts as saturated from here.
SATURATED_PERCENT: Final = 90.0
#: Beyond warmup + duration, a load run may take this long (opening, grace) before it is
#: killed and counted as failed.
RUN_SLACK_S: Final = 40.0
GRACE_S: Final = 2.0
#: CPU used by everything else on the machine over a window, above which a run is flagged.
NOISY_PERCENT: Final = 10.0
#: idle: the proxy's RSS is read this long after the last session opened.
IDLE_SETTLE_S: Final = 0.5
#: The binary-vs-JSON comparison: paths (to the delta upstream) and the client's encodings.
AUDIO_PATHS: Final = ("direct", "relay")
AUDIO_ENCODINGS: Final = ("json", "binary")
DEFAULT_AUDIO_SESSIONS: Final = "50,200"
#: Issue 13's targets for the binary path, relay rows, binary ÷ JSON: client-leg bytes per
#: second of audio at most this share, relay CPU per message at most this multiple.
AUDIO_BYTES_SHARE_TARGET: Final = 0.76
AUDIO_CPU_RATIO_TARGET: Final = 1.3


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup_s: float
    duration_s: float
    stream_sessions: tuple[int, ...]
    churn_loops: int
    idle_sessions: int
    idle_hold_s: float
    ramp: tuple[int, ...]
    budget_ms: float
    #: Stream session counts of the binary-vs-JSON comparison (empty: skipped).
    audio_sessions: tuple[int, ...] = ()


def _steps(text: str) -> tuple[int, ...]:
    return tuple(int(step) for step in text.split(",")) if text else ()


def standard(args: argparse.Namespace) -> Settings:
    return Settings(
        rounds=args.rounds,
        warmup_s=args.warmup_s,
        duration_s=args.duration_s,
        stream_sessions=(50, 200),
        churn_loops=16,
        idle_sessions=200,
        idle_hold_s=30.0,
        ramp=_steps(args.ramp),
        budget_ms=args.budget_ms,
        audio_sessions=_steps(args.audio_sessions),
    )


def tiny(args: argparse.Namespace) -> Settings:
    return Settings(
        rounds=1,
        warmup_s=0.5,
        duration_s=2.0,
        stream_sessions=(5, 10),
        churn_loops=2,
        idle_sessions=20,
        idle_hold_s=10.0,
        ramp=(5, 10),
        budget_ms=args.budget_ms,
        audio_sessions=(5,),
    )


# ---------------------------------------------------------------- one load run


def machine_busy_s() -> float:
    """CPU time every process on the machine has used (``/proc/stat``: all but idle/iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One Node load run against one path, with the OS figures read around it."""

    scenario: str
    path: str
    round: int
    result: dict[str, Any]
    #: The proxy's CPU (user + sys, all its processes) over the measured window, and
    #: the window's length as the orchestrator saw it; likewise the echo upstream(s).
    target_cpu_s: float = math.nan
    window_s: float = math.nan
    echo_cpu_s: float = math.nan
    #: Everything else the machine ran over the window (other processes, this script):
    #: a noisy neighbour shows here, and its runs are flagged.
    other_cpu_s: float = math.nan
    rss_before_kib: int = 0
    rss_ready_kib: int = 0
    failure: str = ""
    #: The load and the echo upstream share one core (pinned): their sum can saturate it.
    pinned_together: bool = False
    #: The binary-vs-JSON comparison: the client's encoding, ``json`` or ``binary``.
    encoding: str = ""

    @property
    def label(self) -> str:
        return f"{self.path} ({self.encoding})" if self.encoding else self.path

    def figure(self, name: str) -> float:
        value = self.result.get(name)
        return float(value) if isinstance(value, int | float) else math.nan

    def latency(self, kind: str, quantile: str) -> float:
        block = self.result.get(kind)
        value = block.get(quantile) if isinstance(block, dict) else None
        return float(value) if isinstance(value, int | float) else math.nan

    @property
    def messages(self) -> float:
        return self.figure("window_sent") + self.figure("window_received")

    @property
    def us_per_message(self) -> float:
        messages = self.messages
        return self.target_cpu_s / messages * 1e6 if messages > 0 else math.nan

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.target_cpu_s / self.window_s if self.window_s > 0 else math.nan

    @property
    def load_percent(self) -> float:
        return self.figure("load_cpu_percent")

    @property
    def echo_percent(self) -> float:
        return 100.0 * self.echo_cpu_s / self.window_s if self.window_s > 0 else math.nan

    @property
    def saturated(self) -> bool:
        """The load process at 90% of a core, or (pinned together) load + echo upstream."""
        load = self.load_percent
        both = load + (0.0 if math.isnan(self.echo_percent) else self.echo_percent)
        return (not math.isnan(load) and load >= SATURATED_PERCENT) or (
            self.pinned_together and both >= SATURATED_PERCENT
        )

    @property
    def other_percent(self) -> float:
        return 100.0 * self.other_cpu_s / self.window_s if self.window_s > 0 else math.nan

    @property
    def lost(self) -> float:
        return self.figure("lost")

    @property
    def client_bytes_per_audio_s(self) -> float:
        """Bytes on the load's sockets, both ways, per second of audio the appends carried."""
        both = self.figure("client_bytes_sent") + self.figure("client_bytes_received")
        audio_s = self.figure("window_audio_s")
        return both / audio_s if audio_s > 0 else math.nan

    def bytes_per(self, direction: str, messages: str) -> float:
        """Client-leg bytes one way per message that way (``sent``/``window_sent``...)."""
        count = self.figure(messages)
        return self.figure(f"client_bytes_{direction}") / count if count > 0 else math.nan

    @property
    def us_per_session(self) -> float:
        completed = self.figure("sessions_completed")
        return self.target_cpu_s / completed * 1e6 if completed > 0 else math.nan

    @property
    def kib_per_session(self) -> float:
        opened = self.figure("sessions_opened")
        return (self.rss_ready_kib - self.rss_before_kib) / opened if opened > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "path": self.path,
            "encoding": self.encoding,
            "round": self.round,
            "failure": self.failure,
            "target_cpu_s": self.target_cpu_s,
            "window_s": self.window_s,
            "echo_cpu_s": self.echo_cpu_s,
            "target_us_per_msg": self.us_per_message,
            "target_cpu_percent": self.cpu_percent,
            "target_us_per_session": self.us_per_session,
            "rss_before_kib": self.rss_before_kib,
            "rss_ready_kib": self.rss_ready_kib,
            "kib_per_session": self.kib_per_session,
            "client_bytes_per_audio_s": self.client_bytes_per_audio_s,
            "load_cpu_percent": self.load_percent,
            "echo_cpu_percent": self.echo_percent,
            "other_cpu_percent": self.other_percent,
            "saturated": self.saturated,
            "load": self.result,
        }


def node_load(
    running: Rig,
    target: Target,
    *,
    scenario: str,
    round_number: int,
    mode: str,
    sessions: int,
    warmup_s: float,
    duration_s: float,
    extra: Iterable[str] = (),
) -> Run:
    """One ``bench/node/loadgen.mjs`` run against ``target``, pinned to the load's core;
    the proxy's CPU is read at the load's window lines, its RSS before and at ``ready``."""
    command = [
        node_binary(),
        str(NODE_DIR / "loadgen.mjs"),
        "--url",
        target.url + REALTIME_PATH,
        "--key",
        target.key,
        "--mode",
        mode,
        "--sessions",
        str(sessions),
        "--concurrency",
        str(sessions),
        "--warmup-s",
        str(warmup_s),
        "--duration-s",
        str(duration_s),
        "--grace-s",
        str(GRACE_S),
        *extra,
    ]
    cpus = running.load_cpus
    run = Run(scenario, target.name, round_number, {})
    run.pinned_together = bool(cpus)
    echo_pids = list(running.echo_pids)
    run.rss_before_kib = memory_kib(target.pid, "VmRSS")
    marks: dict[str, float] = {}
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    deadline = time.monotonic() + warmup_s + duration_s + RUN_SLACK_S
    try:
        for event in load_events(process, deadline):
            kind = event.get("event")
            if kind in ("window_start", "window_end"):
                phase = kind.removeprefix("window_")
                marks[f"cpu_{phase}"] = cpu_seconds(target.pid)
                marks[f"echo_{phase}"] = sum(cpu_seconds(pid) for pid in echo_pids)
                marks[f"at_{phase}"] = time.monotonic()
                marks[f"busy_{phase}"] = machine_busy_s()
            elif kind == "ready":
                if mode == "idle":
                    time.sleep(IDLE_SETTLE_S)
                run.rss_ready_kib = memory_kib(target.pid, "VmRSS")
                if mode == "idle":
                    process.stdin.write(b"stop\n")
                    process.stdin.flush()
            elif kind == "result":
                run.result = event
    except TimeoutError:
        run.failure = "timed out"
    finally:
        if process.poll() is None:
            process.kill()
        _, stderr = process.communicate(timeout=10)
    if not run.result:
        run.failure = run.failure or f"no result (exit {process.returncode}): {stderr[-500:]!r}"
    if "cpu_start" in marks and "cpu_end" in marks:
        run.target_cpu_s = marks["cpu_end"] - marks["cpu_start"]
        run.echo_cpu_s = marks["echo_end"] - marks["echo_start"]
        run.window_s = marks["at_end"] - marks["at_start"]
        load_cpu = run.figure("load_cpu_s")
        run.other_cpu_s = (
            marks["busy_end"]
            - marks["busy_start"]
            - run.target_cpu_s
            - run.echo_cpu_s
            - (0.0 if math.isnan(load_cpu) else load_cpu)
        )
    return run


# ---------------------------------------------------------------- summaries


@dataclass
class Summary:
    """One path in one scenario, over the rounds."""

    scenario: str
    path: str
    runs: list[Run]
    figures: dict[str, Spread] = field(default_factory=dict)


def _paired(
    runs: list[Run], baseline: dict[int, Run], value: Callable[[Run], float], *, ratio: bool
) -> Spread:
    """``value`` against the baseline's from the same round: a difference or a ratio."""
    pairs = []
    for run in runs:
        base = baseline.get(run.round)
        if base is None:
            continue
        mine, theirs = value(run), value(base)
        if ratio:
            pairs.append(mine / theirs if theirs and not math.isnan(theirs) else math.nan)
        else:
            pairs.append(mine - theirs)
    return Spread.of(pairs)


def _latency_of(kind: str, quantile: str) -> Callable[[Run], float]:
    return lambda run: run.latency(kind, quantile)


def summarise(runs: list[Run]) -> list[Summary]:
    summaries: list[Summary] = []
    scenarios = list(dict.fromkeys(run.scenario for run in runs))
    for scenario in scenarios:
        mine = [run for run in runs if run.scenario == scenario]
        by_path: dict[str, list[Run]] = {}
        for run in mine:
            by_path.setdefault(run.path, []).append(run)
        direct = {run.round: run for run in by_path.get("direct", [])}
        splice = {run.round: run for run in by_path.get("splice", [])}
        for path in PATHS:
            path_runs = by_path.get(path)
            if not path_runs:
                continue
            figures = {
                "us_per_msg": Spread.of(run.us_per_message for run in path_runs),
                "cpu_percent": Spread.of(run.cpu_percent for run in path_runs),
                "lost": Spread.of(run.lost for run in path_runs),
                "load_percent": Spread.of(run.load_percent for run in path_runs),
                "echo_percent": Spread.of(run.echo_percent for run in path_runs),
                "other_percent": Spread.of(run.other_percent for run in path_runs),
                "us_per_session": Spread.of(run.us_per_session for run in path_runs),
                "sessions_per_s": Spread.of(
                    run.figure("sessions_completed") / run.window_s for run in path_runs
                ),
                "kib_per_session": Spread.of(run.kib_per_session for run in path_runs),
                "messages_per_s": Spread.of(run.messages / run.window_s for run in path_runs),
            }
            for kind in ("rtt_ms", "handshake_ms"):
                for quantile in ("p50", "p99", "p999"):
                    name = f"{kind.removesuffix('_ms')}_{quantile}"
                    figures[name] = Spread.of(run.latency(kind, quantile) for run in path_runs)
                    figures[f"added_{name}"] = _paired(
                        path_runs,
                        direct,
                        _latency_of(kind, quantile),
                        ratio=False,
                    )
            per_unit: tuple[tuple[str, Callable[[Run], float]], ...] = (
                ("us_per_msg", lambda run: run.us_per_message),
                ("us_per_session", lambda run: run.us_per_session),
                ("kib_per_session", lambda run: run.kib_per_session),
            )
            for name, value in per_unit:
                figures[f"{name}_x_splice"] = _paired(path_runs, splice, value, ratio=True)
            summaries.append(Summary(scenario, path, path_runs, figures))
    return summaries


# ---------------------------------------------------------------- the plan


def run_rounds(running: Rig, settings: Settings, paths: list[str]) -> list[Run]:
    runs: list[Run] = []
    scenarios: list[tuple[str, str, int]] = [
        # Idle once, first, on fresh processes: later runs would reuse memory freed by
        # earlier ones and report almost nothing per session.
        (f"idle {settings.idle_sessions}", "idle", settings.idle_sessions),
        *((f"stream {n}", "stream", n) for n in settings.stream_sessions),
        (f"churn {settings.churn_loops}", "churn", settings.churn_loops),
    ]
    total = settings.rounds * (len(scenarios) - 1) * len(paths) + len(paths) - ("direct" in paths)
    done = 0
    for round_number in range(settings.rounds):
        for scenario, mode, sessions in scenarios:
            for path in rotated(paths, round_number):
                if mode == "idle" and (path == "direct" or round_number > 0):
                    continue
                done += 1
                print(
                    f"[{done}/{total}] round {round_number + 1}: {scenario} via {path}",
                    file=sys.stderr,
                    flush=True,
                )
                idle = mode == "idle"
                run = node_load(
                    running,
                    running.targets[path],
                    scenario=scenario,
                    round_number=round_number,
                    mode=mode,
                    sessions=sessions,
                    warmup_s=0.0 if idle else settings.warmup_s,
                    duration_s=settings.idle_hold_s if idle else settings.duration_s,
                )
                if run.failure:
                    print(f"  failed: {run.failure}", file=sys.stderr, flush=True)
                runs.append(run)
    return runs


def run_ramp(
    running: Rig, settings: Settings, direct: str = "direct", relay: str = "relay"
) -> dict[str, Any]:
    """The concurrency ramp through ``relay``, with ``direct`` (its upstream) in each step."""
    steps: list[dict[str, Any]] = []
    held: int | None = None
    verdict = ""
    for n in settings.ramp:
        pairs: list[tuple[Run, Run]] = []
        for round_number in range(settings.rounds):
            order = rotated([direct, relay], round_number)
            measured = {
                path: node_load(
                    running,
                    running.targets[path],
                    scenario=f"ramp {n}",
                    round_number=round_number,
                    mode="stream",
                    sessions=n,
                    warmup_s=settings.warmup_s,
                    duration_s=settings.duration_s,
                )
                for path in order
            }
            pairs.append((measured[direct], measured[relay]))
        direct_p99 = Spread.of(d.latency("rtt_ms", "p99") for d, _ in pairs)
        relay_p99 = Spread.of(r.latency("rtt_ms", "p99") for _, r in pairs)
        added = Spread.of(r.latency("rtt_ms", "p99") - d.latency("rtt_ms", "p99") for d, r in pairs)
        lost = sum(int(r.lost) if not math.isnan(r.lost) else 1 for _, r in pairs)
        failed = [r.failure for d, r in pairs if r.failure or d.failure]
        saturated = any(d.saturated or r.saturated for d, r in pairs)
        load = Spread.of(max(d.load_percent, r.load_percent) for d, r in pairs)
        step: dict[str, Any] = {
            "sessions": n,
            "direct_p99_ms": direct_p99.to_json(),
            "relay_p99_ms": relay_p99.to_json(),
            "added_p99_ms": added.to_json(),
            "relay_cpu_percent": Spread.of(r.cpu_percent for _, r in pairs).to_json(),
            "relay_us_per_msg": Spread.of(r.us_per_message for _, r in pairs).to_json(),
            "lost": lost,
            "load_cpu_percent": load.to_json(),
            "saturated": saturated,
            "failures": failed,
            "runs": [run.to_json() for pair in pairs for run in pair],
        }
        steps.append(step)
        if direct_p99.median > settings.budget_ms or saturated:
            why = (
                f"direct p99 {direct_p99.median:.1f} ms is over the budget"
                if direct_p99.median > settings.budget_ms
                else f"the load side is saturated (load {load.show('.0f')}% of a core)"
            )
            step["verdict"] = "rig saturated"
            verdict = f"rig saturated at {n}: this step measures the rig, not the relay ({why})"
            print(f"ramp: {verdict}", flush=True)
            break
        ok = relay_p99.median < settings.budget_ms and lost == 0 and not failed
        step["verdict"] = "held" if ok else "over budget"
        print(
            f"ramp: {n} sessions: relay p99 {relay_p99.show('.2f')} ms, added "
            f"{added.show('+.2f')} ms, lost {lost} -> {step['verdict']}",
            flush=True,
        )
        if not ok:
            verdict = f"{relay} went over at {n} (p99 {relay_p99.median:.1f} ms, lost {lost})"
            break
        held = n
    else:
        verdict = "every step held (raise --ramp to find the limit)"
    return {
        "budget_ms": settings.budget_ms,
        "upstream": running.targets[direct].name,
        "through": running.targets[relay].name,
        "steps": steps,
        "sessions_at_budget": held,
        "verdict": verdict,
    }


def start_audio_paths(running: Rig) -> None:
    """The delta upstream (``direct/delta``) and a relay in front of it (``relay/delta``)."""
    running.start_echo_upstream(mode="delta")
    running.start_relay("relay/delta", running.targets["direct/delta"].url)


def run_audio(running: Rig, settings: Settings) -> list[Run]:
    """The binary-vs-JSON comparison: every (path, encoding) once per round, rotated."""
    targets = {
        "direct": running.targets["direct/delta"],
        "relay": running.targets["relay/delta"],
    }
    combinations = [(path, encoding) for path in AUDIO_PATHS for encoding in AUDIO_ENCODINGS]
    runs: list[Run] = []
    total = settings.rounds * len(settings.audio_sessions) * len(combinations)
    done = 0
    for round_number in range(settings.rounds):
        for sessions in settings.audio_sessions:
            for path, encoding in rotated(combinations, round_number):
                done += 1
                print(
                    f"[audio {done}/{total}] round {round_number + 1}: {sessions} sessions "
                    f"via {path}, {encoding}",
                    file=sys.stderr,
                    flush=True,
                )
                run = node_load(
                    running,
                    targets[path],
                    scenario=f"audio {sessions}",
                    round_number=round_number,
                    mode="stream",
                    sessions=sessions,
                    warmup_s=settings.warmup_s,
                    duration_s=settings.duration_s,
                    extra=["--binary"] if encoding == "binary" else [],
                )
                run.path, run.encoding = path, encoding
                if run.failure:
                    print(f"  failed: {run.failure}", file=sys.stderr, flush=True)
                runs.append(run)
    return runs


@dataclass
class AudioRow:
    """One (path, encoding) of one comparison scenario, over the rounds."""

    scenario: str
    path: str
    encoding: str
    runs: list[Run]
    figures: dict[str, Spread]


def summarise_audio(runs: list[Run]) -> list[AudioRow]:
    rows: list[AudioRow] = []
    for scenario in dict.fromkeys(run.scenario for run in runs):
        for path in AUDIO_PATHS:
            mine = [run for run in runs if run.scenario == scenario and run.path == path]
            json_runs = {run.round: run for run in mine if run.encoding == "json"}
            for encoding in AUDIO_ENCODINGS:
                cell = [run for run in mine if run.encoding == encoding]
                if not cell:
                    continue
                figures = {
                    "us_per_msg": Spread.of(run.us_per_message for run in cell),
                    "cpu_percent": Spread.of(run.cpu_percent for run in cell),
                    "client_bytes_per_audio_s": Spread.of(
                        run.client_bytes_per_audio_s for run in cell
                    ),
                    "up_bytes_per_append": Spread.of(
                        run.bytes_per("sent", "window_sent") for run in cell
                    ),
                    "down_bytes_per_answer": Spread.of(
                        run.bytes_per("received", "window_received") for run in cell
                    ),
                    "us_per_msg_x_json": _paired(
                        cell, json_runs, lambda run: run.us_per_message, ratio=True
                    ),
                    "client_bytes_x_json": _paired(
                        cell, json_runs, lambda run: run.client_bytes_per_audio_s, ratio=True
                    ),
                    "rtt_p50": Spread.of(run.latency("rtt_ms", "p50") for run in cell),
                    "rtt_p99": Spread.of(run.latency("rtt_ms", "p99") for run in cell),
                    "lost": Spread.of(run.lost for run in cell),
                    "load_percent": Spread.of(run.load_percent for run in cell),
                    "echo_percent": Spread.of(run.echo_percent for run in cell),
                }
                rows.append(AudioRow(scenario, path, encoding, cell, figures))
    return rows


def audio_targets(rows: list[AudioRow]) -> dict[str, dict[str, Any]]:
    """Per scenario, the relay's binary ÷ JSON figures against issue 13's targets."""
    verdicts: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.path != "relay" or row.encoding != "binary":
            continue
        share = row.figures["client_bytes_x_json"].median
        ratio = row.figures["us_per_msg_x_json"].median
        verdicts[row.scenario] = {
            "client_bytes_x_json": share,
            "client_bytes_target": AUDIO_BYTES_SHARE_TARGET,
            "client_bytes_met": share <= AUDIO_BYTES_SHARE_TARGET,
            "us_per_msg_x_json": ratio,
            "us_per_msg_target": AUDIO_CPU_RATIO_TARGET,
            "us_per_msg_met": ratio <= AUDIO_CPU_RATIO_TARGET,
        }
    return verdicts


def audio_json(rows: list[AudioRow], runs: list[Run]) -> dict[str, Any]:
    return {
        "targets": audio_targets(rows),
        "summaries": [
            {
                "scenario": row.scenario,
                "path": row.path,
                "encoding": row.encoding,
                "figures": {name: spread.to_json() for name, spread in row.figures.items()},
            }
            for row in rows
        ],
        "runs": [run.to_json() for run in runs],
    }


# ---------------------------------------------------------------- the table


def _cell(summary: Summary, name: str, spec: str = ".1f") -> str:
    return summary.figures[name].show(spec)


def stream_table(summaries: list[Summary], scenario: str) -> list[str]:
    lines = [
        f"### {scenario} sessions, 50 appends/s each (1.36 KB), append to echo",
        "",
        "| path | proxy µs/msg | × splice | % core | p50 ms | +p50 ms | p99 ms | +p99 ms "
        "| p99.9 ms | lost | load % | echo % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        if summary.scenario != scenario:
            continue
        direct = summary.path == "direct"
        flag = " ⚠ saturated" if any(run.saturated for run in summary.runs) else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    summary.path,
                    "-" if direct else _cell(summary, "us_per_msg"),
                    "-" if direct else _cell(summary, "us_per_msg_x_splice", ".2f"),
                    "-" if direct else _cell(summary, "cpu_percent", ".0f"),
                    _cell(summary, "rtt_p50", ".2f"),
                    "-" if direct else _cell(summary, "added_rtt_p50", "+.2f"),
                    _cell(summary, "rtt_p99", ".2f"),
                    "-" if direct else _cell(summary, "added_rtt_p99", "+.2f"),
                    _cell(summary, "rtt_p999", ".2f"),
                    _cell(summary, "lost", ".0f"),
                    _cell(summary, "load_percent", ".0f") + flag,
                    _cell(summary, "echo_percent", ".0f"),
                ]
            )
            + " |"
        )
    return lines


def churn_table(summaries: list[Summary], scenario: str) -> list[str]:
    lines = [
        f"### {scenario}: loops opening a session, 5 echoed appends, clean close, again",
        "",
        "| path | CPU µs/session | × splice | sessions/s | % core | handshake p50 ms "
        "| handshake p99 ms | lost | load % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        if summary.scenario != scenario:
            continue
        direct = summary.path == "direct"
        lines.append(
            "| "
            + " | ".join(
                [
                    summary.path,
                    "-" if direct else _cell(summary, "us_per_session", ".0f"),
                    "-" if direct else _cell(summary, "us_per_session_x_splice", ".2f"),
                    _cell(summary, "sessions_per_s", ".0f"),
                    "-" if direct else _cell(summary, "cpu_percent", ".0f"),
                    _cell(summary, "handshake_p50", ".2f"),
                    _cell(summary, "handshake_p99", ".2f"),
                    _cell(summary, "lost", ".0f"),
                    _cell(summary, "load_percent", ".0f"),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "A churn loop is closed (the next session opens when the last one closed), so the "
        "load side runs flat out by design; CPU per session is what it measures.",
    ]
    return lines


def idle_table(summaries: list[Summary], scenario: str) -> list[str]:
    lines = [
        f"### {scenario}: RSS per idle session (RSS with every session open − RSS before) / N",
        "",
        "| path | KiB/session | × splice | handshake p50 ms | handshake p99 ms |",
        "|---|---|---|---|---|",
    ]
    for summary in summaries:
        if summary.scenario != scenario:
            continue
        lines.append(
            f"| {summary.path} | {_cell(summary, 'kib_per_session')} "
            f"| {_cell(summary, 'kib_per_session_x_splice', '.2f')} "
            f"| {_cell(summary, 'handshake_p50', '.2f')} "
            f"| {_cell(summary, 'handshake_p99', '.2f')} |"
        )
    lines += [
        "",
        "Measured once, first, on fresh processes (not per round): a later run would reuse "
        "memory freed by earlier ones and show almost nothing per session.",
    ]
    return lines


def ramp_table(ramp: dict[str, Any]) -> list[str]:
    def show(block: dict[str, Any], spec: str) -> str:
        return Spread(block["median"], block["min"], block["max"], block["n"]).show(spec)

    lines = [
        f"### Concurrency ramp through {ramp.get('through', 'relay')} "
        f"(budget: p99 < {ramp['budget_ms']:g} ms, no loss)",
        "",
        f"Upstream: `{ramp.get('upstream', 'direct')}` (direct p99 is the load straight to it); "
        "the load generator and the upstream share the load core.",
        "",
        "| sessions | direct p99 ms | relay p99 ms | added p99 ms | relay % core | relay µs/msg "
        "| lost | load % | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {step['sessions']} | {show(step['direct_p99_ms'], '.2f')} "
        f"| {show(step['relay_p99_ms'], '.2f')} | {show(step['added_p99_ms'], '+.2f')} "
        f"| {show(step['relay_cpu_percent'], '.0f')} | {show(step['relay_us_per_msg'], '.1f')} "
        f"| {step['lost']} | {show(step['load_cpu_percent'], '.0f')} | {step['verdict']} |"
        for step in ramp["steps"]
    )
    held = ramp["sessions_at_budget"]
    lines += [
        "",
        f"**Limit with this client: {held if held is not None else 'no step held'}"
        f"{' sessions' if held is not None else ''}**; {ramp['verdict']}.",
    ]
    return lines


def audio_table(rows: list[AudioRow], scenario: str) -> list[str]:
    sessions = scenario.split()[-1]
    lines = [
        f"### Binary audio path against JSON: {sessions} sessions, 50 appends/s each "
        "(20 ms, 960 bytes of audio), append to its audio answered",
        "",
        "| path | client leg | relay µs/msg | × JSON | % core | client bytes per s of audio "
        "| × JSON | up B/append | down B/answer | p50 ms | p99 ms | lost | load % | echo % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.scenario != scenario:
            continue
        direct = row.path == "direct"
        figure = row.figures
        flag = " ⚠ saturated" if any(run.saturated for run in row.runs) else ""
        cells = [
            row.path,
            "binary (relay.audio.v1)" if row.encoding == "binary" else "JSON",
            "-" if direct else figure["us_per_msg"].show(".1f"),
            "-" if direct else figure["us_per_msg_x_json"].show(".2f"),
            "-" if direct else figure["cpu_percent"].show(".0f"),
            figure["client_bytes_per_audio_s"].show(",.0f"),
            figure["client_bytes_x_json"].show(".2f"),
            figure["up_bytes_per_append"].show(",.0f"),
            figure["down_bytes_per_answer"].show(",.0f"),
            figure["rtt_p50"].show(".2f"),
            figure["rtt_p99"].show(".2f"),
            figure["lost"].show(".0f"),
            figure["load_percent"].show(".0f") + flag,
            figure["echo_percent"].show(".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = audio_targets(rows).get(scenario)
    if verdict is not None:

        def met(ok: bool) -> str:
            return "met" if ok else "**missed**"

        lines += [
            "",
            f"Targets (issue 13), relay, binary ÷ JSON: client-leg bytes per second of audio "
            f"{verdict['client_bytes_x_json']:.2f} (target ≤ {AUDIO_BYTES_SHARE_TARGET:.2f}: "
            f"{met(verdict['client_bytes_met'])}); relay CPU per message "
            f"{verdict['us_per_msg_x_json']:.2f}x (target ≤ {AUDIO_CPU_RATIO_TARGET:.1f}x: "
            f"{met(verdict['us_per_msg_met'])}).",
        ]
    lines += [
        "",
        "Every row runs against one upstream answering each append with an audio delta "
        "carrying its audio (`echo_upstream.mjs --mode delta`; it speaks `relay.audio.v1` "
        "itself for direct's binary row), the relay rows through one relay process: the two "
        "encodings differ only on the client leg. Client bytes: on the load's sockets, both "
        "ways, frame headers, masks and markers included, over the window / seconds of audio "
        "the appends in it carried (each answered with as much). × JSON: paired with the "
        "same path's JSON run in the same round.",
    ]
    return lines


def warnings(summaries: list[Summary], runs: list[Run]) -> list[str]:
    found: list[str] = []
    # Steady-state latencies only: stream round trips and churn handshakes (a stream's
    # opening burst of handshakes queues differently through each path).
    checked = {"stream": "rtt", "churn": "handshake"}
    direct = {s.scenario: s for s in summaries if s.path == "direct"}
    for summary in summaries:
        kind = checked.get(summary.scenario.split()[0])
        base = direct.get(summary.scenario)
        if summary.path == "direct" or kind is None or base is None:
            continue
        mine, theirs = summary.figures[f"{kind}_p50"].median, base.figures[f"{kind}_p50"].median
        if mine < theirs:
            found.append(
                f"⚠ {summary.scenario}: {summary.path}'s median {kind} p50 ({mine:.3f} ms) is "
                f"below direct's ({theirs:.3f} ms): a proxy cannot be faster than no proxy, "
                "so this difference measures the rig, not the path."
            )
    found.extend(
        f"⚠ round {run.round + 1} {run.scenario} via {run.label}: "
        f"{run.failure or run.result.get('errors')}"
        for run in runs
        if run.failure or run.result.get("errors")
    )
    noisy = [run for run in runs if run.other_percent >= NOISY_PERCENT]
    if noisy:
        worst = max(noisy, key=lambda run: run.other_percent)
        found.append(
            f"⚠ other processes on the machine used ≥ {NOISY_PERCENT:.0f}% of a core during "
            f"{len(noisy)} of {len(runs)} runs (worst {worst.other_percent:.0f}%: round "
            f"{worst.round + 1} {worst.scenario} via {worst.label}); those runs share the "
            "cores with them, so their figures are noisier (other % in stranger.json)."
        )
    if any(run.saturated for run in runs if not run.scenario.startswith("churn")):
        found.append(
            "⚠ the load side saturated in some stream/idle runs (≥ 90% of a core, load + "
            "echo upstream when pinned together): those latencies include the rig's queueing."
        )
    return found


def render(
    summaries: list[Summary],
    runs: list[Run],
    ramp: dict[str, Any] | None,
    settings: Settings,
    command: str,
    pinned: bool,
    elapsed_s: float,
    audio_rows: list[AudioRow] | None = None,
    audio_runs: list[Run] | None = None,
) -> str:
    host = machine()
    scenarios = list(dict.fromkeys(summary.scenario for summary in summaries))
    lines = [
        "## Measured like a stranger would: Node ws client and echo upstream",
        "",
        f"`{command}`",
        "",
        f"Machine: {host['cpus']} CPUs ({host['cpu_model'] or 'unknown'}), Linux "
        f"{host['kernel']}, Python {host['python']}, Node {node_version()}; pinning: "
        + (
            "proxy under test on CPU 0, load + echo upstream on CPU 1"
            if pinned
            else "none (numbers share cores)"
        )
        + f". {settings.rounds} round(s) of {settings.warmup_s:g} s warmup + "
        f"{settings.duration_s:g} s measured per path, paths interleaved within each round; "
        "figures are median (min–max) over the rounds; +p50/+p99 and × splice are paired "
        f"within each round. Elapsed: {elapsed_s / 60:.1f} min.",
        "",
        "µs/msg: the proxy's user+sys CPU (all its processes, /proc) over the measured "
        "window / (appends sent + echoes received in it). load %: the Node load process "
        "(process.cpuUsage); echo %: the echo upstream, on the same core when pinned.",
        "",
    ]
    found = warnings(summaries, [*runs, *(audio_runs or [])])
    if found:
        lines += [*found, ""]
    for scenario in scenarios:
        if scenario.startswith("stream"):
            lines += stream_table(summaries, scenario)
        elif scenario.startswith("churn"):
            lines += churn_table(summaries, scenario)
        elif scenario.startswith("idle"):
            lines += idle_table(summaries, scenario)
        lines.append("")
    for scenario in dict.fromkeys(row.scenario for row in audio_rows or []):
        lines += [*audio_table(audio_rows or [], scenario), ""]
    if ramp is not None:
        lines += ramp_table(ramp)
    return "\n".join(lines) + "\n"


def node_version() -> str:
    try:
        return subprocess.run(
            [node_binary(), "--version"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, RuntimeError, subprocess.CalledProcessError):
        return "?"


# ---------------------------------------------------------------- main


def start_paths(running: Rig, before: Path | None = None) -> list[str]:
    echo_port = running.start_echo_upstream()
    upstream = running.targets["direct"].url
    running.start_splice(echo_port)
    running.start_relay("relay", upstream)
    if before is not None:
        running.start_relay(RELAY_BEFORE, upstream, checkout=before)
    running.start_tls_relay(node_echo=True)
    running.start_nginx(echo_port)
    running.start_websockets_relay(upstream)
    running.start_node_relay(upstream)
    return [path for path in PATHS if path in running.targets]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pin", action="store_true", help="proxy under test on CPU 0; load + echo on CPU 1"
    )
    parser.add_argument("--tiny", action="store_true", help="one round, 2 s per path (smoke)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--duration-s", type=float, default=6.0, help="measured window per run")
    parser.add_argument(
        "--ramp", default=DEFAULT_RAMP, help="stream session steps through relay ('' to skip)"
    )
    parser.add_argument(
        "--budget-ms", type=float, default=DEFAULT_BUDGET_MS, help="ramp: p99 budget"
    )
    parser.add_argument(
        "--ramp-upstream",
        choices=["light", "node"],
        default="light",
        help="ramp's upstream: the C echo (bench/c, light on the load core) or the Node echo",
    )
    parser.add_argument(
        "--audio-sessions",
        default=DEFAULT_AUDIO_SESSIONS,
        help="binary-vs-JSON comparison: stream session counts ('' to skip)",
    )
    parser.add_argument(
        "--audio-only",
        action="store_true",
        help="only the binary-vs-JSON comparison (no other path, scenario or ramp)",
    )
    parser.add_argument(
        "--ramp-only", action="store_true", help="only the concurrency ramp (no other scenario)"
    )
    parser.add_argument(
        "--ramp-through",
        choices=["relay", "splice", "node-ws"],
        default="relay",
        help="with the light upstream: the proxy the ramp goes through (the floor, a baseline)",
    )
    parser.add_argument("--out", default=str(REPO / "bench/results/stranger"))
    parser.add_argument("--relay-log-level", default="warning")
    parser.add_argument(
        "--relay-before",
        type=Path,
        help="also the relay of this work tree (e.g. `git worktree add /tmp/before <commit>`),"
        " as relay@before, for a before/after in the same run",
    )
    args = parser.parse_args()
    settings = tiny(args) if args.tiny else standard(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", *sys.argv])
    started = time.time()
    paths: list[str] = []
    runs: list[Run] = []
    audio_runs: list[Run] = []
    ramp: dict[str, Any] | None = None
    with rig(pinned=args.pin, relay_log_level=args.relay_log_level) as running:
        if not args.audio_only and not args.ramp_only:
            paths = start_paths(running, args.relay_before)
            missing = [path for path in PATHS if path not in paths and path != RELAY_BEFORE]
            if missing:
                print(f"stranger: not measured (not installed): {missing}", file=sys.stderr)
            runs = run_rounds(running, settings, paths)
        if settings.audio_sessions and not args.ramp_only:
            start_audio_paths(running)
            audio_runs = run_audio(running, settings)
        if settings.ramp and not args.audio_only:
            if args.ramp_upstream == "light":
                # A fresh proxy in front of the C echo: the load core keeps room for the load.
                port = running.start_light_echo_upstream()
                url = f"ws://127.0.0.1:{port}/v1"
                if args.ramp_through == "splice":
                    through = running.start_splice(port).name
                elif args.ramp_through == "node-ws":
                    through = running.start_node_relay(url).name
                else:
                    through = running.start_relay("relay/light", url).name
                ramp = run_ramp(running, settings, "direct/light", through)
            else:
                ramp = run_ramp(running, settings)
    elapsed = time.time() - started
    summaries = summarise(runs)
    audio_rows = summarise_audio(audio_runs)
    table = render(
        summaries, runs, ramp, settings, command, args.pin, elapsed, audio_rows, audio_runs
    )
    print(table)
    (out / "table.md").write_text(table)
    (out / "stranger.json").write_text(
        json.dumps(
            json_safe(
                {
                    "machine": machine(),
                    "node": node_version(),
                    "pinned": args.pin,
                    "command": sys.argv,
                    "settings": settings.__dict__,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                    "elapsed_s": elapsed,
                    "paths": paths,
                    "summaries": [
                        {
                            "scenario": summary.scenario,
                            "path": summary.path,
                            "figures": {
                                name: spread.to_json() for name, spread in summary.figures.items()
                            },
                        }
                        for summary in summaries
                    ],
                    "runs": [run.to_json() for run in runs],
                    "audio": audio_json(audio_rows, audio_runs),
                    "ramp": ramp,
                }
            ),
            indent=1,
            allow_nan=False,
            default=str,
        )
    )
    print(f"wrote {out / 'table.md'} and {out / 'stranger.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
