"""A simulated session's outgoing events: their envelope, their ids, and when they fall due.

This module owns what every server event of the simulator shares:

- the envelope: ``{"type", "event_id", ...fields}`` in OpenAI's key order
  (:meth:`Outbox.event`) and the ``error`` event of a refused client event
  (:meth:`Outbox.emit_error`);
- event ids in OpenAI's shape and the ``obfuscation`` padding of deltas, cheap and
  seedable (:class:`FastIds`);
- the schedule: pending events live in a heap of ``(due_time, sequence, payload,
  marker)``; whatever is due is moved, in order, to a ready deque, so an event
  generated "now" can never overtake one that fell due earlier. A :class:`Marker`
  says what becomes true when its event falls due (audio or a word of a response
  was sent, a response finished, the session expired); the session is told
  through the ``on_due`` callback.

Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import orjson

from relay.protocol.events import ID_BODY_CHARS, error_event
from relay.protocol.validation import ClientEventError

if TYPE_CHECKING:
    from relay.simulator.responses import ResponseRun

JSON = dict[str, Any]

#: Transcript and text deltas carry ``obfuscation`` padding up to a multiple of this.
OBFUSCATION_BLOCK_CHARS: Final = 16

#: The alphabet of OpenAI ids (as in relay.protocol.events), as bytes for ``translate``.
_ID_ALPHABET: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: Maps every byte onto the id alphabet; a slight modulo bias is harmless for ids.
_ID_TRANSLATION: Final = bytes.maketrans(
    bytes(range(256)), bytes(_ID_ALPHABET[b % len(_ID_ALPHABET)] for b in range(256))
)

#: Marker kinds. Every event of a response carries its run, so a cancel can find them.
MARK_NONE: Final = 0
MARK_AUDIO: Final = 1
MARK_WORD: Final = 2
MARK_FINISHED: Final = 3
MARK_EXPIRED: Final = 4


class FastIds:
    """Event ids in OpenAI's shape (``event_`` + 21 alphanumerics), cheap and seedable.

    :func:`relay.protocol.events.new_id` draws each character from ``secrets``
    (about 30 us per id); event ids need no secrecy and a response carries dozens.
    """

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def __call__(self, prefix: str = "event_") -> str:
        return prefix + self._rng.randbytes(ID_BODY_CHARS).translate(_ID_TRANSLATION).decode()

    def obfuscation(self, delta: str) -> str:
        """Padding that rounds a delta up to a multiple of 16 characters, as seen live."""
        pad = OBFUSCATION_BLOCK_CHARS - len(delta) % OBFUSCATION_BLOCK_CHARS
        return self._rng.randbytes(pad).translate(_ID_TRANSLATION).decode()


class Marker(NamedTuple):
    """What to record when a scheduled event falls due (sent, from the session's view)."""

    run: ResponseRun | None
    kind: int
    amount: int


class _Scheduled(NamedTuple):
    due: float
    seq: int
    payload: bytes
    marker: Marker | None


class Outbox:
    """Server events of one session: scheduled by due time, then ready in order."""

    def __init__(self, ids: FastIds, now: float, on_due: Callable[[Marker], None]) -> None:
        self.ids = ids
        #: The session's clock: the latest time passed in (never goes backwards).
        self.now = now
        #: Events due, in order, not yet taken by :meth:`pop_due`.
        self.ready: deque[bytes] = deque()
        self._heap: list[_Scheduled] = []
        self._seq = itertools.count()
        self._on_due = on_due

    def advance(self, now: float) -> None:
        """Move the clock (never backwards) and everything now due to the ready queue."""
        if now > self.now:
            self.now = now
        heap = self._heap
        while heap and heap[0].due <= self.now:
            entry = heapq.heappop(heap)
            self.ready.append(entry.payload)
            if entry.marker is not None:
                self._on_due(entry.marker)

    def pop_due(self, now: float) -> list[bytes]:
        """Events due by ``now``, in order; each returned once."""
        self.advance(now)
        due = list(self.ready)
        self.ready.clear()
        return due

    def next_due(self) -> float | None:
        """When the next event falls due (now, if some already have), else ``None``."""
        if self.ready:
            return self.now
        if self._heap:
            return self._heap[0].due
        return None

    def schedule(self, due: float, payload: bytes, marker: Marker | None = None) -> None:
        if due <= self.now:
            self.ready.append(payload)
            if marker is not None:
                self._on_due(marker)
        else:
            heapq.heappush(self._heap, _Scheduled(due, next(self._seq), payload, marker))

    def unschedule(self, run: ResponseRun) -> None:
        """Drop every pending event of ``run`` (a cancelled response)."""
        self._heap = [
            entry for entry in self._heap if entry.marker is None or entry.marker.run is not run
        ]
        heapq.heapify(self._heap)

    def event(self, event_type: str, fields: JSON) -> bytes:
        """A server event with a fresh ``event_id``: type and event_id first, as OpenAI's."""
        return orjson.dumps({"type": event_type, "event_id": self.ids(), **fields})

    def emit(self, event_type: str, fields: JSON) -> None:
        """A server event, due at once."""
        self.ready.append(self.event(event_type, fields))

    def emit_error(self, exc: ClientEventError, caused_by: str | None) -> None:
        """The ``error`` event refusing a client event, due at once."""
        self.ready.append(
            error_event(
                message=exc.message,
                error_type=exc.error_type,
                code=exc.code,
                param=exc.param,
                caused_by_event_id=caused_by,
            )
        )


__all__ = [
    "MARK_AUDIO",
    "MARK_EXPIRED",
    "MARK_FINISHED",
    "MARK_NONE",
    "MARK_WORD",
    "OBFUSCATION_BLOCK_CHARS",
    "FastIds",
    "Marker",
    "Outbox",
]
