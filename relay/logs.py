"""Structured logs: JSON lines, secrets redacted, never blocking the event loop.

This module owns how the relay writes logs:

- every record becomes one JSON line (orjson): ``ts``, ``level``, ``logger``,
  ``msg``, plus the structured fields a caller passes as ``extra={"fields": {...}}``
  (the end-of-session line, access lines, the start-up summary);
- :func:`redact` scrubs anything shaped like a credential (``sk-…``, ``ek_…``,
  ``rk_…``, ``Bearer …``, ``openai-insecure-api-key.…``) from every message and
  string field before it is written, as a last line of defence: the code already
  never logs a credential on purpose; a :class:`~relay.credentials.secret.Secret`
  in the fields is written as ``<redacted>``;
- records go through a bounded queue to a writer thread, which writes what
  queued up every ``LOG_WRITE_INTERVAL_S`` in one write, so a slow or blocked
  stderr never stalls a Trio task; when the queue is full the line is dropped and
  counted (:attr:`QueueingHandler.dropped`, exported as a metric).
"""

from __future__ import annotations

import atexit
import logging
import queue
import re
import sys
import threading
from typing import IO, Any, Final

import orjson

from relay.credentials.secret import Secret

#: Log lines waiting for the writer thread before new ones are dropped.
LOG_QUEUE_MAX_LINES: Final = 10_000
#: Queued lines the writer thread joins into one write.
WRITE_BATCH_MAX_LINES: Final = 256
#: How often the writer thread writes what was queued (the most a line waits).
LOG_WRITE_INTERVAL_S: Final = 0.05
_SECRET_PATTERNS: Final = re.compile(
    r"(?i)(bearer\s+)\S+"
    # Masked keys as providers quote them ("sk-proj-****abcd") count as keys too.
    r"|\b(sk-|ek_|rk_)[A-Za-z0-9._\-*]{4,}"
    r"|(openai-insecure-api-key\.)\S+"
)


def _keep_prefix(match: re.Match[str]) -> str:
    prefix = match.group(1) or match.group(2) or match.group(3) or ""
    return f"{prefix}<redacted>"


def redact(text: str) -> str:
    """Replace anything that looks like a credential with ``<redacted>``."""
    # The search alone is the common case (nothing to hide) and costs half the sub.
    if _SECRET_PATTERNS.search(text) is None:
        return text
    return _SECRET_PATTERNS.sub(_keep_prefix, text)


_PLAIN_TYPES: Final = frozenset({int, float, bool, type(None)})


def _scrub(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        return redact(value)
    if kind in _PLAIN_TYPES:
        return value
    if kind is dict:
        # Inline for the members, the bulk of a session's end line: no call per number.
        return {
            key: item
            if type(item) in _PLAIN_TYPES
            else redact(item)
            if type(item) is str
            else _scrub(item)
            for key, item in value.items()
        }
    if isinstance(value, Secret):  # orjson would write a str subclass's value
        return str(value)
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _scrub(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(_scrub(fields))
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            text += " " + orjson.dumps(_scrub(fields), default=str).decode()
        return redact(text)


class QueueingHandler(logging.Handler):
    """Formats in the caller, writes in a thread; drops (and counts) when full."""

    def __init__(self, stream: IO[str] | None = None, max_lines: int = LOG_QUEUE_MAX_LINES) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.dropped = 0
        self.max_lines = max_lines
        # SimpleQueue is C and lock-light (queue.Queue's put costs more than the
        # line's formatting); the bound is kept by checking its size first.
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_lines, name="relay-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a broken record must not break the caller
            self.dropped += 1
            return
        if self._queue.qsize() >= self.max_lines:
            self.dropped += 1
            return
        self._queue.put(line)

    def _write_lines(self) -> None:
        # The writer wakes on its own every LOG_WRITE_INTERVAL_S, never per line: a
        # wake-up per line costs the event loop's core two thread switches (more
        # than the line's formatting), at any rate of lines.
        queued = self._queue
        while True:
            stopping = self._stop.wait(LOG_WRITE_INTERVAL_S)
            while not queued.empty():
                lines: list[str] = []
                while len(lines) < WRITE_BATCH_MAX_LINES and not queued.empty():
                    lines.append(queued.get_nowait())
                try:
                    self.stream.write("".join(line + "\n" for line in lines))
                    self.stream.flush()
                except (OSError, ValueError):
                    pass
            if stopping:
                return

    def flush_and_stop(self, timeout_s: float = 2.0) -> None:
        """Write what is queued (waiting at most ``timeout_s``) and end the writer."""
        self._stop.set()
        self._thread.join(timeout_s)


_installed: QueueingHandler | None = None


def setup_logging(level: str, log_format: str = "json") -> QueueingHandler:
    """Install the relay's handler on the root logger (once; later calls adjust it)."""
    global _installed
    # Fields our lines never show: not gathered for every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    if _installed is None:
        _installed = QueueingHandler()
        root.handlers[:] = [_installed]
        # Lines still queued when the process exits are written, not lost.
        atexit.register(_installed.flush_and_stop)
    _installed.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return _installed


def dropped_lines() -> int:
    return _installed.dropped if _installed is not None else 0
