"""Locked session config: what a client may not change. Sans-I/O.

This module owns the policy applied to the few client events that can change a
session's behaviour when the client's credential carries a locked session config
(a relay token minted by the app's backend):

- at session start, the locked config is sent upstream as one ``session.update``
  (:func:`initial_update`) before any client event is forwarded;
- a client's ``session.update`` and ``response.create`` are parsed, and every
  field the lock covers is removed from them (``session.<path>`` /
  ``response.<path>``; per-response overrides map onto the same session fields);
  the rest is forwarded, and the client is told once per event with an
  OpenAI-shaped ``error`` (code ``locked_field``, ``param`` naming the first
  removed field, the message listing all of them). An event left with nothing to
  change is still forwarded (``session.update`` with only ``type`` is harmless and
  keeps the client's request/answer pairing intact).

Only those two event types are ever decoded; everything else, audio appends first
of all, is recognised without unmasking the whole frame (:func:`needs_inspection`)
and passes untouched.

The lock is *leaf-wise*: locking ``audio.output.voice`` leaves
``audio.input.turn_detection`` to the client. ``model`` and ``type`` are always
locked when present in the lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

from relay.protocol.events import error_event

#: Client events that may change what the lock protects.
INSPECTED_TYPES: Final = frozenset({"session.update", "response.create"})
#: Unmasking this many leading bytes recognises an append by its prefix.
PREFIX_PROBE_BYTES: Final = 48
_APPEND_PREFIXES: Final = (
    b'{"type":"input_audio_buffer.append"',
    b'{"type": "input_audio_buffer.append"',
)
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


def needs_inspection(prefix: bytes) -> bool:
    """Whether a client text event must be decoded, judged from its first bytes.

    Appends are by far the most frequent client event, and every official SDK
    serialises ``type`` first; anything that does not start like an append is
    decoded (cheap for the small control events) so key order never matters for
    correctness.
    """
    return not prefix.startswith(_APPEND_PREFIXES)


def _leaf_paths(config: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in config.items():
        path = (*prefix, key)
        if isinstance(value, dict) and value:
            paths.extend(_leaf_paths(value, path))
        else:
            paths.append(path)
    return paths


def _remove(target: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = target
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return False
    if isinstance(node, dict) and path[-1] in node:
        del node[path[-1]]
        return True
    return False


@dataclass(frozen=True, slots=True)
class Rewrite:
    """The outcome for one client event."""

    #: Replacement JSON for the event, or None to forward the original bytes.
    payload: bytes | None
    #: ``error`` event to send the client, or None.
    notice: bytes | None
    removed: tuple[str, ...] = ()


UNCHANGED: Final = Rewrite(payload=None, notice=None)


class SessionLock:
    """The locked config of one session and the rewrite of client events against it."""

    def __init__(self, locked_session: dict[str, Any]) -> None:
        self.locked_session = locked_session
        self._paths = [p for p in _leaf_paths(locked_session) if p != ("type",)]
        locked = set(self._paths)
        # A locked subtree (e.g. tools as a whole) also covers a client's deeper paths.
        self._response_paths = [
            path
            for path in RESPONSE_OVERRIDES
            if any(path[: len(lp)] == lp or lp[: len(path)] == path for lp in locked)
        ]

    def initial_update(self) -> bytes:
        """The ``session.update`` that applies the lock upstream at session start."""
        session = dict(self.locked_session)
        session.setdefault("type", "realtime")
        session.pop("model", None)  # chosen by the URL; the upstream refuses changing it
        session.pop("object", None)
        session.pop("id", None)
        session.pop("expires_at", None)
        return orjson.dumps(
            {"type": "session.update", "event_id": "relay_locked_config", "session": session}
        )

    def rewrite(self, payload: bytes) -> Rewrite:
        """Apply the lock to one client text event (the unmasked JSON)."""
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return UNCHANGED  # the upstream answers malformed JSON itself
        if not isinstance(event, dict):
            return UNCHANGED
        kind = event.get("type")
        if kind == "session.update" and isinstance(event.get("session"), dict):
            container, prefix, paths = event["session"], "session", self._paths
        elif kind == "response.create" and isinstance(event.get("response"), dict):
            container, prefix, paths = event["response"], "response", self._response_paths
        else:
            return UNCHANGED
        removed = [".".join((prefix, *path)) for path in paths if _remove(container, path)]
        if not removed:
            return UNCHANGED
        client_event_id = event.get("event_id")
        notice = error_event(
            message=(
                "These fields are locked by the session's credential and were not applied: "
                + ", ".join(removed)
            ),
            code="locked_field",
            param=removed[0],
            caused_by_event_id=client_event_id if isinstance(client_event_id, str) else None,
        )
        return Rewrite(payload=orjson.dumps(event), notice=notice, removed=tuple(removed))
