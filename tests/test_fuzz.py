"""In-process fuzzing of the real server object (issue 10): whatever a client or an
upstream sends, no exception escapes a connection, every answer is well formed, and
the relay keeps serving.

Three surfaces: request heads (arbitrary bytes, and well-formed heads whose header
values are any bytes) fed to :meth:`RelayServer.serve_connection` over a real loopback
socket; arbitrary frame bytes from a client after a real handshake; arbitrary JSON
(``response.done`` usage of every shape included) and arbitrary text from an upstream.

One stack (simulator, scripted upstream, two relays) runs in a Trio loop on a
background thread for the whole module; each example is plain blocking socket I/O
against it, so hundreds of examples cost seconds, not a stack start each.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.net.transport import tune_stream_socket
from relay.protocol import frames, handshake
from relay.server import RelayServer
from tests.conftest import CLIENT_KEY, start_relay, start_simulator
from tests.scripted_upstream import ScriptedUpstream, start_scripted_upstream

MODEL = "gpt-realtime"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: Close codes the relay's close table can give a client (plus the upstream's 1000 here).
CLIENT_CLOSE_CODES = {1000, 1001, 1002, 1007, 1008, 1009, 1011}
#: Bound on one example's socket I/O.
EXAMPLE_TIMEOUT_S = 15.0


@dataclass
class Stack:
    token: trio.lowlevel.TrioToken
    relay: RelayServer
    relay_port: int
    scripted: ScriptedUpstream
    scripted_relay: RelayServer
    scripted_relay_port: int

    def metrics(self, server: RelayServer) -> str:
        return trio.from_thread.run_sync(
            lambda: server.metrics.render().decode(), trio_token=self.token
        )

    def live_sessions(self, server: RelayServer) -> int:
        return trio.from_thread.run_sync(lambda: len(server.sessions), trio_token=self.token)

    def wait_no_sessions(self, server: RelayServer) -> None:
        async def wait() -> None:
            with trio.fail_after(EXAMPLE_TIMEOUT_S):
                while server.sessions:
                    await trio.sleep(0.005)

        trio.from_thread.run(wait, trio_token=self.token)

    def healthy(self, port: int) -> bool:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    ready: list[Stack] = []
    started = threading.Event()
    stop = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            simulator = await start_simulator(nursery)
            relay = await start_relay(nursery, simulator.ws_base)
            scripted = await start_scripted_upstream(nursery)
            scripted_relay = await start_relay(nursery, scripted.ws_base)
            ready.append(
                Stack(
                    trio.lowlevel.current_trio_token(),
                    relay.server,
                    relay.port,
                    scripted,
                    scripted_relay.server,
                    scripted_relay.port,
                )
            )
            started.set()
            while not stop.is_set():
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported by the fixture's teardown
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=run, name="fuzz-stack", daemon=True)
    thread.start()
    assert started.wait(30)
    if failure:
        raise failure[0]
    yield ready[0]
    stop.set()
    thread.join(30)
    assert not failure, failure


def connected_pair() -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """A real TCP connection on loopback: (client end, server end, client address)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, peer = listener.accept()
    tune_stream_socket(server)
    client.settimeout(EXAMPLE_TIMEOUT_S)
    return client, server, (str(peer[0]), int(peer[1]))


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def open_session(port: int, extra: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=EXAMPLE_TIMEOUT_S)
    sock.sendall(
        handshake.upgrade_request(
            host_header="127.0.0.1",
            target=f"/v1/realtime?model={MODEL}",
            key=handshake.new_websocket_key(),
            headers=[("Authorization", f"Bearer {CLIENT_KEY}")],
        )
        + extra
    )
    return sock


def assert_well_formed_answer(data: bytes) -> None:
    """Nothing, a 101, or one HTTP answer with OpenAI's error envelope."""
    if not data:
        return
    response = handshake.parse_response_head(data)
    assert response is not None, data[:120]
    if response.status < 400:
        return
    assert response.status < 600, response.status
    body = response.trailing[: response.content_length]
    if response.header(b"content-type") == "application/json":
        assert set(orjson.loads(body)["error"]) == {"message", "type", "param", "code"}


