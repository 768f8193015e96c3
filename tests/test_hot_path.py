"""The per-message hot path (commit 233644f): runs of whole small frames, pooled mask
keys, run-at-once rate limiting, the tap's first-bytes skip, the transport's
shared-buffer contract, the flag write lock, and what an idle connection holds.

Cores are table-tested without an event loop; shells run over in-memory streams
on ``autojump_clock``; the transport's contract is checked on a real socketpair.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final, cast

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dataplane.policy import UNTAPPED_HEAD, UpstreamTap
from relay.dataplane.ratelimit import ClientRateLimit
from relay.net.transport import CHECKPOINT_EVERY_OPS, Transport, tune_stream_socket
from relay.net.websocket import ConnectionClosed, LegFailed, WebSocket, WriteLock
from relay.protocol import frames as F
from relay.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameChunk,
    FrameProtocolError,
    FrameReader,
    FrameStart,
)
from tests.doubles import MAX_MESSAGE_BYTES, limits, memory_pair, relayed_session

if TYPE_CHECKING:
    from typing_extensions import Buffer

BIG: Final = 1 << 30
KEY: Final = b"\x11\x22\x33\x44"


def reader(
    *, masked: bool = True, limit: int = BIG, whole: int = F.WHOLE_FRAME_MAX_BYTES
) -> FrameReader:
    return FrameReader(expect_masked=masked, max_message_bytes=limit, whole_frame_max_bytes=whole)


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, key: bytes = KEY
) -> bytes:
    return F.encode_frame(opcode, payload, fin=fin, mask_key=key if masked else None)


def drain(r: FrameReader) -> list[Frame | FrameStart | FrameChunk]:
    out: list[Frame | FrameStart | FrameChunk] = []
    while (event := r.next_event()) is not None:
        out.append(event)
    return out


def raws(events: list[Frame | FrameStart | FrameChunk]) -> list[bytes]:
    """The wire bytes of each event (a large frame's header and chunks separately)."""
    out: list[bytes] = []
    for event in events:
        if isinstance(event, Frame):
            out.append(event.raw)
        elif isinstance(event, FrameStart):
            out.append(event.header)
        else:
            out.append(event.data)
    return out


def raises_like_next_event(
    setup: bytes, wire: bytes, *, masked: bool, limit: int
) -> tuple[int, str]:
    """The close code and reason ``next_event`` raises on ``wire`` after ``setup``."""
    r = reader(masked=masked, limit=limit)
    r.feed(setup)
    drain(r)
    r.feed(wire)
    with pytest.raises(FrameProtocolError) as info:
        drain(r)
    return info.value.close_code, info.value.reason


# ================================================================ take_run, table-tested


def test_take_run_takes_a_run_of_masked_text_frames_whole() -> None:
    sizes = [0, 5, 125, 126, 1000, 65535]
    wire = b"".join(frame(OP_TEXT, bytes([65 + i]) * n) for i, n in enumerate(sizes))
    r = reader()
    assert r.idle
    assert r.take_run(memoryview(wire)) == len(wire)
    assert (r.run_frames, r.run_messages) == (len(sizes), len(sizes))
    assert r.idle
    assert not r.in_message
    assert r.buffered_bytes == 0


def test_may_hold_is_set_by_every_feed_and_cleared_only_once_the_reader_is_idle() -> None:
    r = reader()
    assert not r.may_hold
    assert r.idle
    wire = frame(OP_TEXT, b"one") + frame(OP_PING, b"")
    r.feed(wire)
    assert r.may_hold
    assert not r.idle
    assert isinstance(r.next_event(), Frame)
    assert r.may_hold
    assert not r.idle
    assert isinstance(r.next_event(), Frame)
    assert r.may_hold  # nothing left, but no one asked yet
    assert r.idle
    assert not r.may_hold
    r.feed(wire[:3])  # a partial frame
    assert r.next_event() is None
    assert r.may_hold
    assert not r.idle


def test_take_run_counts_are_of_the_last_run_only() -> None:
    r = reader()
    two = frame(OP_TEXT, b"a") + frame(OP_BINARY, b"b")
    assert r.take_run(memoryview(two)) == len(two)
    assert (r.run_frames, r.run_messages) == (2, 2)
    assert r.take_run(memoryview(frame(OP_PING, b""))) == 0
    assert (r.run_frames, r.run_messages) == (0, 0)


@pytest.mark.parametrize("control", [OP_PING, OP_PONG, OP_CLOSE], ids=["ping", "pong", "close"])
def test_take_run_stops_before_a_control_frame(control: int) -> None:
    payload = F.encode_close_payload(1000, "bye") if control == OP_CLOSE else b"hi"
    head = frame(OP_TEXT, b"one") + frame(OP_BINARY, b"two" * 50)
    ctrl = frame(control, payload)
    tail = frame(OP_TEXT, b"three")
    wire = head + ctrl + tail
    r = reader()
    taken = r.take_run(memoryview(wire))
    assert taken == len(head)
    assert (r.run_frames, r.run_messages) == (2, 2)
    r.feed(wire[taken:])
    assert raws(drain(r)) == [ctrl, tail]
    # A control frame first: an empty run, nothing consumed.
    assert reader().take_run(memoryview(ctrl + tail)) == 0


@pytest.mark.parametrize(
    ("whole", "size", "in_run"),
    [
        (200, 200, True),  # at the limit: whole
        (200, 201, False),  # one over: cut through, not in a run
        (125, 125, True),  # 7-bit length at the limit
        (125, 126, False),  # first 16-bit length, over the limit
        (65535, 65535, True),  # largest 16-bit length
    ],
)
def test_take_run_stops_before_a_frame_over_whole_frame_max_bytes(
    whole: int, size: int, in_run: bool
) -> None:
    head = frame(OP_TEXT, b"x")
    big = frame(OP_BINARY, b"\x07" * size)
    wire = head + big + frame(OP_TEXT, b"after")
    r = reader(whole=whole)
    taken = r.take_run(memoryview(wire))
    assert taken == (len(wire) if in_run else len(head))
    r.feed(wire[taken:])
    events = drain(r)
    if not in_run:
        assert isinstance(events[0], FrameStart)
        assert events[0].payload_len == size
    assert b"".join(raws(events)) == wire[taken:]


@pytest.mark.parametrize("size", [5, 65536], ids=["non_minimal_64bit_length", "65536"])
def test_take_run_stops_before_a_frame_with_a_64_bit_length(size: int) -> None:
    """Length code 127 is never in a run, even a frame within whole_frame_max_bytes."""
    payload = b"\x09" * size
    long_form = bytes((0x80 | OP_BINARY, 0x80 | 127)) + size.to_bytes(8, "big") + KEY
    big = long_form + F.xor_mask(payload, KEY)
    head = frame(OP_TEXT, b"x")
    r = reader(whole=BIG)
    assert r.take_run(memoryview(head + big)) == len(head)
    assert r.run_frames == 1
    r.feed(big)
    (event,) = drain(r)
    assert isinstance(event, Frame)
    assert event.payload() == payload


def _incomplete_cuts() -> list[tuple[str, int]]:
    third = frame(OP_TEXT, b"z" * 300)  # 16-bit length: header 2 + 2 + 4 key
    return [
        ("one_header_octet", 1),
        ("length_code_only", 2),
        ("half_the_16_bit_length", 3),
        ("mask_key_partly", 6),
        ("header_whole_no_payload", 8),
        ("payload_partly", 100),
        ("all_but_the_last_octet", len(third) - 1),
    ]


@pytest.mark.parametrize(
    ("cut", "keep"), _incomplete_cuts(), ids=[c for c, _ in _incomplete_cuts()]
)
def test_take_run_stops_at_an_incomplete_frame_and_the_leftover_reads_as_next_event_would(
    cut: str, keep: int
) -> None:
    good = frame(OP_TEXT, b"a" * 10) + frame(OP_BINARY, b"b" * 200)
    third = frame(OP_TEXT, b"z" * 300)
    fourth = frame(OP_PING, b"p")
    wire = good + third + fourth
    first_read = wire[: len(good) + keep]
    r = reader()
    taken = r.take_run(memoryview(first_read))
    assert taken == len(good)
    assert (r.run_frames, r.run_messages) == (2, 2)
    r.feed(first_read[taken:])
    events = drain(r)  # what was left of the read is not yet a frame
    assert events == []
    assert not r.idle
    r.feed(wire[len(first_read) :])
    events = drain(r)
    reference = reader()
    reference.feed(wire[taken:])
    assert raws(events) == raws(drain(reference)) == [third, fourth]
    assert r.idle


def test_a_fragmented_message_inside_a_run_counts_once_and_leaves_the_state_right() -> None:
    fragmented = (
        frame(OP_TEXT, b'{"type":', fin=False)
        + frame(OP_CONTINUATION, b'"x"', fin=False)
        + frame(OP_CONTINUATION, b"}")
    )
    r = reader()
    assert r.take_run(memoryview(fragmented)) == len(fragmented)
    assert (r.run_frames, r.run_messages) == (3, 1)
    assert not r.in_message
    # The message ended: a new text frame is fine...
    new = frame(OP_TEXT, b"next")
    assert r.take_run(memoryview(new)) == len(new)
    assert r.run_messages == 1
    # ... and a continuation now is stray (the first frame of a run: it raises).
    with pytest.raises(FrameProtocolError) as info:
        r.take_run(memoryview(frame(OP_CONTINUATION, b"stray")))
    assert info.value.close_code == F.CLOSE_PROTOCOL_ERROR
    assert "continuation" in info.value.reason


def test_a_message_left_open_by_a_run_continues_in_the_next_one() -> None:
    r = reader()
    opening = frame(OP_BINARY, b"part1", fin=False)
    assert r.take_run(memoryview(opening)) == len(opening)
    assert (r.run_frames, r.run_messages) == (1, 0)
    assert r.in_message
    # A ping between fragments stops the run; next_event takes it, the reader is idle again.
    ping = frame(OP_PING, b"")
    assert r.take_run(memoryview(ping)) == 0
    r.feed(ping)
    assert raws(drain(r)) == [ping]
    assert r.idle
    assert r.in_message
    # A new data frame inside the open message is a violation...
    other = reader()
    other.take_run(memoryview(opening))
    with pytest.raises(FrameProtocolError) as info:
        other.take_run(memoryview(frame(OP_TEXT, b"new")))
    assert info.value.reason == "new data frame inside a fragmented message"
    # ... and the continuation ends it.
    closing = frame(OP_CONTINUATION, b"part2")
    assert r.take_run(memoryview(closing)) == len(closing)
    assert (r.run_frames, r.run_messages) == (1, 1)
    assert not r.in_message


#: (name, setup fed before, the bad frame, masked reader, max_message_bytes)
VIOLATIONS: Final = [
    ("rsv1", b"", bytes((0x80 | 0x40 | OP_TEXT, 0x80 | 1)) + KEY + b"x", True, BIG),
    ("rsv3", b"", bytes((0x80 | 0x10 | OP_BINARY, 0x80 | 1)) + KEY + b"x", True, BIG),
    ("reserved_opcode_3", b"", bytes((0x80 | 0x3, 0x80 | 1)) + KEY + b"x", True, BIG),
    ("reserved_opcode_7", b"", bytes((0x80 | 0x7, 0x80 | 1)) + KEY + b"x", True, BIG),
    ("client_frame_unmasked", b"", frame(OP_TEXT, b"x", masked=False), True, BIG),
    ("server_frame_masked", b"", frame(OP_TEXT, b"x"), False, BIG),
    ("stray_continuation", b"", frame(OP_CONTINUATION, b"x"), True, BIG),
    ("new_frame_in_a_message", frame(OP_TEXT, b"a", fin=False), frame(OP_TEXT, b"b"), True, BIG),
    ("one_frame_over_the_limit", b"", frame(OP_TEXT, b"y" * 101), True, 100),
    (
        "fragments_over_the_limit",
        frame(OP_TEXT, b"y" * 60, fin=False),
        frame(OP_CONTINUATION, b"y" * 41),
        True,
        100,
    ),
]
VIOLATION_IDS: Final = [v[0] for v in VIOLATIONS]


@pytest.mark.parametrize(("name", "setup", "bad", "masked", "limit"), VIOLATIONS, ids=VIOLATION_IDS)
def test_a_violation_in_the_first_frame_of_a_run_raises_as_next_event_does(
    name: str, setup: bytes, bad: bytes, masked: bool, limit: int
) -> None:
    expected = raises_like_next_event(setup, bad, masked=masked, limit=limit)
    r = reader(masked=masked, limit=limit)
    if setup:
        assert r.take_run(memoryview(setup)) == len(setup)
    with pytest.raises(FrameProtocolError) as info:
        r.take_run(memoryview(bad + frame(OP_TEXT, b"after", masked=masked)))
    assert (info.value.close_code, info.value.reason) == expected
    if name.endswith("over_the_limit"):
        assert info.value.close_code == F.CLOSE_MESSAGE_TOO_BIG


@pytest.mark.parametrize(("name", "setup", "bad", "masked", "limit"), VIOLATIONS, ids=VIOLATION_IDS)
def test_a_violation_after_good_frames_ends_the_run_there_and_next_event_raises_it(
    name: str, setup: bytes, bad: bytes, masked: bool, limit: int
) -> None:
    expected = raises_like_next_event(setup, bad, masked=masked, limit=limit)
    # Good frames first (the setup, if any, is itself the good frame before the bad one).
    good = setup or frame(OP_BINARY, b"ok", masked=masked)
    wire = good + bad + frame(OP_TEXT, b"after", masked=masked)
    r = reader(masked=masked, limit=limit)
    taken = r.take_run(memoryview(wire))
    assert taken == len(good)
    assert r.run_frames == 1
    r.feed(wire[taken:])
    with pytest.raises(FrameProtocolError) as info:
        drain(r)
    assert (info.value.close_code, info.value.reason) == expected


def test_on_text_sees_exactly_the_unmasked_text_frames_that_end_a_message() -> None:
    wire = (
        frame(OP_TEXT, b"A", masked=False)
        + frame(OP_BINARY, b"binary", masked=False)
        + frame(OP_TEXT, b"frag1", fin=False, masked=False)
        + frame(OP_CONTINUATION, b"frag2", masked=False)
        + frame(OP_TEXT, b"", masked=False)
        + frame(OP_TEXT, b"D" * 300, masked=False)
    )
    seen: list[bytes] = []
    r = reader(masked=False)
    assert r.take_run(memoryview(wire), lambda p: seen.append(bytes(p))) == len(wire)
    assert seen == [b"A", b"", b"D" * 300]
    assert (r.run_frames, r.run_messages) == (6, 5)


def test_on_text_never_sees_masked_text() -> None:
    wire = frame(OP_TEXT, b"masked") + frame(OP_TEXT, b"masked too")
    seen: list[bytes] = []
    r = reader(masked=True)
    assert r.take_run(memoryview(wire), lambda p: seen.append(bytes(p))) == len(wire)
    assert seen == []


def test_on_text_sees_nothing_past_the_run() -> None:
    """A text frame after the run's end (after a ping) is next_event's, not on_text's."""
    wire = frame(OP_TEXT, b"in", masked=False) + frame(OP_PING, b"", masked=False)
    wire += frame(OP_TEXT, b"out", masked=False)
    seen: list[bytes] = []
    reader(masked=False).take_run(memoryview(wire), lambda p: seen.append(bytes(p)))
    assert seen == [b"in"]


# ================================================================ take_run, properties

#: Payload sizes around the length-encoding boundaries (7/16/64-bit) and small limits.
SIZES: Final = [0, 1, 2, 124, 125, 126, 127, 200, 1000, 65535, 65536]
_NOISE: Final = random.Random(233644).randbytes(70_000)


def _payload(index: int, size: int) -> bytes:
    start = (index * 977) % 1000
    return _NOISE[start : start + size]


@st.composite
def frame_sequences(draw: st.DrawFn) -> list[tuple[int, bool, int]]:
    """(opcode, fin, size) of a valid sequence: messages in fragments, pings and pongs between."""
    specs: list[tuple[int, bool, int]] = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        kind = draw(st.sampled_from([OP_TEXT, OP_BINARY, OP_TEXT, OP_PING, OP_PONG]))
        if kind >= OP_CLOSE:
            specs.append((kind, True, draw(st.sampled_from([0, 1, 125]))))
            continue
        fragments = draw(st.integers(min_value=1, max_value=3))
        for index in range(fragments):
            fin = index == fragments - 1
            specs.append(
                (kind if index == 0 else OP_CONTINUATION, fin, draw(st.sampled_from(SIZES)))
            )
            if not fin and draw(st.booleans()):
                specs.append((OP_PING, True, draw(st.sampled_from([0, 4]))))
    return specs


def _wire(specs: list[tuple[int, bool, int]], masked: bool) -> bytes:
    out = bytearray()
    for index, (opcode, fin, size) in enumerate(specs):
        key = _NOISE[index * 4 : index * 4 + 4] if masked else None
        out += F.encode_frame(opcode, _payload(index, size), fin=fin, mask_key=key)
    return bytes(out)


def _cuts(wire_len: int, points: list[int]) -> Iterator[tuple[int, int]]:
    bounds = sorted({0, wire_len, *(p % (wire_len + 1) for p in points)})
    return itertools.pairwise(bounds)


class _EventCount:
    """What the relay's pumps count and tap from next_event's events."""

    def __init__(self) -> None:
        self.wire = bytearray()
        self.messages = 0
        self.texts: list[bytes] = []

    def take(self, event: Frame | FrameStart | FrameChunk) -> None:
        if isinstance(event, Frame):
            self.wire += event.raw
            if event.opcode < OP_CLOSE and event.fin:
                self.messages += 1
                if event.opcode == OP_TEXT and event.mask_key is None:
                    self.texts.append(event.payload())
        elif isinstance(event, FrameStart):
            self.wire += event.header
            if event.fin:
                self.messages += 1
        else:
            self.wire += event.data


@settings(max_examples=200, deadline=None)
@given(
    frame_sequences(),
    st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=25),
    st.booleans(),
    st.sampled_from([0, 1, 125, 126, 200, 65535, 65536]),
)
def test_reading_the_relays_way_forwards_what_next_event_alone_would(
    specs: list[tuple[int, bool, int]], points: list[int], masked: bool, whole: int
) -> None:
    """next_event until None, then take_run on the next read, joined to the partial frame
    the reader held (take_pending) unless a cut-through frame streams (then feed): the
    same bytes in the same order, the same message count, the same texts tapped, as a
    reader fed everything and drained with next_event. Reads land in one reused buffer
    (the shared receive buffer), scribbled over after each read is handled."""
    wire = _wire(specs, masked)
    reference = reader(masked=masked, whole=whole)
    reference.feed(wire)
    expected = _EventCount()
    for reference_event in drain(reference):
        expected.take(reference_event)
    assert bytes(expected.wire) == wire

    r = reader(masked=masked, whole=whole)
    got = _EventCount()
    shared = bytearray(len(wire) or 1)
    reads = iter(_cuts(len(wire), points))
    while True:
        event = r.next_event()
        if event is not None:
            got.take(event)
            continue
        cut = next(reads, None)
        if cut is None:
            break
        start, end = cut
        shared[: end - start] = wire[start:end]
        data = memoryview(shared)[: end - start]
        pending = None if r.idle else r.take_pending(end - start)
        if pending is not None:
            data.release()
            data = memoryview(pending + wire[start:end])
        if r.idle:
            taken = r.take_run(data, lambda p: got.texts.append(bytes(p)))
            got.wire += data[:taken]
            got.messages += r.run_messages
            assert r.run_messages <= r.run_frames
            if taken < len(data):
                r.feed(data[taken:])
        else:
            r.feed(data)
        data.release()
        shared[:] = b"\xaa" * len(shared)  # the next connection's read
    assert bytes(got.wire) == wire
    assert got.messages == expected.messages == sum(1 for op, fin, _ in specs if fin and op < 8)
    assert got.texts == expected.texts
    assert r.idle
    assert not r.in_message


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([OP_TEXT, OP_BINARY]),
            st.sampled_from([0, 1, 125, 126, 127, 1000, 65535]),
            st.booleans(),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_remask_run_keeps_every_payload_under_a_new_key(specs: list[tuple[int, int, bool]]) -> None:
    wire = bytearray()
    originals: list[tuple[int, bool, bytes, bytes]] = []
    open_message = False
    for index, (opcode, size, fin) in enumerate(specs):
        op = OP_CONTINUATION if open_message else opcode
        last = fin or index == len(specs) - 1
        payload = _payload(index, size)
        key = _NOISE[index * 4 : index * 4 + 4]
        wire += F.encode_frame(op, payload, fin=last, mask_key=key)
        originals.append((op, last, payload, key))
        open_message = not last
    r = reader()
    run = memoryview(bytes(wire))
    assert r.take_run(run) == len(run)
    remasked = F.remask_run(run[: len(run)])
    assert len(remasked) == len(wire)
    decoded = reader()
    decoded.feed(remasked)
    events = drain(decoded)
    assert len(events) == len(originals)
    for event, (op, fin, payload, key) in zip(events, originals, strict=True):
        assert isinstance(event, Frame)
        assert (event.opcode, event.fin) == (op, fin)
        assert event.payload() == payload
        assert event.mask_key is not None
        assert event.mask_key != key


