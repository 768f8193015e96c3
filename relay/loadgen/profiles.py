"""The load profiles: Realtime sessions driven against any endpoint, one Trio process.

This module owns what the load side sends and times. It speaks the Realtime
protocol on the relay's own transport and frame codec, so it spends far less CPU
per message than the relay under test; it measures its own CPU (``getrusage``)
and flags a saturated load process.

Every profile runs in three phases: open the sessions (bounded concurrency,
handshake times recorded), pass the ``gate`` (an orchestrator uses it to line up
several load processes on one start time and to sample the server under test,
e.g. its memory with the sessions held), then run from that start time through
``warmup_s`` and the measured ``duration_s`` window. Profiles:

- ``stream``: one ``input_audio_buffer.append`` of ``chunk_ms`` PCM16 per session
  every ``chunk_ms`` (sessions staggered over the period); against the simulator's
  echo mode each comes back as one ``response.output_audio.delta`` with the same
  ``event_id``, and the round trip is recorded. A bounded drain then counts losses.
- ``flat``: like ``stream`` but as fast as a window of ``window`` appends in flight
  per session allows: maximum messages/s and MB/s.
- ``voice``: turn-taking against a model (the simulator's normal mode, or a real
  one): turn detection off, the user speaks ``speech_ms`` in real-time chunks,
  commits and asks for a response; times commit → first audio delta, and the
  jitter between deltas against their audio length. A turn with no
  ``response.done`` in time counts as lost.
- ``churn``: ``sessions`` workers each open a session, wait for
  ``session.created``, exchange :data:`CHURN_EXCHANGES` echoed appends and close,
  over and over: sessions/s and handshake percentiles.
- ``idle``: hold ``sessions`` silent sessions (answering pings) for ``duration_s``:
  memory per session, measured by the orchestrator at the gate.

With ``binary`` (``relay bench --binary``) every session offers ``relay.audio.v1``
(docs/binary-audio.md) and a session whose server does not select it counts as
failed (``binary_audio_not_selected``): each chunk goes up as one binary message,
and audio comes back as binary frames after ``relay.output_audio.start`` markers.
A binary echo has no ``event_id``, so the stream and flat profiles write the
append's sequence number into the audio itself (its first :data:`SEQUENCE_BYTES`,
little-endian) and match the echoed frame by it, as the JSON path matches by
``event_id``. Every profile reports the bytes on its client sockets inside the
window, both ways, and the seconds of audio its appends carried: the client leg's
bytes per second of audio, JSON against binary.

Load frames carry the MASK bit with an all-zero key: valid RFC 6455 whose XOR
costs nothing. Acceptable for a load tool (RFC 6455 §10.3 guards browsers against
hostile scripts), never for a real client.
"""

from __future__ import annotations

import math
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import urlsplit

import msgspec
import orjson
import trio

from relay.loadgen.results import LoadResult, LoadSpec
from relay.net import http
from relay.net.transport import TransportClosed, open_transport
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import audio, frames, handshake
from relay.protocol.binary_audio import AUDIO_SUBPROTOCOL
from relay.protocol.frames import Frame, FrameProtocolError

#: Handshakes in flight at once while sessions open.
CONNECT_CONCURRENCY: Final = 32
CONNECT_TIMEOUT_S: Final = 15.0
#: After the last append, echoes (and voice answers) are awaited this long.
DRAIN_TIMEOUT_S: Final = 5.0
#: The stream sender wakes this often and sends every append that is due.
SENDER_TICK_S: Final = 0.001
#: Default gap between the gate and the start, so every session is ready.
START_DELAY_S: Final = 0.05
LOAD_MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: Appends each churn session exchanges (echoed) before it closes.
CHURN_EXCHANGES: Final = 3
#: voice: a response must be done within this long after its commit, else the turn is lost.
VOICE_RESPONSE_TIMEOUT_S: Final = 30.0
#: churn: pause after a refused or failed open, so a refusing endpoint is not hammered.
CHURN_RETRY_PAUSE_S: Final = 0.05
_ZERO_MASK: Final = b"\x00\x00\x00\x00"
#: Binary path: an append's sequence number, little-endian, overwrites this many bytes
#: at the start of its audio (two PCM16 samples), so its echo can be matched.
SEQUENCE_BYTES: Final = 4
#: Subprotocols a session offers on the binary path (``realtime`` for servers without it).
BINARY_SUBPROTOCOLS: Final = ("realtime", AUDIO_SUBPROTOCOL)

