"""The session shell over in-memory legs, on a virtual clock, against adverse peers (issue 11).

Every session here runs between two :class:`tests.doubles.Peer` far ends over
bounded in-memory pipes; no socket, no real sleep. The deadlines the README
promises (``max_session_s``, ``idle_timeout_s``, ``pong_timeout_s``) must hold
in exactly the slow-peer cases they exist for, and a failed write must be blamed
on the leg it failed on.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.dataplane.lock import SessionLock
from relay.dataplane.policy import Ending, EndKind, Side, plan_close
from relay.net.transport import TransportClosed
from relay.net.websocket import ConnectionClosed
from relay.protocol.frames import WHOLE_FRAME_MAX_BYTES
from tests.doubles import TIGHT_BYTES, Peer, limits, masked_text, relayed_session, wait_until

DELTA = b'{"type":"response.output_audio.delta","delta":"' + b"A" * 8192 + b'"}'
APPEND = b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 4096 + b'"}'
BIG_APPEND = b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 100_000 + b'"}'
CLEAR = b'{"type":"input_audio_buffer.clear"}'


async def keep_sending(peer: Peer, message: bytes, every_s: float) -> None:
    """Send ``message`` every ``every_s`` until the connection ends."""
    try:
        while True:
            await peer.send_text(message)
            await trio.sleep(every_s)
    except (TransportClosed, ConnectionClosed):
        pass


async def trickle(peer: Peer, wire: bytes, every_s: float) -> None:
    """One frame, one octet per write, holding the peer's write lock (it is one frame)."""
    try:
        async with peer.ws.lock_for_frame():
            await peer.trickle(wire, every_s=every_s)
    except TransportClosed:
        pass


# ---------------------------------------------------------------- a client that never reads


@pytest.mark.parametrize(
    ("overrides", "expected", "ends_by"),
    [
        # The numbers: the client's ping cannot be written, so 0.5 s later it is dead.
        (
            {"max_session_s": 2, "ping_interval_s": 0.2, "pong_timeout_s": 0.5},
            Ending(EndKind.DEAD_PEER, Side.CLIENT),
            0.7,
        ),
        (
            {"max_session_s": 2, "ping_interval_s": 0.2, "pong_timeout_s": 5},
            Ending(EndKind.SESSION_EXPIRED),
            2.0,
        ),
        (
            {"idle_timeout_s": 1, "ping_interval_s": 0.2, "pong_timeout_s": 5},
            Ending(EndKind.IDLE_TIMEOUT),
            1.6,
        ),
    ],
    ids=["pong_timeout", "max_session", "idle_timeout"],
)
async def test_a_client_that_never_reads_is_ended_by_its_deadline(
    autojump_clock: trio.testing.MockClock,
    overrides: dict[str, float],
    expected: Ending,
    ends_by: float,
) -> None:
    session_limits = limits(**overrides)
    relayed = relayed_session(session_limits, to_client_bytes=TIGHT_BYTES)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.upstream.serve)
        nursery.start_soon(keep_sending, relayed.upstream, DELTA, 0.01)
        started = trio.current_time()
        with trio.fail_after(ends_by + session_limits.close_timeout_s):
            ending = await relayed.session.run()
        assert ending == expected
        # Its socket cannot take the error event: the connection is dropped.
        assert relayed.session.client.transport.closed
        # The upstream is told as the close table says.
        with trio.fail_after(5):
            await relayed.upstream.gone.wait()
        assert relayed.upstream.closed_with is not None
        assert relayed.upstream.closed_with[0] == plan_close(expected).upstream.code
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started <= ends_by + session_limits.close_timeout_s


# ---------------------------------------------------------------- an upstream that refuses writes


@pytest.mark.parametrize(
    ("overrides", "expected", "error_code", "ends_by"),
    [
        # A stalled upstream stops answering pings too: a dead peer, retryable 1011.
        (
            {"max_session_s": 2, "ping_interval_s": 0.2, "pong_timeout_s": 0.5},
            Ending(EndKind.DEAD_PEER, Side.UPSTREAM),
            "upstream_timeout",
            0.7,
        ),
        (
            {"max_session_s": 2, "ping_interval_s": 0.2, "pong_timeout_s": 5},
            Ending(EndKind.SESSION_EXPIRED),
            "session_expired",
            2.0,
        ),
    ],
    ids=["pong_timeout", "max_session"],
)
async def test_a_stalled_upstream_while_the_client_streams_audio(
    autojump_clock: trio.testing.MockClock,
    overrides: dict[str, float],
    expected: Ending,
    error_code: str,
    ends_by: float,
) -> None:
    session_limits = limits(**overrides)
    # The upstream never reads: its pipe fills, and the relay's writes to it block.
    relayed = relayed_session(session_limits, to_upstream_bytes=TIGHT_BYTES)
    client = relayed.client
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.serve)
        # Faster than real time, so the upstream's pipe is full before the first ping.
        nursery.start_soon(keep_sending, client, APPEND, 0.001)
        with trio.fail_after(ends_by + session_limits.close_timeout_s):
            ending = await relayed.session.run()
        assert ending == expected
        with trio.fail_after(5):
            await client.gone.wait()
        nursery.cancel_scope.cancel()
    # The client's socket can take them: the error event, then the close table's code.
    plan = plan_close(expected).client
    assert client.error_codes() == [error_code]
    assert client.closed_with is not None
    assert client.closed_with[0] == plan.code
    assert relayed.session.upstream.transport.closed