# ================================================================ fresh_mask_key


class _CountingEntropy:
    """An ``os.urandom`` whose every 4-byte word is new: a reused pool slot shows."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._next = 0
        self._lock = threading.Lock()

    def __call__(self, size: int) -> bytes:
        with self._lock:
            self.calls.append(size)
            words = range(self._next, self._next + size // 4)
            self._next += size // 4
        return b"".join(word.to_bytes(4, "big") for word in words)


def _in_new_thread(fn: Callable[[], list[bytes]]) -> list[bytes]:
    """``fn``'s keys, drawn in a fresh thread (a fresh key pool)."""
    result: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def test_fresh_mask_keys_are_four_bytes_each_a_new_slot_of_one_urandom_read_per_refill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entropy = _CountingEntropy()
    monkeypatch.setattr(os, "urandom", entropy)
    count = 3 * F.MASK_KEYS_PER_REFILL
    keys = _in_new_thread(lambda: [F.fresh_mask_key() for _ in range(count)])
    assert all(type(key) is bytes and len(key) == 4 for key in keys)
    assert len(set(keys)) == count
    assert entropy.calls == [4 * F.MASK_KEYS_PER_REFILL] * 3
    # Every word of every refill handed out once, in order.
    assert keys == [word.to_bytes(4, "big") for word in range(count)]