def head_from(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


UPGRADE_HEADERS = [
    (b"Upgrade", b"websocket"),
    (b"Connection", b"Upgrade"),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Authorization", b"Bearer " + CLIENT_KEY.encode()),
]
header_names = st.sampled_from(
    [
        b"Sec-WebSocket-Key",
        b"Sec-WebSocket-Version",
        b"Sec-WebSocket-Protocol",
        b"Authorization",
        b"api-key",
        b"Origin",
        b"OpenAI-Beta",
        b"Upgrade",
        b"Connection",
        b"Content-Length",
        b"Transfer-Encoding",
        b"X-Forwarded-For",
        b"X-Real-IP",
    ]
)
#: Any bytes; and bytes h11 lets through (visible ASCII and obs-text), so the relay's own
#: header checks see junk too rather than h11 refusing nearly every example first.
any_header_value = st.one_of(
    st.binary(max_size=80).map(lambda v: v.replace(b"\r", b"").replace(b"\n", b"")),
    st.lists(st.integers(0x21, 0xFF).filter(lambda b: b != 0x7F), max_size=40).map(bytes),
)


def _upgrade_headers(choices: list[tuple[int, bytes]]) -> list[tuple[bytes, bytes]]:
    """The valid upgrade headers, each kept (0), dropped (1) or given any bytes (2)."""
    out: list[tuple[bytes, bytes]] = []
    for (name, value), (choice, junk) in zip(UPGRADE_HEADERS, choices, strict=True):
        if choice == 0:
            out.append((name, value))
        elif choice == 2:
            out.append((name, junk))
    return out


upgrade_headers = st.lists(
    st.tuples(st.sampled_from([0, 0, 1, 2]), any_header_value),
    min_size=len(UPGRADE_HEADERS),
    max_size=len(UPGRADE_HEADERS),
).map(_upgrade_headers)
structured_heads = st.builds(
    head_from,
    st.sampled_from([b"GET", b"GET", b"GET", b"POST", b"PUT", b"OPTIONS"]),
    st.sampled_from(
        [
            b"/v1/realtime?model=gpt-realtime",
            b"/v1/realtime?model=gpt-realtime",
            b"/realtime",
            b"/v1/realtime?model=a&model=b",
            b"/healthz",
            b"/readyz",
            b"/v1/realtime/client_secrets",
            b"/metrics",
            b"/admin/sessions",
            b"/nope",
        ]
    ),
    st.tuples(upgrade_headers, st.lists(st.tuples(header_names, any_header_value), max_size=4)).map(
        lambda parts: parts[0] + parts[1]
    ),
)


#: Realtime upgrades where only the upgrade headers vary: where the handshake checks run.
realtime_heads = st.builds(
    head_from,
    st.just(b"GET"),
    st.just(b"/v1/realtime?model=gpt-realtime"),
    st.tuples(upgrade_headers, st.lists(st.tuples(header_names, any_header_value), max_size=2)).map(
        lambda parts: parts[0] + parts[1]
    ),
)


def _one_header_replaced(index: int, value: bytes) -> bytes:
    headers = list(UPGRADE_HEADERS)
    headers[index] = (headers[index][0], value)
    return head_from(b"GET", b"/v1/realtime?model=gpt-realtime", headers)


#: A valid upgrade with exactly one of its headers replaced by junk: each check in turn.
one_bad_header_heads = st.builds(
    _one_header_replaced, st.integers(0, len(UPGRADE_HEADERS) - 1), any_header_value
)


@settings(FUZZ, max_examples=400)
@given(st.one_of(st.binary(max_size=2000), structured_heads, realtime_heads, one_bad_header_heads))
def test_any_request_head_gets_a_clean_answer(stack: Stack, request: bytes) -> None:
    client, server, peer = connected_pair()
    try:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)

        async def serve() -> None:
            with trio.fail_after(EXAMPLE_TIMEOUT_S):
                await stack.relay.serve_connection(server, peer)  # must not raise

        trio.from_thread.run(serve, trio_token=stack.token)
        answer = read_to_end(client)
    finally:
        client.close()
        server.close()
    assert_well_formed_answer(answer)
    assert 'kind="connection_internal_error"' not in stack.metrics(stack.relay)


frame_bytes = st.one_of(
    st.binary(max_size=600),
    st.lists(
        st.builds(
            lambda op, payload, fin, masked: frames.encode_frame(
                op, payload, fin=fin, mask_key=b"\x01\x02\x03\x04" if masked else None
            ),
            st.sampled_from([0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xF]),
            st.binary(max_size=200),
            st.booleans(),
            st.booleans(),  # unmasked client frames too: 1002
        ),
        max_size=8,
    ).map(b"".join),
)


