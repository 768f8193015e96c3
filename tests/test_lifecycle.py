"""The real ``relay serve`` process under signals: drain, hurry, reload, systemd notify."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import open_ws, raw_handshake, read_until_closed
from tests.doubles import wait_until_async

REPO = Path(__file__).resolve().parent.parent
MODEL = "gpt-realtime"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RelayProcess:
    def __init__(
        self,
        tmp: Path,
        toml: str,
        *,
        env: dict[str, str] | None = None,
        simulator: bool = True,
    ) -> None:
        self.port = free_port()
        self.config = tmp / "relay.toml"
        self.config.write_text(toml)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "relay",
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
                *(["--simulator"] if simulator else []),
            ],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def wait_listening(self) -> None:
        with trio.fail_after(20):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)
                    continue
                await stream.aclose()
                return

    async def wait_draining(self) -> None:
        """Until readiness says the relay drains (it took the first stop signal)."""
        async with httpx.AsyncClient() as http:

            async def draining() -> bool:
                answer = await http.get(f"http://127.0.0.1:{self.port}/readyz")
                return answer.status_code == 503

            await wait_until_async(draining)

    async def wait_metric(self, line: str) -> None:
        """Until ``/metrics`` shows ``line`` (e.g. a counter reaching a value)."""
        async with httpx.AsyncClient() as http:

            async def shown() -> bool:
                answer = await http.get(f"http://127.0.0.1:{self.port}/metrics")
                return line in answer.text

            await wait_until_async(shown)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait_exit(self, timeout_s: float = 20) -> int:
        with trio.fail_after(timeout_s):
            while self.process.poll() is None:
                await trio.sleep(0.05)
        return self.process.returncode

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


Spawn = Callable[..., RelayProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    started: list[RelayProcess] = []

    def start(
        toml: str, *, env: dict[str, str] | None = None, simulator: bool = True
    ) -> RelayProcess:
        process = RelayProcess(tmp_path, toml, env=env, simulator=simulator)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


async def test_sigterm_drains_then_closes_1001_and_exits_0(spawn: Spawn) -> None:
    relay = spawn('[serve]\nclient_keys = ["k1"]\ndrain_timeout_s = 1.5\n')
    await relay.wait_listening()
    url = f"{relay.ws_base}/realtime?model={MODEL}"
    async with (
        open_ws(url, extra_headers=bearer("k1")) as one,
        open_ws(url, extra_headers=bearer("k1")) as two,
    ):
        for ws in (one, two):
            assert json.loads(await ws.get_message())["type"] == "session.created"
        relay.signal(signal.SIGTERM)
        async with httpx.AsyncClient() as http:
            with trio.fail_after(5):
                while (await http.get(f"http://127.0.0.1:{relay.port}/readyz")).status_code != 503:
                    await trio.sleep(0.02)
        refused = await raw_handshake(relay.port, f"/v1/realtime?model={MODEL}", bearer("k1"))
        assert refused.status == 503
        # Still draining: live sessions keep working.
        await one.send_message('{"type":"input_audio_buffer.clear"}')
        while json.loads(await one.get_message())["type"] != "input_audio_buffer.cleared":
            pass
        for ws in (one, two):
            events, closed = await read_until_closed(ws)
            assert events[-1]["type"] == "error"
            assert events[-1]["error"]["code"] == "server_shutdown"
            assert closed.code == 1001
    assert await relay.wait_exit() == 0


async def test_second_signal_ends_sessions_at_once(spawn: Spawn) -> None:
    relay = spawn('[serve]\nclient_keys = ["k1"]\ndrain_timeout_s = 120\n')
    await relay.wait_listening()
    async with open_ws(f"{relay.ws_base}/realtime?model={MODEL}", extra_headers=bearer("k1")) as ws:
        assert json.loads(await ws.get_message())["type"] == "session.created"
        relay.signal(signal.SIGTERM)
        await relay.wait_draining()
        relay.signal(signal.SIGINT)
        _, closed = await read_until_closed(ws)
        assert closed.code == 1001
    assert await relay.wait_exit() == 0


async def test_sighup_reloads_keys_without_dropping_sessions(
    spawn: Spawn,
) -> None:
    relay = spawn('[serve]\nclient_keys = ["old-key"]\n')
    await relay.wait_listening()
    target = f"/v1/realtime?model={MODEL}"
    url = f"{relay.ws_base}/realtime?model={MODEL}"
    async with open_ws(url, extra_headers=bearer("old-key")) as live:
        assert json.loads(await live.get_message())["type"] == "session.created"
        relay.config.write_text('[serve]\nclient_keys = ["new-key"]\n')
        relay.signal(signal.SIGHUP)
        with trio.fail_after(10):
            while (await raw_handshake(relay.port, target, bearer("new-key"))).status != 101:
                await trio.sleep(0.05)
        assert (await raw_handshake(relay.port, target, bearer("old-key"))).status == 401
        # An invalid configuration is refused; the previous one stays.
        relay.config.write_text('[serve]\nclient_keys = ["x"]\nmax_sessions = "many"\n')
        relay.signal(signal.SIGHUP)
        await relay.wait_metric('relay_config_reloads_total{outcome="refused"} 1.0')
        assert (await raw_handshake(relay.port, target, bearer("new-key"))).status == 101
        # The live session opened with the old key was not touched.
        await live.send_message('{"type":"input_audio_buffer.clear"}')
        while json.loads(await live.get_message())["type"] != "input_audio_buffer.cleared":
            pass
    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    assert relay.process.stderr is not None
    log = relay.process.stderr.read().decode()
    assert "new configuration refused" in log
    assert "serve.max_sessions" in log


def systemd_socket(tmp_path: Path) -> tuple[socket.socket, dict[str, str]]:
    """A datagram socket standing in for systemd's, and the env that points a relay at it."""
    address = tmp_path / "notify.sock"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(address))
    systemd.setblocking(False)
    return systemd, {"NOTIFY_SOCKET": str(address)}


