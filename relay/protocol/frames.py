"""Sans-I/O RFC 6455 frame codec: the relay's hot path. No trio, no sockets.

This module owns the WebSocket framing layer (RFC 6455 §5) for every endpoint in
the project: the relay's two legs, the simulator, the load generator.

- :class:`FrameReader` turns the bytes one peer sends into frame events. Small
  frames come out whole as :class:`Frame`, whose ``raw`` is the exact wire bytes
  (header and still-masked payload) so a relay can forward them untouched;
  the payload is only unmasked when someone asks (:meth:`Frame.payload`). Data
  frames larger than ``whole_frame_max_bytes`` come out cut-through, as a
  :class:`FrameStart` and then :class:`FrameChunk` pieces as their bytes arrive,
  so memory stays bounded by what was fed, even for a 16 MiB frame.
- :meth:`FrameReader.take_run`, the relay's per-read fast path: the whole small
  data frames at the front of a fresh read, walked in place and checked like any
  other, handed back as one byte count to forward in one write (no object per
  frame); :meth:`FrameReader.take_pending` lets a frame split across reads start
  the next run.
- :func:`encode_frame`, the close payload helpers, :func:`xor_mask` (with a key
  offset, for chunks), :func:`remask_header` and :func:`remask_run`: re-masking a
  forwarded frame to a fresh key is one XOR pass with ``old_key XOR new_key``
  (§5.3); :func:`fresh_mask_key` draws keys from a pooled ``os.urandom`` block.

Checked per frame: RSV bits zero (we never negotiate an extension, §5.2), known
opcodes, the mask bit matching the sender's role (§5.1: clients mask, servers
do not), control frames unfragmented and at most 125 bytes (§5.5), continuation
frames only inside a fragmented message and no new data frame inside one
(§5.4), the 64-bit length's top bit clear (§5.2), and the message size limit:
the sum of a message's fragments may not exceed ``max_message_bytes``; the
error (1009) is raised as soon as a header announces too much, before any of
the payload is read. UTF-8 in text frames is *not* validated: the relay
forwards text without decoding it, and the endpoints validate.

Violations raise :class:`FrameProtocolError` carrying the close code and a short
reason fit for a close frame; after one, the reader must not be used again.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable
from typing import Final, final

_apply_mask: Callable[[bytes | bytearray | memoryview, bytes], bytes] | None
try:  # websockets' C helper XORs 1.4 KB in 0.3 us where the big-integer XOR takes 3.8 us.
    # Its stub says bytes; the C function takes any buffer (memoryviews of the read buffer).
    from websockets.speedups import apply_mask as _apply_mask  # type: ignore[assignment]
except ImportError:  # pragma: no cover - the pure-Python XOR below is the fallback
    _apply_mask = None

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
_KNOWN_OPCODES: Final = frozenset({0x0, 0x1, 0x2, 0x8, 0x9, 0xA})

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013

#: Data frames up to this payload size come out whole; larger ones cut through.
WHOLE_FRAME_MAX_BYTES: Final = 64 * 1024
#: Control frame payload limit (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD_BYTES: Final = 125
#: A close reason must fit a control frame after the 2-byte code.
MAX_CLOSE_REASON_BYTES: Final = MAX_CONTROL_PAYLOAD_BYTES - 2
#: Largest possible frame header: 2 + 8 (length) + 4 (mask).
MAX_HEADER_BYTES: Final = 14
#: Compact the read buffer once this many consumed bytes sit at its front.
_COMPACT_AFTER_BYTES: Final = 64 * 1024
#: Masking keys drawn from the OS per refill of a thread's key pool (4 bytes each).
MASK_KEYS_PER_REFILL: Final = 1024
#: A frame's first two octets and the 16-bit length that may follow (take_run's one-frame path).
_FIRST_FOUR_OCTETS: Final = struct.Struct("!HH").unpack_from
#: The first two octets of a FIN binary frame start here, those of a FIN text frame
#: just below: one integer comparison tells the two apart (take_run's one-frame path).
_BINARY_HEADS: Final = 0x8200


class FrameProtocolError(Exception):
    """The peer broke RFC 6455 (or our size limit); close with ``close_code``."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason


@final
class Frame:
    """One complete frame. ``raw`` is the exact wire bytes (header + payload)."""

    __slots__ = ("fin", "header_len", "mask_key", "opcode", "raw")

    def __init__(
        self, opcode: int, fin: bool, mask_key: bytes | None, raw: bytes, header_len: int
    ) -> None:
        self.opcode = opcode
        self.fin = fin
        self.mask_key = mask_key
        self.raw = raw
        self.header_len = header_len

    def payload(self) -> bytes:
        """The application payload, unmasked."""
        data = self.raw[self.header_len :]
        if self.mask_key is None:
            return data
        return xor_mask(data, self.mask_key)

    def __repr__(self) -> str:
        return (
            f"Frame(opcode={self.opcode}, fin={self.fin}, size={len(self.raw) - self.header_len})"
        )


@final
class FrameStart:
    """The header of a large data frame whose payload follows as :class:`FrameChunk`."""

    __slots__ = ("fin", "header", "mask_key", "opcode", "payload_len")

    def __init__(
        self, opcode: int, fin: bool, mask_key: bytes | None, header: bytes, payload_len: int
    ) -> None:
        self.opcode = opcode
        self.fin = fin
        self.mask_key = mask_key
        self.header = header
        self.payload_len = payload_len


@final
class FrameChunk:
    """Payload bytes of a large frame, as on the wire (still masked if it was)."""

    __slots__ = ("data", "last", "offset")

    def __init__(self, data: bytes, offset: int, last: bool) -> None:
        self.data = data
        self.offset = offset
        self.last = last


FrameEvent = Frame | FrameStart | FrameChunk


# ---------------------------------------------------------------------- masking


