"""bench/rest.py cannot rot: one tiny run of the relay's paths with both clients.

Counts and shapes are asserted, never timings. LiteLLM's path is left out (``--paths``):
it installs LiteLLM into a venv of its own, about 750 MB from the package index
(tests/test_bench_litellm.py checks its parts).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_bench import run_bench_script


@pytest.mark.slow  # a benchmark run: simulator, relay and nginx, two load clients
def test_rest_bench_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "rest.json"
    completed = run_bench_script(
        "bench/rest.py",
        *("--rounds", "1", "--duration-s", "1", "--warmup-s", "0.5", "--streams", "4"),
        *("--paths", "direct,relay,nginx", "--chunk-jitter-ms", "3"),
        # This checkout again as the "before" relay: the before/after path runs.
        *("--relay-before", str(Path(__file__).resolve().parents[1])),
        *("--out", str(out)),
        timeout_s=180,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert set(summary) == {"ours", "node"}
    for client, by_streams in summary.items():
        rows = by_streams["4"]
        assert set(rows) == {"direct", "relay", "relay@before", "nginx"}, client
        assert rows["relay@before"]["cpu_per_chunk_x_nginx"]["median"] > 0, client
        for path, row in rows.items():
            assert row["requests"] > 0, (client, path)
            # Chunks by arrival, requests by completion: the window's edges split some.
            assert row["chunks"] > row["requests"] * 10, (client, path)
            assert row["errors"] == {}, (client, path)
            assert row["ttfb_p50_ms"]["median"] > 0, (client, path)
            assert row["gap_p99_ms"]["n"] == 1, (client, path)
            for figure in ("ttfb_p99_ms", "load_cpu_percent", "sim_cpu_percent"):
                assert row[figure]["n"] == 1, (client, path, figure)
        for figure in ("ttfb_added_p99_ms", "gap_added_p99_ms", "cpu_per_chunk_x_nginx"):
            assert figure in rows["relay"], (client, figure)
        assert client in report["targets"]["verdicts"]
    assert report["config"]["streams"] == [4]
    assert report["config"]["chunk_jitter_ms"] == 3
    assert "20 ms apart ±3 ms" in report["table"][0]
    assert len(report["runs"]) == 8
    assert report["litellm"]["note"] == "litellm: not asked for (--paths)"
    assert set(report["stream_checks"]) == {"direct", "relay", "relay@before", "nginx"}
    assert "issue 15, client ours" in completed.stdout