def test_fresh_mask_keys_of_two_threads_come_from_two_pools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entropy = _CountingEntropy()
    monkeypatch.setattr(os, "urandom", entropy)
    first = _in_new_thread(lambda: [F.fresh_mask_key() for _ in range(10)])
    second = _in_new_thread(lambda: [F.fresh_mask_key() for _ in range(10)])
    # Each thread refilled its own pool, and no key is in both.
    assert len(entropy.calls) == 2
    assert not set(first) & set(second)


def test_fresh_mask_keys_of_two_threads_differ_with_real_entropy() -> None:
    first = _in_new_thread(lambda: [F.fresh_mask_key() for _ in range(64)])
    second = _in_new_thread(lambda: [F.fresh_mask_key() for _ in range(64)])
    here = [F.fresh_mask_key() for _ in range(64)]
    # 192 random 32-bit keys: a chance collision is about 4 in a million.
    assert len(set(first) | set(second) | set(here)) == 192


# ================================================================ ClientRateLimit.admit, runs


def _rate(
    *,
    frames: float = 10,
    frame_burst: float = 10,
    byte_rate: float = 1000,
    byte_burst: float = 1000,
) -> tuple[ClientRateLimit, list[float]]:
    now = [100.0]
    return (
        ClientRateLimit(
            max_frames_per_s=frames,
            frame_burst=frame_burst,
            max_bytes_per_s=byte_rate,
            byte_burst_bytes=byte_burst,
            clock=lambda: now[0],
        ),
        now,
    )