#: Called with the number of sessions opened; returns the start time (``time.time()`` epoch).
Gate = Callable[[int], Awaitable[float]]


class _Envelope(msgspec.Struct):
    type: str
    event_id: str | None = None


class _VoiceEvent(msgspec.Struct):
    type: str
    delta: str | None = None


_ENVELOPE: Final = msgspec.json.Decoder(_Envelope)
_VOICE_EVENT: Final = msgspec.json.Decoder(_VoiceEvent)


async def start_soon_after(opened: int) -> float:
    """The default gate: start right away."""
    del opened
    return time.time() + START_DELAY_S


class _Session:
    __slots__ = (
        "answer_done",
        "commit_at",
        "echoed",
        "index",
        "last_delta_at",
        "last_delta_ms",
        "send_times",
        "updated",
        "ws",
    )

    def __init__(self, index: int, ws: WebSocket) -> None:
        self.index = index
        self.ws = ws
        self.send_times: list[float] = []
        self.echoed = 0
        # voice state
        self.updated = trio.Event()
        self.answer_done = trio.Event()
        self.commit_at = math.inf
        self.last_delta_at = math.nan
        self.last_delta_ms = 0.0


class _Window:
    """The measured interval on the Trio clock, and what crossed the wire inside it."""

    __slots__ = ("audio_ms", "bytes", "end", "received", "sent", "start")

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.sent = 0
        self.received = 0
        self.bytes = 0
        #: Audio the appends sent inside the window carried.
        self.audio_ms = 0.0

    def holds(self, moment: float) -> bool:
        return self.start <= moment < self.end


def _client_context(spec: LoadSpec) -> ssl.SSLContext | None:
    if not spec.url.startswith("wss://"):
        return None
    return ssl.create_default_context(cafile=spec.ca_file or None)


async def open_session(
    spec: LoadSpec, index: int, result: LoadResult, ssl_context: ssl.SSLContext | None
) -> _Session | None:
    """Handshake and ``session.created``; failures are counted by kind in ``result``."""
    parts = urlsplit(spec.url)
    target = handshake.UpstreamTarget.from_url(spec.url)
    path = f"{target.base_path}/realtime?model={spec.model}&{parts.query}".rstrip("&")
    started = trio.current_time()
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            transport = await open_transport(target.host, target.port, ssl_context=ssl_context)
            ws_key = handshake.new_websocket_key()
            await transport.send_all(
                handshake.upgrade_request(
                    host_header=target.host_header,
                    target=path,
                    key=ws_key,
                    headers=[("Authorization", f"Bearer {spec.key}")],
                    subprotocols=BINARY_SUBPROTOCOLS if spec.binary else (),
                )
            )
            response = await http.read_response_head(transport)
            if response.status != 101:
                transport.close()
                result.count_error(f"handshake_{response.status}")
                return None
            if spec.binary and response.header(b"sec-websocket-protocol") != AUDIO_SUBPROTOCOL:
                transport.close()
                result.count_error("binary_audio_not_selected")
                return None
            ws = WebSocket(
                transport,
                client_side=True,
                max_message_bytes=LOAD_MAX_MESSAGE_BYTES,
                initial_data=response.trailing,
            )
            _, payload = await ws.receive_message()
            if _ENVELOPE.decode(payload).type != "session.created":
                result.count_error("no_session_created")
                ws.transport.close()
                return None
    except (
        OSError,
        ssl.SSLError,
        TransportClosed,
        ConnectionClosed,
        trio.TooSlowError,
        handshake.HandshakeError,
        msgspec.DecodeError,
    ) as exc:
        result.count_error(f"connect_{type(exc).__name__}")
        return None
    result.histogram("handshake").record((trio.current_time() - started) * 1000.0)
    return _Session(index, ws)


