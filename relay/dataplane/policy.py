"""Session policy: how a relayed session ends, and what the relay learns from it. Sans-I/O.

Rule 1: every decision about *how a session ends* lives here, in the tables below:
which close code and reason each leg gets, and whether the client is first told
why with a Realtime ``error`` event. The Trio shell (:mod:`relay.dataplane.session`)
reports what happened (an :class:`Ending`) and carries out the returned
:class:`ClosePlan`; it never picks a code itself.

Rule 2: this module does not know about sockets, tasks or time sources; tests
drive it directly.

It also owns the tap on upstream events: the relay learns each upstream text
event's ``type`` from the two-field envelope decode and fully parses only the
few events a feature needs (``session.created`` for the upstream session id and
model, ``error`` for counting, ``response.done`` for usage). Every event is
forwarded byte for byte whatever the tap finds, unknown types included.

Close codes the relay itself chooses (documented in the README):

- upstream closed: its code and reason, verbatim (4000/3000 included);
- client closed: its code and reason go upstream verbatim;
- upstream connection lost without a close frame: client gets ``error``
  (``upstream_connection_lost``) then 1011 (retryable, as for any server failure);
- a leg sent a message over ``max_message_bytes``: that leg is closed 1009; the
  client is told with ``error`` (``message_too_big``) and closed 1009;
- a leg broke the WebSocket protocol: that leg is closed with the codec's code
  (1002); the client is told and closed with the same code if it was the client,
  1011 if it was the upstream;
- idle timeout, maximum session duration: ``error`` then 1008 (policy), reason
  ``idle_timeout`` / ``session_expired``; not retryable by the SDKs' rules;
- the client ran over its frame or byte rate: ``error`` (``rate_limit_exceeded``)
  then 1008; the upstream gets 1000 (it did nothing wrong);
- under a locked config, part of a client message that started like an audio
  append was forwarded before the rest proved it was not one: ``error``
  (``locked_config_violation``) then 1008; the upstream leg is dropped without a
  close frame, because it may be mid-frame and must never receive the rest;
- a dead peer (no pong within the deadline): 1011 to the client if the upstream
  died (retryable), nothing to send if the client died;
- an unexpected relay failure in one session: 1011 ``internal_error``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Final

import msgspec

from relay.protocol import frames
from relay.protocol.events import EventDecodeError, decode_envelope, error_event

#: Close code for relay-enforced limits (idle, duration, rate, lock): RFC 6455 "policy violation".
CLOSE_LIMIT_REACHED: Final = frames.CLOSE_POLICY_VIOLATION
#: Reason sent upstream when the client went away without a close frame.
CLIENT_GONE_REASON: Final = "client disconnected"


class Side(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"


class EndKind(enum.Enum):
    """What ended the session (the first thing that did)."""

    CLOSED = "closed"  # a leg sent a close frame
    DROPPED = "dropped"  # a leg's TCP ended without a close frame
    TOO_BIG = "too_big"  # a leg sent a message over the limit
    PROTOCOL_ERROR = "protocol_error"  # a leg broke RFC 6455
    DEAD_PEER = "dead_peer"  # a leg stopped answering pings
    IDLE_TIMEOUT = "idle_timeout"
    RATE_LIMITED = "rate_limit_exceeded"  # the client sent frames or bytes too fast
    LOCKED_VIOLATION = "locked_config_violation"  # a streamed append failed its proof
    SESSION_EXPIRED = "session_expired"
    SHUTDOWN = "shutdown"  # the relay is going away
    ADMIN = "admin"  # an operator ended it through the admin API
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Ending:
    kind: EndKind
    side: Side | None = None
    code: int | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class LegClose:
    """What to send one leg: optional ``error`` event first, then a close (or nothing)."""

    code: int | None
    reason: str = ""
    #: Encoded Realtime ``error`` event to send before the close, client leg only.
    error_event: bytes | None = None
    #: False when the leg is already gone: just drop the socket.
    send_close: bool = True


@dataclass(frozen=True, slots=True)
class ClosePlan:
    client: LegClose
    upstream: LegClose


def _tell(message: str, code: str, error_type: str = "server_error") -> bytes:
    return error_event(message=message, error_type=error_type, code=code)


def plan_close(ending: Ending) -> ClosePlan:
    """The close plan for every way a session can end (Rule 1)."""
    kind, side = ending.kind, ending.side
    code = ending.code
    if kind is EndKind.CLOSED:
        # A close frame is passed to the other leg verbatim; the closing leg gets its echo.
        verbatim = LegClose(code if code != frames.CLOSE_NO_STATUS else None, ending.reason)
        if side is Side.UPSTREAM:
            return ClosePlan(client=verbatim, upstream=verbatim)
        return ClosePlan(client=verbatim, upstream=verbatim)
    if kind is EndKind.DROPPED:
        if side is Side.UPSTREAM:
            return ClosePlan(
                client=LegClose(
                    frames.CLOSE_INTERNAL_ERROR,
                    "upstream connection lost",
                    _tell("The upstream connection was lost.", "upstream_connection_lost"),
                ),
                upstream=LegClose(None, send_close=False),
            )
        return ClosePlan(
            client=LegClose(None, send_close=False),
            upstream=LegClose(frames.CLOSE_GOING_AWAY, CLIENT_GONE_REASON),
        )
    if kind is EndKind.TOO_BIG:
        too_big = frames.CLOSE_MESSAGE_TOO_BIG
        if side is Side.UPSTREAM:
            return ClosePlan(
                client=LegClose(
                    too_big,
                    "upstream message too big",
                    _tell(
                        f"The upstream sent a message too big to relay: {ending.reason}",
                        "message_too_big",
                    ),
                ),
                upstream=LegClose(too_big, ending.reason),
            )
        return ClosePlan(
            client=LegClose(
                too_big,
                "message too big",
                _tell(
                    f"Message too big: {ending.reason}", "message_too_big", "invalid_request_error"
                ),
            ),
            upstream=LegClose(frames.CLOSE_GOING_AWAY, CLIENT_GONE_REASON),
        )
    if kind is EndKind.PROTOCOL_ERROR:
        violation = code or frames.CLOSE_PROTOCOL_ERROR
        if side is Side.UPSTREAM:
            return ClosePlan(
                client=LegClose(
                    frames.CLOSE_INTERNAL_ERROR,
                    "upstream protocol error",
                    _tell("The upstream broke the WebSocket protocol.", "upstream_protocol_error"),
                ),
                upstream=LegClose(violation, ending.reason),
            )
        return ClosePlan(
            client=LegClose(violation, ending.reason),
            upstream=LegClose(frames.CLOSE_GOING_AWAY, CLIENT_GONE_REASON),
        )
    if kind is EndKind.DEAD_PEER:
        if side is Side.UPSTREAM:
            return ClosePlan(
                client=LegClose(
                    frames.CLOSE_INTERNAL_ERROR,
                    "upstream not responding",
                    _tell("The upstream stopped responding.", "upstream_timeout"),
                ),
                upstream=LegClose(None, send_close=False),
            )
        return ClosePlan(
            client=LegClose(None, send_close=False),
            upstream=LegClose(frames.CLOSE_GOING_AWAY, CLIENT_GONE_REASON),
        )
    if kind in (EndKind.IDLE_TIMEOUT, EndKind.SESSION_EXPIRED):
        message = (
            "The session was idle for too long and has been closed."
            if kind is EndKind.IDLE_TIMEOUT
            else "The session reached its maximum duration and has been closed."
        )
        return ClosePlan(
            client=LegClose(
                CLOSE_LIMIT_REACHED,
                kind.value,
                _tell(message, kind.value, "invalid_request_error"),
            ),
            upstream=LegClose(frames.CLOSE_NORMAL, kind.value),
        )
    if kind is EndKind.RATE_LIMITED:
        return ClosePlan(
            client=LegClose(
                CLOSE_LIMIT_REACHED,
                kind.value,
                _tell(
                    f"The client sent too fast ({ending.reason or 'rate limit'}); "
                    "the session has been closed.",
                    kind.value,
                    "invalid_request_error",
                ),
            ),
            upstream=LegClose(frames.CLOSE_NORMAL, kind.value),
        )
    if kind is EndKind.LOCKED_VIOLATION:
        return ClosePlan(
            client=LegClose(
                CLOSE_LIMIT_REACHED,
                kind.value,
                _tell(
                    "This session's config is locked by its credential, and an event that "
                    f"was partly forwarded broke the lock ({ending.reason or 'violation'}); "
                    "the session has been closed.",
                    kind.value,
                    "invalid_request_error",
                ),
            ),
            # Possibly mid-frame: a close frame would land inside the frame's payload.
            upstream=LegClose(None, send_close=False),
        )
    if kind is EndKind.SHUTDOWN:
        return ClosePlan(
            client=LegClose(
                frames.CLOSE_GOING_AWAY,
                "relay shutting down",
                _tell("The relay is shutting down; reconnect to continue.", "server_shutdown"),
            ),
            upstream=LegClose(frames.CLOSE_GOING_AWAY, "relay shutting down"),
        )
    if kind is EndKind.ADMIN:
        return ClosePlan(
            client=LegClose(
                CLOSE_LIMIT_REACHED,
                "ended_by_operator",
                _tell("An operator ended this session.", "session_ended", "invalid_request_error"),
            ),
            upstream=LegClose(frames.CLOSE_NORMAL, "ended by operator"),
        )
    return ClosePlan(
        client=LegClose(
            frames.CLOSE_INTERNAL_ERROR,
            "internal_error",
            _tell("The relay failed while handling this session.", "internal_error"),
        ),
        upstream=LegClose(frames.CLOSE_GOING_AWAY, "relay error"),
    )


# ------------------------------------------------------------------ the upstream tap


class _InputTokenDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0


class _OutputTokenDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0


class _Usage(msgspec.Struct):
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: _InputTokenDetails | None = None
    output_token_details: _OutputTokenDetails | None = None


class _Response(msgspec.Struct):
    usage: _Usage | None = None
    status: str | None = None


class _ResponseDone(msgspec.Struct):
    response: _Response


class _SessionInfo(msgspec.Struct):
    id: str | None = None
    model: str | None = None


class _SessionCreated(msgspec.Struct):
    session: _SessionInfo


_RESPONSE_DONE: Final = msgspec.json.Decoder(_ResponseDone)
_SESSION_CREATED: Final = msgspec.json.Decoder(_SessionCreated)


@dataclass(slots=True)
class UsageTotals:
    """Token usage summed over a session's ``response.done`` events."""

    responses: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_image_tokens: int = 0
    input_cached_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0
    total_tokens: int = 0

    def add(self, usage: _Usage) -> None:
        """Add one response's usage, each count clamped to ``[0, MAX_TOKENS_PER_RESPONSE]``.

        The counts come from the upstream and feed counters that refuse negative
        increments: a negative or absurd value must cost accuracy, never the session.
        """
        inputs = usage.input_token_details or _InputTokenDetails()
        outputs = usage.output_token_details or _OutputTokenDetails()
        self.responses += 1
        self.input_text_tokens += _clamp_tokens(inputs.text_tokens)
        self.input_audio_tokens += _clamp_tokens(inputs.audio_tokens)
        self.input_image_tokens += _clamp_tokens(inputs.image_tokens)
        self.input_cached_tokens += _clamp_tokens(inputs.cached_tokens)
        self.output_text_tokens += _clamp_tokens(outputs.text_tokens)
        self.output_audio_tokens += _clamp_tokens(outputs.audio_tokens)
        self.total_tokens += _clamp_tokens(usage.total_tokens)