def test_a_run_within_both_budgets_is_admitted_and_charged_whole() -> None:
    rate, _ = _rate()
    assert rate.admit(600, frames=6)
    assert rate.frames.tokens == 4
    assert rate.bytes.tokens == 400
    assert rate.admit(400, frames=4)  # exactly the rest of both budgets
    assert rate.frames.tokens == 0
    assert rate.bytes.tokens == 0


@pytest.mark.parametrize(
    ("wire_bytes", "frames", "exceeded"),
    [
        (100, 11, "frames per second"),
        (1001, 2, "bytes per second"),
        (5000, 50, "frames per second"),
    ],
    ids=["too_many_frames", "too_many_bytes", "both"],
)
def test_a_run_that_would_overdraw_a_bucket_is_refused_whole_and_charges_nothing(
    wire_bytes: int, frames: int, exceeded: str
) -> None:
    rate, _ = _rate()
    assert rate.admit(100, frames=1)
    before = (rate.frames.tokens, rate.bytes.tokens)
    assert not rate.admit(wire_bytes, frames=frames)
    assert rate.exceeded == exceeded
    assert (rate.frames.tokens, rate.bytes.tokens) == before
    # What is left is still there for a smaller run, at the same instant.
    assert rate.admit(900, frames=9)
    assert not rate.admit(1, frames=1)


