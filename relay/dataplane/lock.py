"""Locked session config: what a client may not change, and the proof of what it sent. Sans-I/O.

This module owns the policy applied to client events when the client's credential
carries a locked session config (a relay token minted by the app's backend). The
rule is *what the relay forwards under a lock is what it checked* (issue 10,
finding 3): the upstream must never read an event differently from the relay.

- The locked config is applied before the client's upgrade is answered, and
  invisibly (:class:`LockedStart`): the relay sends it upstream as one
  ``session.update`` (:func:`SessionLock.initial_update`), consumes the upstream's
  ``session.updated`` answer, and hands the client a ``session.created`` carrying
  the applied session, as OpenAI does for an ``ek_`` minted with a config. A
  client that waits for the ``session.updated`` answering its own update gets
  exactly that one.
- Audio appends, by far the most frequent client event, are forwarded as they
  came only once *proven* to be appends (:func:`is_plain_append`, or
  :class:`AppendProof` piece by piece for fragmented and cut-through messages):
  the payload starts with an append prefix (so ``type`` is its first key) and,
  after it, holds no other ``"type"`` and no backslash at all. Base64 audio never
  contains ``"`` or ``\\``, and a key spelled with escapes (``"typ\\u0065"``) needs
  a backslash, so a proven payload has exactly one ``type`` key, whatever the
  upstream's JSON parser does with duplicates.
- Every other text event (:meth:`SessionLock.rewrite`) is parsed with orjson and
  forwarded *re-serialised from the parsed form*, so duplicate keys at any depth
  collapse to the value the relay checked. Events orjson refuses (invalid JSON,
  NaN, lone surrogates, invalid UTF-8), non-objects and events without a string
  ``type`` are not forwarded: the client gets an OpenAI-shaped ``error``.
- In ``session.update`` and ``response.create`` (whose per-response overrides map
  onto the same session fields) every locked field the client sets to a
  *different* value is removed, and the client is told once per event with an
  ``error`` (code ``locked_field``, ``param`` naming the first removed field, the
  message listing all of them); the rest is forwarded. A value equal to the
  locked one is kept silently, so unmodified SDKs (which repeat
  ``session.type = "realtime"`` in every update) keep working. A parent of a
  locked field set to a non-object (``audio.output: null``) counts as changing it.
- Under locked ``instructions``, a ``system`` message item in
  ``conversation.item.create`` or in ``response.create``'s ``response.input`` is
  refused (not forwarded; ``locked_field``, ``param`` naming the role): a system
  message would be instructions by another name.

The lock is *leaf-wise*: locking ``audio.output.voice`` leaves
``audio.input.turn_detection`` to the client. Every leaf of the lock is locked,
``model`` and ``type`` included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from relay.protocol.events import error_event

#: The spellings of an append's opening that official SDKs produce (compact JSON and
#: Python's default separators); anything else is parsed.
APPEND_PREFIXES: Final = (
    b'{"type":"input_audio_buffer.append"',
    b'{"type": "input_audio_buffer.append"',
)
#: Bytes needed to judge whether a message starts like an append.
APPEND_PREFIX_MAX_BYTES: Final = max(len(p) for p in APPEND_PREFIXES)
_TYPE_KEY: Final = b'"type"'
#: Bytes of a piece kept for the next one, so a ``"type"`` split across pieces is seen.
_CARRY_BYTES: Final = len(_TYPE_KEY) - 1
#: Session fields a ``response.create`` may override, by their session path.
RESPONSE_OVERRIDES: Final[tuple[tuple[str, ...], ...]] = (
    ("instructions",),
    ("tools",),
    ("tool_choice",),
    ("output_modalities",),
    ("audio", "output", "voice"),
    ("audio", "output", "format"),
    ("max_output_tokens",),
    ("model",),
    ("prompt",),
)


# ------------------------------------------------------------------ the append proof


def is_plain_append(payload: bytes) -> bool:
    """Whether one whole unmasked text payload is proven to be an audio append."""
    if payload.startswith(APPEND_PREFIXES[0]):
        start = len(APPEND_PREFIXES[0])
    elif payload.startswith(APPEND_PREFIXES[1]):
        start = len(APPEND_PREFIXES[1])
    else:
        return False
    # From the prefix's closing quote on, as AppendProof's carry does.
    return payload.find(_TYPE_KEY, start - 1) < 0 and b"\\" not in payload


#: :class:`AppendProof` states.
PENDING: Final = 0  # too few bytes yet to judge the prefix
HOLDS: Final = 1  # starts like an append and nothing so far refutes it
FAILS: Final = 2  # not provably an append (final)


class AppendProof:
    """:func:`is_plain_append`, fed one unmasked piece at a time with bounded memory.

    Keeps at most the prefix while it is undecided, then only the last
    ``_CARRY_BYTES`` of what it saw, so a ``"type"`` split across fragments or
    chunks is still caught. Feeding the pieces of a payload reaches the same
    verdict as :func:`is_plain_append` on the whole (``HOLDS`` for ``True``), once
    :meth:`finish` has judged a payload shorter than the prefix.
    """

    __slots__ = ("_carry", "_head", "state")

    def __init__(self) -> None:
        self.state = PENDING
        self._head = b""
        self._carry = b""

    def feed(self, piece: bytes) -> int:
        """Look at the next piece of the payload; the state after it."""
        if self.state == HOLDS:
            self._scan(piece)
        elif self.state == PENDING:
            head = self._head + piece
            for prefix in APPEND_PREFIXES:
                if head.startswith(prefix):
                    self.state = HOLDS
                    self._head = b""
                    self._carry = prefix[-_CARRY_BYTES:]
                    self._scan(head[len(prefix) :])
                    return self.state
            if any(prefix.startswith(head) for prefix in APPEND_PREFIXES):
                self._head = head  # shorter than a prefix it may still become
            else:
                self.state = FAILS
                self._head = b""
        return self.state

    def finish(self) -> int:
        """The payload is complete: one still too short for the prefix is no append."""
        if self.state == PENDING:
            self.state = FAILS
            self._head = b""
        return self.state

    def _scan(self, piece: bytes) -> None:
        if (
            b"\\" in piece
            or piece.find(_TYPE_KEY) >= 0
            or (self._carry + piece[:_CARRY_BYTES]).find(_TYPE_KEY) >= 0
        ):
            self.state = FAILS
            return
        if len(piece) >= _CARRY_BYTES:
            self._carry = piece[-_CARRY_BYTES:]
        else:
            self._carry = (self._carry + piece)[-_CARRY_BYTES:]


# ------------------------------------------------------------------ the rewrite


_MISSING: Final = object()


def _leaf_paths(config: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in config.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            paths.extend(_leaf_paths(value, path))
        else:
            paths.append(path)
    return paths


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _same(value: Any, locked: Any) -> bool:
    """JSON equality, strict about types (Python's ``1 == 1.0 == True`` is not)."""
    if locked is _MISSING:
        return False
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        locked, option=orjson.OPT_SORT_KEYS
    )