async def next_datagram(systemd: socket.socket) -> str:
    with trio.fail_after(20):
        await trio.lowlevel.wait_readable(systemd)
    return systemd.recv(4096).decode()


async def test_systemd_notify_ready_and_stopping(spawn: Spawn, tmp_path: Path) -> None:
    systemd, env = systemd_socket(tmp_path)
    with systemd:
        relay = spawn("[serve]\nno_auth = true\n", env=env)
        ready = await next_datagram(systemd)
        assert "READY=1" in ready
        # READY=1 is sent only once the port accepts connections.
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.aclose()
        relay.signal(signal.SIGTERM)
        assert "STOPPING=1" in await next_datagram(systemd)
        assert await relay.wait_exit() == 0


async def test_serve_freezes_its_startup_heap_before_it_says_ready(
    spawn: Spawn, tmp_path: Path
) -> None:
    """The modules, config and caches alive at startup are out of every collection.

    Without the freeze each full collection under session churn walked about 60,000
    startup objects: a 38-51 ms stop of every session (README, "The collector").
    """
    systemd, env = systemd_socket(tmp_path)
    with systemd:
        relay = spawn('[serve]\nno_auth = true\nlog_level = "debug"\n', env=env)
        assert "READY=1" in await next_datagram(systemd)
        relay.signal(signal.SIGTERM)
        assert await relay.wait_exit() == 0
    assert relay.process.stderr is not None
    lines = [json.loads(line) for line in relay.process.stderr.read().decode().splitlines()]
    froze = [line["msg"] for line in lines if line["msg"].startswith("froze ")]
    assert len(froze) == 1
    # The count is the whole startup heap, not a handful of objects.
    assert int(froze[0].split()[1]) > 10_000


