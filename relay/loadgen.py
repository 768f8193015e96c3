"""Realtime load generator: N sessions of real-time audio appends, round trips timed.

This module owns the load side of the benchmarks (``python -m relay.loadgen``).
It speaks the Realtime protocol on the relay's own transport and frame codec, so
it costs far less CPU per message than the relay under test and is not the
bottleneck; it reports its own CPU so a reader can check.

Profiles: ``stream`` (below), ``churn`` (:func:`run_churn`: sessions opened, used
for a few exchanges and closed, in parallel: sessions per second and handshake
percentiles) and ``idle`` (:func:`run_idle`: many silent sessions held open, for
memory per session).

``stream`` profile: open ``sessions`` WebSockets (bounded concurrency), wait for
``session.created`` on each, then for ``duration_s`` send each session one
``input_audio_buffer.append`` of ``chunk_ms`` PCM16 audio per ``chunk_ms``, sessions
staggered evenly over the period. Against the simulator's echo mode every append
comes back as one ``response.output_audio.delta`` with the same ``event_id``; the
reader matches them and records round-trip times. After the send phase a bounded
drain counts losses (sent, never echoed).

Load frames carry the MASK bit with an all-zero key: the wire format is valid
RFC 6455 and the XOR costs nothing. That is acceptable for a load tool talking to
our own relay (RFC 6455 §10.3's concern is browsers and hostile scripts), never
for a real client. Measurement windows are announced on stdout (``MEASURE_START``
/ ``MEASURE_END``) so an orchestrator can sample the relay's CPU exactly over them.
"""

from __future__ import annotations

import argparse
import math
import resource
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Final
from urllib.parse import urlsplit

import msgspec
import orjson
import trio

from relay.net import http
from relay.net.transport import TransportClosed, open_transport
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import audio, frames, handshake
from relay.protocol.frames import Frame, FrameProtocolError

#: Handshakes in flight at once while sessions open.
CONNECT_CONCURRENCY: Final = 32
CONNECT_TIMEOUT_S: Final = 15.0
#: After the last append, echoes are awaited this long before counting losses.
DRAIN_TIMEOUT_S: Final = 5.0
#: The sender wakes this often and sends every append that is due.
SENDER_TICK_S: Final = 0.001
LOAD_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
_ZERO_MASK: Final = b"\x00\x00\x00\x00"
#: A load process using more than this share of one core is the bottleneck.
SATURATED_CPU_SHARE: Final = 0.85


class _EchoEnvelope(msgspec.Struct):
    type: str
    event_id: str | None = None


_ENVELOPE: Final = msgspec.json.Decoder(_EchoEnvelope)


@dataclass
class LoadResult:
    sessions_requested: int
    sessions_opened: int
    duration_s: float
    sent: int = 0
    received: int = 0
    lost: int = 0
    #: Messages sent and echoed inside the measured window (orchestrators divide CPU by this).
    window_sent: int = 0
    window_received: int = 0
    window_s: float = 0.0
    rtt_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    load_cpu_s: float = 0.0
    load_cpu_percent: float = 0.0
    load_saturated: bool = False


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


class _Session:
    __slots__ = ("echoed", "index", "rtts", "send_times", "ws")

    def __init__(self, index: int, ws: WebSocket) -> None:
        self.index = index
        self.ws = ws
        self.send_times: list[float] = []
        self.echoed = 0
        self.rtts: list[float] = []


async def _open_session(
    url: str,
    key: str,
    index: int,
    model: str,
    errors: dict[str, int],
    ssl_context: ssl.SSLContext | None = None,
) -> _Session | None:
    parts = urlsplit(url)
    target = handshake.UpstreamTarget.from_url(url)
    path = f"{target.base_path}/realtime?model={model}&{parts.query}".rstrip("&")
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            context = ssl_context
            if target.tls and context is None:
                context = ssl.create_default_context()
            transport = await open_transport(
                target.host, target.port, ssl_context=context if target.tls else None
            )
            ws_key = handshake.new_websocket_key()
            await transport.send_all(
                handshake.upgrade_request(
                    host_header=target.host_header,
                    target=path,
                    key=ws_key,
                    headers=[("Authorization", f"Bearer {key}")],
                )
            )
            response = await http.read_response_head(transport)
            if response.status != 101:
                transport.close()
                errors[f"handshake_{response.status}"] = (
                    errors.get(f"handshake_{response.status}", 0) + 1
                )
                return None
            ws = WebSocket(
                transport,
                client_side=True,
                max_message_bytes=LOAD_MAX_MESSAGE_BYTES,
                initial_data=response.trailing,
            )
            _, payload = await ws.receive_message()
            if _ENVELOPE.decode(payload).type != "session.created":
                errors["no_session_created"] = errors.get("no_session_created", 0) + 1
                ws.transport.close()
                return None
            return _Session(index, ws)
    except (
        OSError,
        ssl.SSLError,
        TransportClosed,
        ConnectionClosed,
        trio.TooSlowError,
        handshake.HandshakeError,
    ) as exc:
        name = f"connect_{type(exc).__name__}"
        errors[name] = errors.get(name, 0) + 1
        return None


