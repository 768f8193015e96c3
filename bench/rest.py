"""The REST proxy's cost: streamed chat completions direct, through the relay and through nginx.

Issue 15's figures. ``--streams`` concurrent streams (default 50 and 200), each a
keep-alive connection looping ``POST /v1/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``, reading the SSE answer to ``data: [DONE]``. The
upstream answers each with ``--stream-chunks`` text deltas (24 SSE events in all at
the default 20: role, deltas, finish, usage, ``[DONE]``), one HTTP chunk per event,
``--chunk-interval-ms`` apart, each wait jittered by up to ``--chunk-jitter-ms`` either
way (:data:`DEFAULT_CHUNK_JITTER_MS`; 0 is the lockstep pacing of runs 1-7, where the
streams' events bunch and the table measures how a proxy's per-request latency spreads
them, see the README). By default (``--upstream c``) the upstream is
``bench/c/sse_upstream.c``, which sends the simulator's bytes at the simulator's pace
in C on one epoll loop, so the load core is not saturated by the upstream; ``--upstream
simulator`` is ``relay simulate`` itself (about 125 µs of the load core per chunk).
Four paths (``--paths``, all by default), all in one run, round-robin over ``--rounds``
short repetitions (the order rotated each round):

- ``direct``: the upstream itself;
- ``relay``: our relay (``relay serve``, one upstream, a client key);
- ``nginx``: nginx as a plain HTTP reverse proxy (:data:`REST_NGINX_CONF`: HTTP/1.1 to an
  ``upstream`` block with ``keepalive 64``, ``Connection ""``, no buffering either way),
  the floor;
- ``litellm``: LiteLLM's proxy, what many users would deploy instead
  (``bench/litellm_proxy.py``: its own venv ``bench/.litellm-venv``, made on first use
  from the pinned ``bench/litellm/requirements.txt``; one model routed to the upstream,
  a master key as the load's bearer token, no database, error-level logs, one uvicorn
  worker on uvloop). When LiteLLM cannot be installed or started, the path is reported
  "not measured" with the reason; when ``--paths`` names it, that is an error instead.

Before the rounds, a request per path (:func:`check_path`: the second, after one that
warms the proxy) checks that the answer streams: 200, chunked, the SSE events arriving
in separate reads over the answer's length rather than at once, a ``usage`` chunk and
``data: [DONE]``.

Two load clients, each driving every path in every round: ``ours``
(``bench/rest_client.py``: raw asyncio sockets on uvloop, parsing the chunked HTTP
itself, light on CPU) and ``node`` (``bench/node/rest_load.mjs``: Node's built-in
``http`` module, nothing of ours in its HTTP). With ``--pin`` the proxy under test is
alone on CPU 0, the upstream and the load on CPU 1.

Reported per client, stream count and path (median over the rounds, min-max spread):
time to first byte (request written -> first SSE event) p50/p99 and, paired within the
round, added against ``direct``; the inter-chunk gap p99 and its added p99; requests
and chunks completed in the measured window and errors; the proxy's CPU (user+sys from
/proc, nginx's workers included, over exactly the measured window) per request and per
chunk; relay's and LiteLLM's CPU per chunk ÷ nginx's, and the relay's ÷ LiteLLM's, paired
per round; the load process's own CPU
(flagged ``!`` at 90 % of a core: then its latencies measure the load, not the proxy)
and the simulator's. Judged against issue 15's targets: added p99 time to first byte
under :data:`TTFB_ADDED_P99_TARGET_MS` at 50 streams, relay CPU per streamed chunk
within :data:`CPU_X_NGINX_TARGET` times nginx's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from harness import (
    CLIENT_KEY,
    NGINX_PRELUDE,
    NODE_DIR,
    RELAY_BEFORE,
    REPO,
    SIM_KEY,
    Rig,
    Spread,
    cpu_seconds,
    find_nginx,
    free_port,
    load_events,
    rig,
    rotated,
)
from litellm_proxy import (
    MASTER_KEY,
    STARTUP_TIMEOUT_S,
    Installed,
    LiteLLMUnavailable,
    config_yaml,
    ensure_installed,
    proxy_command,
    proxy_env,
)

from relay.loadgen import LatencyHistogram

PATHS: Final = ("direct", "relay", "nginx", "litellm")
#: The paths whose CPU per chunk is put against nginx's.
PROXIES_X_NGINX: Final = ("relay", "litellm", RELAY_BEFORE)
CLIENTS: Final = ("ours", "node")
DEFAULT_STREAMS: Final = "50,200"
DEFAULT_ROUNDS: Final = 3
DEFAULT_DURATION_S: Final = 5.0
DEFAULT_WARMUP_S: Final = 1.0
#: After the window, requests in flight get this long to end (seconds).
DRAIN_S: Final = 5.0
DEFAULT_CHUNK_INTERVAL_MS: Final = 20
DEFAULT_STREAM_CHUNKS: Final = 20
#: ``--upstream c``: each wait between events is the interval plus a uniform draw in
#: [-this, +this] ms. Real token streams are irregular; with a fixed interval, streams
#: that once started together stay in lockstep, and their events reach a proxy in
#: bursts it handles per wake-up (README, "REST proxy": the lockstep pacing).
DEFAULT_CHUNK_JITTER_MS: Final = 5
#: The upstreams ``--upstream`` chooses from: the C stand-in, or the Python simulator.
UPSTREAMS: Final = ("c", "simulator")
DEFAULT_UPSTREAM: Final = "c"
UPSTREAM_NAMES: Final = {"c": "bench/c/sse_upstream.c", "simulator": "relay simulate"}
MODEL: Final = "gpt-4o-mini"
CHAT_PATH: Final = "/v1/chat/completions"
#: Issue 15's targets.
TTFB_ADDED_P99_TARGET_MS: Final = 2.0
TTFB_TARGET_STREAMS: Final = 50
CPU_X_NGINX_TARGET: Final = 2.0
#: A load process at this share of a core is flagged as saturated.
SATURATED_PERCENT: Final = 90.0

REST_NGINX_CONF: Final = (
    NGINX_PRELUDE
    + """    upstream simulator {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://simulator;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""
)


