"""The ``relay.audio.v1`` binary audio path (docs/binary-audio.md), core, shell and end to end.

- the sans-I/O core, table-tested without a loop: the append an SDK would send,
  the refusals, the input format followed from session events, the delta converter;
- the session shell over in-memory legs on a virtual clock: binary up becomes an
  append, deltas down become binary frames after their start markers, refusals
  are told and not forwarded, fragmented and trickled binary messages, the locked
  pump, and a connection that did not opt in;
- end to end over real sockets with the simulator as upstream and trio-websocket,
  an implementation independent of ours, as the client.
"""

from __future__ import annotations

import base64
import os
import struct
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from relay.dataplane.lock import SessionLock
from relay.dataplane.policy import Ending, EndKind, Side
from relay.net.transport import TransportClosed
from relay.net.websocket import ConnectionClosed
from relay.protocol import binary_audio, frames
from relay.protocol.binary_audio import (
    AUDIO_SUBPROTOCOL,
    CODE_EMPTY,
    CODE_PARTIAL_SAMPLE,
    CODE_TOO_LARGE,
    AudioFormat,
    DeltaConverter,
)
from relay.protocol.frames import OP_BINARY, OP_CONTINUATION, OP_TEXT, WHOLE_FRAME_MAX_BYTES
from tests.conftest import CLIENT_KEY, RunningSimulator, open_ws, start_relay
from tests.doubles import (
    TIGHT_BYTES,
    Peer,
    Relayed,
    limits,
    masked_text,
    relayed_session,
    wait_until,
)

#: 20 ms of 24 kHz PCM16: 480 samples.
CHUNK = struct.pack("<480h", *((i * 37) % 20000 - 10000 for i in range(480)))
LIMIT = binary_audio.DEFAULT_MAX_AUDIO_MESSAGE_BYTES


def delta(audio: bytes, item: str = "item_1", response: str = "resp_1", content: int = 0) -> bytes:
    return orjson.dumps(
        {
            "type": "response.output_audio.delta",
            "event_id": "event_9",
            "response_id": response,
            "item_id": item,
            "output_index": 0,
            "content_index": content,
            "delta": base64.b64encode(audio).decode(),
        }
    )