async def _reader(
    session: _Session, errors: dict[str, int], window: list[float], counts: list[int]
) -> None:
    ws = session.ws
    send_times = session.send_times
    rtts = session.rtts
    try:
        while True:
            event = await ws.next_frame_event()
            if type(event) is not Frame:
                continue
            if event.opcode >= frames.OP_CLOSE:
                if event.opcode == frames.OP_PING:
                    await ws.send_pong(event.payload())
                    continue
                if event.opcode == frames.OP_CLOSE:
                    code, _ = frames.decode_close_payload(event.payload())
                    errors[f"closed_{code}"] = errors.get(f"closed_{code}", 0) + 1
                    return
                continue
            now = trio.current_time()
            envelope = _ENVELOPE.decode(memoryview(event.raw)[event.header_len :])
            if envelope.type != "response.output_audio.delta" or envelope.event_id is None:
                if envelope.type == "error":
                    errors["error_event"] = errors.get("error_event", 0) + 1
                continue
            sequence = int(envelope.event_id)
            sent_at = send_times[sequence]
            session.echoed += 1
            rtts.append((now - sent_at) * 1000.0)
            if window[0] <= sent_at and now <= window[1]:
                counts[1] += 1
    except (ConnectionClosed, TransportClosed, FrameProtocolError) as exc:
        name = f"read_{type(exc).__name__}"
        errors[name] = errors.get(name, 0) + 1


async def run_stream(
    url: str,
    key: str,
    *,
    sessions: int,
    duration_s: float,
    warmup_s: float = 0.0,
    chunk_ms: int = 20,
    model: str = "gpt-realtime",
    announce: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> LoadResult:
    """The ``stream`` profile; see the module docstring."""
    result = LoadResult(sessions_requested=sessions, sessions_opened=0, duration_s=duration_s)
    errors: dict[str, int] = {}
    opened: list[_Session] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def open_one(index: int) -> None:
        async with limiter:
            session = await _open_session(url, key, index, model, errors, ssl_context)
        if session is not None:
            opened.append(session)

    async with trio.open_nursery() as nursery:
        for index in range(sessions):
            nursery.start_soon(open_one, index)
    result.sessions_opened = len(opened)
    chunk = audio.speech_like(chunk_ms, seed=7)
    audio_b64 = audio.b64encode(chunk).encode("ascii")
    prefix = b'{"type":"input_audio_buffer.append","event_id":"'
    middle = b'","audio":"' + audio_b64 + b'"}'
    period_s = chunk_ms / 1000.0
    # window[0..1]: measured interval (trio clock); counts[0]=sent, counts[1]=echoed in it.
    window = [math.inf, math.inf]
    counts = [0, 0]
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()

    async with trio.open_nursery() as readers:
        for session in opened:
            readers.start_soon(_reader, session, errors, window, counts)
        start = trio.current_time() + 0.05
        end = start + warmup_s + duration_s
        window[0] = start + warmup_s
        window[1] = end
        count = len(opened)
        offsets = [i * period_s / max(1, count) for i in range(count)]
        next_due = [start + offsets[i] for i in range(count)]
        announced_start = False
        while True:
            now = trio.current_time()
            if announce and not announced_start and now >= window[0]:
                print("MEASURE_START", flush=True)
                announced_start = True
            if now >= end:
                break
            for i, session in enumerate(opened):
                if next_due[i] > now:
                    continue
                sequence = len(session.send_times)
                payload = prefix + str(sequence).encode() + middle
                session.send_times.append(trio.current_time())
                try:
                    await session.ws.send_raw(
                        frames.encode_frame(frames.OP_TEXT, payload, mask_key=_ZERO_MASK)
                    )
                except TransportClosed:
                    errors["send_failed"] = errors.get("send_failed", 0) + 1
                    next_due[i] = math.inf
                    continue
                if window[0] <= session.send_times[-1] < window[1]:
                    counts[0] += 1
                next_due[i] += period_s
            await trio.sleep(SENDER_TICK_S)
        if announce:
            print("MEASURE_END", flush=True)
        sent_total = sum(len(s.send_times) for s in opened)
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            # Polling keeps the readers' hot path free of any wake-up bookkeeping.
            while sum(s.echoed for s in opened) < sent_total:  # noqa: ASYNC110
                await trio.sleep(0.05)
        readers.cancel_scope.cancel()
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.monotonic() - wall_before
    for session in opened:
        with trio.CancelScope(shield=True):
            await session.ws.close_quietly(frames.CLOSE_NORMAL, "")
    rtts = sorted(r for s in opened for r in s.rtts)
    result.sent = sum(len(s.send_times) for s in opened)
    result.received = sum(s.echoed for s in opened)
    result.lost = result.sent - result.received
    result.window_sent, result.window_received = counts
    result.window_s = duration_s
    result.rtt_ms = {
        "p50": _percentile(rtts, 0.50),
        "p90": _percentile(rtts, 0.90),
        "p99": _percentile(rtts, 0.99),
        "p99.9": _percentile(rtts, 0.999),
        "max": rtts[-1] if rtts else math.nan,
    }
    result.errors = errors
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (
        usage_after.ru_stime - usage_before.ru_stime
    )
    result.load_cpu_s = cpu
    result.load_cpu_percent = 100.0 * cpu / wall if wall > 0 else 0.0
    result.load_saturated = cpu / wall > SATURATED_CPU_SHARE if wall > 0 else False
    return result


@dataclass
class ChurnResult:
    workers: int
    duration_s: float
    sessions_completed: int = 0
    sessions_per_s: float = 0.0
    #: Time from TCP connect to ``session.created``, milliseconds.
    handshake_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)


