"""bench/stranger.py, the benchmark on a load tool not ours, cannot rot: a tiny run.

Counts and shapes are asserted, never timings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PATHS = ("direct", "splice", "relay", "relay/tls", "nginx", "websockets+uvloop", "node-ws")


@pytest.mark.slow  # a benchmark run: Node, nginx, seven paths
def test_stranger_tiny_run_measures_every_path_without_loss(tmp_path: Path) -> None:
    if shutil.which("node") is None or not (REPO / "bench/node/node_modules/ws").is_dir():
        pytest.skip("Node and bench/node/node_modules (scripts/install) are needed")
    completed = subprocess.run(
        [sys.executable, "bench/stranger.py", "--tiny", "--out", str(tmp_path)],
        cwd=REPO,
        # The checkout's relay, also from a git worktree sharing another checkout's venv.
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads((tmp_path / "stranger.json").read_text())
    assert tuple(result["paths"]) == PATHS
    runs = result["runs"]
    for path in PATHS:
        streamed = [r for r in runs if r["path"] == path and r["scenario"].startswith("stream")]
        assert len(streamed) == 2, path
        for run in streamed:
            load = run["load"]
            assert run["failure"] == "", run
            assert load["errors"] == {}, run
            assert load["window_sent"] > 0, run
            assert load["window_received"] > 0, run
            assert load["lost"] == 0, run
            assert load["rtt_ms"]["count"] > 0, run
        churned = [r for r in runs if r["path"] == path and r["scenario"].startswith("churn")]
        assert churned[0]["load"]["sessions_completed"] > 0, path
        assert churned[0]["load"]["lost"] == 0, path
        if path != "direct":
            assert streamed[0]["target_us_per_msg"] > 0, path
            idle = next(r for r in runs if r["path"] == path and r["scenario"].startswith("idle"))
            assert idle["load"]["sessions_held"] == idle["load"]["sessions_requested"], path
    # Steps are 5 and 10 sessions; a loaded machine may stop the ramp after the first.
    assert [step["sessions"] for step in result["ramp"]["steps"]] in ([5], [5, 10])
    table = (tmp_path / "table.md").read_text()
    assert "bench/stranger.py --tiny" in table
    assert table in completed.stdout