@dataclass
class Endpoint:
    """A path the load is pointed at: its port, the key it takes, whose CPU counts."""

    name: str
    port: int
    key: str
    pid: int


@dataclass
class Run:
    """One load run: one client, one stream count, one path, one round."""

    client: str
    streams: int
    path: str
    round: int
    requests: int = 0
    chunks: int = 0
    started: int = 0
    unfinished: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttfb: dict[str, Any] = field(default_factory=dict)
    gap: dict[str, Any] = field(default_factory=dict)
    window_s: float = math.nan
    proxy_cpu_s: float = math.nan
    load_cpu_s: float = math.nan
    sim_cpu_s: float = math.nan
    #: Why the load run gave no figures (only LiteLLM's runs may fail and be kept).
    failure: str = ""

    def quantile(self, which: str, fraction: float) -> float:
        histogram = LatencyHistogram.from_wire(self.ttfb if which == "ttfb" else self.gap)
        return histogram.percentile(fraction)

    def per(self, count: int) -> float:
        """Proxy CPU per unit, in µs (NaN for direct: there is no proxy)."""
        if self.path == "direct" or not count:
            return math.nan
        return self.proxy_cpu_s / count * 1e6

    def percent(self, cpu_s: float) -> float:
        return 100.0 * cpu_s / self.window_s if self.window_s else math.nan


@dataclass
class LiteLLMStatus:
    """Whether the ``litellm`` path was measured, and with what."""

    #: ``--paths`` named it (then a failure to install or start it is an error).
    explicit: bool
    measured: bool = False
    reason: str = ""
    version: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    config: str = ""

    def note(self) -> str:
        if self.measured:
            return (
                f"litellm: LiteLLM {self.version} (bench/litellm/requirements.txt), one uvicorn "
                "worker on uvloop, one model to the upstream, master key, no database, "
                "LITELLM_LOG=ERROR; its config is in the JSON (--out)."
            )
        return f"litellm: not measured: {self.reason}"


class StreamCheckFailed(RuntimeError):
    """One request through a path did not stream as the upstream does."""


@dataclass
class StreamCheck:
    """One streamed answer through a path, read by :func:`check_stream`."""

    events: int
    #: Reads that completed at least one SSE event: one per event when nothing is held back.
    reads_with_events: int
    first_event_ms: float
    #: First event to last.
    span_ms: float
    usage: dict[str, Any] | None

    def show(self) -> str:
        return (
            f"{self.events} events in {self.reads_with_events} reads over "
            f"{self.span_ms:.0f} ms, first after {self.first_event_ms:.1f} ms"
        )