#: No single response is billed more tokens than this (OpenAI's largest context is
#: well under it); a bigger count from the upstream is clamped, not trusted.
MAX_TOKENS_PER_RESPONSE: Final = 10_000_000


def _clamp_tokens(count: int) -> int:
    return min(max(count, 0), MAX_TOKENS_PER_RESPONSE)


#: Longest upstream session id or model name the tap keeps.
MAX_TAPPED_ID_CHARS: Final = 128
#: Events whose type the tap cares about; every other type is only counted.
TAPPED_TYPES: Final = frozenset({"session.created", "response.done", "error"})
_TAPPED_TYPE_NAMES: Final = frozenset(name.encode() for name in TAPPED_TYPES)
#: How OpenAI's events begin: ``type`` is the first member. An event that begins so
#: with a type the tap does not want (audio deltas, transcripts: nearly all traffic)
#: is skipped from its first bytes, without a JSON decode: one regex match.
#:
#: The match reads the name only as far as it takes to tell it from every tapped name:
#: the name is untapped once, after a stretch equal to the start of each tapped name,
#: it has a byte that none of them has there (the closing quote included) and that is
#: not a backslash. An escape before that point could spell a tapped type, so it
#: fails the match and the event is decoded. Most names differ at their first byte
#: (``input_audio_buffer.*``, ``conversation.*``) or a few bytes in (``response.``
#: then anything but ``d``): a handful of steps where a scan of the whole name for
#: escapes took one per byte (bench/instructions.py).


