"""The ``relay.audio.v1`` binary audio path: raw audio frames on the client leg.

This module owns the sans-I/O half of the binary path (the wire contract is
``docs/binary-audio.md``); the relay's session shell (:mod:`relay.dataplane.session`),
the simulator and the load tool all speak it through these functions:

- **negotiation**: a client that offers the ``relay.audio.v1`` subprotocol is
  answered with it (instead of ``realtime``) when the relay has the path enabled;
  the client reads the selected subprotocol to know which protocol it speaks;
- **up**: a binary message is audio in the session's input format. It becomes the
  text event an SDK would have sent, ``{"type":"input_audio_buffer.append",
  "audio":"<base64>"}``, built by one base64 pass and one join
  (:func:`append_event`; pybase64's SIMD encoder, 4x CPython's binascii here);
  :func:`audio_problem` refuses a message that is empty, over the size limit, or
  not a whole number of samples;
- **down**: each ``response.output_audio.delta`` becomes a binary frame of its
  decoded audio. :class:`DeltaConverter` recognises a delta from its first bytes,
  decodes it, and emits a ``relay.output_audio.start`` text marker before the
  first delta of each new (response, item, output, content part), so the client
  knows what a run of binary frames belongs to; every other event stays text;
- **format**: :class:`AudioFormat` follows the session's input format from the
  client's ``session.update`` and the upstream's ``session.created`` /
  ``session.updated`` (the later one wins), for the sample-size check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec
import orjson
import pybase64

from relay.protocol.events import error_event

#: The subprotocol a client offers to opt in; the relay selects it when enabled.
AUDIO_SUBPROTOCOL: Final = "relay.audio.v1"
#: The text event announcing which response and item the next binary frames belong to.
AUDIO_START_TYPE: Final = "relay.output_audio.start"
#: Default largest binary audio message the relay turns into an append (1.36 s of
#: 24 kHz PCM16; a browser sends 20-100 ms per message).
DEFAULT_MAX_AUDIO_MESSAGE_BYTES: Final = 64 * 1024
#: Largest value the setting may take: OpenAI's limit of 15 MiB per append, in base64.
MAX_AUDIO_MESSAGE_BYTES_LIMIT: Final = 15 * 1024 * 1024 * 3 // 4

#: Input formats (``audio.input.format.type``) and their bytes per sample.
FORMAT_PCM16: Final = "audio/pcm"
SAMPLE_BYTES_BY_FORMAT: Final[dict[str, int]] = {
    FORMAT_PCM16: 2,
    "audio/pcmu": 1,
    "audio/pcma": 1,
}

#: Error codes of the ``error`` events the binary path sends (never forwarded upstream).
CODE_EMPTY: Final = "binary_audio_empty"
CODE_TOO_LARGE: Final = "binary_audio_too_large"
CODE_PARTIAL_SAMPLE: Final = "binary_audio_partial_sample"

_APPEND_HEAD: Final = b'{"type":"input_audio_buffer.append","audio":"'
_APPEND_TAIL: Final = b'"}'
_DELTA_HEAD: Final = b'{"type":"response.output_audio.delta"'
_TYPE_FIRST: Final = b'{"type":"'
#: Bytes of an event read to tell its type (the type key comes first from OpenAI).
_TYPE_SCAN_BYTES: Final = 64


def selects_audio_path(offered_subprotocols: list[str], *, enabled: bool) -> bool:
    """Whether a handshake opts in: the client offered the subprotocol and the relay has it on."""
    return enabled and AUDIO_SUBPROTOCOL in offered_subprotocols


# ---------------------------------------------------------------------- up


def append_event(audio: bytes | bytearray | memoryview) -> bytes:
    """The ``input_audio_buffer.append`` text event carrying ``audio``, as an SDK sends it."""
    return b"".join((_APPEND_HEAD, pybase64.b64encode(audio), _APPEND_TAIL))


def audio_problem(size_bytes: int, sample_bytes: int, max_bytes: int) -> bytes | None:
    """The ``error`` event for a binary message that may not go upstream, or ``None``."""
    if size_bytes == 0:
        return error_event(
            message="Binary audio message is empty; send at least one sample.",
            code=CODE_EMPTY,
        )
    if size_bytes > max_bytes:
        return error_event(
            message=f"Binary audio message of {size_bytes} bytes is over the relay's "
            f"limit of {max_bytes} bytes; send shorter chunks.",
            code=CODE_TOO_LARGE,
        )
    if size_bytes % sample_bytes:
        return error_event(
            message=f"Binary audio message of {size_bytes} bytes is not a whole number "
            f"of {sample_bytes}-byte samples for the session's input format.",
            code=CODE_PARTIAL_SAMPLE,
        )
    return None


# ---------------------------------------------------------------------- format


class _Format(msgspec.Struct):
    type: str | None = None


class _AudioInput(msgspec.Struct):
    format: _Format | None = None


class _Audio(msgspec.Struct):
    input: _AudioInput | None = None


class _Session(msgspec.Struct):
    audio: _Audio | None = None


class _SessionEvent(msgspec.Struct):
    type: str = ""
    session: _Session | None = None


_SESSION_EVENT_DECODER: Final = msgspec.json.Decoder(_SessionEvent)
_FORMAT_EVENT_TYPES: Final = frozenset({"session.update", "session.created", "session.updated"})
_FORMAT_EVENT_HEADS: Final = tuple(
    b'{"type":"' + name.encode() + b'"' for name in sorted(_FORMAT_EVENT_TYPES)
)


def _could_name_format(head: bytes) -> bool:
    """Whether an event's first bytes leave it possibly a session event (cheap to rule out)."""
    if not head.startswith(_TYPE_FIRST):
        return True  # the type is not first: only a decode can tell
    return head.startswith(_FORMAT_EVENT_HEADS) or b"\\" in head


