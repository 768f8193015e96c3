"""Plain-text summaries of load results, as ``relay bench`` prints them.

This module owns the wording of a single run's report (the benchmark suite's
table lives in ``bench/``): sessions, losses, rates, latency percentiles and the
load side's own CPU with a warning when it saturated, so a reader knows whether
the figures describe the endpoint or the load generator, and the client leg's bytes
(both ways, per second of audio) for comparing the JSON and binary audio paths.
"""

from __future__ import annotations

from relay.loadgen.results import LoadResult


def _percentiles(values: dict[str, float]) -> str:
    return "  ".join(f"{name} {value:.2f}" for name, value in values.items())


def passed(result: LoadResult) -> bool:
    """Sessions opened, nothing lost, no errors (idle: every session still held)."""
    if result.profile == "idle" and result.sessions_held < result.sessions_requested:
        return False
    return result.sessions_opened > 0 and result.lost == 0 and not result.errors


def describe(result: LoadResult) -> str:
    opened = (
        f"{result.sessions_opened} sessions opened by {result.sessions_requested} workers"
        if result.profile == "churn"
        else f"sessions {result.sessions_opened}/{result.sessions_requested} opened"
    )
    lines = [
        f"{opened}  handshake to session.created ms: {_percentiles(result.latency('handshake'))}"
    ]
    profile = result.profile
    if profile in ("stream", "flat"):
        lines.append(
            f"sent {result.sent}  echoed {result.received}  lost {result.lost}  "
            f"{result.messages_per_s:.0f} msgs/s  {result.megabytes_per_s:.2f} MB/s in the window"
        )
        lines.append(f"round trip ms: {_percentiles(result.latency('rtt'))}")
    elif profile == "voice":
        lines.append(
            f"turns {result.turns}  audio deltas {result.received}  lost turns {result.lost}  "
            f"{result.messages_per_s:.0f} msgs/s in the window"
        )
        lines.append(
            f"commit to first audio delta ms: {_percentiles(result.latency('first_delta'))}"
        )
        lines.append(f"inter-delta jitter ms: {_percentiles(result.latency('jitter'))}")
    elif profile == "churn":
        lines.append(
            f"churn: {result.sessions_completed} sessions opened, used and closed in the window "
            f"({result.sessions_per_s:.1f}/s)"
        )
    else:
        lines.append(
            f"idle: {result.sessions_held}/{result.sessions_requested} sessions still open after "
            f"{result.duration_s:g} s"
        )
    if result.window_audio_s > 0:
        lines.append(
            f"client leg ({'binary, relay.audio.v1' if result.binary else 'JSON'}): "
            f"{result.client_bytes_sent:,} bytes sent, {result.client_bytes_received:,} "
            f"received in the window, {result.client_bytes_per_audio_s:,.0f} bytes per second "
            "of audio"
        )
    if "binary_audio_not_selected" in result.errors:
        lines.append(
            "the server did not select relay.audio.v1: it has no binary audio path, or has it "
            "turned off; run without --binary"
        )
    lines.append(f"errors: {result.errors or 'none'}")
    saturated = (
        "  (SATURATED: the load side may be the bottleneck; try --load-procs)"
        if result.load_saturated
        else ""
    )
    lines.append(
        f"load side: {result.load_procs} process(es), busiest at "
        f"{result.load_cpu_percent:.0f}% of one core{saturated}"
    )
    return "\n".join(lines)