def chat_request(port: int, key: str) -> bytes:
    """The load clients' request (``bench/rest_client.py``), for :func:`check_stream`."""
    body = json.dumps(
        {
            "model": MODEL,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Say something short."}],
        },
        separators=(",", ":"),
    ).encode()
    return (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def dechunk(body: bytes) -> bytes:
    """A whole chunked body's data (``StreamCheckFailed`` when it is not one)."""
    out = bytearray()
    position = 0
    while True:
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise StreamCheckFailed("the chunked body ends without its last chunk")
        try:
            size = int(body[position:line_end].split(b";")[0], 16)
        except ValueError as error:
            raise StreamCheckFailed(
                f"a bad chunk size line: {body[position:line_end]!r}"
            ) from error
        if size == 0:
            return bytes(out)
        out += body[line_end + 2 : line_end + 2 + size]
        position = line_end + 2 + size + 2


def streamed_head(head: bytes) -> bool:
    """A ``200`` with a chunked body, as the load clients require."""
    lowered = head.lower()
    return lowered.startswith(b"http/1.1 200") and b"transfer-encoding: chunked" in lowered


def check_stream(
    port: int,
    key: str,
    *,
    stream_chunks: int,
    chunk_interval_ms: int,
    timeout_s: float = 60.0,
    judge_timing: bool = True,
) -> StreamCheck:
    """One request as the load sends it, every read timed: the answer must be 200 and
    chunked, end with ``data: [DONE]``, carry a ``usage`` object (the request asks with
    ``stream_options.include_usage``), and (``judge_timing``) arrive as it is made: each
    delta in a read of its own, spread over at least half the upstream's pace. A
    proxy's first request may be slow to start (LiteLLM's took 0.6 s here, its lazy
    imports, and then sent the deltas it had gathered at once): :func:`check_path`
    judges the timing of the second."""
    reads: list[tuple[float, int]] = []  # (arrival, bytes so far)
    raw = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as connection:
            sent = time.perf_counter()
            connection.sendall(chat_request(port, key))
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = connection.recv(65536)
                if not data:
                    break
                raw += data
                reads.append((time.perf_counter(), len(raw)))
                head_end = raw.find(b"\r\n\r\n")
                if head_end >= 0 and not streamed_head(bytes(raw[:head_end])):
                    break  # an error's answer: it has no chunked end to wait for
    except OSError as error:
        raise StreamCheckFailed(f"the request failed: {error}") from error
    head_end = raw.find(b"\r\n\r\n")
    if head_end < 0:
        raise StreamCheckFailed(f"no whole response head: {bytes(raw[:200])!r}")
    if not streamed_head(bytes(raw[:head_end])):
        raise StreamCheckFailed(f"answered {bytes(raw[:400])!r}, not a chunked 200")
    text = dechunk(bytes(raw[head_end + 4 :]))
    events = [event for event in text.split(b"\n\n") if event.strip()]
    if not events or events[-1].strip() != b"data: [DONE]":
        raise StreamCheckFailed("the stream does not end with data: [DONE]")
    usage = None
    for event in events[:-1]:
        if not event.startswith(b"data: "):
            continue
        payload = json.loads(event[len(b"data: ") :])
        if isinstance(payload.get("usage"), dict):
            usage = payload["usage"]
    if usage is None or "total_tokens" not in usage:
        raise StreamCheckFailed("no usage chunk, though the request asked for one")
    # When each event was complete: the read that brought its "\n\n" (the chunk framing
    # has none of its own).
    arrivals = []
    start = 0
    while (found := raw.find(b"\n\n", start)) >= 0:
        arrivals.append(next(at for at, upto in reads if upto > found + 1))
        start = found + 2
    check = StreamCheck(
        events=len(events),
        reads_with_events=len(set(arrivals)),
        first_event_ms=(arrivals[0] - sent) * 1e3,
        span_ms=(arrivals[-1] - arrivals[0]) * 1e3,
        usage=usage,
    )
    if judge_timing and (
        check.reads_with_events < stream_chunks + 1
        or check.span_ms < stream_chunks * chunk_interval_ms / 2
    ):
        raise StreamCheckFailed(f"the answer was held back, not streamed: {check.show()}")
    return check


def check_path(target: Endpoint, args: argparse.Namespace) -> StreamCheck:
    """:func:`check_stream` twice on one path: the first request warms the proxy (its
    shape is checked, not its timing), the second is judged and reported."""
    for judged in (False, True):
        check = check_stream(
            target.port,
            target.key,
            stream_chunks=args.stream_chunks,
            chunk_interval_ms=args.chunk_interval_ms,
            judge_timing=judged,
        )
    return check


def node_for_rest() -> str:
    """Node for ``bench/node/rest_load.mjs``, which needs only Node's built-ins (so not
    :func:`harness.node_binary`, which also wants ``ws`` installed)."""
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed (bench/node/rest_load.mjs needs Node 20+)")
    return found


def load_command(
    client: str, target: Endpoint, streams: int, args: argparse.Namespace
) -> list[str]:
    common = [
        "--port",
        str(target.port),
        "--path",
        CHAT_PATH,
        "--key",
        target.key,
        "--model",
        MODEL,
        "--streams",
        str(streams),
        "--warmup-s",
        str(args.warmup_s),
        "--duration-s",
        str(args.duration_s),
        "--drain-s",
        str(DRAIN_S),
        "--stagger-ms",
        str(args.chunk_interval_ms),
        "--max-requests",
        str(args.max_requests),
    ]
    if client == "ours":
        return [sys.executable, str(REPO / "bench/rest_client.py"), *common]
    return [node_for_rest(), str(NODE_DIR / "rest_load.mjs"), *common]


def measure_rest(
    running: Rig, target: Endpoint, sim_pid: int, client: str, streams: int, run: Run, args: Any
) -> Run:
    """One load process against ``target``; CPU of the proxy, the load and the simulator
    sampled when the load says its measured window starts and ends."""
    cpus = running.load_cpus
    stderr_path = running.work_dir / f"load-{client}-{target.name}-{streams}.err"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            load_command(client, target, streams, args),
            cwd=REPO,
            env=running.env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    deadline = time.monotonic() + args.warmup_s + args.duration_s + DRAIN_S + 60
    samples: dict[str, tuple[float, float, float, float]] = {}
    try:
        for event in load_events(process, deadline):
            kind = event["event"]
            if kind in ("window_start", "window_end"):
                samples[kind] = (
                    time.monotonic(),
                    cpu_seconds(target.pid),
                    cpu_seconds(process.pid),
                    cpu_seconds(sim_pid),
                )
            elif kind == "result":
                run.requests, run.chunks = event["requests"], event["chunks"]
                run.started, run.unfinished = event["started"], event["unfinished"]
                run.errors = dict(event["errors"])
                run.ttfb, run.gap = event["ttfb"], event["gap"]
        process.wait(timeout=DRAIN_S + 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0 or not run.ttfb:
        raise RuntimeError(
            f"{client} load against {target.name} exited {process.returncode}: "
            + stderr_path.read_text(errors="replace")[-2000:]
        )
    if "window_start" in samples and "window_end" in samples:
        start, end = samples["window_start"], samples["window_end"]
        run.window_s = end[0] - start[0]
        run.proxy_cpu_s = end[1] - start[1]
        run.load_cpu_s = end[2] - start[2]
        run.sim_cpu_s = end[3] - start[3]
    if run.unfinished:
        run.errors["unfinished_after_drain"] = run.unfinished
    return run


# ---------------------------------------------------------------- figures


def spread(runs: list[Run], figure: Callable[[Run], float]) -> Spread:
    return Spread.of(figure(run) for run in runs)


def paired(
    by_round: dict[tuple[str, int], Run],
    path: str,
    base: str,
    figure: Callable[[Run], float],
    combine: Callable[[float, float], float],
) -> Spread:
    """``combine(figure(path's run), figure(base's run))`` within each round."""
    values = []
    for (name, number), run in by_round.items():
        other = by_round.get((base, number))
        if name == path and other is not None:
            values.append(combine(figure(run), figure(other)))
    return Spread.of(values)


def minus(a: float, b: float) -> float:
    return a - b


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def ttfb50(run: Run) -> float:
    return run.quantile("ttfb", 0.50)


def ttfb99(run: Run) -> float:
    return run.quantile("ttfb", 0.99)


def gap50(run: Run) -> float:
    return run.quantile("gap", 0.50)


def gap99(run: Run) -> float:
    return run.quantile("gap", 0.99)


def per_request(run: Run) -> float:
    return run.per(run.requests)


def per_chunk(run: Run) -> float:
    return run.per(run.chunks)


def proxy_percent(run: Run) -> float:
    return run.percent(run.proxy_cpu_s) if run.path != "direct" else math.nan


def load_percent(run: Run) -> float:
    return run.percent(run.load_cpu_s)


def sim_percent(run: Run) -> float:
    return run.percent(run.sim_cpu_s)


def load_core_percent(run: Run) -> float:
    """The load process and the simulator together: the load core's use when pinned."""
    return run.percent(run.load_cpu_s + run.sim_cpu_s)


def summarise(
    runs: list[Run], clients: list[str], streams_list: list[int], paths: tuple[str, ...] = PATHS
) -> dict[str, Any]:
    """Per client, stream count and path: the figures as Spreads, paired ones per round."""
    summary: dict[str, Any] = {}
    for client in clients:
        summary[client] = {}
        for streams in streams_list:
            mine = [run for run in runs if run.client == client and run.streams == streams]
            by_round = {(run.path, run.round): run for run in mine}
            rows: dict[str, Any] = {}
            for path in paths:
                path_runs = [run for run in mine if run.path == path]
                if not path_runs:
                    continue
                errors: dict[str, int] = {}
                for run in path_runs:
                    for kind, count in run.errors.items():
                        errors[kind] = errors.get(kind, 0) + count
                rows[path] = {
                    "requests": sum(run.requests for run in path_runs),
                    "chunks": sum(run.chunks for run in path_runs),
                    "errors": errors,
                    "ttfb_p50_ms": spread(path_runs, ttfb50),
                    "ttfb_p99_ms": spread(path_runs, ttfb99),
                    "ttfb_added_p50_ms": paired(by_round, path, "direct", ttfb50, minus),
                    "ttfb_added_p99_ms": paired(by_round, path, "direct", ttfb99, minus),
                    "gap_p50_ms": spread(path_runs, gap50),
                    "gap_p99_ms": spread(path_runs, gap99),
                    "gap_added_p99_ms": paired(by_round, path, "direct", gap99, minus),
                    "cpu_us_per_request": spread(path_runs, per_request),
                    "cpu_us_per_chunk": spread(path_runs, per_chunk),
                    "cpu_percent": spread(path_runs, proxy_percent),
                    "cpu_per_chunk_x_nginx": paired(by_round, path, "nginx", per_chunk, ratio),
                    "cpu_per_chunk_x_litellm": paired(by_round, path, "litellm", per_chunk, ratio),
                    "load_cpu_percent": spread(path_runs, load_percent),
                    "sim_cpu_percent": spread(path_runs, sim_percent),
                    "load_core_percent": spread(path_runs, load_core_percent),
                }
            summary[client][str(streams)] = rows
    return summary


def judge(summary: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's two targets, per client, on the medians."""
    verdicts: dict[str, Any] = {}
    for client, by_streams in summary.items():
        relay_at = by_streams.get(str(TTFB_TARGET_STREAMS), {}).get("relay")
        added = relay_at["ttfb_added_p99_ms"].median if relay_at else math.nan
        ratios = {
            streams: rows["relay"]["cpu_per_chunk_x_nginx"].median
            for streams, rows in by_streams.items()
            if "relay" in rows and "nginx" in rows
        }
        verdicts[client] = {
            "ttfb_added_p99_ms_at_50": added,
            "ttfb_met": (added < TTFB_ADDED_P99_TARGET_MS) if not math.isnan(added) else None,
            "cpu_per_chunk_x_nginx": ratios,
            "cpu_met": (
                all(value <= CPU_X_NGINX_TARGET for value in ratios.values())
                if ratios and not any(math.isnan(value) for value in ratios.values())
                else None
            ),
        }
    return verdicts


def load_flag(judged: Spread, shown: Spread | None = None) -> str:
    """``shown`` (default ``judged``), with ``!`` when ``judged`` reached saturation."""
    text = (shown or judged).show(".0f")
    return f"{text}!" if judged.n and judged.high >= SATURATED_PERCENT else text


def table(
    summary: dict[str, Any],
    verdicts: dict[str, Any],
    args: argparse.Namespace,
    litellm: LiteLLMStatus | None = None,
    checks: dict[str, StreamCheck] | None = None,
) -> list[str]:
    columns = (
        f"{'path':<12} {'requests':>8} {'chunks':>8} {'TTFB p50 ms':>17} {'p99 ms':>17} "
        f"{'added p50':>17} {'added p99':>17} {'gap p99 ms':>17} {'added':>17} "
        f"{'CPU us/req':>17} {'us/chunk':>17} {'x nginx':>17} {'proxy %':>9} {'load %':>9} "
        f"{'sim %':>9} errors"
    )
    jitter = f" ±{args.chunk_jitter_ms} ms" if args.chunk_jitter_ms else ""
    lines = [
        f"REST proxy: streamed chat completions ({args.stream_chunks} deltas, one SSE event "
        f"per HTTP chunk, {args.chunk_interval_ms} ms apart{jitter}), {args.rounds} interleaved "
        f"rounds of {args.duration_s:g} s{', pinned' if args.pin else ''}, upstream "
        f"{UPSTREAM_NAMES[args.upstream]}; median (min-max)",
    ]
    for client, by_streams in summary.items():
        for streams, rows in by_streams.items():
            lines += ["", f"client {client}, {streams} streams", columns]
            for path, row in rows.items():
                base = path == "direct"
                x_nginx = row["cpu_per_chunk_x_nginx"].show(".2f")
                sim_cell = (
                    load_flag(row["load_core_percent"], row["sim_cpu_percent"])
                    if args.pin
                    else row["sim_cpu_percent"].show(".0f")
                )
                lines.append(
                    f"{path:<12} {row['requests']:>8} {row['chunks']:>8} "
                    f"{row['ttfb_p50_ms'].show('.2f'):>17} {row['ttfb_p99_ms'].show('.2f'):>17} "
                    f"{'' if base else row['ttfb_added_p50_ms'].show('+.2f'):>17} "
                    f"{'' if base else row['ttfb_added_p99_ms'].show('+.2f'):>17} "
                    f"{row['gap_p99_ms'].show('.2f'):>17} "
                    f"{'' if base else row['gap_added_p99_ms'].show('+.2f'):>17} "
                    f"{row['cpu_us_per_request'].show('.0f'):>17} "
                    f"{row['cpu_us_per_chunk'].show('.1f'):>17} "
                    f"{x_nginx if path in PROXIES_X_NGINX else '':>17} "
                    f"{'' if base else load_flag(row['cpu_percent']):>9} "
                    f"{load_flag(row['load_cpu_percent']):>9} "
                    f"{sim_cell:>9} "
                    f"{json.dumps(row['errors']) if row['errors'] else '-'}"
                )
    lines.append("")
    for client, verdict in verdicts.items():
        added = verdict["ttfb_added_p99_ms_at_50"]
        ratios = ", ".join(
            f"{number(value, '.2f')}x at {streams}"
            for streams, value in verdict["cpu_per_chunk_x_nginx"].items()
        )
        lines.append(
            f"issue 15, client {client}: added p99 TTFB at {TTFB_TARGET_STREAMS} streams "
            f"{number(added, '+.2f')} ms (target < {TTFB_ADDED_P99_TARGET_MS:g}): "
            f"{verdict_word(verdict['ttfb_met'])}; relay CPU per chunk "
            f"{ratios or '-'} nginx's (target <= {CPU_X_NGINX_TARGET:g}x): "
            f"{verdict_word(verdict['cpu_met'])}"
        )
    lines += litellm_lines(summary)
    lines += [
        "",
        "TTFB: request written -> first SSE event; gap: one event's arrival to the next; "
        "added: paired with direct in the same round. CPU: the proxy's user+sys over the "
        "measured window (nginx: its workers too); proxy %: that in % of a core ('!' at "
        f"{SATURATED_PERCENT:.0f} %: the proxy is saturated, its latencies are its queue). "
        "load %: the load process's own CPU "
        f"('!' at {SATURATED_PERCENT:.0f} % of a core: its latencies measure the load); "
        "sim %: the upstream's, on the load's core when pinned ('!' when it and the "
        "load together reach that share of the core).",
    ]
    if checks:
        lines.append(
            "stream check, before the rounds (a path's second request; the first warms it): "
            + "; ".join(f"{path} {check.show()}" for path, check in checks.items())
        )
    if litellm is not None:
        lines.append(litellm.note())
    return lines


def litellm_lines(summary: dict[str, Any]) -> list[str]:
    """Per client: LiteLLM's CPU per chunk against nginx's, and the relay's against it."""
    lines = []
    for client, by_streams in summary.items():
        parts = []
        for streams, rows in by_streams.items():
            if "litellm" not in rows:
                continue
            against = [f"{rows['litellm']['cpu_per_chunk_x_nginx'].show('.2f')}x nginx's"]
            if "relay" in rows:
                relay_x = rows["relay"]["cpu_per_chunk_x_litellm"].show(".2f")
                against.append(f"the relay's {relay_x}x LiteLLM's")
            parts.append(f"{', '.join(against)} at {streams}")
        if parts:
            lines.append(f"LiteLLM, client {client}: CPU per chunk {'; '.join(parts)}")
    return lines


def number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def verdict_word(met: bool | None) -> str:
    return "not measured" if met is None else "met" if met else "NOT met"


def to_json(value: Any) -> Any:
    if isinstance(value, Spread):
        return value.to_json()
    if isinstance(value, dict):
        return {key: to_json(item) for key, item in value.items()}
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument(
        "--streams", default=DEFAULT_STREAMS, help="concurrent streams, comma-separated"
    )
    parser.add_argument("--duration-s", type=float, default=DEFAULT_DURATION_S)
    parser.add_argument("--warmup-s", type=float, default=DEFAULT_WARMUP_S)
    parser.add_argument(
        "--clients", default=",".join(CLIENTS), help="load clients: ours, node (comma-separated)"
    )
    parser.add_argument(
        "--chunk-interval-ms",
        type=int,
        default=DEFAULT_CHUNK_INTERVAL_MS,
        help="milliseconds between an answer's SSE events (the simulator's "
        "--rest-chunk-interval-ms)",
    )
    parser.add_argument(
        "--chunk-jitter-ms",
        type=int,
        help="--upstream c: each wait between events is the interval plus a uniform draw "
        f"in [-J, +J] ms (default {DEFAULT_CHUNK_JITTER_MS}; 0: a fixed interval, and "
        "streams that start together stay in lockstep)",
    )
    parser.add_argument(
        "--stream-chunks",
        type=int,
        default=DEFAULT_STREAM_CHUNKS,
        help="text deltas per answer (the simulator's --rest-stream-chunks)",
    )
    parser.add_argument(
        "--upstream",
        choices=UPSTREAMS,
        default=DEFAULT_UPSTREAM,
        help="c: bench/c/sse_upstream.c (light); simulator: relay simulate",
    )
    parser.add_argument("--max-requests", type=int, default=1_000_000, help="per load run, a bound")
    parser.add_argument("--relay-log-level", default="warning")
    parser.add_argument("--pin", action="store_true", help="relay on CPU 0, the rest on CPU 1")
    parser.add_argument("--out", type=Path, help="write the runs and the summary as JSON here")
    parser.add_argument(
        "--relay-before",
        type=Path,
        help=f"another work tree's relay (an older commit), measured as {RELAY_BEFORE} in the "
        "same interleaved rounds: a before/after on one machine state",
    )
    parser.add_argument(
        "--paths",
        help=f"paths, comma-separated (default: all of {','.join(PATHS)}, LiteLLM reported "
        "'not measured' when it cannot be installed or started; naming litellm here "
        "makes that an error)",
    )
    args = parser.parse_args()
    streams_list = [int(value) for value in args.streams.split(",") if value]
    if args.chunk_jitter_ms is None:
        args.chunk_jitter_ms = DEFAULT_CHUNK_JITTER_MS if args.upstream == "c" else 0
    elif args.chunk_jitter_ms and args.upstream != "c":
        parser.error("--chunk-jitter-ms needs --upstream c")
    if not 0 <= args.chunk_jitter_ms <= args.chunk_interval_ms:
        parser.error("--chunk-jitter-ms must be from 0 to --chunk-interval-ms")
    clients = [value for value in args.clients.split(",") if value]
    for client in clients:
        if client not in CLIENTS:
            parser.error(f"unknown client {client!r}: {', '.join(CLIENTS)}")
    paths = list(PATHS) if args.paths is None else [v for v in args.paths.split(",") if v]
    for path in paths:
        if path not in PATHS and not (path == RELAY_BEFORE and args.relay_before):
            parser.error(f"unknown path {path!r}: {', '.join(PATHS)}")
    if args.relay_before is not None:
        if not (args.relay_before / "relay" / "__init__.py").is_file():
            parser.error(f"--relay-before {args.relay_before}: no relay package there")
        if RELAY_BEFORE not in paths:
            paths.insert(paths.index("relay") + 1 if "relay" in paths else len(paths), RELAY_BEFORE)
    if "nginx" in paths and find_nginx() is None:
        parser.error("nginx is not installed (scripts/install installs it)")
    litellm = LiteLLMStatus(explicit=args.paths is not None) if "litellm" in paths else None
    installed: Installed | None = None
    if litellm is not None:
        try:
            installed = ensure_installed()
        except LiteLLMUnavailable as error:
            if litellm.explicit:
                print(f"rest.py: LiteLLM could not be installed: {error}", file=sys.stderr)
                return 1
            litellm.reason = f"it could not be installed: {error}"
            paths.remove("litellm")
            print(f"rest.py: litellm not measured: {litellm.reason}", file=sys.stderr)
        else:
            litellm.version = installed.version
    runs: list[Run] = []
    checks: dict[str, StreamCheck] = {}
    began = time.monotonic()
    with rig(pinned=args.pin, relay_log_level=args.relay_log_level) as running:
        if args.upstream == "c":
            sim_port = running.start_light_sse_upstream(
                chunk_interval_ms=args.chunk_interval_ms,
                stream_chunks=args.stream_chunks,
                chunk_jitter_ms=args.chunk_jitter_ms,
            )
        else:
            sim_port = running.start_simulator(
                extra_args=(
                    "--rest-chunk-interval-ms",
                    str(args.chunk_interval_ms),
                    "--rest-stream-chunks",
                    str(args.stream_chunks),
                )
            )
        sim_pid = running.targets["direct"].pid
        targets = {"direct": Endpoint("direct", sim_port, SIM_KEY, sim_pid)}
        if "relay" in paths:
            relay = running.start_relay("relay", f"ws://127.0.0.1:{sim_port}/v1")
            targets["relay"] = Endpoint("relay", port_of(relay.url), CLIENT_KEY, relay.pid)
        if RELAY_BEFORE in paths:
            before = running.start_relay(
                RELAY_BEFORE, f"ws://127.0.0.1:{sim_port}/v1", checkout=args.relay_before
            )
            targets[RELAY_BEFORE] = Endpoint(
                RELAY_BEFORE, port_of(before.url), CLIENT_KEY, before.pid
            )
        if "nginx" in paths:
            nginx = running.start_nginx(sim_port, conf_template=REST_NGINX_CONF)
            assert nginx is not None
            targets["nginx"] = Endpoint("nginx", port_of(nginx.url), SIM_KEY, nginx.pid)
        litellm_process: subprocess.Popen[bytes] | None = None
        for path in paths:
            try:
                if path == "litellm":
                    assert installed is not None
                    assert litellm is not None
                    targets[path], litellm_process = start_litellm(
                        running, installed, sim_port, litellm
                    )
                checks[path] = check_path(targets[path], args)
            except (LiteLLMUnavailable, StreamCheckFailed) as error:
                if path != "litellm" or (litellm is not None and litellm.explicit):
                    print(f"rest.py: {path}: {error}", file=sys.stderr)
                    return 1
                assert litellm is not None
                litellm.reason = str(error)
                print(f"rest.py: litellm not measured: {error}", file=sys.stderr)
            else:
                print(f"stream check, {path}: {checks[path].show()}", file=sys.stderr)
        if litellm is not None and "litellm" in paths:
            litellm.measured = "litellm" in checks
            if not litellm.measured:
                paths.remove("litellm")
        total = args.rounds * len(streams_list) * len(clients) * len(paths)
        for number in range(args.rounds):
            for streams in streams_list:
                for client in rotated(clients, number):
                    for path in rotated(paths, number):
                        print(
                            f"[{len(runs) + 1}/{total}] round {number + 1}/{args.rounds}: "
                            f"{client}, {streams} streams, {path}",
                            file=sys.stderr,
                        )
                        run = Run(client, streams, path, number)
                        if path != "litellm":
                            runs.append(
                                measure_rest(
                                    running, targets[path], sim_pid, client, streams, run, args
                                )
                            )
                            continue
                        assert litellm_process is not None
                        runs.append(
                            measure_kept(
                                running, targets[path], litellm_process, sim_pid, run, args
                            )
                        )
    summary = summarise(runs, clients, streams_list, tuple(paths))
    verdicts = judge(summary)
    lines = table(summary, verdicts, args, litellm, checks)
    print("\n".join(lines))
    print(f"({time.monotonic() - began:.0f} s)", file=sys.stderr)
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "config": {
                        "rounds": args.rounds,
                        "streams": streams_list,
                        "clients": clients,
                        "paths": paths,
                        "duration_s": args.duration_s,
                        "warmup_s": args.warmup_s,
                        "chunk_interval_ms": args.chunk_interval_ms,
                        "chunk_jitter_ms": args.chunk_jitter_ms,
                        "stream_chunks": args.stream_chunks,
                        "upstream": args.upstream,
                        "pinned": args.pin,
                        "relay_log_level": args.relay_log_level,
                        "machine": platform.platform(),
                        "python": platform.python_version(),
                        "cpus": os.cpu_count(),
                    },
                    "summary": to_json(summary),
                    "targets": {
                        "ttfb_added_p99_ms": TTFB_ADDED_P99_TARGET_MS,
                        "ttfb_streams": TTFB_TARGET_STREAMS,
                        "cpu_per_chunk_x_nginx": CPU_X_NGINX_TARGET,
                        "verdicts": verdicts,
                    },
                    "stream_checks": {path: asdict(check) for path, check in checks.items()},
                    "litellm": (
                        {"note": litellm.note(), **asdict(litellm)}
                        if litellm is not None
                        else {"note": "litellm: not asked for (--paths)"}
                    ),
                    "table": lines,
                    "runs": [asdict(run) for run in runs],
                },
                indent=2,
                default=str,
            )
        )
    return 0


