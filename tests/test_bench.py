"""The load tool and the benchmark suite cannot rot: tiny runs in CI.

Counts, shapes and merges are asserted, never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from relay.loadgen import LatencyHistogram, LoadResult, LoadSpec, merge_results, run_load
from relay.loadgen.stats import RELATIVE_PRECISION
from tests.conftest import CLIENT_KEY, SIM_KEY, start_relay, start_simulator

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- sans-I/O parts


def test_histogram_percentiles_are_within_the_stated_precision() -> None:
    values = [0.05 + (i % 997) * 0.731 for i in range(20_000)]
    histogram = LatencyHistogram.of(values)
    ordered = sorted(values)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        exact = ordered[max(0, int(fraction * len(ordered) + 0.999999) - 1)]
        assert abs(histogram.percentile(fraction) - exact) <= exact * RELATIVE_PRECISION
    assert histogram.summary()["max"] == max(values)
    assert histogram.total == len(values)
    assert histogram.cdf()[-1][1] == 1.0


def test_histograms_merge_like_one_and_survive_the_wire() -> None:
    left_values = [0.1 * i for i in range(1, 500)]
    right_values = [3.0 + 0.01 * i for i in range(700)]
    left, right = LatencyHistogram.of(left_values), LatencyHistogram.of(right_values)
    left.merge(LatencyHistogram.from_wire(json.loads(json.dumps(right.to_wire()))))
    whole = LatencyHistogram.of(left_values + right_values)
    assert left.counts == whole.counts
    assert left.summary() == whole.summary()
    assert LatencyHistogram().summary()["p50"] != LatencyHistogram().summary()["p50"]  # NaN


def test_spec_splits_sessions_over_processes_without_losing_any() -> None:
    spec = LoadSpec(profile="stream", url="ws://127.0.0.1:1/v1", key="k", sessions=7)
    parts = spec.split(3)
    assert [part.sessions for part in parts] == [3, 2, 2]
    assert [part.index_offset for part in parts] == [0, 3, 5]
    assert len(spec.split(20)) == 7
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"profile": "stream", "url": "u", "key": "k", "sessions": 0}, LoadSpec)


def test_results_merge_counts_errors_and_cpu() -> None:
    first = LoadResult(profile="stream", sessions_requested=2, duration_s=1.0, window_s=1.0)
    second = LoadResult(profile="stream", sessions_requested=3, duration_s=1.0, window_s=1.0)
    first.sent, second.sent = 10, 15
    first.window_sent, second.window_sent = 8, 12
    first.count_error("closed_1011")
    second.count_error("closed_1011")
    first.note_load_cpu(0.2, 1.0)
    second.note_load_cpu(0.9, 1.0)
    first.histogram("rtt").record(1.0)
    second.histogram("rtt").record(2.0)
    merged = merge_results([LoadResult.from_json(first.to_json()), second])
    assert merged.sessions_requested == 5
    assert merged.sent == 25
    assert merged.messages_per_s == 20.0
    assert merged.errors == {"closed_1011": 2}
    assert merged.load_procs == 2
    assert merged.load_saturated
    assert merged.load_cpu_percent == pytest.approx(90.0)
    assert merged.histogram("rtt").total == 2


# ---------------------------------------------------------------- profiles on sockets


def _spec(profile: str, url: str, key: str, **fields: object) -> LoadSpec:
    return msgspec.convert({"profile": profile, "url": url, "key": key, **fields}, LoadSpec)


async def test_stream_profile_through_relay_and_direct(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    for url, key in ((simulator.ws_base, SIM_KEY), (relay.ws_base, CLIENT_KEY)):
        result = await run_load(_spec("stream", url, key, sessions=3, duration_s=1.0))
        assert result.sessions_opened == 3
        assert result.sent > 0
        assert result.lost == 0
        assert result.received == result.sent
        assert result.errors == {}
        assert result.histogram("rtt").total == result.received
        assert result.histogram("handshake").total == 3


async def test_refused_sessions_are_counted_by_kind(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    result = await run_load(_spec("stream", simulator.ws_base, "wrong-key", sessions=2))
    assert result.sessions_opened == 0
    assert result.errors == {"handshake_401": 2}


async def test_flat_profile_keeps_its_window_in_flight(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    # As fast as the window allows is over the relay's default frame rate limit (1000/s,
    # a burst of 5000) within the half second: the limit is not what this measures.
    relay = await start_relay(nursery, simulator.ws_base, client_max_frames_per_s=0)
    result = await run_load(
        _spec("flat", relay.ws_base, CLIENT_KEY, sessions=2, duration_s=0.5, window=4)
    )
    assert result.sessions_opened == 2
    assert result.lost == 0
    assert result.sent == result.received
    # Each session starts a window of 4 and each echo inside the run sends one more.
    assert result.sent > 2 * 4
    assert result.window_bytes > 0


async def test_voice_profile_turns_through_the_relay(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(
        nursery, realtime_pacing=True, response_audio_ms=300, delta_audio_ms=100
    )
    relay = await start_relay(nursery, simulator.ws_base)
    result = await run_load(
        _spec(
            "voice",
            relay.ws_base,
            CLIENT_KEY,
            sessions=2,
            duration_s=1.0,
            speech_ms=200,
            pause_ms=50,
        )
    )
    assert result.errors == {}
    assert result.lost == 0
    assert result.turns >= 2
    # 300 ms answers in 100 ms deltas: three per turn, the first timed from the commit.
    assert result.received == 3 * result.turns
    assert result.histogram("first_delta").total == result.turns
    assert result.histogram("jitter").total == 2 * result.turns


async def test_churn_and_idle_profiles(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    churn = await run_load(_spec("churn", relay.ws_base, CLIENT_KEY, sessions=3, duration_s=1))
    assert churn.sessions_completed > 0
    assert churn.errors == {}
    assert churn.histogram("handshake").total >= churn.sessions_completed
    ready: list[tuple[int, int]] = []
    idle = await run_load(
        _spec("idle", relay.ws_base, CLIENT_KEY, sessions=5, duration_s=0.3),
        on_ready=lambda opened: ready.append((opened, relay.server.live_sessions)),
    )
    assert ready == [(5, 5)]
    assert idle.sessions_held == 5
    assert idle.errors == {}


async def test_load_spread_over_processes_merges_into_one_result(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    phases: list[str] = []
    result = await run_load(
        _spec("stream", relay.ws_base, CLIENT_KEY, sessions=5, duration_s=0.5, warmup_s=0.2),
        processes=2,
        on_window=phases.append,
    )
    assert phases == ["start", "end"]
    assert result.load_procs == 2
    assert result.sessions_opened == 5
    assert result.lost == 0
    assert result.sent == result.received > 0
    assert result.histogram("rtt").total == result.received


# ---------------------------------------------------------------- commands


async def _relay_bench(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "relay", "bench", *args],
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_relay_bench_command(nursery: trio.Nursery, tmp_path: Path) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    out = tmp_path / "result.json"
    completed = await _relay_bench(
        "--url", simulator.ws_base, "--key", SIM_KEY, "--sessions", "2", "--duration-s", "1",
        "--load-procs", "2", "--json", str(out), "--no-progress",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert b"lost 0" in completed.stdout
    assert SIM_KEY.encode() not in completed.stdout + completed.stderr + out.read_bytes()
    result = json.loads(out.read_text())
    assert result["sessions_opened"] == 2
    assert result["lost"] == 0
    assert result["load_procs"] == 2
    assert result["rtt_ms"]["p50"] > 0


async def test_relay_bench_refuses_bad_arguments_in_one_line(nursery: trio.Nursery) -> None:
    completed = await _relay_bench("--url", "ws://127.0.0.1:9/v1", "--key", "k", "--sessions", "0")
    assert completed.returncode == 2
    assert completed.stderr.decode().startswith("relay: bench:")
    assert b"Traceback" not in completed.stderr


def run_bench_script(script: str, *args: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run a bench/ program to its end, output captured as text, from this checkout: its
    relay is imported from here, also from a git worktree sharing another checkout's venv."""
    return subprocess.run(
        [sys.executable, script, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.mark.slow  # a benchmark run, with nginx
def test_relay_throughput_quick_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, "bench/relay_throughput.py", "--quick", "--baselines", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(row["n"], row["path"]) for row in rows] == [
        (5, "direct"),
        (5, "relay"),
        (5, "splice"),
        (5, "nginx"),
    ]
    for row in rows[1:]:
        assert row["lost"] == 0
        assert row["relay_us_per_msg"] > 0
    assert "relay us/msg" in completed.stdout


@pytest.mark.slow  # a benchmark run, with nginx
def test_suite_tiny_run_prints_one_table_and_writes_json_and_plots(tmp_path: Path) -> None:
    completed = run_bench_script(
        "bench/suite.py", "--tiny", "--out", str(tmp_path), "--budget-ms", "1000", timeout_s=180
    )
    assert completed.returncode == 0, completed.stderr
    suite = json.loads((tmp_path / "suite.json").read_text())
    seen = {(row["scenario"].split()[0], row["path"]) for row in suite["rows"]}
    for profile in ("stream", "voice", "flat", "churn", "idle"):
        assert (profile, "relay") in seen
    assert {("stream", path) for path in ("direct", "relay/tls", "splice", "nginx")} <= seen
    for row in suite["rows"]:
        assert row["result"]["lost"] == 0, row
        assert row["result"]["errors"] == {}, row
    idle = next(row for row in suite["rows"] if row["scenario"].startswith("idle"))
    assert idle["result"]["sessions_held"] == idle["result"]["sessions_requested"]
    assert [step["sessions"] for step in suite["ramp"]["steps"]] == [2, 4]
    assert suite["ramp"]["sessions_at_budget"] == 4
    (audio,) = suite["audio"]
    assert {(row["path"], row["encoding"]) for row in audio["rows"]} == {
        (path, encoding) for path in ("direct", "relay") for encoding in ("json", "binary")
    }
    for row in audio["rows"]:
        assert row["lost"] == 0, row
        assert row["errors"] == {}, row
        assert row["client_bytes_per_audio_s"]["median"] > 0, row
        if row["encoding"] == "binary":
            assert row["client_bytes_x_json"]["median"] < 0.76, row
    assert audio["client_bytes_met"]
    table = (tmp_path / "table.txt").read_text()
    assert "concurrency limit: 4 sessions" in table
    assert "binary audio path against JSON, stream 3" in table
    assert table in completed.stdout
    for name in ("latency-cdf.png", "ramp.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a benchmark run: four paths, real processes
def test_failover_bench_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "failover.json"
    completed = run_bench_script(
        "bench/failover.py",
        *("--rounds", "1", "--duration-s", "0.5", "--sessions", "2", "--out", str(out)),
        timeout_s=120,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"direct", "relay", "relay/429", "relay/refused"}
    for path, row in summary.items():
        assert row["sessions"] > 0, path
        assert row["errors"] == {}, path
        assert row["handshake_p50_ms"]["median"] > 0, path
    assert "p50 added vs relay" in completed.stdout