def _divergence_pattern(rests: frozenset[bytes]) -> bytes:
    """A regex that matches where a JSON string, read literally, leaves every one of
    ``rests`` (what is left of the tapped names, each with its closing quote) at a byte
    that is neither the next byte of one of them nor a backslash (an escape could
    still spell it). No match: the string may be one of them."""
    firsts = sorted({rest[:1] for rest in rests})
    alternatives = [b"[^" + b"".join(re.escape(first) for first in firsts) + rb"\\]"]
    for first in firsts:
        tails = frozenset(rest[1:] for rest in rests if rest[:1] == first)
        if b"" not in tails:  # the closing quote ends a name: nothing left to differ by
            alternatives.append(re.escape(first) + _divergence_pattern(tails))
    return b"(?:" + b"|".join(alternatives) + b")"


UNTAPPED_HEAD: Final = re.compile(
    rb'\{"type":"' + _divergence_pattern(frozenset(name + b'"' for name in _TAPPED_TYPE_NAMES))
).match


@dataclass(slots=True)
class UpstreamTap:
    """What the relay learns from upstream events without changing a byte of them."""

    upstream_session_id: str | None = None
    upstream_model: str | None = None
    error_events: int = 0
    undecodable_events: int = 0
    usage: UsageTotals = field(default_factory=UsageTotals)

    def observe_text(self, payload: bytes | memoryview) -> None:
        """Look at one complete upstream text message (unmasked payload)."""
        if UNTAPPED_HEAD(payload) is not None:
            return
        try:
            event_type = decode_envelope(payload).type
        except EventDecodeError:
            self.undecodable_events += 1
            return
        if event_type not in TAPPED_TYPES:
            return
        try:
            if event_type == "response.done":
                usage = _RESPONSE_DONE.decode(payload).response.usage
                if usage is not None:
                    self.usage.add(usage)
            elif event_type == "session.created":
                info = _SESSION_CREATED.decode(payload).session
                # Both become log fields and a metric label: bounded, whatever the upstream sends.
                self.upstream_session_id = info.id[:MAX_TAPPED_ID_CHARS] if info.id else None
                self.upstream_model = info.model[:MAX_TAPPED_ID_CHARS] if info.model else None
            else:
                self.error_events += 1
        except msgspec.DecodeError:
            self.undecodable_events += 1