def _strip(container: dict[str, Any], path: tuple[str, ...], locked: Any) -> tuple[str, ...]:
    """Remove the client's change to one locked path; the path removed, or ``()``."""
    node = container
    last = len(path) - 1
    for depth, key in enumerate(path):
        if key not in node:
            return ()
        value = node[key]
        if depth == last:
            if _same(value, locked):
                return ()  # no change: keep it, say nothing
            del node[key]
            return path
        if not isinstance(value, dict):
            # A parent of a locked field replaced by a non-object would reset the field.
            del node[key]
            return path[: depth + 1]
        node = value
    return ()  # pragma: no cover - the loop returns at the last key


@dataclass(frozen=True, slots=True)
class Rewrite:
    """The outcome for one client text event."""

    #: JSON to forward upstream (re-serialised from the parsed event), or None: refused.
    payload: bytes | None
    #: ``error`` event to send the client, or None.
    notice: bytes | None
    removed: tuple[str, ...] = ()


def _refusal(message: str, code: str, param: str | None = None, event_id: object = None) -> Rewrite:
    notice = error_event(
        message=message,
        code=code,
        param=param,
        caused_by_event_id=event_id if isinstance(event_id, str) else None,
    )
    return Rewrite(payload=None, notice=notice)


def binary_refusal() -> bytes:
    """The ``error`` for a binary data message on a locked session (never forwarded)."""
    return error_event(
        message="Binary messages are not accepted on a session with a locked config; "
        "send Realtime events as text.",
        code="invalid_event",
    )