async def _open_all(
    spec: LoadSpec, result: LoadResult, ssl_context: ssl.SSLContext | None
) -> list[_Session]:
    opened: list[_Session] = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def open_one(index: int) -> None:
        async with limiter:
            session = await open_session(spec, index, result, ssl_context)
        if session is not None:
            opened.append(session)

    async with trio.open_nursery() as nursery:
        for number in range(spec.sessions):
            nursery.start_soon(open_one, spec.index_offset + number)
    opened.sort(key=lambda session: session.index)
    result.sessions_opened = len(opened)
    return opened


async def _close_all(sessions: list[_Session]) -> None:
    with trio.CancelScope(shield=True):
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(session.ws.close_quietly, frames.CLOSE_NORMAL, "")


def _append_template(chunk_ms: int, seed: int) -> tuple[bytes, bytes]:
    """``prefix + event_id + suffix`` is one append of ``chunk_ms`` speech-like PCM16."""
    audio_b64 = audio.b64encode(audio.speech_like(chunk_ms, seed=seed)).encode("ascii")
    prefix = b'{"type":"input_audio_buffer.append","event_id":"'
    suffix = b'","audio":"' + audio_b64 + b'"}'
    return prefix, suffix


async def run_profile(spec: LoadSpec, *, gate: Gate = start_soon_after) -> LoadResult:
    """Run ``spec.profile``; see the module docstring."""
    result = LoadResult(
        profile=spec.profile, sessions_requested=spec.sessions, duration_s=spec.duration_s
    )
    ssl_context = _client_context(spec)
    result.binary = spec.binary
    opened = [] if spec.profile == "churn" else await _open_all(spec, result, ssl_context)
    start_epoch = await gate(len(opened))
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    wall_before = time.monotonic()
    start = trio.current_time() + max(0.0, start_epoch - time.time())
    window = _Window(start + spec.warmup_s, start + spec.warmup_s + spec.duration_s)
    try:
        async with trio.open_nursery() as counting:
            counting.start_soon(_count_client_bytes, opened, result, window)
            if spec.profile in ("stream", "flat"):
                await _run_echo(spec, opened, result, start, window)
            elif spec.profile == "voice":
                await _run_voice(spec, opened, result, start, window)
            elif spec.profile == "churn":
                await _run_churn(spec, result, start, window, ssl_context)
            else:
                await _run_idle(opened, result, window)
            counting.cancel_scope.cancel()
    finally:
        await _close_all(opened)
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    result.note_load_cpu(
        (usage_after.ru_utime - usage_before.ru_utime)
        + (usage_after.ru_stime - usage_before.ru_stime),
        time.monotonic() - wall_before,
    )
    result.window_sent, result.window_received = window.sent, window.received
    result.window_bytes = window.bytes
    result.window_s = spec.duration_s
    result.window_audio_s = window.audio_ms / 1000.0
    return result


async def _count_client_bytes(opened: list[_Session], result: LoadResult, window: _Window) -> None:
    """The sessions' socket byte counts at the window's two ends (churn: its own count)."""
    await trio.sleep_until(window.start)
    sent = sum(session.ws.bytes_sent for session in opened)
    received = sum(session.ws.bytes_received for session in opened)
    await trio.sleep_until(window.end)
    result.client_bytes_sent += sum(session.ws.bytes_sent for session in opened) - sent
    result.client_bytes_received += sum(session.ws.bytes_received for session in opened) - received


def _sequenced_chunk(pcm: bytes, sequence: int) -> bytes:
    """``pcm`` with ``sequence`` written over its first :data:`SEQUENCE_BYTES`."""
    return sequence.to_bytes(SEQUENCE_BYTES, "little") + pcm[SEQUENCE_BYTES:]


def _echoed_sequence(audio_bytes: bytes | memoryview) -> int:
    return int.from_bytes(audio_bytes[:SEQUENCE_BYTES], "little")


# ---------------------------------------------------------------- stream and flat