def test_a_refused_run_passes_once_the_buckets_refilled() -> None:
    rate, now = _rate()
    assert rate.admit(1000, frames=10)
    assert not rate.admit(500, frames=5)
    now[0] += 0.5  # half a second: 5 frames and 500 bytes accrued
    assert rate.admit(500, frames=5)
    assert not rate.admit(1, frames=1)


def test_a_run_with_only_one_bucket_on() -> None:
    rate, _ = _rate(frames=0, frame_burst=0)  # frames off: only bytes count
    assert rate.admit(1000, frames=10_000)
    assert not rate.admit(1, frames=1)
    assert rate.exceeded == "bytes per second"


# ================================================================ UpstreamTap


def test_tap_skips_untapped_types_unread_so_junk_after_one_is_not_undecodable_by_design() -> None:
    """The intended trade-off: an untapped event is never decoded, so it is never found
    undecodable either."""
    tap = UpstreamTap()
    tap.observe_text(b'{"type":"response.output_audio.delta" \x00\xff this is not JSON')
    tap.observe_text(memoryview(b'{"type":"conversation.item.created",}}}}'))
    assert tap.undecodable_events == 0
    assert tap.error_events == 0


def test_tap_counts_response_done_usage() -> None:
    tap = UpstreamTap()
    done = (
        b'{"type":"response.done","event_id":"e1","response":{"status":"completed","usage":'
        b'{"total_tokens":30,"input_tokens":20,"output_tokens":10,'
        b'"input_token_details":{"text_tokens":5,"audio_tokens":15,"cached_tokens":4},'
        b'"output_token_details":{"text_tokens":3,"audio_tokens":7}}}}'
    )
    tap.observe_text(memoryview(done))
    assert tap.usage.responses == 1
    assert tap.usage.total_tokens == 30
    assert tap.usage.output_audio_tokens == 7


def test_tap_takes_session_created_id_and_model() -> None:
    tap = UpstreamTap()
    tap.observe_text(b'{"type":"session.created","session":{"id":"sess_9","model":"gpt-realtime"}}')
    assert (tap.upstream_session_id, tap.upstream_model) == ("sess_9", "gpt-realtime")


def test_tap_counts_error_events() -> None:
    tap = UpstreamTap()
    tap.observe_text(b'{"type":"error","error":{"code":"x"}}')
    tap.observe_text(b'{"type":"error","error":{}}')
    assert tap.error_events == 2


@pytest.mark.parametrize(
    "event",
    [
        b'{"type":"response\\u002edone","response":{"usage":{"total_tokens":7}}}',
        b'{"type":"\\u0072esponse.done","response":{"usage":{"total_tokens":7}}}',
    ],
    ids=["escaped_dot", "escaped_first_letter"],
)
def test_tap_still_decodes_a_type_name_with_an_escape(event: bytes) -> None:
    tap = UpstreamTap()
    tap.observe_text(event)
    assert tap.usage.responses == 1
    assert tap.usage.total_tokens == 7


@pytest.mark.parametrize(
    ("head", "skipped"),
    [
        (b'{"type":"input_audio_buffer.append"', True),
        (b'{"type":"response.output_audio.delta"', True),
        (b'{"type":"response.don"', True),  # a tapped name's prefix, then its end
        (b'{"type":"response.donee"', True),  # a tapped name, then more
        (b'{"type":"errors"', True),
        (b'{"type":"session.updated"', True),
        (b'{"type":""', True),
        (b'{"type":"input\\u005faudio"', True),  # an escape after the names differ
        (b'{"type":"response.done"', False),
        (b'{"type":"session.created"', False),
        (b'{"type":"error"', False),
        (b'{"type":"e\\u0072ror"', False),  # an escape where a tapped name goes on
        (b'{"type":"\\u0065rror"', False),
        (b'{"type":"respon', False),  # cut short inside a tapped name's prefix
        (b'{"event_id":"e","type":"x"', False),
    ],
)
def test_the_tap_skips_exactly_the_names_that_differ_from_every_tapped_one(
    head: bytes, skipped: bool
) -> None:
    assert (UNTAPPED_HEAD(head) is not None) is skipped


def test_tap_counts_non_json_as_undecodable() -> None:
    tap = UpstreamTap()
    tap.observe_text(b"not json")
    tap.observe_text(b'{"type":"error"')  # a tapped type, cut short
    tap.observe_text(b"")
    assert tap.undecodable_events == 3


@pytest.mark.parametrize(
    ("event", "error_events", "responses", "undecodable"),
    [
        (b'{"event_id":"e","type":"error","error":{}}', 1, 0, 0),  # type not first
        (b'{ "type": "error", "error": {}}', 1, 0, 0),  # spaced
        (
            b'{"event_id":"e","type":"response.done","response":{"usage":{"total_tokens":3}}}',
            0,
            1,
            0,
        ),
        (b'{"event_id":"e","type":"response.output_audio.delta"}', 0, 0, 0),
        (b'{"event_id":"e"}', 0, 0, 1),  # no type at all
        (b'["type","error"]', 0, 0, 1),
        (b'{"type":"' + b"x" * 120 + b'"}', 0, 0, 0),  # name past the scan window
    ],
    ids=["type_second", "spaced", "done_second", "delta_second", "no_type", "array", "long_name"],
)
def test_tap_decodes_events_that_do_not_begin_with_the_type_as_before(
    event: bytes, error_events: int, responses: int, undecodable: int
) -> None:
    tap = UpstreamTap()
    tap.observe_text(event)
    assert tap.error_events == error_events
    assert tap.usage.responses == responses
    assert tap.undecodable_events == undecodable


# ================================================================ Transport over a socketpair


def _socketpair() -> tuple[Transport, Transport]:
    a, b = socket.socketpair()
    tune_stream_socket(a)
    tune_stream_socket(b)
    return Transport(a), Transport(b)