@pytest.mark.parametrize("locked", [False, True], ids=["plain", "locked"])
@pytest.mark.parametrize("message", [APPEND, BIG_APPEND], ids=["whole", "cut_through"])
async def test_a_failed_write_to_the_upstream_is_blamed_on_the_upstream(
    autojump_clock: trio.testing.MockClock, locked: bool, message: bytes
) -> None:
    assert (len(message) > WHOLE_FRAME_MAX_BYTES) == (message is BIG_APPEND)
    lock = SessionLock({"instructions": "be brief"}) if locked else None
    relayed = relayed_session(limits(), lock=lock)
    client, upstream = relayed.client, relayed.upstream
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.serve)
        nursery.start_soon(upstream.serve)

        async def run() -> None:
            with trio.fail_after(10):
                endings.append(await relayed.session.run())

        endings: list[Ending] = []
        nursery.start_soon(run)
        await client.send_text(CLEAR)
        await wait_until(lambda: any(b"clear" in text for text in upstream.texts))
        # The upstream stops accepting data (a broken pipe on write); its reads still block.
        upstream.stream.refuse_writes("EPIPE")
        await client.send_text(message)
        with trio.fail_after(10):
            await client.gone.wait()
        await wait_until(lambda: bool(endings))
        nursery.cancel_scope.cancel()
    assert endings == [Ending(EndKind.DROPPED, Side.UPSTREAM)]
    assert client.error_codes() == ["upstream_connection_lost"]
    assert client.closed_with is not None
    assert client.closed_with[0] == 1011


# ---------------------------------------------------------------- a frame trickled byte by byte


async def test_a_frame_trickled_byte_by_byte_cannot_outlive_max_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cut-through frame holds the upstream's write lock while its bytes trickle in."""
    session_limits = limits(max_session_s=2, ping_interval_s=0.5, pong_timeout_s=10)
    relayed = relayed_session(session_limits)
    client, upstream = relayed.client, relayed.upstream
    # Its pongs would wait behind the trickled frame; the pong deadline is beyond the test.
    client.answer_pings = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.serve)
        nursery.start_soon(upstream.serve)
        nursery.start_soon(trickle, client, masked_text(BIG_APPEND), 0.05)
        with trio.fail_after(2 + session_limits.close_timeout_s):
            ending = await relayed.session.run()
        with trio.fail_after(5):
            await client.gone.wait()
        nursery.cancel_scope.cancel()
    assert ending == Ending(EndKind.SESSION_EXPIRED)
    assert client.error_codes() == ["session_expired"]
    assert client.closed_with is not None
    assert client.closed_with[0] == 1008
    # The upstream was mid-frame: it gets no close frame (it would land in the payload).
    assert upstream.closed_with is None
    assert relayed.session.upstream.transport.closed


# ---------------------------------------------------------------- an idle session sleeps


class _CountSteps(trio.abc.Instrument):
    def __init__(self, name_part: str) -> None:
        self.name_part = name_part
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.name_part in task.name:
            self.steps += 1


async def test_an_idle_session_wakes_once_per_ping_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not once a second: 600 s of silence with 20 s pings is about 30 wake-ups of the
    run's timers (the session's clock is a timer there, not a task of its own)."""
    session_limits = limits(idle_timeout_s=600, ping_interval_s=20, pong_timeout_s=20)
    relayed = relayed_session(session_limits)
    counter = _CountSteps("relay timers")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relayed.client.serve)
        nursery.start_soon(relayed.upstream.serve)
        started = trio.current_time()
        trio.lowlevel.add_instrument(counter)
        try:
            with trio.fail_after(700):
                ending = await relayed.session.run()
        finally:
            trio.lowlevel.remove_instrument(counter)
        nursery.cancel_scope.cancel()
    assert ending == Ending(EndKind.IDLE_TIMEOUT)
    assert 600 <= trio.current_time() - started <= 600 + 20 + session_limits.close_timeout_s
    assert 0 < counter.steps <= 600 / 20 + 5
