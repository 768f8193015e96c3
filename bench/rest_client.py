"""Our REST load client for ``bench/rest.py``: streamed chat completions on raw sockets.

``--streams`` keep-alive HTTP/1.1 connections to 127.0.0.1, each looping: one
``POST <path>`` with ``stream: true`` (and ``stream_options.include_usage``), the
chunked SSE response read to ``data: [DONE]`` and its last chunk, then the next
request on the same connection. The HTTP is parsed here, by hand, on asyncio
protocols (uvloop): no HTTP library, one callback per read, so the
client stays light on the load core it shares with the simulator.

Per request it records the time to first byte (request written -> first whole SSE
event received) and every inter-chunk gap (one event's arrival to the next; events
that arrive in one read count a gap of 0), in :class:`relay.loadgen.LatencyHistogram`
buckets. Stream *i* sends its first request *i*/N of ``--stagger-ms`` late (the chunk
interval), so the streams' chunks do not all arrive at once. The run is bounded:
``--warmup-s`` (not recorded), then ``--duration-s`` measured (samples by arrival
time; requests by completion), then at most
``--drain-s`` for the requests in flight to end, with ``--max-requests`` in all and
``--request-timeout-s`` per request. It prints JSON lines on stdout: ``ready`` once
every connection is open, ``window_start``, ``window_end``, then ``result``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sys
import time
from typing import Any, Final

import uvloop

from relay.loadgen import LatencyHistogram

HEAD_END: Final = b"\r\n\r\n"
EVENT_END: Final = b"\n\n"
DONE: Final = b"data: [DONE]"
#: Pause after an error before the connection is opened again (seconds).
RECONNECT_PAUSE_S: Final = 0.05


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Run:
    """What every connection shares: the phase, the counters and the histograms."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        body = json.dumps(
            {
                "model": args.model,
                "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "Say something short."}],
            },
            separators=(",", ":"),
        ).encode()
        self.request = (
            f"POST {args.path} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{args.port}\r\n"
            f"Authorization: Bearer {args.key}\r\n"
            "Content-Type: application/json\r\n"
            "Accept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.recording = False
        self.stopping = False
        self.started = 0
        self.requests = 0
        self.chunks = 0
        self.errors: dict[str, int] = {}
        self.ttfb = LatencyHistogram()
        self.gap = LatencyHistogram()
        self.in_flight = 0
        self.idle = asyncio.Event()

    def error(self, kind: str) -> None:
        if self.recording:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def may_start(self) -> bool:
        return not self.stopping and self.started < self.args.max_requests


class Stream(asyncio.Protocol):
    """One keep-alive connection and its request loop, parsed as bytes arrive."""

    def __init__(self, run: Run, connection_lost: asyncio.Future[None]) -> None:
        self.run = run
        self.lost = connection_lost
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.active = False
        self.timer: asyncio.TimerHandle | None = None

    # --- the request loop ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def start(self) -> None:
        run = self.run
        if self.transport is None or self.transport.is_closing() or not run.may_start():
            self.close()
            return
        run.started += 1
        run.in_flight += 1
        run.idle.clear()
        self.active = True
        self.buffer.clear()
        self.head_done = False
        self.close_after = False
        self.chunk_left = -1  # -1: a size line is next; >= 0: data bytes, then CRLF
        self.events = 0
        self.done_seen = False
        self.last_event = 0.0
        self.timer = asyncio.get_running_loop().call_later(
            run.args.request_timeout_s, self.fail, "timeout"
        )
        self.sent_at = time.perf_counter()
        self.transport.write(run.request)

    def finish(self) -> None:
        run = self.run
        self.end_request()
        if run.recording:
            run.requests += 1
        if self.close_after:
            self.close()  # the server ends this connection: keep_connected opens another
        else:
            self.start()

    def end_request(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.active:
            self.active = False
            self.run.in_flight -= 1
            if self.run.in_flight == 0:
                self.run.idle.set()

    def fail(self, kind: str) -> None:
        if self.active:
            self.run.error(kind)
        self.close()

    def close(self) -> None:
        self.end_request()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.active:
            self.run.error("connection_lost")
        self.end_request()
        if not self.lost.done():
            self.lost.set_result(None)

    # --- parsing ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.fail("unexpected_bytes")
            return
        now = time.perf_counter()
        buffer = self.buffer
        buffer += data
        if not self.head_done:
            end = buffer.find(HEAD_END)
            if end < 0:
                return
            head = bytes(buffer[:end]).lower()
            if not head.startswith(b"http/1.1 200"):
                self.fail(f"status_{head[9:12].decode('ascii', 'replace')}")
                return
            if b"transfer-encoding: chunked" not in head:
                self.fail("not_chunked")
                return
            self.close_after = b"\r\nconnection: close" in head
            del buffer[: end + 4]
            self.head_done = True
        position = 0
        size = len(buffer)
        while position < size:
            if self.chunk_left < 0:
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                try:
                    chunk_size = int(bytes(buffer[position:line_end]).split(b";")[0], 16)
                except ValueError:
                    self.fail("bad_chunk_size")
                    return
                if chunk_size == 0:
                    # The last chunk, then its empty trailer (CRLF): wait for both.
                    if size - line_end < 4:
                        break
                    del buffer[:]
                    if not self.done_seen:
                        self.fail("no_done")
                        return
                    self.finish()
                    return
                self.chunk_left = chunk_size
                position = line_end + 2
            left = self.chunk_left
            if size - position < left + 2:
                break
            self._events(buffer, position, position + left, now)
            position += left + 2
            self.chunk_left = -1
        if position:
            del buffer[:position]

    def _events(self, buffer: bytearray, start: int, end: int, now: float) -> None:
        """One chunk's data: count its SSE events, record their times."""
        count = buffer.count(EVENT_END, start, end)
        if count == 0:
            return
        run = self.run
        if run.recording:
            if self.events == 0:
                run.ttfb.record((now - self.sent_at) * 1e3)
            else:
                run.gap.record((now - self.last_event) * 1e3)
            for _ in range(count - 1):  # events that came in the same read as this one
                run.gap.record(0.0)
            run.chunks += count
        self.events += count
        self.last_event = now
        if buffer.find(DONE, start, end) >= 0:
            self.done_seen = True


async def main_async(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    run = Run(args)
    run.idle.set()
    streams: list[Stream] = []
    lost: list[asyncio.Future[None]] = []
    for _ in range(args.streams):
        future: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_connection(
            functools.partial(Stream, run, future), "127.0.0.1", args.port
        )
        streams.append(protocol)
        lost.append(future)
    emit("ready", streams=len(streams))
    for index, stream in enumerate(streams):
        # Stream i starts i/N of --stagger-ms late, so the streams' chunks are not in phase.
        loop.call_later(args.stagger_ms / 1e3 * index / len(streams), stream.start)
    reconnect_task = asyncio.ensure_future(keep_connected(run, streams, lost, loop))
    await asyncio.sleep(args.warmup_s)
    run.recording = True
    emit("window_start")
    window_start = time.perf_counter()
    await asyncio.sleep(args.duration_s)
    run.recording = False
    window_s = time.perf_counter() - window_start
    emit("window_end")
    run.stopping = True
    try:
        await asyncio.wait_for(run.idle.wait(), timeout=args.drain_s)
    except TimeoutError:
        pass
    reconnect_task.cancel()
    for stream in streams:
        stream.close()
    emit(
        "result",
        streams=args.streams,
        window_s=window_s,
        started=run.started,
        requests=run.requests,
        chunks=run.chunks,
        errors=run.errors,
        ttfb=run.ttfb.to_wire(),
        gap=run.gap.to_wire(),
        unfinished=run.in_flight,
    )


async def keep_connected(
    run: Run,
    streams: list[Stream],
    lost: list[asyncio.Future[None]],
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A connection that ended (an error, a server's close) is opened again."""
    while not run.stopping:
        await asyncio.sleep(RECONNECT_PAUSE_S)
        for index, future in enumerate(lost):
            if not future.done() or run.stopping or not run.may_start():
                continue
            fresh: asyncio.Future[None] = loop.create_future()
            try:
                _, protocol = await loop.create_connection(
                    functools.partial(Stream, run, fresh), "127.0.0.1", run.args.port
                )
            except OSError:
                run.error("connect")
                continue
            streams[index], lost[index] = protocol, fresh
            protocol.start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--key", required=True)
    parser.add_argument("--model", default="gpt-4o-mini")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--stagger-ms", type=float, default=20.0)
    parser.add_argument("--drain-s", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=1_000_000)
    parser.add_argument("--request-timeout-s", type=float, default=30.0)
    args = parser.parse_args()
    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