def start_litellm(
    running: Rig, installed: Installed, upstream_port: int, status: LiteLLMStatus
) -> tuple[Endpoint, subprocess.Popen[bytes]]:
    """LiteLLM's proxy on the servers' cores, configured in the run's directory."""
    directory = running.work_dir / "litellm"
    directory.mkdir(exist_ok=True)
    config = directory / "config.yaml"
    status.config = config_yaml(upstream_port=upstream_port, model=MODEL, upstream_key=SIM_KEY)
    config.write_text(status.config)
    port = free_port()
    status.command = proxy_command(installed, config, port)
    env = proxy_env(running.env)
    status.env = {key: env[key] for key in sorted(set(env) - set(running.env))}
    try:
        target = running.start_server(
            "litellm",
            status.command,
            port,
            MASTER_KEY,
            env=env,
            cwd=directory,
            timeout_s=STARTUP_TIMEOUT_S,
        )
    except RuntimeError as error:
        log = running.server_log("litellm")
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise LiteLLMUnavailable(f"it did not start: {error}; its output ends: {tail}") from error
    process = next(p for p in running.processes if p.pid == target.pid)
    return Endpoint("litellm", port, MASTER_KEY, target.pid), process


def measure_kept(
    running: Rig,
    target: Endpoint,
    process: subprocess.Popen[bytes],
    sim_pid: int,
    run: Run,
    args: argparse.Namespace,
) -> Run:
    """:func:`measure_rest` for LiteLLM, whose failures are figures, not the end of the
    bench: a load run that fails is kept with the reason, and once the proxy has exited
    its remaining runs say so."""
    if process.poll() is not None:
        run.errors["proxy_exited"] = 1
        run.failure = f"LiteLLM exited with {process.returncode} before this run"
        return run
    try:
        return measure_rest(running, target, sim_pid, run.client, run.streams, run, args)
    except (RuntimeError, TimeoutError) as error:
        run.errors["load_failed"] = 1
        run.failure = str(error)[-1000:]
        print(f"rest.py: litellm run failed: {run.failure}", file=sys.stderr)
        return run


def port_of(url: str) -> int:
    """The port of a rig target's ``ws://127.0.0.1:PORT/v1``."""
    return int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


if __name__ == "__main__":
    raise SystemExit(main())
