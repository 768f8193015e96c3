"""Sans-I/O RFC 6455 frame codec: the relay's hot path. No trio, no sockets.

CONTRACT (written before the implementation; keep these names and semantics):

Constants: OP_CONTINUATION=0x0, OP_TEXT=0x1, OP_BINARY=0x2, OP_CLOSE=0x8, OP_PING=0x9,
OP_PONG=0xA. Close codes as named constants (CLOSE_NORMAL=1000, CLOSE_GOING_AWAY=1001,
CLOSE_PROTOCOL_ERROR=1002, CLOSE_UNSUPPORTED_DATA=1003, CLOSE_NO_STATUS=1005,
CLOSE_ABNORMAL=1006, CLOSE_INVALID_PAYLOAD=1007, CLOSE_POLICY_VIOLATION=1008,
CLOSE_MESSAGE_TOO_BIG=1009, CLOSE_INTERNAL_ERROR=1011, CLOSE_TRY_AGAIN_LATER=1013).

encode_frame(opcode, payload, *, fin=True, mask_key=None) -> bytes
    Whole frame. mask_key (4 bytes) set => MASK bit set and payload XORed.
encode_close_payload(code: int | None, reason: str = "") -> bytes
    b"" for None; reason truncated to fit 123 bytes on a UTF-8 boundary.
decode_close_payload(payload) -> tuple[int, str]
    (1005, "") for empty; FrameProtocolError(1002) for length 1 or a code that
    may not appear on the wire; FrameProtocolError(1007) for a reason that is not UTF-8.
xor_mask(data, key: bytes, offset: int = 0) -> bytes
    XOR with the 4-byte key starting at key position offset % 4 (for chunks).

class FrameProtocolError(Exception): .close_code: int, .reason: str

class FrameReader: incremental reader for the frames ONE peer sends on ONE connection.
    FrameReader(*, expect_masked: bool, max_message_bytes: int,
                whole_frame_max_bytes: int = WHOLE_FRAME_MAX_BYTES)
    .feed(data: bytes | bytearray | memoryview) -> None   (copies what it must keep)
    .next_event() -> Frame | FrameStart | FrameChunk | None   (None = need more bytes)
    Raises FrameProtocolError on a violation; after that the reader is dead.
    Rules checked: RSV bits zero (no extensions are ever negotiated); known opcodes;
    mask bit == expect_masked; control frames FIN=1 and payload <= 125; continuation only
    inside a fragmented message and no new data frame inside one; 64-bit length MSB zero;
    total message length (sum of fragments) <= max_message_bytes else 1009 as soon as the
    header announces it (before the payload arrives).
    Frames whose payload is <= whole_frame_max_bytes (and all control frames) come out as
    one Frame once complete. Larger data frames come out cut-through: FrameStart (header
    parsed) then FrameChunk events carrying payload bytes as they arrive, the last one
    with .last=True, so memory stays bounded by what was fed.
    .buffered_bytes -> int: bytes held inside the reader (for the memory-bound tests).

class Frame:       opcode, fin, mask_key (bytes | None), raw (exact wire bytes: header+payload),
                   header_len (int); .payload() -> bytes unmasked payload.
class FrameStart:  opcode, fin, mask_key, header (exact wire header bytes), payload_len.
class FrameChunk:  data (wire bytes, still masked if the frame was), offset (position of data[0]
                   within the payload), last (bool).
remask_header(header: bytes, new_key: bytes) -> bytes: the same header with a new mask key.
"""

from __future__ import annotations