def xor_mask(data: bytes | bytearray | memoryview, key: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``key``, starting at key position ``offset % 4``.

    websockets' C ``apply_mask`` when installed (it is a dependency); otherwise one
    big-integer XOR, whose conversions and XOR run in C too.
    """
    size = len(data)
    if size == 0:
        return b""
    shift = offset & 3
    if shift:
        key = key[shift:] + key[:shift]
    if _apply_mask is not None:
        return _apply_mask(data, key)
    repeated = key * ((size >> 2) + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated[:size], "little")).to_bytes(
        size, "little"
    )


class _MaskKeyPool(threading.local):
    """Fresh masking keys from one OS entropy read per :data:`MASK_KEYS_PER_REFILL` keys.

    RFC 6455 §5.3 wants each key unpredictable, from a strong source of entropy: these
    come from ``os.urandom`` all the same, without one system call per frame. One pool
    per thread, so two threads never hand out the same key.
    """

    def __init__(self) -> None:
        self.block = b""
        self.position = 0


_MASK_KEYS: Final = _MaskKeyPool()


def fresh_mask_key() -> bytes:
    """A fresh masking key: 4 bytes of ``os.urandom`` that no earlier call was given.

    Fresh means a new draw of entropy, not a value unlike every earlier one: random
    32-bit keys repeat by chance (about 1 in 1,000 over 3,000 keys), as RFC 6455 allows.
    """
    pool = _MASK_KEYS
    position = pool.position
    if position >= len(pool.block):
        pool.block = os.urandom(4 * MASK_KEYS_PER_REFILL)
        position = 0
    pool.position = position + 4
    return pool.block[position : position + 4]


def remask_header(header: bytes, new_key: bytes) -> bytes:
    """The same frame header carrying ``new_key`` as its masking key."""
    if not header[1] & 0x80:
        raise ValueError("header has no mask")
    return header[:-4] + new_key


def remask_run(run: bytes | bytearray | memoryview) -> bytes:
    """Whole masked frames (as :meth:`FrameReader.take_run` found them) under fresh keys.

    ``take_run`` never includes a frame with a 64-bit length, so only the 7- and
    16-bit length forms occur here.

    Each frame gets its own new key; its payload is XORed once with
    ``old_key XOR new_key`` (§5.3), so it is never unmasked in between.
    """
    out = bytearray()
    pos = 0
    end = len(run)
    while pos < end:
        length = run[pos + 1] & 0x7F
        key_at = pos + 2
        if length == 126:
            length = (run[pos + 2] << 8) | run[pos + 3]
            key_at = pos + 4
        payload_at = key_at + 4
        old = bytes(run[key_at:payload_at])
        new = fresh_mask_key()
        out += run[pos:key_at]
        out += new
        out += xor_mask(run[payload_at : payload_at + length], xor_mask(old, new))
        pos = payload_at + length
    return bytes(out)


# ---------------------------------------------------------------------- encoding


def encode_header(opcode: int, size: int, *, fin: bool = True, masked: bool = False) -> bytes:
    """A frame header for a ``size``-byte payload, up to (not including) any masking key."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if size < 126:
        return bytes((first, mask_bit | size))
    if size < 65536:
        return bytes((first, mask_bit | 126)) + size.to_bytes(2, "big")
    return bytes((first, mask_bit | 127)) + size.to_bytes(8, "big")


def encode_frame(
    opcode: int,
    payload: bytes | bytearray | memoryview,
    *,
    fin: bool = True,
    mask_key: bytes | None = None,
) -> bytes:
    """One whole frame. With ``mask_key`` (4 bytes) the MASK bit is set and the payload XORed."""
    header = encode_header(opcode, len(payload), fin=fin, masked=mask_key is not None)
    if mask_key is None:
        return header + bytes(payload)
    return header + mask_key + xor_mask(payload, mask_key)


def _close_code_allowed_on_wire(code: int) -> bool:
    """RFC 6455 §7.4: 1000-1003, 1007-1014 defined; 3000-4999 registered/private."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


def encode_close_payload(code: int | None, reason: str = "") -> bytes:
    """A close frame's payload: code and a reason cut to fit on a UTF-8 boundary."""
    if code is None:
        return b""
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CLOSE_REASON_BYTES:
        encoded = encoded[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return code.to_bytes(2, "big") + encoded


def decode_close_payload(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a received close frame; ``(1005, "")`` when it has none."""
    if not payload:
        return CLOSE_NO_STATUS, ""
    if len(payload) == 1:
        raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not _close_code_allowed_on_wire(code):
        raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameProtocolError(CLOSE_INVALID_PAYLOAD, "close reason is not UTF-8") from None
    return code, reason


# ---------------------------------------------------------------------- decoding


def _one_frame_heads(masked: bool) -> tuple[frozenset[int], frozenset[int], int, int]:
    """What take_run's one-frame path matches for one role: the first two octets of a
    FIN text or binary frame with the mask bit as expected, for a 16-bit length (the
    126 marker) and, under 0xFF80, for a 7-bit one; then the two header sizes."""
    mask_bit = 0x80 if masked else 0
    return (
        frozenset({0x8100 | mask_bit | 126, 0x8200 | mask_bit | 126}),
        frozenset({0x8100 | mask_bit, 0x8200 | mask_bit}),
        8 if masked else 4,
        6 if masked else 2,
    )


_MASKED_HEADS: Final = _one_frame_heads(masked=True)
_UNMASKED_HEADS: Final = _one_frame_heads(masked=False)


class FrameReader:
    """Incremental reader for the frames one peer sends on one connection."""

    def __init__(
        self,
        *,
        expect_masked: bool,
        max_message_bytes: int,
        whole_frame_max_bytes: int = WHOLE_FRAME_MAX_BYTES,
    ) -> None:
        self.expect_masked = expect_masked
        self.max_message_bytes = max_message_bytes
        self.whole_frame_max_bytes = whole_frame_max_bytes
        self._buffer = bytearray()
        self._pos = 0
        #: Opcode of the fragmented message in progress, or None.
        self._message_opcode: int | None = None
        self._message_bytes = 0
        #: Payload bytes still to stream for the cut-through frame in progress.
        self._streaming_left = 0
        self._streaming_offset = 0
        self._dead = False
        #: False only while the reader is known to hold nothing: a flag the hot path
        #: reads instead of asking :attr:`idle` (a property: a call) or
        #: :meth:`next_event` per read. Every :meth:`feed` sets it; :attr:`idle`
        #: clears it when it finds nothing buffered and no cut-through frame open.
        self.may_hold = False
        #: What the last :meth:`take_run` found: data frames, and those ending a message.
        self.run_frames = 0
        self.run_messages = 0
        # take_run's one-frame path (shared per role: two sets fewer to build per reader).
        self._heads_16, self._heads_7, self._header_16, self._header_7 = (
            _MASKED_HEADS if expect_masked else _UNMASKED_HEADS
        )
        self._one_frame_max = min(whole_frame_max_bytes, max_message_bytes)

    @property
    def in_message(self) -> bool:
        """Whether a fragmented message (or a cut-through frame) is in progress."""
        return self._message_opcode is not None or self._streaming_left > 0

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer) - self._pos

    @property
    def idle(self) -> bool:
        """Nothing buffered and no cut-through frame in progress: :meth:`take_run` may run."""
        if self._pos == len(self._buffer) and not self._streaming_left:
            self.may_hold = False
            return True
        return False

    def take_pending(self, incoming_bytes: int) -> bytes | None:
        """Hand back the partial frame the reader holds, so a run can start with it.

        Under a backlog most reads end inside a frame, and the next read would then
        never start on a frame boundary: joined to the bytes it was waiting for, the
        partial frame starts a run like any other. Only when :meth:`next_event` has
        nothing complete to give (the caller drained it), no cut-through frame is
        streaming, and the ``incoming_bytes`` of the next read complete the frame
        (or its header is not even complete yet: at most a few bytes); ``None``
        otherwise, and the caller feeds the read. So a frame trickled a byte at a
        time is appended to, never copied again per read. The reader is then idle:
        nothing of the partial frame was consumed, so no message state changes.
        """
        if self._streaming_left:
            return None
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        if available >= 2:
            length = buffer[pos + 1] & 0x7F
            header_len = (2 if length < 126 else 4 if length == 126 else 10) + (
                4 if buffer[pos + 1] & 0x80 else 0
            )
            if available >= header_len:
                if length == 126:
                    length = (buffer[pos + 2] << 8) | buffer[pos + 3]
                elif length == 127:
                    length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                if available + incoming_bytes < header_len + length:
                    return None  # still incomplete after this read: append, don't copy
        pending = bytes(buffer[pos:])
        buffer.clear()
        self._pos = 0
        return pending

    def take_run(
        self,
        data: memoryview,
        on_text: Callable[[memoryview], None] | None = None,
        accept: Callable[[int, bool, bytes | memoryview], bool] | None = None,
        skip_text: Callable[[memoryview, int, int], object] | None = None,
        size: int = -1,
    ) -> int:
        """Consume the whole small data frames at the front of freshly read ``data``.

        The relay's hot path: for bytes just read while the reader holds nothing
        (:attr:`idle`), walk the frame headers in place and return how many leading
        bytes are complete data frames of at most ``whole_frame_max_bytes`` with a
        7- or 16-bit length (one run, forwarded by the caller in one write, without a
        copy or an object per frame). Each header gets the same checks, and moves
        the same message state, as in :meth:`next_event`. The run stops before a
        control frame, a large frame, an incomplete frame or a violation; the caller
        feeds the rest with :meth:`feed` and reads it as events. A violation in the
        first frame raises :class:`FrameProtocolError`; later in the run it stops the
        run, so the frames before it are still forwarded, and :meth:`next_event`
        raises it when it gets there.

        ``on_text`` sees the payload of every unmasked TEXT frame that ends a message
        (the upstream tap), unless ``skip_text(data, start, end)`` (a compiled
        pattern's ``match``, given the payload's bounds in ``data``) returns
        something: a frame the tap has no use for costs one match, no call, no view.
        ``accept``, when given, is asked about each frame (its
        opcode, fin and unmasked payload: a view of ``data`` when the frame is not
        masked) before it joins the run, and the run stops
        before the first it refuses (the locked pump takes only proven appends).
        :attr:`run_frames` and :attr:`run_messages` count the run. ``size``: the
        caller's ``len(data)``, when it knows it (a read's byte count), saving a call.
        """
        end = len(data) if size < 0 else size
        # The read of a real-time session is one whole common frame: the loop's checks
        # for that frame in the fewest steps, a third of the loop's cost. These are
        # frame_at's lines, inline: a call and a tuple per read cost a third again.
        if end >= 4 and accept is None and self._message_opcode is None:
            head, length = _FIRST_FOUR_OCTETS(data)
            if head in self._heads_16:
                start = self._header_16
            elif head & 0xFF80 in self._heads_7 and head & 0x7F < 126:
                length = head & 0x7F
                start = self._header_7
            else:
                start = 0
        else:
            start = length = 0
        if start and start + length == end and length <= self._one_frame_max:
            if (
                on_text is not None
                and head < _BINARY_HEADS  # a text frame (0x81), from its header
                and not self.expect_masked
                and (skip_text is None or skip_text(data, start, end) is None)
            ):
                on_text(data[start:end])
            self.run_frames = self.run_messages = 1
            return end
        pos = 0
        frames = 0
        messages = 0
        whole_max = self.whole_frame_max_bytes
        # The common frame passes _check's rules at a glance: FIN, text or binary, no
        # RSV bits, the mask bit as expected, no fragmented message open, within the
        # limit. Anything else gets the full _check.
        usual_mask = 0x80 if self.expect_masked else 0
        usual_max = min(whole_max, self.max_message_bytes)
        while end - pos >= 2:
            first = data[pos]
            opcode = first & 0x0F
            if opcode >= OP_CLOSE:
                break
            second = data[pos + 1]
            length = second & 0x7F
            header_len = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                header_len = 4
            elif length == 127:
                break
            masked = second & 0x80
            if masked:
                header_len += 4
            total = header_len + length
            if length > whole_max or end - pos < total:
                break
            fin = first & 0x80 == 0x80
            if (
                (first == 0x81 or first == 0x82)
                and masked == usual_mask
                and length <= usual_max
                and self._message_opcode is None
            ):
                message_bytes = length
            else:
                try:
                    message_bytes = self._check(first, opcode, fin, masked == 0x80, length)
                except FrameProtocolError:
                    if not frames:
                        raise
                    # Forward the frames before it; next_event meets the same header
                    # again (a failed check changes no message state) and raises then.
                    self._dead = False
                    break
            if accept is not None:
                payload_at = pos + header_len
                payload: bytes | memoryview
                if masked:
                    key = bytes(data[payload_at - 4 : payload_at])
                    payload = xor_mask(data[payload_at : pos + total], key)
                else:
                    payload = data[payload_at : pos + total]
                if not accept(opcode, fin, payload):
                    break  # not consumed: next_event gives it, checked again
            if not fin or self._message_opcode is not None:
                self._advance_message(opcode, fin, message_bytes)
            if fin:
                messages += 1
                if (
                    on_text is not None
                    and opcode == OP_TEXT
                    and not masked
                    and (
                        skip_text is None or skip_text(data, pos + header_len, pos + total) is None
                    )
                ):
                    on_text(data[pos + header_len : pos + total])
            frames += 1
            pos += total
        self.run_frames = frames
        self.run_messages = messages
        return pos

    def frame_at(self, data: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
        """``(payload start, end)`` of the whole common frame at ``pos`` in ``data``, or None.

        Common: FIN, text or binary, no RSV bits, the mask bit as expected, a 7- or
        16-bit length within ``whole_frame_max_bytes`` and ``max_message_bytes``, no
        fragmented message open: the checks :meth:`take_run` and :meth:`next_event`
        would make, and pass. One unpack for the header and two set lookups. A frame
        that is not common (or has fewer than 4 bytes in all) is left to those two.
        Changes no state: the caller that takes the frame has consumed it.
        """
        if len(data) - pos < 4 or self._message_opcode is not None:
            return None
        head, length = _FIRST_FOUR_OCTETS(data, pos)
        if head in self._heads_16:
            start = pos + self._header_16
        elif head & 0xFF80 in self._heads_7 and head & 0x7F < 126:
            length = head & 0x7F
            start = pos + self._header_7
        else:
            return None
        end = start + length
        if end > len(data) or length > self._one_frame_max:
            return None
        return start, end

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.may_hold = True
        pos = self._pos
        if pos and (pos == len(self._buffer) or pos >= _COMPACT_AFTER_BYTES):
            del self._buffer[:pos]
            self._pos = 0
        self._buffer += data

    def next_event(self) -> FrameEvent | None:
        """The next frame event, or ``None`` when more bytes are needed."""
        if self._streaming_left:
            return self._next_chunk()
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        if available < 2:
            return None
        if self._dead:
            raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "reader used after an error")
        first = buffer[pos]
        second = buffer[pos + 1]
        length = second & 0x7F
        masked = second & 0x80
        header_len = 2
        if length == 126:
            header_len = 4
            if available < 4:
                return None
            length = (buffer[pos + 2] << 8) | buffer[pos + 3]
        elif length == 127:
            header_len = 10
            if available < 10:
                return None
            length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
        if masked:
            header_len += 4
            if available < header_len:
                return None
        opcode = first & 0x0F
        fin = bool(first & 0x80)
        message_bytes = self._check(first, opcode, fin, bool(masked), length)
        total = header_len + length
        if length <= self.whole_frame_max_bytes or opcode >= OP_CLOSE:
            if available < total:
                # Nothing is consumed yet: the same header is checked again once the
                # rest of the frame has arrived, so no message state may change here.
                return None
            raw = bytes(buffer[pos : pos + total])
            self._pos = pos + total
            if not fin or self._message_opcode is not None:
                # Only fragments move the message state: whole messages skip the call.
                self._advance_message(opcode, fin, message_bytes)
            mask_key = raw[header_len - 4 : header_len] if masked else None
            return Frame(opcode, fin, mask_key, raw, header_len)
        header = bytes(buffer[pos : pos + header_len])
        self._pos = pos + header_len
        self._advance_message(opcode, fin, message_bytes)
        self._streaming_left = length
        self._streaming_offset = 0
        return FrameStart(opcode, fin, header[-4:] if masked else None, header, length)

    def _advance_message(self, opcode: int, fin: bool, message_bytes: int) -> None:
        """Record a consumed data frame in the fragmented-message state."""
        if opcode >= OP_CLOSE:
            return
        if fin:
            self._message_opcode = None
            self._message_bytes = 0
        else:
            if opcode != OP_CONTINUATION:
                self._message_opcode = opcode
            self._message_bytes = message_bytes

    def _next_chunk(self) -> FrameChunk | None:
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        if available == 0:
            return None
        take = min(available, self._streaming_left)
        data = bytes(buffer[pos : pos + take])
        self._pos = pos + take
        offset = self._streaming_offset
        self._streaming_offset += take
        self._streaming_left -= take
        return FrameChunk(data, offset, self._streaming_left == 0)

    def _check(self, first: int, opcode: int, fin: bool, masked: bool, length: int) -> int:
        """Validate one header; returns the message size so far. Changes no message state."""
        try:
            if first & 0x70:
                raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "RSV bits set without an extension")
            if opcode not in _KNOWN_OPCODES:
                raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
            if masked != self.expect_masked:
                raise FrameProtocolError(
                    CLOSE_PROTOCOL_ERROR,
                    "client frames must be masked"
                    if self.expect_masked
                    else "server frames must not be masked",
                )
            if length >> 63:
                raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "frame length has its top bit set")
            if opcode >= OP_CLOSE:
                if not fin:
                    raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD_BYTES:
                    raise FrameProtocolError(CLOSE_PROTOCOL_ERROR, "control frame over 125 bytes")
                return 0
            if opcode == OP_CONTINUATION:
                if self._message_opcode is None:
                    raise FrameProtocolError(
                        CLOSE_PROTOCOL_ERROR, "continuation frame outside a message"
                    )
                size = self._message_bytes + length
            else:
                if self._message_opcode is not None:
                    raise FrameProtocolError(
                        CLOSE_PROTOCOL_ERROR, "new data frame inside a fragmented message"
                    )
                size = length
            if size > self.max_message_bytes:
                raise FrameProtocolError(
                    CLOSE_MESSAGE_TOO_BIG,
                    f"message over {self.max_message_bytes} bytes",
                )
            return size
        except FrameProtocolError:
            self._dead = True
            raise
