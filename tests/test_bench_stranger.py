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
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
PATHS = ("direct", "splice", "relay", "relay/tls", "nginx", "websockets+uvloop", "node-ws")
#: The binary-vs-JSON comparison's rows: each path with each client encoding.
AUDIO_ROWS = {(p, e) for p in ("direct", "relay") for e in ("json", "binary")}
#: Per 20 ms append and its answer, binary ÷ JSON on the client leg: (968 + 964) / (1,357
#: + 1,432) is 0.69 (docs/binary-audio.md); counted over a window, whose edges move it.
AUDIO_BYTES_SHARE_MAX = 0.76


def _stranger(tmp_path: Path, *options: str) -> dict[str, Any]:
    if shutil.which("node") is None or not (REPO / "bench/node/node_modules/ws").is_dir():
        pytest.skip("Node and bench/node/node_modules (scripts/install) are needed")
    completed = subprocess.run(
        [sys.executable, "bench/stranger.py", *options, "--out", str(tmp_path)],
        cwd=REPO,
        # The checkout's relay, also from a git worktree sharing another checkout's venv.
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "table.md").read_text() in completed.stdout
    result: dict[str, Any] = json.loads((tmp_path / "stranger.json").read_text())
    return result


def _check_audio(result: dict[str, Any]) -> None:
    """Every (path, encoding) ran without loss and the binary rows carried fewer bytes."""
    audio = result["audio"]
    runs = audio["runs"]
    assert {(run["path"], run["encoding"]) for run in runs} == AUDIO_ROWS
    for run in runs:
        load = run["load"]
        assert run["failure"] == "", run
        assert load["errors"] == {}, run
        assert load["binary"] is (run["encoding"] == "binary"), run
        assert load["lost"] == 0, run
        assert load["window_received"] > 0, run
        assert load["client_bytes_sent"] > 0, run
        assert load["client_bytes_received"] > 0, run
        assert run["client_bytes_per_audio_s"] > 0, run
        if run["path"] == "relay":
            assert run["target_us_per_msg"] > 0, run
    shares = [
        row["figures"]["client_bytes_x_json"]["median"]
        for row in audio["summaries"]
        if row["encoding"] == "binary"
    ]
    assert len(shares) == 2
    assert all(share < AUDIO_BYTES_SHARE_MAX for share in shares), shares
    verdict = audio["targets"]["audio 5"]
    assert verdict["client_bytes_met"]
    assert verdict["us_per_msg_x_json"] > 0


@pytest.mark.slow  # a benchmark run: Node, the delta upstream, a relay, four rows
def test_stranger_tiny_binary_against_json(tmp_path: Path) -> None:
    result = _stranger(tmp_path, "--tiny", "--audio-only")
    assert result["runs"] == []
    assert result["ramp"] is None
    _check_audio(result)
    table = (tmp_path / "table.md").read_text()
    assert "### Binary audio path against JSON: 5 sessions" in table
    assert "| relay | binary (relay.audio.v1) |" in table
    assert "Targets (issue 13)" in table


@pytest.mark.slow  # a benchmark run: Node, nginx, seven paths
def test_stranger_tiny_run_measures_every_path_without_loss(tmp_path: Path) -> None:
    result = _stranger(tmp_path, "--tiny")
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
    _check_audio(result)
    table = (tmp_path / "table.md").read_text()
    assert "bench/stranger.py --tiny" in table