#: Appends each churn session exchanges (echoed) before it closes.
CHURN_EXCHANGES: Final = 3


async def run_churn(
    url: str,
    key: str,
    *,
    workers: int,
    duration_s: float,
    model: str = "gpt-realtime",
    ssl_context: ssl.SSLContext | None = None,
) -> ChurnResult:
    """``churn`` profile: open, wait for ``session.created``, a few exchanges, close."""
    result = ChurnResult(workers=workers, duration_s=duration_s)
    handshakes: list[float] = []
    errors: dict[str, int] = {}
    audio_b64 = audio.b64encode(audio.speech_like(20, seed=5))
    deadline = trio.current_time() + duration_s

    async def worker(index: int) -> None:
        while trio.current_time() < deadline:
            started = trio.current_time()
            session = await _open_session(url, key, index, model, errors, ssl_context)
            if session is None:
                await trio.sleep(0.05)  # do not spin on a refusing endpoint
                continue
            handshakes.append((trio.current_time() - started) * 1000.0)
            ws = session.ws
            try:
                for sequence in range(CHURN_EXCHANGES):
                    await ws.send_text(
                        orjson.dumps(
                            {
                                "type": "input_audio_buffer.append",
                                "event_id": str(sequence),
                                "audio": audio_b64,
                            }
                        )
                    )
                    while True:
                        _, payload = await ws.receive_message()
                        if _ENVELOPE.decode(payload).type == "response.output_audio.delta":
                            break
                await ws.close(frames.CLOSE_NORMAL, "")
                result.sessions_completed += 1
            except (ConnectionClosed, TransportClosed) as exc:
                name = f"churn_{type(exc).__name__}"
                errors[name] = errors.get(name, 0) + 1
                ws.transport.close()

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for index in range(workers):
            nursery.start_soon(worker, index)
    elapsed = trio.current_time() - started
    ordered = sorted(handshakes)
    result.sessions_per_s = result.sessions_completed / elapsed if elapsed > 0 else 0.0
    result.handshake_ms = {
        "p50": _percentile(ordered, 0.5),
        "p99": _percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else math.nan,
    }
    result.errors = errors
    return result


@dataclass
class IdleResult:
    sessions_requested: int
    sessions_held: int
    held_s: float
    errors: dict[str, int] = field(default_factory=dict)


async def run_idle(
    url: str,
    key: str,
    *,
    sessions: int,
    hold_s: float,
    model: str = "gpt-realtime",
    ssl_context: ssl.SSLContext | None = None,
    on_held: Callable[[int], None] | None = None,
) -> IdleResult:
    """``idle`` profile: hold many open, silent sessions (for memory per session)."""
    errors: dict[str, int] = {}
    opened: list[_Session] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def open_one(index: int) -> None:
        async with limiter:
            session = await _open_session(url, key, index, model, errors, ssl_context)
        if session is not None:
            opened.append(session)

    async with trio.open_nursery() as nursery:
        for index in range(sessions):
            nursery.start_soon(open_one, index)
    if on_held is not None:
        on_held(len(opened))
    await trio.sleep(hold_s)
    alive = 0
    for session in opened:
        if not session.ws.transport.closed and session.ws.close_received is None:
            alive += 1
        with trio.CancelScope(shield=True):
            await session.ws.close_quietly(frames.CLOSE_NORMAL, "")
    return IdleResult(
        sessions_requested=sessions, sessions_held=alive, held_s=hold_s, errors=errors
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relay.loadgen")
    parser.add_argument("--url", required=True, help="ws:// base ending in /v1")
    parser.add_argument("--key", required=True)
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=0.0)
    parser.add_argument("--chunk-ms", type=int, default=20)
    parser.add_argument("--announce", action="store_true")
    parser.add_argument("--ca-file", help="CA bundle for a wss:// URL with a private CA")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else None
    result = trio.run(
        lambda: run_stream(
            args.url,
            args.key,
            sessions=args.sessions,
            duration_s=args.duration_s,
            warmup_s=args.warmup_s,
            chunk_ms=args.chunk_ms,
            announce=args.announce,
            ssl_context=context,
        )
    )
    sys.stdout.write(orjson.dumps(asdict(result)).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