@dataclass(slots=True)
class AudioFormat:
    """The session's input audio format as far as the relay has seen it (PCM16 by default)."""

    input_format: str = FORMAT_PCM16

    @property
    def sample_bytes(self) -> int:
        return SAMPLE_BYTES_BY_FORMAT.get(self.input_format, 1)

    def observe(self, payload: bytes | memoryview) -> None:
        """Look at one whole text event from either leg; a session event may name the format."""
        if not _could_name_format(bytes(payload[:_TYPE_SCAN_BYTES])):
            return
        try:
            event = _SESSION_EVENT_DECODER.decode(payload)
        except msgspec.DecodeError:
            return  # not ours to judge: the upstream answers a malformed event
        if event.type not in _FORMAT_EVENT_TYPES or event.session is None:
            return
        audio = event.session.audio
        if audio is None or audio.input is None or audio.input.format is None:
            return
        if audio.input.format.type is not None:
            self.input_format = audio.input.format.type


# ---------------------------------------------------------------------- down


class _Delta(msgspec.Struct):
    type: str
    #: msgspec decodes a ``bytes`` field's base64 in the same C pass as the JSON
    #: (3x binascii's strict decoder), and refuses malformed base64.
    delta: bytes
    response_id: str = ""
    item_id: str = ""
    output_index: int = 0
    content_index: int = 0


_DELTA_DECODER: Final = msgspec.json.Decoder(_Delta)


def is_audio_delta(head: bytes | memoryview) -> bool:
    """Whether an upstream text event is (or, with its type not first, may be) an audio delta."""
    start = bytes(head[: len(_DELTA_HEAD)])
    if start == _DELTA_HEAD:
        return True
    return not start.startswith(_TYPE_FIRST) or b"\\" in start


class DeltaConverter:
    """Turns the upstream's audio deltas into binary frames plus start markers, per session."""

    __slots__ = ("_current", "deltas_converted")

    def __init__(self) -> None:
        self._current: tuple[str, str, int, int] | None = None
        self.deltas_converted = 0

    def convert(self, payload: bytes | memoryview) -> tuple[bytes | None, bytes] | None:
        """``(marker or None, audio)`` for an audio delta; ``None`` for any other event.

        A delta that does not decode (or whose base64 is malformed) is ``None`` too:
        the caller forwards it as text, unchanged, and nothing is lost.
        """
        try:
            event = _DELTA_DECODER.decode(payload)
        except msgspec.DecodeError:
            return None
        if event.type != "response.output_audio.delta":
            return None
        audio = event.delta
        where = (event.response_id, event.item_id, event.output_index, event.content_index)
        marker = None
        if where != self._current:
            self._current = where
            marker = start_marker(*where)
        self.deltas_converted += 1
        return marker, audio


def start_marker(response_id: str, item_id: str, output_index: int, content_index: int) -> bytes:
    """The ``relay.output_audio.start`` text event for the binary frames that follow."""
    return orjson.dumps(
        {
            "type": AUDIO_START_TYPE,
            "response_id": response_id,
            "item_id": item_id,
            "output_index": output_index,
            "content_index": content_index,
        }
    )