async def test_sighup_rotates_the_upstream_key_for_new_sessions_only(
    spawn: Spawn, nursery: trio.Nursery
) -> None:
    from tests.conftest import start_simulator

    simulator = await start_simulator(nursery, api_keys=("sk-upstream-one", "sk-upstream-two"))
    base = f'[serve]\nclient_keys = ["k1"]\nupstream_url = "{simulator.ws_base}"\n'
    relay = spawn(base + 'upstream_api_key = "sk-upstream-one"\n', simulator=False)
    await relay.wait_listening()
    url = f"{relay.ws_base}/realtime?model={MODEL}"
    async with open_ws(url, extra_headers=bearer("k1")) as live:
        assert json.loads(await live.get_message())["type"] == "session.created"
        assert simulator.sim.sessions_by_key_index == {0: 1}
        relay.config.write_text(base + 'upstream_api_key = "sk-upstream-two"\n')
        relay.signal(signal.SIGHUP)
        with trio.fail_after(10):
            while simulator.sim.sessions_by_key_index[1] == 0:
                async with open_ws(url, extra_headers=bearer("k1")) as fresh:
                    await fresh.get_message()
                await trio.sleep(0.05)
        # The live session still runs on the key it was opened with.
        await live.send_message('{"type":"input_audio_buffer.clear"}')
        while json.loads(await live.get_message())["type"] != "input_audio_buffer.cleared":
            pass
    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0


async def test_sighup_swaps_the_whole_upstream_table_and_live_sessions_keep_theirs(
    spawn: Spawn, nursery: trio.Nursery, tmp_path: Path
) -> None:
    from tests.conftest import start_simulator

    first = await start_simulator(nursery, api_keys=("sk-upstream-first",))
    second = await start_simulator(nursery, api_keys=("sk-upstream-second",))
    key_file = tmp_path / "second.key"
    key_file.write_text("sk-upstream-second\n")

    def table(name: str, url: str, key_setting: str) -> str:
        return f'[upstreams.{name}]\nurl = "{url}"\n{key_setting}\nmodels = ["{MODEL}"]\n'

    serve = '[serve]\nclient_keys = ["k1"]\n'
    relay = spawn(
        serve + table("first", first.ws_base, 'api_key_env = ["FIRST_KEY"]'),
        simulator=False,
        env={"FIRST_KEY": "sk-upstream-first"},
    )
    await relay.wait_listening()
    url = f"{relay.ws_base}/realtime?model={MODEL}"
    async with open_ws(url, extra_headers=bearer("k1")) as live:
        assert json.loads(await live.get_message())["type"] == "session.created"
        # A table whose key file is missing is refused whole: the old table stays.
        relay.config.write_text(
            serve + table("second", second.ws_base, 'api_key_file = ["/nonexistent/key"]')
        )
        relay.signal(signal.SIGHUP)
        await relay.wait_metric('relay_config_reloads_total{outcome="refused"} 1.0')
        async with open_ws(url, extra_headers=bearer("k1")) as fresh:
            await fresh.get_message()
        assert first.sim.sessions_by_key_index == {0: 2}
        relay.config.write_text(
            serve + table("second", second.ws_base, f'api_key_file = ["{key_file}"]')
        )
        relay.signal(signal.SIGHUP)
        await relay.wait_metric('relay_config_reloads_total{outcome="applied"} 1.0')
        async with open_ws(url, extra_headers=bearer("k1")) as fresh:
            await fresh.get_message()
        assert second.sim.sessions_by_key_index == {0: 1}
        # The live session still runs on the upstream it was opened with.
        await live.send_message('{"type":"input_audio_buffer.clear"}')
        while json.loads(await live.get_message())["type"] != "input_audio_buffer.cleared":
            pass
    relay.signal(signal.SIGTERM)
    assert await relay.wait_exit() == 0
    assert relay.process.stderr is not None
    log = relay.process.stderr.read().decode()
    assert "upstreams.second.api_key_file[0]" in log
    assert "sk-upstream" not in log