def masked(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    return frames.encode_frame(opcode, payload, mask_key=os.urandom(4), fin=fin)


def session_update(format_type: str) -> bytes:
    return orjson.dumps(
        {
            "type": "session.update",
            "session": {"audio": {"input": {"format": {"type": format_type}}}},
        }
    )


# ---------------------------------------------------------------- the core, without a loop


def test_the_append_is_what_an_sdk_sends() -> None:
    event = orjson.loads(binary_audio.append_event(CHUNK))
    assert event == {"type": "input_audio_buffer.append", "audio": base64.b64encode(CHUNK).decode()}
    # The docs' byte-level example.
    assert binary_audio.append_event(bytes.fromhex("0000e80318fcff7f")) == (
        b'{"type":"input_audio_buffer.append","audio":"AADoAxj8/38="}'
    )


@pytest.mark.parametrize(
    ("size", "sample_bytes", "code"),
    [
        (960, 2, None),
        (2, 2, None),
        (0, 2, CODE_EMPTY),
        (961, 2, CODE_PARTIAL_SAMPLE),
        (1, 2, CODE_PARTIAL_SAMPLE),
        (961, 1, None),  # G.711: any whole number of bytes
        (LIMIT, 2, None),
        (LIMIT + 2, 2, CODE_TOO_LARGE),
        (LIMIT + 1, 2, CODE_TOO_LARGE),  # too large is said first
    ],
)
def test_refusals(size: int, sample_bytes: int, code: str | None) -> None:
    problem = binary_audio.audio_problem(size, sample_bytes, LIMIT)
    if code is None:
        assert problem is None
    else:
        assert problem is not None
        event = orjson.loads(problem)
        assert event["type"] == "error"
        assert event["error"]["type"] == "invalid_request_error"
        assert event["error"]["code"] == code
        assert size == 0 or str(size) in event["error"]["message"]


@pytest.mark.parametrize(
    ("events", "format_type", "sample_bytes"),
    [
        ([], "audio/pcm", 2),
        ([session_update("audio/pcmu")], "audio/pcmu", 1),
        ([session_update("audio/pcma"), session_update("audio/pcm")], "audio/pcm", 2),
        # The upstream's answer counts as much as the client's request; the later wins.
        (
            [
                session_update("audio/pcmu"),
                b'{"type":"session.updated","event_id":"e","session":{"audio":{"input":'
                b'{"format":{"type":"audio/pcm","rate":24000}}}}}',
            ],
            "audio/pcm",
            2,
        ),
        (
            [
                b'{"type":"session.created","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}}'
            ],
            "audio/pcmu",
            1,
        ),
        # The type key need not come first.
        (
            [
                b'{"session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}},"type":"session.update"}'
            ],
            "audio/pcmu",
            1,
        ),
        # Escapes in the type name still spell the type.
        (
            [
                b'{"type":"session\\u002eupdate","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}}'
            ],
            "audio/pcmu",
            1,
        ),
        # Other events, partial sessions and malformed JSON leave the format alone.
        (
            [
                b'{"type":"response.create","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}}}}}'
            ],
            "audio/pcm",
            2,
        ),
        ([b'{"type":"session.update","session":{"instructions":"hi"}}'], "audio/pcm", 2),
        (
            [
                b'{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcmu"}'
            ],
            "audio/pcm",
            2,
        ),
        ([b"\xff\xfe"], "audio/pcm", 2),
        # An unknown format is one byte per sample: nothing refused for its length.
        ([session_update("audio/opus")], "audio/opus", 1),
    ],
)
def test_the_input_format_follows_session_events(
    events: list[bytes], format_type: str, sample_bytes: int
) -> None:
    audio_format = AudioFormat()
    for event in events:
        audio_format.observe(event)
    assert audio_format.input_format == format_type
    assert audio_format.sample_bytes == sample_bytes


@pytest.mark.parametrize(
    ("head", "may_be_delta"),
    [
        (delta(b"\x00\x00"), True),
        (b'{"type":"response.output_audio_transcript.delta","delta":"hi"}', False),
        (b'{"type":"response.done"}', False),
        (b'{"event_id":"e","type":"response.output_audio.delta","delta":""}', True),
        (b'{"type":"response.output_audio\\u002edelta","delta":""}', True),
        (b" {}", True),
    ],
)
def test_a_delta_is_recognised_from_its_first_bytes(head: bytes, may_be_delta: bool) -> None:
    assert binary_audio.is_audio_delta(memoryview(head)) is may_be_delta


def test_the_converter_marks_each_new_content_part_once() -> None:
    converter = DeltaConverter()
    first = converter.convert(delta(b"\x01\x02"))
    assert first is not None
    marker, audio = first
    assert audio == b"\x01\x02"
    assert marker is not None
    assert orjson.loads(marker) == {
        "type": "relay.output_audio.start",
        "response_id": "resp_1",
        "item_id": "item_1",
        "output_index": 0,
        "content_index": 0,
    }
    assert converter.convert(delta(b"\x03\x04")) == (None, b"\x03\x04")
    for changed in (
        delta(b"\x00", item="item_2"),
        delta(b"\x00", response="r2"),
        delta(b"\x00", content=1),
    ):
        converted = converter.convert(changed)
        assert converted is not None
        assert converted[0] is not None
    assert converter.deltas_converted == 5


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type":"response.output_audio.delta","delta":"not base64!"}',
        b'{"type":"response.output_audio.delta","delta":"AAA"}',  # missing padding
        b'{"type":"response.output_audio.delta","delta":7}',
        b'{"type":"response.output_audio.delta"}',
        b'{"type":"response.output_audio.delta","delta":"AAAA"',
        b'{"type":"response.output_text.delta","delta":"AAAA"}',
    ],
)
def test_what_cannot_be_converted_is_left_as_text(payload: bytes) -> None:
    assert DeltaConverter().convert(payload) is None


