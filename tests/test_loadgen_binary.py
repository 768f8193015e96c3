"""The load tool on the binary audio path (``relay bench --binary``), against the simulator.

Counts, shapes and byte accounting are asserted, never timings. The simulator
speaks ``relay.audio.v1`` itself, so these runs need no relay; ``raw-echo`` does
not select the subprotocol, which stands in for a server without the path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import trio

from relay.loadgen import LoadResult, LoadSpec, merge_results, profiles, run_load
from relay.loadgen.profiles import SEQUENCE_BYTES, _echoed_sequence, _sequenced_chunk
from tests.conftest import CLIENT_KEY, SIM_KEY, start_relay, start_simulator

REPO = Path(__file__).resolve().parent.parent
#: Per 20 ms chunk the binary client leg carries 968 + 964 bytes against about
#: 1,340 + 1,430 on JSON (docs/binary-audio.md): 0.70. The window's edges move it a little.
BINARY_BYTES_SHARE_MAX = 0.76


async def _relay_bench_binary(
    url: str, *, sessions: int, duration_s: float
) -> subprocess.CompletedProcess[bytes]:
    command = [sys.executable, "-m", "relay", "bench", "--url", url, "--key", SIM_KEY]
    command += ["--sessions", str(sessions), "--duration-s", str(duration_s)]
    command += ["--binary", "--no-progress"]
    return await trio.run_process(
        command, cwd=REPO, capture_stdout=True, capture_stderr=True, check=False
    )


def _spec(profile: str, url: str, **fields: object) -> LoadSpec:
    return msgspec.convert({"profile": profile, "url": url, "key": SIM_KEY, **fields}, LoadSpec)


def test_a_sequence_number_rides_in_the_audio_and_comes_back_out() -> None:
    pcm = bytes(range(48)) * 20
    chunk = _sequenced_chunk(pcm, 70_000)
    assert len(chunk) == len(pcm)
    assert chunk[SEQUENCE_BYTES:] == pcm[SEQUENCE_BYTES:]
    assert _echoed_sequence(memoryview(chunk)) == 70_000


def test_merged_results_keep_the_client_leg_figures() -> None:
    parts = []
    for sent in (1000, 3000):
        part = LoadResult(profile="stream", sessions_requested=1, duration_s=1.0, window_s=1.0)
        part.binary = True
        part.client_bytes_sent, part.client_bytes_received = sent, sent + 10
        part.window_audio_s = 0.5
        parts.append(LoadResult.from_json(part.to_json()))
    merged = merge_results(parts)
    assert merged.binary
    assert (merged.client_bytes_sent, merged.client_bytes_received) == (4000, 4020)
    assert merged.client_bytes_per_audio_s == 8020.0


async def test_stream_binary_against_json_on_the_same_server(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    results: dict[bool, LoadResult] = {}
    for binary in (False, True):
        result = await run_load(
            _spec(
                "stream", simulator.ws_base, sessions=3, duration_s=1.0, warmup_s=0.2, binary=binary
            )
        )
        assert result.errors == {}, binary
        assert result.sessions_opened == 3
        assert result.lost == 0
        assert result.received == result.sent > 0
        assert result.histogram("rtt").total == result.received
        assert result.binary is binary
        assert result.window_audio_s > 0
        assert result.client_bytes_sent > 0
        assert result.client_bytes_received > 0
        results[binary] = result
    share = results[True].client_bytes_per_audio_s / results[False].client_bytes_per_audio_s
    assert share < BINARY_BYTES_SHARE_MAX


async def test_stream_binary_through_the_relay(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    relay = await start_relay(nursery, simulator.ws_base)
    result = await run_load(
        msgspec.convert(
            {"profile": "stream", "url": relay.ws_base, "key": CLIENT_KEY, "sessions": 3}
            | {"duration_s": 0.5, "binary": True},
            LoadSpec,
        )
    )
    assert result.errors == {}
    assert result.lost == 0
    assert result.received == result.sent > 0
    # Binary both ways: 968 bytes per 20 ms append up, a 962-byte frame per echo down.
    assert result.client_bytes_sent < result.window_sent * 1000


async def test_flat_and_churn_on_the_binary_path(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    flat = await run_load(
        _spec("flat", simulator.ws_base, sessions=2, duration_s=0.5, window=4, binary=True)
    )
    assert flat.errors == {}
    assert flat.lost == 0
    assert flat.sent == flat.received > 2 * 4
    churn = await run_load(
        _spec("churn", simulator.ws_base, sessions=2, duration_s=0.5, binary=True)
    )
    assert churn.errors == {}
    assert churn.sessions_completed > 0


async def test_voice_turns_on_the_binary_path(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(
        nursery, realtime_pacing=True, response_audio_ms=300, delta_audio_ms=100
    )
    result = await run_load(
        _spec(
            "voice",
            simulator.ws_base,
            sessions=2,
            duration_s=1.0,
            speech_ms=200,
            pause_ms=50,
            binary=True,
        )
    )
    assert result.errors == {}
    assert result.lost == 0
    assert result.turns >= 2
    # 300 ms answers in 100 ms deltas, each a binary frame: three per turn.
    assert result.received == 3 * result.turns
    assert result.histogram("first_delta").total == result.turns
    assert result.histogram("jitter").total == 2 * result.turns


async def test_a_server_that_does_not_select_the_binary_path_fails_the_run(
    nursery: trio.Nursery,
) -> None:
    simulator = await start_simulator(nursery, mode="raw-echo")
    result = await run_load(_spec("stream", simulator.ws_base, sessions=2, binary=True))
    assert result.sessions_opened == 0
    assert result.errors == {"binary_audio_not_selected": 2}
    completed = await _relay_bench_binary(simulator.ws_base, sessions=1, duration_s=0.2)
    assert completed.returncode == 1
    assert b"did not select relay.audio.v1" in completed.stdout


async def test_relay_bench_binary_reports_the_client_leg(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery, mode="echo")
    completed = await _relay_bench_binary(simulator.ws_base, sessions=2, duration_s=0.5)
    assert completed.returncode == 0, completed.stderr
    assert b"client leg (binary, relay.audio.v1)" in completed.stdout
    assert b"bytes per second of audio" in completed.stdout


@pytest.mark.parametrize(
    ("body", "number"),
    [
        (b'{"type":"response.output_audio.delta","event_id":"42","delta":""}', 42),
        # A server that names its own events: no append matches, and no crash.
        (b'{"type":"response.output_audio.delta","event_id":"event_abc","delta":""}', -1),
        (b'{"type":"response.output_audio.delta","event_id":"\\u0661","delta":""}', -1),
        (b'{"type":"response.output_audio.delta","delta":""}', None),
        (b'{"type":"session.updated","event_id":"7"}', None),
    ],
)
def test_a_json_echo_is_matched_by_its_event_id_or_not_at_all(
    body: bytes, number: int | None
) -> None:
    assert profiles._echoed_number(memoryview(body), binary=False) == number