async def _run_echo(
    spec: LoadSpec, opened: list[_Session], result: LoadResult, start: float, window: _Window
) -> None:
    prefix, suffix = _append_template(spec.chunk_ms, seed=7)
    template_bytes = len(prefix) + len(suffix)
    flat = spec.profile == "flat"
    pcm = audio.speech_like(spec.chunk_ms, seed=7)
    # The zero mask leaves the payload as it is: one join builds the whole frame.
    binary_head = frames.encode_header(frames.OP_BINARY, len(pcm), masked=True) + _ZERO_MASK
    sequenced = pcm[SEQUENCE_BYTES:]

    async def send_append(session: _Session) -> None:
        number = len(session.send_times)
        if spec.binary:
            size = len(pcm)
            frame = b"".join((binary_head, number.to_bytes(SEQUENCE_BYTES, "little"), sequenced))
        else:
            sequence = str(number).encode()
            size = template_bytes + len(sequence)
            header = frames.encode_header(frames.OP_TEXT, size, masked=True)
            frame = b"".join((header, _ZERO_MASK, prefix, sequence, suffix))
        now = trio.current_time()
        session.send_times.append(now)
        if window.holds(now):
            window.sent += 1
            window.bytes += size
            window.audio_ms += spec.chunk_ms
        await session.ws.send_raw(frame)

    async with trio.open_nursery() as readers:
        for session in opened:
            readers.start_soon(_echo_reader, session, result, window, send_append if flat else None)
        await trio.sleep_until(start)
        if flat:
            for session in opened:
                for _ in range(spec.window):
                    try:
                        await send_append(session)
                    except TransportClosed:
                        result.count_error("send_failed")
                        break
            await trio.sleep_until(window.end)
        else:
            await _stream_sender(
                opened, result, start, window.end, spec.chunk_ms / 1000.0, send_append
            )
        sent_total = sum(len(s.send_times) for s in opened)
        with trio.move_on_after(DRAIN_TIMEOUT_S):
            # Polling keeps the readers' hot path free of any wake-up bookkeeping.
            while sum(s.echoed for s in opened) < sent_total:  # noqa: ASYNC110
                await trio.sleep(0.05)
        readers.cancel_scope.cancel()
    result.sent = sum(len(s.send_times) for s in opened)
    result.received = sum(s.echoed for s in opened)
    result.lost = result.sent - result.received


async def _stream_sender(
    opened: list[_Session],
    result: LoadResult,
    start: float,
    end: float,
    period_s: float,
    send_append: Callable[[_Session], Awaitable[None]],
) -> None:
    count = max(1, len(opened))
    next_due = [start + number * period_s / count for number in range(len(opened))]
    while True:
        now = trio.current_time()
        if now >= end:
            return
        for number, session in enumerate(opened):
            if next_due[number] > now:
                continue
            try:
                await send_append(session)
            except TransportClosed:
                result.count_error("send_failed")
                next_due[number] = math.inf
                continue
            next_due[number] += period_s
        await trio.sleep(SENDER_TICK_S)


async def _echo_reader(
    session: _Session,
    result: LoadResult,
    window: _Window,
    refill: Callable[[_Session], Awaitable[None]] | None,
) -> None:
    ws = session.ws
    send_times = session.send_times
    rtt = result.histogram("rtt")
    binary = result.binary
    try:
        while True:
            event = await ws.next_frame_event()
            if type(event) is not Frame:
                continue
            if event.opcode >= frames.OP_CLOSE:
                if event.opcode == frames.OP_PING:
                    await ws.send_pong(event.payload())
                elif event.opcode == frames.OP_CLOSE:
                    code, _ = frames.decode_close_payload(event.payload())
                    result.count_error(f"closed_{code}")
                    return
                continue
            now = trio.current_time()
            body = memoryview(event.raw)[event.header_len :]
            if event.opcode == frames.OP_BINARY:
                number = _echoed_sequence(body) if binary else -1
            else:
                found = _echoed_number(body, binary)
                if found is None:
                    if _ENVELOPE.decode(body).type == "error":
                        result.count_error("error_event")
                    continue
                number = found
            if not 0 <= number < len(send_times):
                result.count_error("echo_unmatched")
                continue
            sent_at = send_times[number]
            session.echoed += 1
            rtt.record((now - sent_at) * 1000.0)
            if window.start <= sent_at and now <= window.end:
                window.received += 1
                window.bytes += len(body)
            if refill is not None and now < window.end:
                await refill(session)
    except (ConnectionClosed, TransportClosed, FrameProtocolError, msgspec.DecodeError) as exc:
        result.count_error(f"read_{type(exc).__name__}")