async def test_send_all_sends_what_it_was_given_though_the_caller_reuses_it_as_it_waits() -> None:
    sender, receiver = _socketpair()
    original = random.Random(6).randbytes(4 * 1024 * 1024)
    source = bytearray(original)
    sent = trio.Event()

    async def send() -> None:
        await sender.send_all(memoryview(source))
        sent.set()

    received = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set(), "4 MiB fit the socket buffers: send_all never waited"
            source[:] = b"\x00" * len(source)  # the shared buffer's next read
            buffer = bytearray(64 * 1024)
            with trio.fail_after(10):
                while len(received) < len(original):
                    size = await receiver.recv_into(buffer)
                    assert size
                    received += buffer[:size]
                await sent.wait()
    finally:
        sender.close()
        receiver.close()
    assert bytes(received) == original


class _RecordingSocket:
    """A socket whose reads are logged, to see what runs between a read and its return."""

    def __init__(self, sock: socket.socket, log: list[str]) -> None:
        self._sock = sock
        self._log = log

    def recv_into(self, buffer: bytearray | memoryview, nbytes: int = 0) -> int:
        self._log.append("read")
        return self._sock.recv_into(buffer, nbytes)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        self._sock.close()


class _StepLog(trio.abc.Instrument):
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.watched: trio.lowlevel.Task | None = None

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.watched:
            self.log.append("suspend")


async def test_recv_into_yields_before_the_read_never_between_the_read_and_its_return() -> None:
    """CHECKPOINT_EVERY_OPS * 8 reads of 16 ready bytes each, into one buffer that a
    concurrent task scribbles over whenever it runs: the reader always finds what it
    read, and never suspends between a read and its return, though it yields."""
    a, b = socket.socketpair()
    tune_stream_socket(a)
    tune_stream_socket(b)
    reads = CHECKPOINT_EVERY_OPS * 8
    chunks = [f"{i:015d}|".encode() for i in range(reads)]
    b.sendall(b"".join(chunks))
    log: list[str] = []
    transport = Transport(cast(socket.socket, _RecordingSocket(a, log)))
    shared = bytearray(16)
    scribbles = 0
    done = False
    instrument = _StepLog(log)

    async def scribbler() -> None:
        nonlocal scribbles
        while not done:
            shared[:] = b"X" * 16
            scribbles += 1
            await trio.lowlevel.checkpoint()

    trio.lowlevel.add_instrument(instrument)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(scribbler)
            instrument.watched = trio.lowlevel.current_task()
            for index in range(reads):
                size = await transport.recv_into(shared, 16)
                log.append("returned")
                assert size == 16
                assert bytes(shared) == chunks[index], f"read {index} overwritten"
            done = True
            instrument.watched = None
    finally:
        trio.lowlevel.remove_instrument(instrument)
        transport.close()
        b.close()
    pairs = [(x, y) for x, y in itertools.pairwise(log) if x == "read"]
    assert len(pairs) == reads
    assert all(after == "returned" for _, after in pairs)
    # It did yield (before reads), and the scribbler did run in between (once per
    # yield, give or take the scheduler's order within a batch).
    assert log.count("suspend") >= reads // CHECKPOINT_EVERY_OPS
    assert scribbles >= reads // CHECKPOINT_EVERY_OPS // 2


# ================================================================ WebSocket.send_raw, WriteLock


async def test_send_raw_waiting_for_a_held_write_lock_sends_the_bytes_it_was_given(
    autojump_clock: trio.testing.MockClock,
) -> None:
    near, far = memory_pair()
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    peer = WebSocket(far, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES)
    original = frame(OP_TEXT, b"the original bytes", masked=False)
    source = bytearray(original)
    lock = ws.lock_for_frame()
    async with trio.open_nursery() as nursery:
        await lock.acquire()
        nursery.start_soon(ws.send_raw, memoryview(source))
        await trio.testing.wait_all_tasks_blocked()
        assert far.unread_bytes == 0  # parked on the lock, nothing written
        source[:] = frame(OP_TEXT, b"OVERWRITTEN BYTES!", masked=False)
        lock.release()
        with trio.fail_after(5):
            opcode, payload = await peer.receive_message()
    assert (opcode, payload) == (OP_TEXT, b"the original bytes")
    assert ws.bytes_sent == len(original)
    assert not lock.held


async def test_send_now_writes_what_fits_and_send_rest_finishes_it_from_a_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The pumps' write: what the pipe takes at once goes now, the rest is awaited,
    whole and in order, even though the caller's buffer is reused meanwhile."""
    near, far = memory_pair(a_to_b=64)
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    peer = WebSocket(far, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES)
    original = frame(OP_TEXT, b"x" * 200, masked=False)
    source = bytearray(original)
    sent = ws.send_now(memoryview(source))
    assert sent == 64
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send_rest, memoryview(source), sent)
        await trio.testing.wait_all_tasks_blocked()
        assert ws.lock_for_frame().held  # the rest of the frame waits under the lock
        source[:] = bytes(len(source))  # the shared buffer, reused
        with trio.fail_after(5):
            opcode, payload = await peer.receive_message()
    assert (opcode, payload) == (OP_TEXT, b"x" * 200)
    assert ws.bytes_sent == len(original)
    assert not ws.lock_for_frame().held


async def test_send_now_writes_nothing_while_another_task_holds_the_write_lock() -> None:
    near, far = memory_pair()
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    await ws.lock_for_frame().acquire()
    assert ws.send_now(frame(OP_TEXT, b"later", masked=False)) == 0
    assert far.unread_bytes == 0


async def test_send_now_on_a_broken_connection_fails_as_its_leg() -> None:
    near, _ = memory_pair()
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    ws.mark_broken()
    with pytest.raises(LegFailed) as failed:
        ws.send_now(b"\x81\x00")
    assert failed.value.leg is ws


async def test_write_lock_hands_over_in_arrival_order() -> None:
    lock = WriteLock()
    await lock.acquire()
    order: list[str] = []

    async def waiter(name: str) -> None:
        async with lock:
            order.append(name)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(waiter, name)
            await trio.testing.wait_all_tasks_blocked()
        lock.release()
        # Handed over, not freed: a newcomer (here "d") cannot take it first.
        assert lock.held
        nursery.start_soon(waiter, "d")
    assert order == ["a", "b", "c", "d"]
    assert not lock.held


