"""Per-session client rate limits (issue 10, finding 14), over real sockets."""

from __future__ import annotations

import pytest
import trio

from relay.protocol import frames
from tests.conftest import CLIENT_KEY, start_relay
from tests.test_lock_attacks import MODEL, Locked, locked
from tests.wire import RawClient, RecordingUpstream, error_codes, masked, text

__all__ = ["locked"]  # the fixture, shared with the lock attack tests

#: Far more tiny frames than the default burst (5000 frames) allows at once.
FLOOD_FRAMES = 20_000
APPEND = b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 1280 + b'"}'


async def flood_until_closed(client: RawClient) -> tuple[list[dict[str, object]], int, str]:
    # Pings are control frames: they count like any other frame.
    await client.send(masked(frames.OP_PING, b"x") * FLOOD_FRAMES)
    with trio.fail_after(20):
        events, closed = await client.until_closed()
    return events, closed.code, closed.reason


@pytest.mark.parametrize("kind", ["plain", "locked"])
async def test_flood_of_tiny_frames_is_cut_off(
    nursery: trio.Nursery, locked: Locked, kind: str
) -> None:
    if kind == "locked":
        client, leg = await locked.connect()
    else:
        upstream = RecordingUpstream()
        await upstream.start(nursery)
        relay = await start_relay(nursery, upstream.ws_base)
        client = await RawClient.connect(relay.port, f"/v1/realtime?model={MODEL}", CLIENT_KEY)
        locked.clients.append(client)  # closed with the fixture
        leg = await upstream.leg()
    events, code, reason = await flood_until_closed(client)
    assert error_codes(events) == ["rate_limit_exceeded"]
    assert (code, reason) == (1008, "rate_limit_exceeded")
    with trio.fail_after(10):
        await leg.wait_for(lambda: leg.ended)


async def test_real_time_client_is_untouched_under_a_tight_limit(nursery: trio.Nursery) -> None:
    upstream = RecordingUpstream()
    await upstream.start(nursery)
    # 100 frames/s with a burst of 20: a client at real-time pace (50 appends/s) stays
    # under it, a burst of 200 frames does not.
    relay = await start_relay(
        nursery, upstream.ws_base, client_max_frames_per_s=100, client_frame_burst=20
    )
    client = await RawClient.connect(relay.port, f"/v1/realtime?model={MODEL}", CLIENT_KEY)
    try:
        leg = await upstream.leg()
        for _ in range(50):  # one second of 20 ms audio chunks, paced as a microphone is
            await client.send(text(APPEND))
            await trio.sleep(0.02)
        with trio.fail_after(10):
            await leg.wait_for(lambda: len(leg.messages) == 50)
        assert not leg.ended
        assert all(m == APPEND for m in leg.messages)
        await client.send(text(APPEND) * 200)
        with trio.fail_after(10):
            events, closed = await client.until_closed()
        assert (closed.code, closed.reason) == (1008, "rate_limit_exceeded")
        assert error_codes(events) == ["rate_limit_exceeded"]
    finally:
        await client.aclose()