def test_selecting_the_path_needs_the_offer_and_the_setting() -> None:
    assert binary_audio.selects_audio_path(["realtime", AUDIO_SUBPROTOCOL], enabled=True)
    assert not binary_audio.selects_audio_path(["realtime", AUDIO_SUBPROTOCOL], enabled=False)
    assert not binary_audio.selects_audio_path(["realtime", "relay.audio.v2"], enabled=True)


# ---------------------------------------------------------------- the shell, in memory


def audio_session(**overrides: Any) -> Relayed:
    lock = overrides.pop("lock", None)
    first = overrides.pop("first_client_events", ())
    max_bytes = overrides.pop("max_bytes", LIMIT)
    return relayed_session(
        limits(**overrides),
        lock=lock,
        binary_audio_max_message_bytes=max_bytes,
        first_client_events=first,
    )


async def run_with_peers(relayed: Relayed, scenario: Any) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.upstream.serve)
        nursery.start_soon(relayed.client.serve)
        nursery.start_soon(relayed.session.run)
        await scenario(relayed)
        await relayed.client.ws.close(1000, "done", timeout_s=1)
        with trio.fail_after(5):
            await relayed.session.ended.wait()
        nursery.cancel_scope.cancel()


def texts_of(peer: Peer) -> list[dict[str, Any]]:
    return [orjson.loads(text) for text in peer.texts]


async def test_binary_up_becomes_an_append_and_text_passes_verbatim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    commit = b'{"type":"input_audio_buffer.commit","event_id":"c1"}'

    async def scenario(relayed: Relayed) -> None:
        wire = masked(OP_BINARY, CHUNK) + masked_text(commit) + masked(OP_BINARY, CHUNK[:2])
        await relayed.client.stream.send_all(wire)  # three frames in one read: one run
        await wait_until(lambda: len(relayed.upstream.texts) == 3)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts == [
        binary_audio.append_event(CHUNK),
        commit,
        binary_audio.append_event(CHUNK[:2]),
    ]
    assert relayed.client.texts == []
    assert relayed.session.stats.messages_up == 3


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", CODE_EMPTY),
        (CHUNK + b"\x00", CODE_PARTIAL_SAMPLE),
        (b"\x00" * (LIMIT + 2), CODE_TOO_LARGE),
    ],
    ids=["empty", "odd", "too_large"],
)
async def test_a_refused_binary_message_is_told_and_not_forwarded(
    autojump_clock: trio.testing.MockClock, payload: bytes, code: str
) -> None:
    async def scenario(relayed: Relayed) -> None:
        await relayed.client.stream.send_all(masked(OP_BINARY, payload) + masked(OP_BINARY, CHUNK))
        await wait_until(lambda: len(relayed.upstream.texts) == 1 and relayed.client.texts != [])

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.client.error_codes() == [code]
    # The session goes on: the next chunk went up, and only it.
    assert relayed.upstream.texts == [binary_audio.append_event(CHUNK)]


async def test_a_message_over_a_large_limit_streams_in_and_is_assembled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    big = CHUNK * 100  # 96,000 bytes: over the whole-frame limit, so it is cut through
    assert len(big) > WHOLE_FRAME_MAX_BYTES

    async def scenario(relayed: Relayed) -> None:
        wire = masked(OP_BINARY, big)
        for start in range(0, len(wire), 7000):  # arriving in pieces
            await relayed.client.stream.send_all(wire[start : start + 7000])
        await relayed.client.stream.send_all(masked(OP_BINARY, big + b"\x00" * 10_000))
        await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK))
        await wait_until(lambda: len(relayed.upstream.texts) == 2)

    relayed = audio_session(max_bytes=100_000)
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts == [
        binary_audio.append_event(big),
        binary_audio.append_event(CHUNK),
    ]
    assert relayed.client.error_codes() == [CODE_TOO_LARGE]