async def test_a_write_lock_waiter_cancelled_while_parked_neither_gets_it_nor_breaks_it() -> None:
    lock = WriteLock()
    await lock.acquire()
    got: list[str] = []
    scopes: dict[str, trio.CancelScope] = {}

    async def waiter(name: str) -> None:
        with trio.CancelScope() as scope:
            scopes[name] = scope
            async with lock:
                got.append(name)
                await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for name in "abc":
            nursery.start_soon(waiter, name)
            await trio.testing.wait_all_tasks_blocked()
        scopes["b"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert got == ["a", "c"]
    assert not lock.held

    # The only waiter cancelled: release frees the lock, and the next acquire is immediate.
    await lock.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter, "lone")
        await trio.testing.wait_all_tasks_blocked()
        scopes["lone"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        lock.release()
    assert not lock.held
    await lock.acquire()
    assert lock.held
    lock.release()
    assert got == ["a", "c"]


# ================================================================ memory of idle connections


def test_two_websockets_share_one_receive_view() -> None:
    async def main() -> None:
        a, b = memory_pair()
        first = WebSocket(a, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
        second = WebSocket(b, client_side=True, max_message_bytes=MAX_MESSAGE_BYTES)
        assert first.read_view is second.read_view

    trio.run(main)


IDLE_SESSIONS: Final = 40
#: The budget per idle session (before 233644f each WebSocket held a 64 KiB buffer:
#: about 280 KB per session measured this way).
IDLE_SESSION_BUDGET_BYTES: Final = 24 * 1024


def _traced_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated between two snapshots, leaving out the in-memory pipes' own."""
    leave_out = [
        tracemalloc.Filter(False, "*/tests/doubles.py"),
        tracemalloc.Filter(False, tracemalloc.__file__),
    ]
    return sum(
        stat.size_diff
        for stat in after.filter_traces(leave_out).compare_to(
            before.filter_traces(leave_out), "filename"
        )
    )


async def test_idle_sessions_hold_no_receive_buffer_of_their_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """N sessions running and idle: the traced memory per session (the relay's two legs,
    the session's tasks, and the two far ends' WebSockets; not the in-memory pipes)
    stays under 24 KiB: no leg holds a receive buffer."""
    async with trio.open_nursery() as nursery:
        warm = relayed_session(limits())  # imports, the thread's receive buffer, caches
        nursery.start_soon(warm.session.run)
        await trio.testing.wait_all_tasks_blocked()
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            total_before = tracemalloc.get_traced_memory()[0]
            sessions = [relayed_session(limits()) for _ in range(IDLE_SESSIONS)]
            for relayed in sessions:
                nursery.start_soon(relayed.session.run)
            await trio.testing.wait_all_tasks_blocked()
            total = (tracemalloc.get_traced_memory()[0] - total_before) / IDLE_SESSIONS
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        nursery.cancel_scope.cancel()
    per_session = _traced_growth(before, after) / IDLE_SESSIONS
    print(f"\nper idle session: {per_session:.0f} bytes ({total:.0f} with the memory pipes)")
    assert per_session < IDLE_SESSION_BUDGET_BYTES


async def test_a_backlog_of_reads_ending_mid_frame_still_forwards_in_runs() -> None:
    """A sender far ahead of the relay: every 64 KiB read ends inside a frame. The
    partial frame joins the next read (take_pending), so nearly every frame still goes
    out in a run, not as a per-frame event, and the bytes are exactly what was sent."""
    far, near = memory_pair(a_to_b=1 << 24)
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    payloads = [os.urandom(1000 + index % 700) for index in range(5000)]
    wire = b"".join(
        F.encode_frame(F.OP_TEXT, payload, mask_key=os.urandom(4)) for payload in payloads
    )
    await far.send_all(wire)
    far.close()
    forwarded = bytearray()
    in_runs = one_by_one = 0
    while True:
        event = ws.reader.next_event()
        if event is not None:
            assert isinstance(event, Frame)
            forwarded += event.raw
            one_by_one += 1
            continue
        try:
            run = await ws.receive_run()
        except ConnectionClosed:
            break
        forwarded += run
        in_runs += ws.reader.run_frames
    assert bytes(forwarded) == wire
    assert in_runs + one_by_one == len(payloads)
    assert one_by_one == 0


class _CountingSocket(socket.socket):
    """A real socket that counts its reads (EAGAIN tries included)."""

    reads = 0

    def recv_into(self, buffer: Buffer, nbytes: int = 0, flags: int = 0) -> int:
        self.reads += 1
        return super().recv_into(buffer, nbytes, flags)


async def test_after_a_short_read_the_next_read_waits_for_readiness_without_a_failing_try() -> None:
    """A read that returned less than asked drained the kernel at that instant: the next
    one waits for readiness instead of a try that fails with EAGAIN (a system call and
    an exception per message on the relay's hot path)."""
    near, far = socket.socketpair()
    counted = _CountingSocket(fileno=near.detach())
    tune_stream_socket(counted)
    transport = Transport(counted)
    buffer = bytearray(1024)
    far.send(b"0123456789")
    assert await transport.recv_into(buffer) == 10
    assert counted.reads == 1
    got: list[int] = []

    async def read_again() -> None:
        got.append(await transport.recv_into(buffer))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_again)
        await trio.testing.wait_all_tasks_blocked()
        assert counted.reads == 1  # parked on readiness, no failing try
        far.send(b"abc")
    assert got == [3]
    assert counted.reads == 2
    # A read that filled the buffer may have left more: the next one tries at once.
    far.send(b"x" * 2048)
    assert await transport.recv_into(buffer) == 1024
    assert await transport.recv_into(buffer) == 1024
    assert counted.reads == 4
    transport.close()
    far.close()


def test_take_run_stops_before_the_first_frame_accept_refuses_and_leaves_it_unread() -> None:
    """The locked pump's gate: it sees each frame unmasked; the run ends before the
    first refusal, which next_event then gives whole, with the message state intact."""
    ok, bad = b'{"a":1}', b'{"b":2}'
    wire = frame(OP_TEXT, ok) + frame(OP_TEXT, ok) + frame(OP_TEXT, bad) + frame(OP_TEXT, ok)
    seen: list[tuple[int, bool, bytes]] = []

    def accept(opcode: int, fin: bool, payload: bytes | memoryview) -> bool:
        seen.append((opcode, fin, bytes(payload)))
        return payload == ok

    r = reader()
    data = memoryview(wire)
    taken = r.take_run(data, accept=accept)
    assert taken == 2 * len(frame(OP_TEXT, ok))
    assert (r.run_frames, r.run_messages) == (2, 2)
    assert seen == [(OP_TEXT, True, ok), (OP_TEXT, True, ok), (OP_TEXT, True, bad)]
    r.feed(data[taken:])
    refused = r.next_event()
    assert isinstance(refused, Frame)
    assert refused.payload() == bad
    assert r.take_run(memoryview(b""), accept=accept) == 0
    last = r.next_event()
    assert isinstance(last, Frame)
    assert last.payload() == ok
    assert r.idle


async def test_a_release_right_after_a_waiter_was_cancelled_frees_the_lock() -> None:
    """The waiter is out of the lot once cancelled but has not run its cleanup yet when
    the holder releases: the lock must come free, not pass to nobody."""
    lock = WriteLock()
    await lock.acquire()
    waiter_scope = trio.CancelScope()

    async def wait_for_lock() -> None:
        with waiter_scope:
            await lock.acquire()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_lock)
        await trio.testing.wait_all_tasks_blocked()
        assert lock.waiting == 1
        waiter_scope.cancel()  # out of the lot now; its finally runs later
        lock.release()  # in the same step, before the waiter ran
        assert not lock.held
    assert lock.waiting == 0
    with trio.fail_after(1):
        await lock.acquire()
    assert lock.held


