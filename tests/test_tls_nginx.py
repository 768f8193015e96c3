"""Behind a real nginx over wss://, and with the relay terminating TLS itself."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from relay.protocol import frames, handshake
from tests.conftest import CLIENT_KEY, RunningRelay, RunningSimulator, start_relay
from tests.doubles import wait_until
from tests.sdk_client import sdk_voice_turn

REPO = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass
class Certificates:
    cert: Path
    key: Path
    ca: Path


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    found = Certificates(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    issued.private_key_pem.write_to_path(str(found.key))
    with found.cert.open("wb") as chain:
        for blob in issued.cert_chain_pems:
            chain.write(blob.bytes())
    ca.cert_pem.write_to_path(str(found.ca))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Nginx:
    port: int
    access_log: Path
    #: The template's internal listener (metrics and admin API).
    internal_port: int


@pytest.fixture
def nginx_for(tmp_path: Path, certificates: Certificates) -> Iterator[object]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (.ci/run installs it from the distribution)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(relay_port: int) -> Nginx:
        port, internal_port = free_port(), free_port()
        access_log = tmp_path / "access.log"
        # The shipped file, adapted only for ports, certificates and paths.
        site = (REPO / "scripts/nginx/relay.conf").read_text()
        site = site.replace("127.0.0.1:8080", f"127.0.0.1:{relay_port}")
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        site = site.replace("listen 127.0.0.1:9180;", f"listen 127.0.0.1:{internal_port};")
        site = site.replace("/etc/relay/tls/fullchain.pem", str(certificates.cert))
        site = site.replace("/etc/relay/tls/privkey.pem", str(certificates.key))
        site = site.replace("/var/log/nginx/relay_access.log", str(access_log))
        (tmp_path / "site.conf").write_text(site)
        (tmp_path / "nginx.conf").write_text(
            f"""
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
"""
        )
        process = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        return Nginx(port=port, access_log=access_log, internal_port=internal_port)

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


async def wait_for_port(port: int) -> None:
    with trio.fail_after(15):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def relay_behind_nginx(
    nursery: trio.Nursery, simulator: RunningSimulator, nginx_for: object
) -> tuple[RunningRelay, Nginx]:
    """A relay on the simulator, and the shipped template's nginx in front of it."""
    relay = await start_relay(nursery, simulator.ws_base, trusted_proxies=("127.0.0.1",))
    nginx: Nginx = nginx_for(relay.port)  # type: ignore[operator]
    await wait_for_port(nginx.port)
    return relay, nginx


@pytest.mark.slow  # a real nginx
async def test_openai_sdk_over_wss_through_nginx(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    nginx_for: object,
    certificates: Certificates,
) -> None:
    _relay, nginx = await relay_behind_nginx(nursery, simulator, nginx_for)
    summary = await sdk_voice_turn(
        f"https://localhost:{nginx.port}/v1",
        f"wss://localhost:{nginx.port}/v1",
        CLIENT_KEY,
        ca_file=str(certificates.ca),
    )
    assert summary["types"][0] == "session.created"
    assert summary["types"][-1] == "response.done"
    assert summary["audio_deltas"] > 0
    # nginx writes the access line when the upgraded connection ends.
    log_file = nginx.access_log
    await wait_until(lambda: log_file.exists() and "GET /v1/realtime" in log_file.read_text())
    log = nginx.access_log.read_text()
    assert "GET /v1/realtime HTTP/1.1" in log  # the upgrade went through nginx
    assert "model=" not in log  # no query strings on disk
    assert CLIENT_KEY not in log


async def test_relay_terminates_tls_itself(
    nursery: trio.Nursery, simulator: RunningSimulator, certificates: Certificates
) -> None:
    relay = await start_relay(
        nursery,
        simulator.ws_base,
        tls_cert_file=str(certificates.cert),
        tls_key_file=str(certificates.key),
    )
    summary = await sdk_voice_turn(
        f"https://localhost:{relay.port}/v1",
        f"wss://localhost:{relay.port}/v1",
        CLIENT_KEY,
        ca_file=str(certificates.ca),
    )
    assert summary["types"][-1] == "response.done"
    # The control plane is served over the same TLS port.
    context = ssl.create_default_context(cafile=str(certificates.ca))
    async with httpx.AsyncClient(verify=context) as http:
        health = await http.get(f"https://localhost:{relay.port}/healthz")
    assert health.status_code == 200


# ------------------------------------------------- the shipped template under load

UPGRADES = 1000
UPGRADE_WORKERS = 4
HEALTH_INTERVAL_S = 0.1


async def _read_exactly(stream: trio.abc.Stream, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError(f"closed with {len(buffer)} of {size} bytes")
        buffer += chunk
    data = bytes(buffer[:size])
    del buffer[:size]
    return data


async def wss_first_event(port: int, context: ssl.SSLContext) -> str:
    """One real WebSocket handshake through nginx; the answer's status, or the first event."""
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    async with stream:
        await stream.send_all(
            handshake.upgrade_request(
                host_header=f"localhost:{port}",
                target="/v1/realtime?model=gpt-realtime",
                key=handshake.new_websocket_key(),
                headers=[("Authorization", f"Bearer {CLIENT_KEY}")],
            )
        )
        buffer = bytearray()
        while (end := buffer.find(b"\r\n\r\n")) < 0:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return "closed before an answer"
            buffer += chunk
        status_line = bytes(buffer[: buffer.find(b"\r\n")]).decode("latin-1")
        if not status_line.startswith("HTTP/1.1 101 "):
            return status_line
        del buffer[: end + 4]
        _, second = await _read_exactly(stream, buffer, 2)
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await _read_exactly(stream, buffer, 2), "big")
        elif size == 127:
            size = int.from_bytes(await _read_exactly(stream, buffer, 8), "big")
        event = json.loads(await _read_exactly(stream, buffer, size))
        await stream.send_all(
            frames.encode_frame(
                0x8, frames.encode_close_payload(1000), mask_key=b"\x01\x02\x03\x04"
            )
        )
        return str(event["type"])


