"""Behind a real nginx over wss://, and with the relay terminating TLS itself."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from tests.conftest import CLIENT_KEY, RunningSimulator, start_relay
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


@pytest.fixture
def nginx_for(tmp_path: Path, certificates: Certificates) -> Iterator[object]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed (.ci/run installs it from the distribution)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(relay_port: int) -> Nginx:
        port = free_port()
        access_log = tmp_path / "access.log"
        site = (REPO / "scripts/nginx/relay.conf").read_text()
        site = site.replace("127.0.0.1:8080", f"127.0.0.1:{relay_port}")
        site = site.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
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
        return Nginx(port=port, access_log=access_log)

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


async def test_openai_sdk_over_wss_through_nginx(
    nursery: trio.Nursery,
    simulator: RunningSimulator,
    nginx_for: object,
    certificates: Certificates,
) -> None:
    relay = await start_relay(nursery, simulator.ws_base, trusted_proxies=("127.0.0.1",))
    nginx = nginx_for(relay.port)  # type: ignore[operator]
    await wait_for_port(nginx.port)
    summary = await sdk_voice_turn(
        f"https://localhost:{nginx.port}/v1",
        f"wss://localhost:{nginx.port}/v1",
        CLIENT_KEY,
        ca_file=str(certificates.ca),
    )
    assert summary["types"][0] == "session.created"
    assert summary["types"][-1] == "response.done"
    assert summary["audio_deltas"] > 0
    await trio.sleep(0.3)
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
    import ssl

    import httpx

    context = ssl.create_default_context(cafile=str(certificates.ca))
    async with httpx.AsyncClient(verify=context) as http:
        health = await http.get(f"https://localhost:{relay.port}/healthz")
    assert health.status_code == 200