@FUZZ
@given(frame_bytes)
def test_any_client_frames_end_cleanly(stack: Stack, data: bytes) -> None:
    with open_session(stack.relay_port, data) as sock:
        sock.shutdown(socket.SHUT_WR)
        received = read_to_end(sock)
    assert received.startswith(b"HTTP/1.1 101")
    reader = frames.FrameReader(expect_masked=False, max_message_bytes=1 << 26)
    reader.feed(received[received.index(b"\r\n\r\n") + 4 :])
    while (event := reader.next_event()) is not None:
        if isinstance(event, frames.Frame) and event.opcode == frames.OP_CLOSE:
            code, _ = frames.decode_close_payload(event.payload())
            # A code of the client's own (3000-4999) is echoed to it.
            assert code in CLIENT_CLOSE_CODES | {1005} or 3000 <= code <= 4999
    stack.wait_no_sessions(stack.relay)
    assert 'kind="session_internal_error"' not in stack.metrics(stack.relay)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
token_counts = st.integers(min_value=-(2**70), max_value=2**70)


def usage_of(counts: st.SearchStrategy[Any], details: st.SearchStrategy[Any] | None) -> Any:
    """``response.usage`` shapes whose counts come from ``counts``; ``details``, when
    given, may replace either details object wholesale (any JSON, null...)."""

    def details_of(names: tuple[str, ...]) -> st.SearchStrategy[Any]:
        shaped = st.fixed_dictionaries({}, optional={name: counts for name in names})
        return shaped if details is None else st.one_of(details, shaped)

    return st.fixed_dictionaries(
        {},
        optional={
            "total_tokens": counts,
            "input_tokens": counts,
            "output_tokens": counts,
            "input_token_details": details_of(("text_tokens", "audio_tokens", "cached_tokens")),
            "output_token_details": details_of(("text_tokens", "audio_tokens")),
        },
    )


#: Usage the relay's decoder accepts (every count an integer, any sign or size): the
#: shapes that reach the accounting, so the fuzzer spends its examples there.
well_typed_usage = usage_of(token_counts, None)
#: Anything at all in every position.
usage_shapes = usage_of(st.one_of(token_counts, json_values), json_values)


def _event(kind: str, body: Any) -> bytes:
    # The stdlib encoder: integers past 64 bits must reach the relay too.
    if kind == "response.done":
        body = {"type": kind, "response": {"usage": body}}
    elif kind == "session.created":
        body = {"type": kind, "session": body}
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


upstream_events = st.lists(
    st.one_of(
        st.builds(_event, st.just("response.done"), well_typed_usage),
        st.builds(_event, st.just("response.done"), st.one_of(usage_shapes, json_values)),
        st.builds(_event, st.just("session.created"), json_values),
        st.builds(_event, st.just("other"), json_values),
        st.binary(max_size=100),  # not JSON, maybe not UTF-8: forwarded, never parsed to death
    ),
    max_size=6,
)


@FUZZ
@given(upstream_events)
def test_any_upstream_events_are_relayed_verbatim_and_accounted_safely(
    stack: Stack, events: list[bytes]
) -> None:
    stack.scripted.script = events
    reader = frames.FrameReader(expect_masked=False, max_message_bytes=1 << 26)
    received: list[bytes] = []
    close_code = None
    with open_session(stack.scripted_relay_port) as sock:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        assert data.startswith(b"HTTP/1.1 101")
        reader.feed(data[data.index(b"\r\n\r\n") + 4 :])
        while close_code is None:
            event = reader.next_event()
            if event is None:
                chunk = sock.recv(65536)
                assert chunk
                reader.feed(chunk)
            elif isinstance(event, frames.Frame):
                if event.opcode == frames.OP_CLOSE:
                    close_code = frames.decode_close_payload(event.payload())[0]
                    sock.sendall(
                        frames.encode_frame(frames.OP_CLOSE, event.payload(), mask_key=b"abcd")
                    )
                elif event.opcode == frames.OP_TEXT:
                    received.append(event.payload())
    assert received == events
    assert close_code == 1000
    stack.wait_no_sessions(stack.scripted_relay)
    metrics = stack.metrics(stack.scripted_relay)
    assert "_internal_error" not in metrics
    assert "session_accounting_error" not in metrics
    assert stack.healthy(stack.scripted_relay_port)


def test_the_stack_survived_every_example(stack: Stack) -> None:
    """After all the fuzzing above, both relays still answer."""
    assert stack.healthy(stack.relay_port)
    assert stack.healthy(stack.scripted_relay_port)