@pytest.mark.slow  # a real nginx
async def test_shipped_nginx_template_never_sends_an_upgrade_to_the_control_plane(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    nginx_for: object,
    certificates: Certificates,
) -> None:
    _relay, nginx = await relay_behind_nginx(nursery, simulator, nginx_for)
    context = ssl.create_default_context(cafile=str(certificates.ca))
    outcomes: Counter[str] = Counter()
    health: Counter[int] = Counter()
    attempted = 0
    done = trio.Event()

    async def health_checks() -> None:
        # A load balancer's probe through nginx, every 100 ms, for the whole run.
        async with httpx.AsyncClient(verify=context, timeout=5) as http:
            while not done.is_set():
                answer = await http.get(f"https://localhost:{nginx.port}/readyz")
                health[answer.status_code] += 1
                with trio.move_on_after(HEALTH_INTERVAL_S):
                    await done.wait()

    async def upgrades() -> None:
        nonlocal attempted
        while attempted < UPGRADES:
            attempted += 1
            try:
                with trio.fail_after(10):
                    outcomes[await wss_first_event(nginx.port, context)] += 1
            except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError) as exc:
                outcomes[type(exc).__name__] += 1

    started = trio.current_time()
    with trio.fail_after(240):  # bounded: 1,000 upgrades take ~10-30 s on 2 cores
        async with trio.open_nursery() as load:
            load.start_soon(health_checks)
            async with trio.open_nursery() as workers:
                for _ in range(UPGRADE_WORKERS):
                    workers.start_soon(upgrades)
            done.set()
    took = trio.current_time() - started
    print(
        f"\nnginx template: {attempted} upgrades, outcomes {dict(outcomes)}, "
        f"{sum(health.values())} health checks {dict(health)}, {took:.1f} s"
    )
    assert attempted == UPGRADES
    assert outcomes == {"session.created": UPGRADES}  # zero failed
    assert set(health) == {200}
    assert sum(health.values()) >= took / HEALTH_INTERVAL_S / 2  # ~one per 100 ms, really


@pytest.mark.slow  # a real nginx
async def test_metrics_and_admin_are_refused_on_the_public_listener(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    nginx_for: object,
    certificates: Certificates,
) -> None:
    relay, nginx = await relay_behind_nginx(nursery, simulator, nginx_for)
    await wait_for_port(nginx.internal_port)
    context = ssl.create_default_context(cafile=str(certificates.ca))
    public = f"https://localhost:{nginx.port}"
    async with httpx.AsyncClient(verify=context) as http:
        for method, path in [
            ("GET", "/metrics"),
            ("GET", "/metrics?format=text"),
            ("GET", "//metrics"),
            ("GET", "/%6Detrics"),
            ("GET", "/admin/sessions"),
            ("POST", "/admin/sessions/abc/end"),
            ("GET", "/admin"),
        ]:
            answer = await http.request(method, public + path)
            assert answer.status_code == 404, (path, answer.status_code)
            assert answer.headers["content-type"].startswith("application/json")
            assert answer.json()["error"]["code"] == "not_found", path
        assert b"relay_" not in (await http.get(public + "/metrics")).content
        # The public control plane still works, and nginx's own refusals are envelopes too.
        assert (await http.get(public + "/healthz")).status_code == 200
        too_big = await http.post(
            public + "/v1/realtime/client_secrets", content=b"x" * (2 * 1024 * 1024)
        )
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "request_too_large"
        # The relay's own 503 (readiness while draining) passes through nginx untouched.
        relay.server.registry.draining = True
        draining = await http.get(public + "/readyz")
        relay.server.registry.draining = False
        assert draining.status_code == 503
        assert draining.json() == {"status": "draining"}
        # The internal listener serves Prometheus.
        scraped = await http.get(f"http://127.0.0.1:{nginx.internal_port}/metrics")
    assert scraped.status_code == 200
    assert b"relay_" in scraped.content


@pytest.mark.slow  # a real nginx
async def test_a_non_ascii_websocket_key_through_nginx_is_400_and_the_relay_lives(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    nginx_for: object,
    certificates: Certificates,
) -> None:
    """Issue 10, finding 1, the way it arrives in production: through the shipped template."""
    _relay, nginx = await relay_behind_nginx(nursery, simulator, nginx_for)
    context = ssl.create_default_context(cafile=str(certificates.ca))
    request = (
        b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: localhost\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: " + b"\xe9" * 24 + b"\r\n\r\n"
    )
    tcp = await trio.open_tcp_stream("127.0.0.1", nginx.port)
    stream = trio.SSLStream(tcp, context, server_hostname="localhost")
    data = b""
    async with stream:
        await stream.send_all(request)
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk
                data += chunk
    assert data.startswith(b"HTTP/1.1 400")
    async with httpx.AsyncClient(verify=context) as http:
        assert (await http.get(f"https://localhost:{nginx.port}/healthz")).status_code == 200
