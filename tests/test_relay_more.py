"""More data-plane behaviour: TLS upstream, dead peers, fragments, backpressure upward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed

from relay.credentials.secret import Secret
from relay.protocol import frames, handshake
from tests.conftest import (
    CLIENT_KEY,
    SIM_KEY,
    RunningRelay,
    close_reason,
    open_raw_session,
    open_ws,
    start_relay,
    start_simulator,
)

MODEL = "gpt-realtime"
BEARER = [("Authorization", f"Bearer {CLIENT_KEY}")]


async def test_wss_upstream_with_verified_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    simulator = await start_simulator(
        nursery, tls_cert_file=str(cert_file), tls_key_file=str(key_file)
    )
    url = f"wss://localhost:{simulator.port}/v1"
    relay = await start_relay(nursery, url, SIM_KEY, upstream_ca_file=str(ca_file))
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=BEARER) as ws:
        assert json.loads(await ws.get_message())["type"] == "session.created"
        # Large messages cross the TLS leg too.
        big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 400_000})
        await ws.send_message(big)
        await ws.send_message('{"type":"input_audio_buffer.clear"}')
        while json.loads(await ws.get_message())["type"] != "input_audio_buffer.cleared":
            pass
    # Without the private CA the upstream's certificate is refused: 502, no session.
    untrusted = await start_relay(nursery, url, SIM_KEY)
    from tests.conftest import raw_handshake

    answer = await raw_handshake(untrusted.port, f"/v1/realtime?model={MODEL}", BEARER)
    assert answer.status == 502


async def test_the_second_wss_session_resumes_the_first_tls_session(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full TLS handshake per session is most of a wss:// session's cost: the next
    dial resumes the last session the upstream gave a ticket for."""
    from relay.dataplane import upstream as upstream_module

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    simulator = await start_simulator(
        nursery, tls_cert_file=str(cert_file), tls_key_file=str(key_file)
    )
    resumed: list[bool] = []
    remember = upstream_module.TlsResumption.remember

    def watching(self: upstream_module.TlsResumption, transport: Any) -> None:
        resumed.append(transport.sock.session_reused)
        remember(self, transport)

    monkeypatch.setattr(upstream_module.TlsResumption, "remember", watching)
    url = f"wss://localhost:{simulator.port}/v1"
    relay = await start_relay(nursery, url, SIM_KEY, upstream_ca_file=str(ca_file))
    for _ in range(2):
        async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=BEARER) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
    assert resumed == [False, True]
    assert relay.server.router.table.upstreams[0].resumption.session is not None


async def test_dead_upstream_detected_by_ping_deadline(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery)
    relay = await start_relay(nursery, simulator.ws_base, ping_interval_s=0.2, pong_timeout_s=0.4)
    url = f"{relay.ws_base}/realtime?model={MODEL}&sim_fault=stall"
    async with open_ws(url, extra_headers=BEARER) as ws:
        assert json.loads(await ws.get_message())["type"] == "session.created"
        with trio.fail_after(10):
            error = json.loads(await ws.get_message())
        assert error["error"]["code"] == "upstream_timeout"
        with pytest.raises(ConnectionClosed) as info:
            await ws.get_message()
    assert close_reason(info.value).code == 1011


async def test_client_that_sends_a_partial_head_gets_408(nursery: trio.Nursery) -> None:
    simulator = await start_simulator(nursery)
    relay = await start_relay(nursery, simulator.ws_base, handshake_timeout_s=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    async with stream:
        await stream.send_all(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\n")
        with trio.fail_after(5):
            answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 408")


async def test_fragmented_messages_pass_through(relay: RunningRelay) -> None:
    stream, reader = await open_raw_session(relay.port, f"model={MODEL}&sim_mode=raw-echo")
    async with stream:
        key = b"\x01\x02\x03\x04"
        parts = [b'{"type":"x.frag",', b'"n":1,', b'"end":true}']
        wire = frames.encode_frame(frames.OP_TEXT, parts[0], fin=False, mask_key=key)
        wire += frames.encode_frame(frames.OP_PING, b"mid", mask_key=key)  # control in between
        wire += frames.encode_frame(frames.OP_CONTINUATION, parts[1], fin=False, mask_key=key)
        wire += frames.encode_frame(frames.OP_CONTINUATION, parts[2], mask_key=key)
        await stream.send_all(wire)
        got: list[bytes] = []
        pong = False
        with trio.fail_after(5):
            while len(got) < 3:
                event = reader.next_event()
                if event is None:
                    reader.feed(await stream.receive_some(65536))
                    continue
                assert isinstance(event, frames.Frame)
                if event.opcode == frames.OP_PONG:
                    pong = event.payload() == b"mid"
                    continue
                got.append(event.payload())
        assert b"".join(got) == b"".join(parts)
        assert pong  # the relay answered the ping on the client's own leg


async def test_upstream_that_stops_reading_keeps_relay_memory_bounded(
    nursery: trio.Nursery,
) -> None:
    simulator = await start_simulator(nursery)
    relay = await start_relay(nursery, simulator.ws_base)
    stream, _ = await open_raw_session(
        relay.port, f"model={MODEL}&sim_fault=stall", receive_buffer_bytes=16 * 1024
    )
    async with stream:
        append = frames.encode_frame(
            frames.OP_TEXT,
            b'{"type":"input_audio_buffer.append","audio":"' + b"A" * 64_000 + b'"}',
            mask_key=b"abcd",
        )
        sent = 0
        # Keep writing until the kernel refuses more: the relay stopped reading us.
        with trio.move_on_after(3):
            while sent < 400:
                await stream.send_all(append)
                sent += 1
        assert sent < 400, "the relay kept reading although the upstream stopped"
        (session,) = relay.server.sessions.values()
        from relay.net.transport import RECEIVE_BYTES
        from relay.protocol.frames import WHOLE_FRAME_MAX_BYTES

        held = session.client.reader.buffered_bytes + session.upstream.reader.buffered_bytes
        assert held <= 2 * (RECEIVE_BYTES + WHOLE_FRAME_MAX_BYTES)


def test_client_address_trusts_only_configured_proxies() -> None:
    from relay.config import ServeConfig
    from relay.server import RelayServer

    def head(*lines: str) -> handshake.RequestHead:
        raw = "\r\n".join(["GET /v1/realtime HTTP/1.1", "Host: x", *lines]) + "\r\n\r\n"
        parsed = handshake.parse_request_head(raw.encode())
        assert parsed is not None
        return parsed

    server = RelayServer(
        ServeConfig(
            trusted_proxies=("10.0.0.1", "10.0.0.2"),
            client_keys=(Secret("k"),),
            upstream_url="ws://127.0.0.1:1/v1",
            upstream_api_key=Secret("sk-x"),
        )
    )
    spoofed = head("X-Forwarded-For: 6.6.6.6")
    assert server.client_address(spoofed, ("203.0.113.9", 5000)) == "203.0.113.9"
    via_nginx = head("X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.0.0.2")
    assert server.client_address(via_nginx, ("10.0.0.1", 5000)) == "198.51.100.7"
    real_ip = head("X-Real-IP: 198.51.100.8")
    assert server.client_address(real_ip, ("10.0.0.1", 5000)) == "198.51.100.8"