async def test_a_fragmented_binary_message_is_one_append_with_pings_between(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(relayed: Relayed) -> None:
        wire = (
            masked(OP_BINARY, CHUNK[:100], fin=False)
            + masked(frames.OP_PING, b"p")
            + masked(OP_CONTINUATION, CHUNK[100:101], fin=False)
            + masked(OP_CONTINUATION, CHUNK[101:])
            + masked_text(b'{"type":"input_audio_buffer.commit"}')
        )
        await relayed.client.stream.send_all(wire)
        await wait_until(lambda: len(relayed.upstream.texts) == 2)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts == [
        binary_audio.append_event(CHUNK),
        b'{"type":"input_audio_buffer.commit"}',
    ]


async def test_a_binary_frame_trickled_an_octet_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(relayed: Relayed) -> None:
        await relayed.client.trickle(masked(OP_BINARY, CHUNK), every_s=0.001)
        await wait_until(lambda: len(relayed.upstream.texts) == 1)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts == [binary_audio.append_event(CHUNK)]


async def test_the_client_switching_to_g711_may_send_odd_lengths(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(relayed: Relayed) -> None:
        await relayed.client.stream.send_all(masked(OP_BINARY, b"\x7f" * 161))
        await wait_until(lambda: relayed.client.texts != [])
        await relayed.client.stream.send_all(
            masked_text(session_update("audio/pcmu")) + masked(OP_BINARY, b"\x7f" * 161)
        )
        await wait_until(lambda: len(relayed.upstream.texts) == 2)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.client.error_codes() == [CODE_PARTIAL_SAMPLE]
    assert relayed.upstream.texts == [
        session_update("audio/pcmu"),
        binary_audio.append_event(b"\x7f" * 161),
    ]


async def test_deltas_down_become_binary_frames_after_their_markers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    transcript = b'{"type":"response.output_audio_transcript.delta","delta":"hi"}'
    bad = b'{"type":"response.output_audio.delta","delta":"%%%"}'
    done = b'{"type":"response.output_audio.done","item_id":"item_1"}'

    async def scenario(relayed: Relayed) -> None:
        upstream = relayed.upstream.ws
        # One read with several frames (the run gate keeps the deltas out), then single writes.
        await upstream.send_raw(
            frames.encode_frame(OP_TEXT, transcript)
            + frames.encode_frame(OP_TEXT, delta(b"\x01\x00"))
            + frames.encode_frame(OP_TEXT, delta(b"\x02\x00"))
        )
        await upstream.send_text(bad)
        await upstream.send_text(delta(b"\x03\x00", item="item_2"))
        await upstream.send_text(done)
        await wait_until(lambda: len(relayed.client.messages) == 8)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    marker_1 = binary_audio.start_marker("resp_1", "item_1", 0, 0)
    marker_2 = binary_audio.start_marker("resp_1", "item_2", 0, 0)
    assert relayed.client.messages == [
        (OP_TEXT, transcript),
        (OP_TEXT, marker_1),
        (OP_BINARY, b"\x01\x00"),
        (OP_BINARY, b"\x02\x00"),
        (OP_TEXT, bad),  # not convertible: as it came
        (OP_TEXT, marker_2),
        (OP_BINARY, b"\x03\x00"),
        (OP_TEXT, done),
    ]
    assert relayed.session.stats.messages_down == 6  # what the upstream sent


async def test_the_locked_pump_turns_binary_into_appends_and_keeps_the_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = SessionLock(
        {"instructions": "locked", "audio": {"input": {"format": {"type": "audio/pcmu"}}}}
    )
    created = orjson.dumps(
        {
            "type": "session.created",
            "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        }
    )
    sneaky = b'{"type":"session.update","session":{"instructions":"evil"}}'

    async def scenario(relayed: Relayed) -> None:
        # G.711 from the locked config: an odd length is whole samples.
        await relayed.client.stream.send_all(masked(OP_BINARY, b"\x55" * 161) + masked_text(sneaky))
        await wait_until(lambda: relayed.client.error_codes() != [])

    relayed = audio_session(lock=lock, first_client_events=(created,))
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts[0] == binary_audio.append_event(b"\x55" * 161)
    assert all(b"evil" not in text for text in relayed.upstream.texts)
    assert relayed.client.error_codes() == ["locked_field"]


async def test_without_the_opt_in_binary_passes_unchanged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    relayed = relayed_session(limits())

    async def scenario(relayed: Relayed) -> None:
        await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK))
        await relayed.upstream.ws.send_text(delta(b"\x01\x00"))
        await wait_until(
            lambda: len(relayed.upstream.messages) == 1 and len(relayed.client.messages) == 1
        )

    await run_with_peers(relayed, scenario)
    assert relayed.upstream.messages == [(OP_BINARY, CHUNK)]
    assert relayed.client.messages == [(OP_TEXT, delta(b"\x01\x00"))]


# ---------------------------------------------------------------- end to end, real sockets


async def test_binary_audio_through_the_relay_to_the_simulator(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base)
    protocols = ["realtime", AUDIO_SUBPROTOCOL, f"openai-insecure-api-key.{CLIENT_KEY}"]
    url = f"{relay.ws_base}/realtime?model=gpt-realtime&sim_mode=echo"
    async with open_ws(url, subprotocols=protocols, max_message_size=1 << 24) as ws:
        assert ws.subprotocol == AUDIO_SUBPROTOCOL
        received: list[bytes | str] = []
        sent = [CHUNK[: 2 * n] for n in (480, 240, 17)]
        for chunk in sent:
            await ws.send_message(chunk)
        with trio.fail_after(10):
            while sum(isinstance(m, bytes) for m in received) < len(sent):
                received.append(await ws.get_message())
        binaries = [m for m in received if isinstance(m, bytes)]
        # The simulator's echo mode answers each append with a delta of the same audio.
        assert binaries == sent
        texts = [orjson.loads(m) for m in received if isinstance(m, str)]
        assert "relay.output_audio.start" in [t["type"] for t in texts]
        await ws.send_message(CHUNK + b"\x00")
        with trio.fail_after(10):
            while True:
                message = await ws.get_message()
                if isinstance(message, str) and orjson.loads(message)["type"] == "error":
                    assert orjson.loads(message)["error"]["code"] == CODE_PARTIAL_SAMPLE
                    break


async def test_the_relay_answers_realtime_when_the_path_is_off(
    nursery: trio.Nursery, simulator: RunningSimulator
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, binary_audio_enabled=False)
    protocols = ["realtime", AUDIO_SUBPROTOCOL, f"openai-insecure-api-key.{CLIENT_KEY}"]
    async with open_ws(
        f"{relay.ws_base}/realtime?model=gpt-realtime", subprotocols=protocols
    ) as ws:
        assert ws.subprotocol == "realtime"
        with trio.fail_after(10):
            first = await ws.get_message()
        assert isinstance(first, str)
        assert orjson.loads(first)["type"] == "session.created"


async def test_one_binary_frame_per_read_is_charged_to_the_rate_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The one-frame fast path (a read holding exactly one binary frame) pays like any frame."""
    relayed = audio_session(client_max_frames_per_s=10, client_frame_burst=3)

    async def scenario(relayed: Relayed) -> None:
        for _ in range(4):  # one write per frame: each read is one whole frame
            await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK))
            await trio.sleep(0.001)
        await wait_until(lambda: relayed.session.ended.is_set())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.upstream.serve)
        nursery.start_soon(relayed.client.serve)
        nursery.start_soon(scenario, relayed)
        ending = await relayed.session.run()
        nursery.cancel_scope.cancel()
    assert ending.kind.name == "RATE_LIMITED"
    assert relayed.upstream.texts == [binary_audio.append_event(CHUNK)] * 3


async def test_the_tap_still_counts_usage_on_the_binary_path(
    autojump_clock: trio.testing.MockClock,
) -> None:
    done = orjson.dumps(
        {"type": "response.done", "response": {"usage": {"total_tokens": 42, "input_tokens": 40}}}
    )

    async def scenario(relayed: Relayed) -> None:
        await relayed.upstream.ws.send_text(done)  # alone in its read: the one-frame path
        await relayed.upstream.ws.send_raw(  # and in a run with a delta
            frames.encode_frame(OP_TEXT, done) + frames.encode_frame(OP_TEXT, delta(b"\x01\x00"))
        )
        await wait_until(lambda: len(relayed.client.messages) == 4)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.session.stats.tap.usage.total_tokens == 84
    assert [m for m in relayed.client.messages if m[0] == OP_BINARY] == [(OP_BINARY, b"\x01\x00")]


async def test_one_binary_frame_alone_under_the_lock_is_an_append(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = SessionLock({"instructions": "locked"})

    async def scenario(relayed: Relayed) -> None:
        await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK))
        await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK[:3]))  # odd: refused
        await wait_until(lambda: len(relayed.upstream.texts) == 1 and relayed.client.texts != [])

    relayed = audio_session(lock=lock)
    await run_with_peers(relayed, scenario)
    assert relayed.upstream.texts == [binary_audio.append_event(CHUNK)]
    assert relayed.client.error_codes() == [CODE_PARTIAL_SAMPLE]


# ---------------------------------------------------------------- adverse peers, binary path


async def test_a_client_that_never_reads_converted_audio_is_ended_by_its_pong_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The binary down pump writes converted frames under the same backpressure: a
    client that never reads stops it, and the dead-peer deadline ends the session."""
    session_limits = limits(max_session_s=5, ping_interval_s=0.2, pong_timeout_s=0.5)
    relayed = relayed_session(
        session_limits, to_client_bytes=TIGHT_BYTES, binary_audio_max_message_bytes=LIMIT
    )

    async def keep_sending_deltas() -> None:
        try:
            while True:
                await relayed.upstream.ws.send_text(delta(CHUNK))
                await trio.sleep(0.01)
        except (TransportClosed, ConnectionClosed):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.upstream.serve)
        nursery.start_soon(keep_sending_deltas)
        started = trio.current_time()
        with trio.fail_after(0.7 + session_limits.close_timeout_s):
            ending = await relayed.session.run()
        nursery.cancel_scope.cancel()
    assert ending == Ending(EndKind.DEAD_PEER, Side.CLIENT)
    assert relayed.session.stats.messages_down > 0  # audio went until the pipe filled
    assert trio.current_time() - started <= 0.7 + session_limits.close_timeout_s


