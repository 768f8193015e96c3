"""The RFC 6455 frame codec, without an event loop: rules, boundaries and properties."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.protocol import frames as F
from relay.protocol.frames import Frame, FrameChunk, FrameProtocolError, FrameReader, FrameStart

BIG = 1 << 30


def reader(
    *, masked: bool = True, limit: int = BIG, whole: int = F.WHOLE_FRAME_MAX_BYTES
) -> FrameReader:
    return FrameReader(expect_masked=masked, max_message_bytes=limit, whole_frame_max_bytes=whole)


def drain(r: FrameReader) -> list[Frame | FrameStart | FrameChunk]:
    out: list[Frame | FrameStart | FrameChunk] = []
    while (event := r.next_event()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_length_encodings_round_trip(size: int) -> None:
    payload = os.urandom(size)
    key = os.urandom(4)
    wire = F.encode_frame(F.OP_BINARY, payload, mask_key=key)
    header_len = 2 + (0 if size < 126 else 2 if size < 65536 else 8) + 4
    assert len(wire) == header_len + size
    r = reader(whole=BIG)
    r.feed(wire)
    (frame,) = drain(r)
    assert isinstance(frame, Frame)
    assert frame.raw == wire
    assert frame.header_len == header_len
    assert frame.mask_key == key
    assert frame.payload() == payload


def test_remask_is_one_xor_with_old_key_xor_new_key() -> None:
    payload = b"hello realtime" * 50
    old, new = b"\x01\x02\x03\x04", b"\xa0\xb0\xc0\xd0"
    wire = F.encode_frame(F.OP_TEXT, payload, mask_key=old)
    r = reader()
    r.feed(wire)
    (frame,) = drain(r)
    assert isinstance(frame, Frame)
    flip = bytes(a ^ b for a, b in zip(old, new, strict=True))
    header = F.remask_header(frame.raw[: frame.header_len], new)
    remasked = header + F.xor_mask(frame.raw[frame.header_len :], flip)
    assert remasked == F.encode_frame(F.OP_TEXT, payload, mask_key=new)


def test_xor_mask_with_offset_matches_whole() -> None:
    data, key = os.urandom(1001), os.urandom(4)
    whole = F.xor_mask(data, key)
    pieces = (
        F.xor_mask(data[:7], key, 0)
        + F.xor_mask(data[7:500], key, 7)
        + F.xor_mask(data[500:], key, 500)
    )
    assert pieces == whole


@pytest.mark.parametrize(
    ("wire", "masked", "code"),
    [
        (bytes([0x81 | 0x40, 0x80]) + b"abcd", True, 1002),  # RSV1 without an extension
        (bytes([0x83, 0x80]) + b"abcd", True, 1002),  # reserved opcode
        (F.encode_frame(F.OP_TEXT, b"x"), True, 1002),  # client frame not masked
        (F.encode_frame(F.OP_TEXT, b"x", mask_key=b"abcd"), False, 1002),  # server frame masked
        (F.encode_frame(F.OP_PING, b"x", fin=False, mask_key=b"abcd"), True, 1002),
        (F.encode_frame(F.OP_PING, b"x" * 126, mask_key=b"abcd"), True, 1002),
        (F.encode_frame(F.OP_CONTINUATION, b"x", mask_key=b"abcd"), True, 1002),
        (bytes([0x82, 0xFF]) + (1 << 63).to_bytes(8, "big") + b"abcd", True, 1002),
    ],
)
def test_protocol_violations(wire: bytes, masked: bool, code: int) -> None:
    r = reader(masked=masked)
    r.feed(wire)
    with pytest.raises(FrameProtocolError) as info:
        drain(r)
    assert info.value.close_code == code
    assert len(info.value.reason.encode()) <= F.MAX_CLOSE_REASON_BYTES


def test_new_data_frame_inside_a_fragmented_message_is_refused() -> None:
    r = reader()
    r.feed(F.encode_frame(F.OP_TEXT, b"a", fin=False, mask_key=b"abcd"))
    r.feed(F.encode_frame(F.OP_TEXT, b"b", mask_key=b"abcd"))
    with pytest.raises(FrameProtocolError) as info:
        drain(r)
    assert info.value.close_code == 1002


def test_message_limit_counts_fragments_and_fires_on_the_header() -> None:
    r = reader(limit=100)
    r.feed(F.encode_frame(F.OP_TEXT, b"a" * 60, fin=False, mask_key=b"abcd"))
    assert r.in_message or drain(r)
    header_only = F.encode_frame(F.OP_CONTINUATION, b"b" * 60, mask_key=b"abcd")[:8]
    r.feed(header_only)
    with pytest.raises(FrameProtocolError) as info:
        drain(r)
    assert info.value.close_code == 1009


def test_control_frames_between_fragments() -> None:
    r = reader()
    r.feed(
        F.encode_frame(F.OP_TEXT, b"he", fin=False, mask_key=b"abcd")
        + F.encode_frame(F.OP_PING, b"p", mask_key=b"abcd")
        + F.encode_frame(F.OP_CONTINUATION, b"llo", mask_key=b"abcd")
    )
    events = drain(r)
    assert [e.opcode for e in events if isinstance(e, Frame)] == [F.OP_TEXT, F.OP_PING, 0]
    assert not r.in_message


@pytest.mark.parametrize(
    ("code", "valid"),
    [
        (1000, True),
        (1003, True),
        (1007, True),
        (1014, True),
        (3000, True),
        (4999, True),
        (999, False),
        (1004, False),
        (1005, False),
        (1006, False),
        (1015, False),
        (5000, False),
    ],
)
def test_close_codes_on_the_wire(code: int, valid: bool) -> None:
    payload = code.to_bytes(2, "big") + b"why"
    if valid:
        assert F.decode_close_payload(payload) == (code, "why")
    else:
        with pytest.raises(FrameProtocolError):
            F.decode_close_payload(payload)


def test_close_payload_edge_cases() -> None:
    assert F.decode_close_payload(b"") == (1005, "")
    assert F.encode_close_payload(None) == b""
    with pytest.raises(FrameProtocolError):
        F.decode_close_payload(b"\x03")
    with pytest.raises(FrameProtocolError) as info:
        F.decode_close_payload(b"\x03\xe8\xff")
    assert info.value.close_code == 1007
    long_reason = "é" * 100  # 200 bytes: cut on a character boundary
    encoded = F.encode_close_payload(4000, long_reason)
    assert len(encoded) <= 125
    assert F.decode_close_payload(encoded)[1] == "é" * 61


frames_strategy = st.lists(
    st.tuples(
        st.sampled_from([F.OP_TEXT, F.OP_BINARY]),
        st.binary(max_size=3000),
        st.binary(min_size=4, max_size=4),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(frames_strategy, st.lists(st.integers(min_value=1, max_value=4000), min_size=1))
def test_round_trip_in_any_chunking(specs: list[tuple[int, bytes, bytes]], cuts: list[int]) -> None:
    wires = [F.encode_frame(op, payload, mask_key=key) for op, payload, key in specs]
    stream = b"".join(wires)
    r = reader(whole=1024)
    events: list[Frame | FrameStart | FrameChunk] = []
    position, index = 0, 0
    while position < len(stream):
        step = cuts[index % len(cuts)]
        r.feed(stream[position : position + step])
        position += step
        index += 1
        events.extend(drain(r))
        # Cut-through keeps the reader's memory bounded by one feed plus a header.
        assert r.buffered_bytes <= max(cuts) + 1024 + F.MAX_HEADER_BYTES
    rebuilt: list[bytes] = []
    current = b""
    for event in events:
        if isinstance(event, Frame):
            rebuilt.append(event.raw)
        elif isinstance(event, FrameStart):
            current = event.header
        else:
            current += event.data
            if event.last:
                rebuilt.append(current)
    assert rebuilt == wires


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fragmented_message_reassembles(payload: bytes, pieces: int) -> None:
    size = max(1, len(payload) // pieces)
    parts = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    wire = b""
    for index, part in enumerate(parts):
        op = F.OP_BINARY if index == 0 else F.OP_CONTINUATION
        wire += F.encode_frame(op, part, fin=index == len(parts) - 1, mask_key=b"\x00\x01\x02\x03")
    r = reader()
    r.feed(wire)
    events = drain(r)
    assert all(isinstance(e, Frame) for e in events)
    assert b"".join(e.payload() for e in events if isinstance(e, Frame)) == payload
    assert not r.in_message


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.booleans())
def test_random_bytes_raise_only_our_protocol_error(data: bytes, masked: bool) -> None:
    r = reader(masked=masked, limit=1000, whole=100)
    r.feed(data)
    try:
        for event in drain(r):
            if isinstance(event, Frame) and event.opcode == F.OP_CLOSE:
                F.decode_close_payload(event.payload())
    except FrameProtocolError:
        pass


# ------------------------------------------------ fragmented messages in any chunking


def _message_sequence_wire(
    messages: list[tuple[int, list[bytes], list[bool]]], key: bytes | None
) -> tuple[bytes, list[tuple[int, bool, bytes]]]:
    """Wire bytes of messages in fragments, a ping wherever ``pings`` says, and the
    (opcode, fin, payload) of every frame in order."""
    wire = b""
    expected: list[tuple[int, bool, bytes]] = []
    for opcode, fragments, pings in messages:
        for index, fragment in enumerate(fragments):
            op = opcode if index == 0 else F.OP_CONTINUATION
            fin = index == len(fragments) - 1
            wire += F.encode_frame(op, fragment, fin=fin, mask_key=key)
            expected.append((op, fin, fragment))
            if pings[index % len(pings)] and not fin:
                wire += F.encode_frame(F.OP_PING, b"p", mask_key=key)
                expected.append((F.OP_PING, True, b"p"))
    return wire, expected


messages_strategy = st.lists(
    st.tuples(
        st.sampled_from([F.OP_TEXT, F.OP_BINARY]),
        st.lists(st.binary(max_size=300), min_size=1, max_size=6),
        st.lists(st.booleans(), min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    messages_strategy,
    st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=20),
    st.booleans(),
)
def test_fragments_and_control_frames_in_any_chunking(
    messages: list[tuple[int, list[bytes], list[bool]]], cuts: list[int], masked: bool
) -> None:
    """Regression (issue 10, finding 10): a fragment whose header arrived before its
    payload was checked twice, and the second check saw "a new data frame inside a
    fragmented message". Any valid sequence, fed in any pieces, must come out whole."""
    key = b"\x05\x06\x07\x08" if masked else None
    wire, expected = _message_sequence_wire(messages, key)
    r = reader(masked=masked, whole=128)
    got: list[tuple[int, bool, bytes]] = []
    pending: FrameStart | None = None
    body = b""
    position, index = 0, 0
    while position < len(wire):
        step = cuts[index % len(cuts)]
        r.feed(wire[position : position + step])
        position, index = position + step, index + 1
        for event in drain(r):
            if isinstance(event, Frame):
                got.append((event.opcode, event.fin, event.payload()))
            elif isinstance(event, FrameStart):
                pending, body = event, b""
            else:
                assert pending is not None
                data = event.data
                if pending.mask_key is not None:
                    data = F.xor_mask(data, pending.mask_key, event.offset)
                body += data
                if event.last:
                    got.append((pending.opcode, pending.fin, body))
    assert got == expected
    assert not r.in_message


def test_fragment_header_before_its_payload() -> None:
    """The exact failing case: two fragments, fed one octet at a time."""
    wire = F.encode_frame(F.OP_TEXT, b'{"type":', fin=False, mask_key=b"abcd")
    wire += F.encode_frame(F.OP_CONTINUATION, b'"x"}', mask_key=b"abcd")
    r = reader()
    events: list[Frame | FrameStart | FrameChunk] = []
    for octet in wire:
        r.feed(bytes([octet]))
        events.extend(drain(r))
    assert [(e.opcode, e.fin) for e in events if isinstance(e, Frame)] == [
        (F.OP_TEXT, False),
        (F.OP_CONTINUATION, True),
    ]
