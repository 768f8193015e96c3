"""Running a load profile: in this process, or spread over several load processes.

This module owns the orchestration around :mod:`relay.loadgen.profiles`:

- :func:`run_load` runs one :class:`~relay.loadgen.results.LoadSpec` either in the
  calling Trio process or over ``processes`` worker processes
  (``python -m relay.loadgen``), optionally pinned to CPUs, so the load side is
  never the bottleneck. Workers open their sessions, report ``ready``, and all
  start at one wall-clock time the parent sends them; their results are merged.
- Hooks let a benchmark sample the server under test at the right moments:
  ``on_ready`` once every session is open (memory with the sessions held), and
  ``on_window`` as the measured window opens and closes (CPU over the window).
- :class:`ProgressBar` draws elapsed time over the run on a terminal.

Worker protocol, JSON lines: the parent writes the spec (it carries the key, so
the key never appears on a command line), the worker answers
``{"event": "ready", "opened": n}``, the parent writes ``{"start_at": epoch}``,
and the worker ends with ``{"event": "result", "result": {...}}``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Final, TextIO

import msgspec
import orjson
import trio

from relay.loadgen.profiles import (
    CONNECT_CONCURRENCY,
    CONNECT_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    START_DELAY_S,
    VOICE_RESPONSE_TIMEOUT_S,
    run_profile,
)
from relay.loadgen.results import LoadResult, LoadSpec, merge_results

#: Slack on top of a run's own time bounds before the parent gives up on a worker.
WORKER_SLACK_S: Final = 30.0
#: Longest line a worker may write (a result with its histograms).
WORKER_LINE_MAX_BYTES: Final = 16 * 1024 * 1024
PROGRESS_INTERVAL_S: Final = 0.5
PROGRESS_BAR_CHARS: Final = 30

WindowHook = Callable[[str], None]
ReadyHook = Callable[[int], None]


class LoadError(Exception):
    """A load worker failed or overran its time bound; the message says which."""


class ProgressBar:
    """``label [#####-----] 12.0/20.0 s`` redrawn in place on ``stream``."""

    def __init__(self, label: str, total_s: float, stream: TextIO) -> None:
        self.label = label
        self.total_s = total_s
        self.stream = stream

    @staticmethod
    def wanted(flag: bool | None) -> bool:
        """``--progress``/``--no-progress`` as given, else only when stderr is a terminal."""
        return sys.stderr.isatty() if flag is None else flag

    def draw(self, elapsed_s: float) -> None:
        share = min(1.0, max(0.0, elapsed_s / self.total_s)) if self.total_s > 0 else 1.0
        filled = round(share * PROGRESS_BAR_CHARS)
        bar = "#" * filled + "-" * (PROGRESS_BAR_CHARS - filled)
        self.stream.write(
            f"\r{self.label} [{bar}] {min(elapsed_s, self.total_s):5.1f}/{self.total_s:.1f} s"
        )
        self.stream.flush()

    def finish(self) -> None:
        self.draw(self.total_s)
        self.stream.write("\n")
        self.stream.flush()

    async def run_until(self, start: float) -> None:
        """Redraw from ``start`` (Trio clock) until cancelled or the total has passed."""
        await trio.sleep_until(start)
        while (elapsed := trio.current_time() - start) < self.total_s:
            self.draw(elapsed)
            await trio.sleep(PROGRESS_INTERVAL_S)
        self.finish()


def time_bound_s(spec: LoadSpec) -> float:
    """Longest a run of ``spec`` may take, start to result, before it counts as hung."""
    opening = CONNECT_TIMEOUT_S * (1 + math.ceil(spec.sessions / CONNECT_CONCURRENCY))
    running = spec.warmup_s + spec.duration_s + DRAIN_TIMEOUT_S
    if spec.profile == "voice":
        running += VOICE_RESPONSE_TIMEOUT_S
    return opening + running + WORKER_SLACK_S


async def _window_hooks(
    start_epoch: float, spec: LoadSpec, on_window: WindowHook | None, progress: ProgressBar | None
) -> None:
    start = trio.current_time() + max(0.0, start_epoch - time.time())
    async with trio.open_nursery() as nursery:
        if progress is not None:
            nursery.start_soon(progress.run_until, start)
        if on_window is not None:
            await trio.sleep_until(start + spec.warmup_s)
            on_window("start")
            await trio.sleep_until(start + spec.warmup_s + spec.duration_s)
            on_window("end")


async def run_load(
    spec: LoadSpec,
    *,
    processes: int = 0,
    cpus: set[int] | None = None,
    on_ready: ReadyHook | None = None,
    on_window: WindowHook | None = None,
    progress: ProgressBar | None = None,
) -> LoadResult:
    """Run ``spec``: in this process when ``processes`` is 0, else over that many workers."""
    if processes <= 0:
        return await _run_here(spec, on_ready, on_window, progress)
    return await _run_workers(spec, processes, cpus, on_ready, on_window, progress)


async def _run_here(
    spec: LoadSpec,
    on_ready: ReadyHook | None,
    on_window: WindowHook | None,
    progress: ProgressBar | None,
) -> LoadResult:
    async with trio.open_nursery() as nursery:

        async def gate(opened: int) -> float:
            if on_ready is not None:
                on_ready(opened)
            start_epoch = time.time() + START_DELAY_S
            nursery.start_soon(_window_hooks, start_epoch, spec, on_window, progress)
            return start_epoch

        result = await run_profile(spec, gate=gate)
    return result


class _LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def line(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                return line
            if len(self.buffer) > WORKER_LINE_MAX_BYTES:
                raise LoadError("a load worker wrote an overlong line")
            chunk = await self.stream.receive_some()
            if not chunk:
                raise LoadError("a load worker exited before it reported (see its stderr above)")
            self.buffer += chunk


async def _run_workers(
    spec: LoadSpec,
    processes: int,
    cpus: set[int] | None,
    on_ready: ReadyHook | None,
    on_window: WindowHook | None,
    progress: ProgressBar | None,
) -> LoadResult:
    parts = spec.split(processes)
    workers: list[trio.Process] = []
    try:
        with trio.fail_after(time_bound_s(spec)):
            for part in parts:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "relay.loadgen"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                if cpus:
                    os.sched_setaffinity(process.pid, cpus)
                workers.append(process)
                assert process.stdin is not None
                await process.stdin.send_all(msgspec.json.encode(part) + b"\n")
            readers = [_LineReader(w.stdout) for w in workers if w.stdout is not None]
            opened = 0
            for reader in readers:
                opened += int(orjson.loads(await reader.line())["opened"])
            if on_ready is not None:
                on_ready(opened)
            start_epoch = time.time() + START_DELAY_S
            for process in workers:
                assert process.stdin is not None
                await process.stdin.send_all(orjson.dumps({"start_at": start_epoch}) + b"\n")
            results: list[LoadResult] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_window_hooks, start_epoch, spec, on_window, progress)
                for reader in readers:
                    message = orjson.loads(await reader.line())
                    results.append(LoadResult.from_json(message["result"]))
            for process in workers:
                await process.wait()
    except trio.TooSlowError:
        raise LoadError(f"load workers overran {time_bound_s(spec):.0f} s") from None
    finally:
        for process in workers:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
    return merge_results(results)


async def serve_worker(stdin: trio.abc.ReceiveStream, stdout: TextIO) -> None:
    """The worker side of the protocol above (``python -m relay.loadgen``)."""
    reader = _LineReader(stdin)
    spec = msgspec.json.decode(await reader.line(), type=LoadSpec)

    async def gate(opened: int) -> float:
        stdout.write(orjson.dumps({"event": "ready", "opened": opened}).decode() + "\n")
        stdout.flush()
        return float(orjson.loads(await reader.line())["start_at"])

    result = await run_profile(spec, gate=gate)
    stdout.write(orjson.dumps({"event": "result", "result": result.to_json()}).decode() + "\n")
    stdout.flush()