class SessionLock:
    """The locked config of one session and the rewrite of client events against it."""

    def __init__(self, locked_session: dict[str, Any]) -> None:
        self.locked_session = locked_session
        self._paths = [(p, _lookup(locked_session, p)) for p in _leaf_paths(locked_session)]
        locked = [path for path, _ in self._paths]
        # A locked subtree (e.g. tools as a whole) also covers a client's deeper paths.
        self._response_paths = [
            (path, _lookup(locked_session, path))
            for path in RESPONSE_OVERRIDES
            if any(path[: len(lp)] == lp or lp[: len(path)] == path for lp in locked)
        ]
        self._instructions_locked = "instructions" in locked_session

    def initial_update(self) -> bytes:
        """The ``session.update`` that applies the lock upstream at session start."""
        session = dict(self.locked_session)
        session.setdefault("type", "realtime")
        session.pop("model", None)  # chosen by the URL; the upstream refuses changing it
        session.pop("object", None)
        session.pop("id", None)
        session.pop("expires_at", None)
        return orjson.dumps(
            {"type": "session.update", "event_id": LOCKED_UPDATE_EVENT_ID, "session": session}
        )

    def rewrite(self, payload: bytes) -> Rewrite:
        """Check one client text event (the unmasked JSON) against the lock."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return _refusal(
                "Invalid JSON: the event could not be parsed (a session with a locked "
                "config forwards only events it can read).",
                "invalid_json",
            )
        if not isinstance(event, dict):
            return _refusal("Invalid event: expected a JSON object.", "invalid_event")
        kind = event.get("type")
        event_id = event.get("event_id")
        if kind is None:
            return _refusal(
                "The 'type' field is missing.", "missing_required_parameter", "type", event_id
            )
        if not isinstance(kind, str):
            return _refusal(
                "Invalid type for 'type': expected a string.", "invalid_type", "type", event_id
            )
        removed: list[str] = []
        if kind == "session.update" and isinstance(event.get("session"), dict):
            session = event["session"]
            for path, value in self._paths:
                if stripped := _strip(session, path, value):
                    removed.append(".".join(("session", *stripped)))
        elif kind == "response.create" and isinstance(event.get("response"), dict):
            response = event["response"]
            if refused := self._system_item(response.get("input"), "response.input", event_id):
                return refused
            for path, value in self._response_paths:
                if stripped := _strip(response, path, value):
                    removed.append(".".join(("response", *stripped)))
        elif kind == "conversation.item.create":
            item = event.get("item")
            if refused := self._system_item([item], "item", event_id):
                return refused
        forwarded = orjson.dumps(event)
        if not removed:
            return Rewrite(payload=forwarded, notice=None)
        notice = error_event(
            message=(
                "These fields are locked by the session's credential and were not applied: "
                + ", ".join(removed)
            ),
            code="locked_field",
            param=removed[0],
            caused_by_event_id=event_id if isinstance(event_id, str) else None,
        )
        return Rewrite(payload=forwarded, notice=notice, removed=tuple(removed))

    def _system_item(self, items: object, where: str, event_id: object) -> Rewrite | None:
        """Refuse a ``system`` message among ``items`` when the instructions are locked."""
        if not self._instructions_locked or not isinstance(items, list):
            return None
        for index, item in enumerate(items):
            if isinstance(item, dict) and item.get("role") == "system":
                param = f"{where}.role" if where == "item" else f"{where}[{index}].role"
                return _refusal(
                    "System messages are locked by the session's credential (its "
                    "instructions are locked); the event was not applied.",
                    "locked_field",
                    param,
                    event_id,
                )
        return None


# ------------------------------------------------------------------ the invisible start

#: Upstream events other than session.created/updated held while the lock is applied.
LOCKED_START_MAX_HELD_EVENTS: Final = 16
LOCKED_UPDATE_EVENT_ID: Final = "relay_locked_config"


@dataclass(frozen=True, slots=True)
class LockedStartDone:
    #: What the client gets first, in order: ``session.created`` with the applied
    #: session, then any other upstream event that arrived meanwhile.
    client_events: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class LockedStartFailed:
    #: Why, for the relay's log (the upstream's own words; redacted there).
    detail: str


class LockedStart:
    """Turns the upstream's first events into what the client sees under a lock.

    Feed every upstream text event from the start of the session (after sending
    :meth:`SessionLock.initial_update`); :meth:`feed` answers None while it needs
    more, then :class:`LockedStartDone` or :class:`LockedStartFailed`. Fails closed:
    an upstream that refuses the locked config (an ``error`` event) or says
    something else first opens no session.
    """

    def __init__(self) -> None:
        self._created: dict[str, Any] | None = None
        self._held: list[bytes] = []

    def feed(self, payload: bytes) -> LockedStartDone | LockedStartFailed | None:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return LockedStartFailed("the upstream sent an unreadable event before the session")
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "error":
            error = event.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            return LockedStartFailed(f"the upstream refused the locked session config: {message}")
        if self._created is None:
            if kind != "session.created":
                return LockedStartFailed(f"the upstream's first event was {str(kind)[:64]!r}")
            self._created = event
            return None
        if kind == "session.updated" and isinstance(event.get("session"), dict):
            created = dict(self._created)
            created["session"] = event["session"]
            return LockedStartDone((orjson.dumps(created), *self._held))
        if len(self._held) >= LOCKED_START_MAX_HELD_EVENTS:
            return LockedStartFailed("the upstream did not answer the locked session config")
        self._held.append(payload)
        return None