async def test_an_upstream_that_refuses_writes_stops_binary_audio_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Binary audio up, an upstream whose socket takes nothing more: the appends wait,
    the client's frames are not read ahead without bound, the session ends in time."""
    session_limits = limits(max_session_s=2, ping_interval_s=0.2, pong_timeout_s=5)
    relayed = relayed_session(
        session_limits, to_upstream_bytes=TIGHT_BYTES, binary_audio_max_message_bytes=LIMIT
    )

    async def keep_sending_audio() -> None:
        try:
            while True:
                await relayed.client.stream.send_all(masked(OP_BINARY, CHUNK))
                await trio.sleep(0.001)
        except (TransportClosed, ConnectionClosed):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.client.serve)  # the client reads; the upstream never does
        nursery.start_soon(keep_sending_audio)
        with trio.fail_after(2.0 + session_limits.close_timeout_s + 0.1):
            ending = await relayed.session.run()
        nursery.cancel_scope.cancel()
    assert ending == Ending(EndKind.SESSION_EXPIRED)
    # What went up is bounded by the upstream pipe, not by what the client sent.
    assert relayed.session.upstream.bytes_sent <= 2 * TIGHT_BYTES + 2 * LIMIT


async def test_a_delta_trickled_an_octet_at_a_time_still_becomes_binary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def scenario(relayed: Relayed) -> None:
        await relayed.upstream.trickle(
            frames.encode_frame(OP_TEXT, delta(CHUNK[:64])), every_s=0.001
        )
        await wait_until(lambda: len(relayed.client.messages) == 2)

    relayed = audio_session()
    await run_with_peers(relayed, scenario)
    assert relayed.client.messages == [
        (OP_TEXT, binary_audio.start_marker("resp_1", "item_1", 0, 0)),
        (OP_BINARY, CHUNK[:64]),
    ]