def _echoed_number(body: memoryview, binary: bool) -> int | None:
    """The append a text echo answers: its ``event_id`` (JSON path), or, on the binary
    path (a delta the server could not convert), the sequence number in its audio."""
    if not binary:
        envelope = _ENVELOPE.decode(body)
        if envelope.type != "response.output_audio.delta" or envelope.event_id is None:
            return None
        event_id = envelope.event_id
        # An id that is not one of ours (a server that names its own events) matches no
        # append: -1 is counted as echo_unmatched, not a crash of the session's reader.
        return int(event_id) if event_id.isascii() and event_id.isdigit() else -1
    event = _VOICE_EVENT.decode(body)
    if event.type != "response.output_audio.delta" or event.delta is None:
        return None  # a relay.output_audio.start marker, or another event
    return _echoed_sequence(audio.b64decode(event.delta))


# ---------------------------------------------------------------- voice

_SESSION_UPDATE: Final = orjson.dumps(
    {
        "type": "session.update",
        "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
    }
)
_COMMIT: Final = b'{"type":"input_audio_buffer.commit"}'
_RESPONSE_CREATE: Final = b'{"type":"response.create"}'


async def _run_voice(
    spec: LoadSpec, opened: list[_Session], result: LoadResult, start: float, window: _Window
) -> None:
    prefix, suffix = _append_template(spec.chunk_ms, seed=11)
    pcm = audio.speech_like(spec.chunk_ms, seed=11)
    binary_frame = frames.encode_header(frames.OP_BINARY, len(pcm), masked=True) + _ZERO_MASK + pcm
    chunks_per_turn = max(1, spec.speech_ms // spec.chunk_ms)
    turn_period_s = (spec.speech_ms + spec.pause_ms) / 1000.0

    async def send(session: _Session, payload: bytes, *, audio_ms: int = 0) -> None:
        if window.holds(trio.current_time()):
            window.sent += 1
            window.bytes += len(payload)
            window.audio_ms += audio_ms
        result.sent += 1
        await session.ws.send_text(payload)

    async def send_chunk(session: _Session, sequence: int) -> None:
        if not spec.binary:
            await send(session, prefix + str(sequence).encode() + suffix, audio_ms=spec.chunk_ms)
            return
        if window.holds(trio.current_time()):
            window.sent += 1
            window.bytes += len(pcm)
            window.audio_ms += spec.chunk_ms
        result.sent += 1
        await session.ws.send_raw(binary_frame)

    async def talker(session: _Session, offset_s: float) -> None:
        try:
            await send(session, _SESSION_UPDATE)
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await session.updated.wait()
            due = start + offset_s
            while due < window.end:
                for sequence in range(chunks_per_turn):
                    await trio.sleep_until(due)
                    await send_chunk(session, sequence)
                    due += spec.chunk_ms / 1000.0
                session.answer_done = trio.Event()
                session.commit_at = trio.current_time()
                session.last_delta_at = math.nan
                await send(session, _COMMIT)
                await send(session, _RESPONSE_CREATE)
                answered_by = min(
                    session.commit_at + VOICE_RESPONSE_TIMEOUT_S, window.end + DRAIN_TIMEOUT_S
                )
                with trio.move_on_at(answered_by):
                    await session.answer_done.wait()
                if not session.answer_done.is_set():
                    result.lost += 1
                    result.count_error("voice_no_response_done")
                    return
                result.turns += 1
                due = trio.current_time() + spec.pause_ms / 1000.0
        except (ConnectionClosed, TransportClosed) as exc:
            result.count_error(f"send_{type(exc).__name__}")
        except trio.TooSlowError:
            result.count_error("voice_no_session_updated")

    async with trio.open_nursery() as readers:
        for session in opened:
            readers.start_soon(_voice_reader, session, result, window)
        async with trio.open_nursery() as talkers:
            count = max(1, len(opened))
            for number, session in enumerate(opened):
                talkers.start_soon(talker, session, number * turn_period_s / count)
        readers.cancel_scope.cancel()


async def _voice_reader(session: _Session, result: LoadResult, window: _Window) -> None:
    first_delta = result.histogram("first_delta")
    jitter = result.histogram("jitter")
    try:
        while True:
            opcode, payload = await session.ws.receive_message()
            now = trio.current_time()
            if window.holds(now):
                window.received += 1
                window.bytes += len(payload)
            if opcode == frames.OP_BINARY:
                kind = "response.output_audio.delta"
                audio_bytes = len(payload)
            else:
                event = _VOICE_EVENT.decode(payload)
                kind = event.type
                delta = event.delta
                audio_bytes = (
                    -1
                    if delta is None
                    else audio.b64_decoded_length(len(delta), delta.count("=", -2))
                )
            if kind == "response.output_audio.delta" and audio_bytes >= 0:
                result.received += 1
                if math.isnan(session.last_delta_at):
                    first_delta.record((now - session.commit_at) * 1000.0)
                else:
                    gap_ms = (now - session.last_delta_at) * 1000.0
                    jitter.record(abs(gap_ms - session.last_delta_ms))
                session.last_delta_at = now
                session.last_delta_ms = audio.duration_ms(audio_bytes)
            elif kind == "response.done":
                session.answer_done.set()
            elif kind == "session.updated":
                session.updated.set()
            elif kind == "error":
                result.count_error("error_event")
    except ConnectionClosed as exc:
        if exc.code != frames.CLOSE_NORMAL:
            result.count_error(f"closed_{exc.code}")
    except (TransportClosed, msgspec.DecodeError) as exc:
        result.count_error(f"read_{type(exc).__name__}")


# ---------------------------------------------------------------- churn and idle


async def _run_churn(
    spec: LoadSpec,
    result: LoadResult,
    start: float,
    window: _Window,
    ssl_context: ssl.SSLContext | None,
) -> None:
    prefix, suffix = _append_template(spec.chunk_ms, seed=5)
    pcm = audio.speech_like(spec.chunk_ms, seed=5)
    appends = [prefix + str(n).encode() + suffix for n in range(CHURN_EXCHANGES)]
    await trio.sleep_until(start)

    async def exchange(ws: WebSocket, number: int) -> None:
        """One append (text or binary) and its echo (a delta, or a binary frame)."""
        if spec.binary:
            await ws.send_binary(_sequenced_chunk(pcm, number))
        else:
            await ws.send_text(appends[number])
        while True:
            opcode, payload = await ws.receive_message()
            if opcode == frames.OP_BINARY:
                return
            if _ENVELOPE.decode(payload).type == "response.output_audio.delta":
                return

    async def worker(index: int) -> None:
        while trio.current_time() < window.end:
            session = await open_session(spec, index, result, ssl_context)
            if session is None:
                await trio.sleep(CHURN_RETRY_PAUSE_S)
                continue
            result.sessions_opened += 1
            ws = session.ws
            try:
                for number in range(CHURN_EXCHANGES):
                    await exchange(ws, number)
                await ws.close(frames.CLOSE_NORMAL, "")
            except (ConnectionClosed, TransportClosed, msgspec.DecodeError) as exc:
                result.count_error(f"churn_{type(exc).__name__}")
                ws.transport.close()
                continue
            if window.holds(trio.current_time()):
                result.sessions_completed += 1
                window.sent += CHURN_EXCHANGES
                window.received += CHURN_EXCHANGES

    async with trio.open_nursery() as nursery:
        for number in range(spec.sessions):
            nursery.start_soon(worker, spec.index_offset + number)


async def _run_idle(opened: list[_Session], result: LoadResult, window: _Window) -> None:
    async def hold(session: _Session) -> None:
        try:
            while True:
                await session.ws.receive_message()  # answers pings; nothing else expected
        except ConnectionClosed as exc:
            result.count_error(f"closed_{exc.code}")
        except TransportClosed as exc:
            result.count_error(f"read_{type(exc).__name__}")

    async with trio.open_nursery() as holders:
        for session in opened:
            holders.start_soon(hold, session)
        await trio.sleep_until(window.end)
        holders.cancel_scope.cancel()
    result.sessions_held = sum(
        1 for s in opened if not s.ws.transport.closed and s.ws.close_received is None
    )
