"""The demo voice session: a scripted Realtime client that prints the event flow.

This module owns ``relay demo``'s client side. It is deliberately written on
trio-websocket, an implementation independent of the relay's own frame codec, so
the demo is also a second opinion on the relay's wire behaviour. Per turn it
streams speech-like PCM16 at real-time pace as ``input_audio_buffer.append``
events, commits, asks for a response and consumes events until ``response.done``,
timing the first audio delta and the end of the response from the commit.

Failures (a refused handshake, an ``error`` event, a close) end the demo with a
one-line reason and ``ok=False``; never a traceback.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import trio
import trio_websocket

from relay.protocol import audio

#: Large enough for any Realtime event (OpenAI allows 15 MiB of audio per append).
DEMO_MAX_MESSAGE_BYTES = 32 * 1024 * 1024


@dataclass
class DemoReport:
    ok: bool
    turns_completed: int
    events_received: int
    first_audio_ms: list[float] = field(default_factory=list)
    response_done_ms: list[float] = field(default_factory=list)
    audio_bytes_received: int = 0
    usage_total_tokens: int = 0
    error: str | None = None


class _DemoFailed(Exception):
    pass


def _describe_rejection(exc: trio_websocket.ConnectionRejected) -> str:
    message = ""
    try:
        body = orjson.loads(exc.body or b"{}")
        message = str(body.get("error", {}).get("message", ""))
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return f"handshake refused with HTTP {exc.status_code}" + (f": {message}" if message else "")


async def run_demo(
    url: str,
    api_key: str,
    *,
    model: str = "gpt-realtime",
    turns: int = 2,
    speech_ms: int = 600,
    chunk_ms: int = 20,
    auth: Literal["header", "subprotocol"] = "header",
    out: Callable[[str], None] = print,
    timeout_s: float = 30.0,
) -> DemoReport:
    """Run the scripted session against ``<url>/realtime?model=<model>``."""
    report = DemoReport(ok=False, turns_completed=0, events_received=0)
    target = f"{url.rstrip('/')}/realtime?model={model}"
    headers: list[tuple[bytes, bytes]] = []
    subprotocols: list[str] = []
    if auth == "header":
        headers.append((b"Authorization", f"Bearer {api_key}".encode()))
    else:
        subprotocols = ["realtime", f"openai-insecure-api-key.{api_key}"]
    out(f"connecting to {target} ({auth} auth)")
    try:
        with trio.fail_after(timeout_s):
            async with trio_websocket.open_websocket_url(
                target,
                extra_headers=headers,
                subprotocols=subprotocols,
                max_message_size=DEMO_MAX_MESSAGE_BYTES,
            ) as ws:
                try:
                    await _session(ws, report, turns, speech_ms, chunk_ms, out)
                finally:
                    with trio.CancelScope(shield=True):
                        # trio-websocket may leave its socket open if the server closes first.
                        await ws._stream.aclose()
        report.ok = report.turns_completed == turns
    except trio_websocket.ConnectionRejected as exc:
        report.error = _describe_rejection(exc)
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        report.error = (
            f"connection closed: {reason.code} {reason.reason or ''}".strip()
            if reason is not None
            else "connection closed"
        )
    except trio_websocket.HandshakeError as exc:
        report.error = f"handshake failed: {exc}"
    except OSError as exc:
        report.error = f"cannot connect: {exc.strerror or exc}"
    except trio.TooSlowError:
        report.error = f"no answer within {timeout_s} s"
    except _DemoFailed as exc:
        report.error = str(exc)
    _print_summary(report, out)
    return report


async def _next(ws: trio_websocket.WebSocketConnection, report: DemoReport) -> dict[str, Any]:
    message = await ws.get_message()
    report.events_received += 1
    event = orjson.loads(message)
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise _DemoFailed(f"server sent something that is not an event: {message[:80]!r}")
    if event["type"] == "error":
        error = event.get("error", {})
        raise _DemoFailed(f"error event: {error.get('code')}: {error.get('message')}")
    return event


async def _session(
    ws: trio_websocket.WebSocketConnection,
    report: DemoReport,
    turns: int,
    speech_ms: int,
    chunk_ms: int,
    out: Callable[[str], None],
) -> None:
    created = await _next(ws, report)
    if created["type"] != "session.created":
        raise _DemoFailed(f"first event was {created['type']}, expected session.created")
    session = created.get("session", {})
    out(f"<- session.created  id={session.get('id')} model={session.get('model')}")
    update = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "instructions": "You are a concise voice assistant.",
            "audio": {"input": {"turn_detection": None}, "output": {"voice": "marin"}},
        },
    }
    await ws.send_message(orjson.dumps(update).decode())
    out("-> session.update   turn_detection=null voice=marin")
    while (event := await _next(ws, report))["type"] != "session.updated":
        out(f"<- {event['type']}")
    out("<- session.updated")
    for turn in range(1, turns + 1):
        speech = audio.speech_like(speech_ms, seed=turn)
        chunks = audio.split_chunks(speech, chunk_ms)
        start = trio.current_time()
        for index, chunk in enumerate(chunks):
            await trio.sleep_until(start + index * chunk_ms / 1000)
            await ws.send_message(
                orjson.dumps(
                    {"type": "input_audio_buffer.append", "audio": audio.b64encode(chunk)}
                ).decode()
            )
        out(f"-> input_audio_buffer.append x{len(chunks)}  ({speech_ms} ms of PCM16 24 kHz)")
        await ws.send_message('{"type":"input_audio_buffer.commit"}')
        committed_at = trio.current_time()
        out("-> input_audio_buffer.commit")
        await ws.send_message('{"type":"response.create"}')
        out("-> response.create")
        await _consume_response(ws, report, committed_at, out)
        report.turns_completed += 1


async def _consume_response(
    ws: trio_websocket.WebSocketConnection,
    report: DemoReport,
    committed_at: float,
    out: Callable[[str], None],
) -> None:
    deltas = 0
    delta_bytes = 0
    transcript: list[str] = []
    first_audio: float | None = None
    while True:
        event = await _next(ws, report)
        kind = event["type"]
        if kind == "response.output_audio.delta":
            if first_audio is None:
                first_audio = (trio.current_time() - committed_at) * 1000
                report.first_audio_ms.append(first_audio)
            deltas += 1
            delta_bytes += len(event.get("delta", "")) * 3 // 4
            continue
        if kind == "response.output_audio_transcript.delta":
            transcript.append(str(event.get("delta", "")))
            continue
        if deltas and kind == "response.output_audio.done":
            out(f"<- response.output_audio.delta x{deltas}  ({delta_bytes} bytes of audio)")
        if transcript and kind == "response.output_audio_transcript.done":
            out(f'<- response.output_audio_transcript  "{"".join(transcript).strip()}"')
        if kind == "response.done":
            done_ms = (trio.current_time() - committed_at) * 1000
            report.response_done_ms.append(done_ms)
            report.audio_bytes_received += delta_bytes
            usage = (event.get("response") or {}).get("usage") or {}
            report.usage_total_tokens += int(usage.get("total_tokens", 0))
            out(
                f"<- response.done  status={event['response'].get('status')} "
                f"usage: in={usage.get('input_tokens')} out={usage.get('output_tokens')} "
                f"total={usage.get('total_tokens')}"
            )
            return
        out(f"<- {kind}")


def _print_summary(report: DemoReport, out: Callable[[str], None]) -> None:
    out("")
    if report.error:
        out(f"demo FAILED: {report.error}")
    for index, (first, done) in enumerate(
        zip(report.first_audio_ms, report.response_done_ms, strict=False), start=1
    ):
        out(f"turn {index}: first audio {first:.1f} ms after commit, response.done {done:.1f} ms")
    if report.first_audio_ms:
        out(
            f"first audio p50 {statistics.median(report.first_audio_ms):.1f} ms, "
            f"max {max(report.first_audio_ms):.1f} ms; "
            f"{report.events_received} events, {report.audio_bytes_received} audio bytes, "
            f"{report.usage_total_tokens} tokens"
        )
    if report.ok:
        out(f"demo OK: {report.turns_completed} turns completed")