async def test_a_frame_trickled_a_byte_at_a_time_is_appended_not_copied_per_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that sends a 60 KB frame one octet per read: the partial frame joins a
    read only once that read completes it, so the relay copies it once, not once per
    byte (60,000 reads of a growing copy would be 1.8 GB of copying)."""
    far, near = memory_pair()
    ws = WebSocket(near, client_side=False, max_message_bytes=MAX_MESSAGE_BYTES)
    wire = F.encode_frame(F.OP_TEXT, b"x" * 60_000, mask_key=os.urandom(4))
    handed_back: list[int] = []
    take_pending = FrameReader.take_pending

    def counting(self: FrameReader, incoming_bytes: int) -> bytes | None:
        pending = take_pending(self, incoming_bytes)
        handed_back.append(len(pending) if pending is not None else 0)
        return pending

    monkeypatch.setattr(FrameReader, "take_pending", counting)
    forwarded = bytearray()
    for index in range(len(wire)):
        await far.send_all(wire[index : index + 1])
        forwarded += await ws.receive_run()
    assert bytes(forwarded) == wire
    assert sum(handed_back) <= len(wire) + F.MAX_HEADER_BYTES * F.MAX_HEADER_BYTES


async def test_upstream_names_are_resolved_once_per_ttl_and_ip_literals_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from relay.net import transport

    lookups: list[str] = []
    now = [1000.0]

    async def fake_getaddrinfo(host: str, port: int, **_: object) -> list[object]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    monkeypatch.setattr(transport, "_resolved", {})
    assert (await transport.resolve("127.0.0.1", 443))[0][4] == ("127.0.0.1", 443)
    assert (await transport.resolve("::1", 443))[0][0] == socket.AF_INET6
    assert lookups == []
    await transport.resolve("upstream.example", 443)
    now[0] += transport.RESOLVED_ADDRESS_TTL_S - 1
    await transport.resolve("upstream.example", 443)
    assert lookups == ["upstream.example"]
    now[0] += 2  # past the TTL: looked up again
    await transport.resolve("upstream.example", 443)
    assert lookups == ["upstream.example", "upstream.example"]


@settings(max_examples=400, deadline=None)
@given(
    # Mostly the common first octets (FIN text, FIN binary), then any.
    st.one_of(st.sampled_from([0x81, 0x82]), st.integers(min_value=0, max_value=255)),
    st.booleans(),
    st.sampled_from([0, 1, 2, 3, 125, 126, 127, 300, 65535, 65536]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([0, 1, 125, 126, 65536]),
)
def test_the_one_frame_path_decides_as_the_loop_does(
    first: int, masked: bool, length: int, expect_masked: bool, in_message: bool, whole: int
) -> None:
    """A read of exactly one frame (any first octet, mask bit, length) taken by take_run's
    one-frame path gives what the frame loop gives: an ``accept`` that takes everything
    sends the same read through the loop. Same count taken, same counts, same text
    tapped, the same refusal."""
    header = bytearray([first])
    if length < 126:
        header.append(length | (0x80 if masked else 0))
    elif length < 65536:
        header += bytes([126 | (0x80 if masked else 0)]) + length.to_bytes(2, "big")
    else:
        header += bytes([127 | (0x80 if masked else 0)]) + length.to_bytes(8, "big")
    wire = bytes(header) + (KEY if masked else b"") + b"x" * length

    def outcome(loop: bool) -> tuple[object, ...]:
        r = reader(masked=expect_masked, whole=whole)
        if in_message:  # a fragmented text message open
            r.feed(frame(OP_TEXT, b"a", fin=False, masked=expect_masked))
            drain(r)
        tapped: list[bytes] = []
        try:
            taken = r.take_run(
                memoryview(wire),
                lambda p: tapped.append(bytes(p)),
                (lambda *_: True) if loop else None,
            )
        except FrameProtocolError as exc:
            return ("refused", exc.close_code, exc.reason)
        return (taken, r.run_frames, r.run_messages, tapped, r.in_message)

    assert outcome(loop=False) == outcome(loop=True)
    # frame_at (the binary audio path's frame walk) takes exactly the frames the
    # one-frame path takes whole, and says where the payload starts.
    r = reader(masked=expect_masked, whole=whole)
    if in_message:
        r.feed(frame(OP_TEXT, b"a", fin=False, masked=expect_masked))
        drain(r)
    span = r.frame_at(memoryview(wire), 0)
    took_whole = outcome(loop=False)[0] == len(wire)
    common = first in (0x81, 0x82) and not in_message
    assert (span is not None) == (took_whole and common and len(wire) >= 4)
    if span is not None:
        assert span == (len(wire) - length, len(wire))
        assert r.frame_at(memoryview(b"\x00" * 3 + wire), 3) == (span[0] + 3, span[1] + 3)
