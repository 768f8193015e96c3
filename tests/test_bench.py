"""The benchmark code cannot rot: tiny runs in CI. Counts are asserted, never timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio

from relay.loadgen import run_stream
from tests.conftest import CLIENT_KEY, SIM_KEY, start_relay, start_simulator

REPO = Path(__file__).resolve().parent.parent


async def test_loadgen_stream_through_relay_and_direct(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    for url, key in ((simulator.ws_base, SIM_KEY), (relay.ws_base, CLIENT_KEY)):
        result = await run_stream(url, key, sessions=3, duration_s=1.0)
        assert result.sessions_opened == 3
        assert result.sent > 0
        assert result.lost == 0
        assert result.received == result.sent
        assert result.errors == {}
        assert result.rtt_ms["p50"] <= result.rtt_ms["max"]


async def test_loadgen_counts_refused_sessions(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    result = await run_stream(simulator.ws_base, "wrong-key", sessions=2, duration_s=0.1)
    assert result.sessions_opened == 0
    assert result.errors == {"handshake_401": 2}


def test_bench_script_quick_run(tmp_path: Path) -> None:
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


async def test_relay_bench_command(nursery: trio.Nursery, tmp_path: Path) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    out = tmp_path / "result.json"
    completed = await trio.run_process(
        [
            sys.executable,
            "-m",
            "relay",
            "bench",
            "--url",
            simulator.ws_base,
            "--key",
            SIM_KEY,
            "--sessions",
            "2",
            "--duration-s",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert b"lost 0" in completed.stdout
    result = json.loads(out.read_text())
    assert result["sessions_opened"] == 2
    assert result["lost"] == 0


def test_concurrency_ramp_reports_the_last_step_that_held(tmp_path: Path) -> None:
    out = tmp_path / "ramp.json"
    completed = subprocess.run(
        [
            sys.executable,
            "bench/relay_throughput.py",
            "--ramp",
            "2,4",
            "--duration-s",
            "1",
            "--warmup-s",
            "0.5",
            "--budget-ms",
            "1000",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    ramp = json.loads(out.read_text())["ramp"]
    assert [step["n"] for step in ramp["steps"]] == [2, 4]
    assert all(step["held"] and step["lost"] == 0 for step in ramp["steps"])
    assert ramp["sessions_at_budget"] == 4
    assert "concurrency limit: 4 real-time sessions" in completed.stdout


async def test_churn_and_idle_profiles(nursery: trio.Nursery) -> None:
    from relay.loadgen import run_churn, run_idle

    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    churn = await run_churn(relay.ws_base, CLIENT_KEY, workers=3, duration_s=1.0)
    assert churn.sessions_completed > 0
    assert churn.errors == {}
    assert churn.handshake_ms["p50"] <= churn.handshake_ms["max"]
    held: list[int] = []
    idle = await run_idle(relay.ws_base, CLIENT_KEY, sessions=5, hold_s=0.3, on_held=held.append)
    assert held == [5]
    assert relay.server.live_sessions == 0 or idle.sessions_held == 5
    assert idle.sessions_held == 5
    assert idle.errors == {}
