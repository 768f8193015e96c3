"""The benchmark rig: processes under test, OS measurements, and one measured load run.

This module owns what ``bench/suite.py`` and ``bench/relay_throughput.py`` share:

- starting the processes of a run on loopback, each a :class:`Target` the load can
  be pointed at: the simulator (the "direct" baseline), the relay, a relay whose
  upstream is the simulator over verified ``wss://`` (a throwaway CA from
  trustme), the raw Trio byte splice (``bench/raw_splice.py``) and nginx as a
  plain WebSocket proxy (installed with apt by ``scripts/bench`` when missing);
- for ``bench/stranger.py``: a Node ``ws`` echo upstream (``bench/node``) standing in
  for OpenAI, plain or TLS, echoing frames or answering appends with audio deltas
  (the binary-vs-JSON comparison), and the two relays a user might write instead of ours
  (``bench/websockets_relay.py`` on websockets + uvloop, ``bench/node/ws_relay.mjs``);
- reading the OS: user+sys CPU from ``/proc/<pid>/stat`` and resident memory from
  ``/proc/<pid>/status``, summed over a process and its direct children (nginx's
  workers), and resetting the peak (``clear_refs``) so each row shows its own;
- :func:`measure`: one load run (:mod:`relay.loadgen`, in its own processes,
  pinned when asked) with the target's CPU sampled exactly over the measured
  window and its memory sampled with every session open;
- :class:`Spread` and :func:`rotated`: paths interleaved over short repetitions, each
  figure reported as its median and min-max spread.
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import trio

from relay.credentials import keyfiles
from relay.loadgen import LoadResult, LoadSpec, ProgressBar, run_load

_T = TypeVar("_T")

REPO: Final = Path(__file__).resolve().parent.parent
CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
SIM_KEY: Final = "sk-bench-simulator-key"
CLIENT_KEY: Final = "bench-client-key"
#: The path of another work tree's relay (``--relay-before``): a before/after in one run.
RELAY_BEFORE: Final = "relay@before"
#: Appended to the simulator's URL for the echo profiles (stream, flat, churn).
ECHO_QUERY: Final = "sim_mode=echo"
STARTUP_TIMEOUT_S: Final = 20.0
#: The relay's per-session client limits in bench runs (see ``Rig.relay_env``).
BENCH_CLIENT_MAX_FRAMES_PER_S: Final = 1_000_000
BENCH_CLIENT_MAX_BYTES_PER_S: Final = 1 << 30
STOP_TIMEOUT_S: Final = 10.0
NODE_DIR: Final = REPO / "bench/node"
C_DIR: Final = REPO / "bench/c"
#: Delta size and answer length of the simulator's paced model (voice profile).
SIM_DELTA_AUDIO_MS: Final = 100
SIM_RESPONSE_AUDIO_MS: Final = 1200

#: Everything of an nginx configuration but its ``http`` block's proxying: one worker,
#: no access log, every temporary path under the run's own directory.
NGINX_PRELUDE: Final = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log error;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
"""
NGINX_CONF: Final = (
    NGINX_PRELUDE
    + """    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _tree(pid: int) -> Iterator[tuple[Path, list[str]]]:
    """``/proc/<pid>`` and those of its direct children, each with its ``stat`` fields
    after the command name (state, ppid, ...: utime and stime are indexes 11 and 12)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            yield stat.parent, fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and of its direct children."""
    return sum((int(f[11]) + int(f[12])) / CLOCK_TICKS_PER_S for _, f in _tree(pid))


def memory_kib(pid: int, field_name: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM``) summed over the tree."""
    total = 0
    for proc, _ in _tree(pid):
        try:
            text = (proc / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(field_name + ":"):
                total += int(line.split()[1])
    return total


def reset_peak_rss(pid: int) -> None:
    """Start a new ``VmHWM`` period (Linux ``clear_refs`` value 5); ignored where refused."""
    for proc, _ in _tree(pid):
        try:
            (proc / "clear_refs").write_text("5")
        except OSError:
            pass


def pin(pid: int, cpus: set[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(pid, cpus)


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout_s} s")


def load_events(process: subprocess.Popen[bytes], deadline: float) -> Iterator[dict[str, Any]]:
    """The JSON lines a load process prints on stdout, each as it comes, until the
    process ends or closes stdout; ``TimeoutError`` once ``deadline`` (monotonic) passes."""
    assert process.stdout is not None
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if not ready:
            if process.poll() is not None:
                return
            continue
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)
    raise TimeoutError("the load process gave no result in time")


def build_c_program(name: str) -> Path:
    """``bench/c/<name>.c`` compiled with the system's C compiler, rebuilt when the
    source or a shared header is newer than the binary (the build directory is not
    committed)."""
    source = C_DIR / f"{name}.c"
    binary = C_DIR / "build" / name
    # The shared header (bench/c/loop.h) counts as source too.
    newest_source = max(path.stat().st_mtime for path in (source, *C_DIR.glob("*.h")))
    if not binary.exists() or binary.stat().st_mtime < newest_source:
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError(f"no C compiler (cc or gcc) to build bench/c/{name}.c")
        binary.parent.mkdir(exist_ok=True)
        # Built beside the binary and renamed over it: a concurrent build never runs half a file.
        partial = binary.with_name(f"{name}.{os.getpid()}.tmp")
        subprocess.run(
            [compiler, "-O2", "-Wall", "-Werror", "-o", str(partial), str(source)], check=True
        )
        partial.replace(binary)
    return binary


def build_light_echo() -> Path:
    """``bench/c/echo_upstream.c``: the concurrency ramp's light WebSocket upstream."""
    return build_c_program("echo_upstream")


def build_light_sse() -> Path:
    """``bench/c/sse_upstream.c``: the REST bench's light streamed chat completions upstream."""
    return build_c_program("sse_upstream")


def find_nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def node_binary() -> str:
    """Node 20+ for ``bench/node``; its ``ws`` comes from ``npm ci`` (scripts/install)."""
    found = shutil.which("node")
    if found is None:
        raise RuntimeError("node is not installed (bench/node needs Node 20 or later)")
    if not (NODE_DIR / "node_modules/ws").is_dir():
        raise RuntimeError(f"{NODE_DIR}/node_modules is missing: run npm ci --prefix bench/node")
    return found


@dataclass
class Target:
    """Something the load can be pointed at: ``url`` base ending in /v1, and whose CPU counts."""

    name: str
    url: str
    key: str
    pid: int


@dataclass
class Rig:
    """The processes of one benchmark run; :meth:`stop` ends them all."""

    work_dir: Path
    server_cpus: set[int] | None = None
    load_cpus: set[int] | None = None
    relay_log_level: str = "info"
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)
    app_key: str = ""
    #: The Node echo upstreams started (plain and TLS): the rig's side, like the load.
    echo_pids: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=lambda: {**os.environ, "PYTHONUNBUFFERED": "1"})

    def _spawn(
        self,
        command: list[str],
        env: dict[str, str] | None = None,
        cpus: set[int] | None = None,
        cwd: Path = REPO,
        output: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``command``; with ``cpus``, pinned before it runs, so every thread it
        starts (Node's and V8's helpers) inherits the pinning; with ``output``, its stdout
        and stderr go to that file instead of nowhere."""
        with output.open("ab") if output is not None else open(os.devnull, "wb") as sink:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env or self.env,
                stdout=sink,
                stderr=sink,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        self.processes.append(process)
        return process

    def _ready(self, port: int, process: subprocess.Popen[bytes], cpus: set[int] | None) -> None:
        wait_for_port(port, process)
        pin(process.pid, cpus)

    def start_simulator(
        self,
        *,
        mode: str = "normal",
        tls: tuple[Path, Path] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> int:
        """The simulator: a paced model by default; ``?sim_mode=echo`` per session for echoes.

        ``extra_args``: more ``relay simulate`` options (``bench/rest.py``'s REST pacing)."""
        port = free_port()
        env = dict(self.env)
        if tls is not None:
            env["RELAY_SIMULATE_TLS_CERT_FILE"], env["RELAY_SIMULATE_TLS_KEY_FILE"] = map(str, tls)
        env["RELAY_SIMULATE_RESPONSE_AUDIO_MS"] = str(SIM_RESPONSE_AUDIO_MS)
        env["RELAY_SIMULATE_DELTA_AUDIO_MS"] = str(SIM_DELTA_AUDIO_MS)
        process = self._spawn(
            [
                sys.executable,
                "-m",
                "relay",
                "simulate",
                "--mode",
                mode,
                "--port",
                str(port),
                "--api-key",
                SIM_KEY,
                "--faults",
                *extra_args,
            ],
            env,
        )
        # The simulator stands in for OpenAI: it shares the load's core, not the relay's.
        self._ready(port, process, self.load_cpus)
        scheme = "wss" if tls is not None else "ws"
        host = "localhost" if tls is not None else "127.0.0.1"
        if tls is None:
            self.targets["direct"] = Target(
                "direct", f"{scheme}://{host}:{port}/v1", SIM_KEY, process.pid
            )
        return port

    def relay_env(self, port: int, upstream_url: str, ca_file: str = "") -> dict[str, str]:
        keys = self.work_dir / "keys"
        keys.mkdir(exist_ok=True)
        app_keys, signing = keys / "app-keys.json", keys / "signing.json"
        if not self.app_key:
            self.app_key = keyfiles.create_app_key(app_keys, "bench")
            keyfiles.rotate_signing_key(signing, time.time())
        return {
            **self.env,
            "RELAY_SERVE_PORT": str(port),
            "RELAY_SERVE_UPSTREAM_URL": upstream_url,
            "RELAY_SERVE_UPSTREAM_API_KEY": SIM_KEY,
            "RELAY_SERVE_UPSTREAM_CA_FILE": ca_file,
            "RELAY_SERVE_CLIENT_KEYS": CLIENT_KEY,
            "RELAY_SERVE_MAX_SESSIONS": "100000",
            # The flat profile echoes as fast as a window allows (over 10k frames/s per
            # session, over the default 1000/s and 8 MiB/s): limits a bench run would
            # otherwise hit, closing its sessions 1008. High, not off, so every frame
            # still pays the rate limit's check, as in production.
            "RELAY_SERVE_CLIENT_MAX_FRAMES_PER_S": str(BENCH_CLIENT_MAX_FRAMES_PER_S),
            "RELAY_SERVE_CLIENT_FRAME_BURST": str(BENCH_CLIENT_MAX_FRAMES_PER_S),
            "RELAY_SERVE_CLIENT_MAX_BYTES_PER_S": str(BENCH_CLIENT_MAX_BYTES_PER_S),
            "RELAY_SERVE_CLIENT_BYTE_BURST_BYTES": str(BENCH_CLIENT_MAX_BYTES_PER_S),
            # Echo mode is chosen per session with the simulator's query hook.
            "RELAY_SERVE_UPSTREAM_QUERY_PARAMS": "sim_mode",
            "RELAY_SERVE_LOG_LEVEL": self.relay_log_level,
            "RELAY_SERVE_APP_KEYS_FILE": str(app_keys),
            "RELAY_SERVE_SIGNING_KEYS_FILE": str(signing),
        }

    def start_relay(
        self, name: str, upstream_url: str, ca_file: str = "", *, checkout: Path = REPO
    ) -> Target:
        """Our relay; ``checkout``: the relay of another work tree (an older commit, for a
        before/after in one run), imported from there."""
        port = free_port()
        env = self.relay_env(port, upstream_url, ca_file)
        if checkout != REPO:
            env["PYTHONPATH"] = str(checkout)
        process = self._spawn(
            [sys.executable, "-m", "relay", "serve"], env, cpus=self.server_cpus, cwd=checkout
        )
        self._ready(port, process, self.server_cpus)
        target = Target(name, f"ws://127.0.0.1:{port}/v1", CLIENT_KEY, process.pid)
        self.targets[name] = target
        return target

    def start_relay_with_upstreams(self, name: str, upstreams_toml: str) -> Target:
        """Our relay with an upstream table (``[upstreams.NAME]`` tables, keys in the
        environment as ``BENCH_UPSTREAM_KEY``) instead of the one-upstream shorthand."""
        port = free_port()
        env = self.relay_env(port, "")
        for shorthand in ("UPSTREAM_URL", "UPSTREAM_API_KEY", "UPSTREAM_CA_FILE"):
            env.pop(f"RELAY_SERVE_{shorthand}")
        env["BENCH_UPSTREAM_KEY"] = SIM_KEY
        config = self.work_dir / f"{name.replace('/', '-')}.toml"
        config.write_text(upstreams_toml)
        process = self._spawn(
            [sys.executable, "-m", "relay", "serve", "--config", str(config)],
            env,
            cpus=self.server_cpus,
        )
        self._ready(port, process, self.server_cpus)
        target = Target(name, f"ws://127.0.0.1:{port}/v1", CLIENT_KEY, process.pid)
        self.targets[name] = target
        return target

    def start_refusing_upstream(self) -> int:
        """``bench/refusing_upstream.py`` on the load's core: every handshake answered 429."""
        port = free_port()
        process = self._spawn(
            [sys.executable, str(REPO / "bench/refusing_upstream.py"), "--port", str(port)],
            cpus=self.load_cpus,
        )
        self._ready(port, process, self.load_cpus)
        return port

    def tls_files(self) -> tuple[Path, Path, Path]:
        """A certificate for localhost, its key and the throwaway CA (trustme) that signed it."""
        import trustme

        tls_dir = self.work_dir / "tls"
        cert, key, ca_file = tls_dir / "cert.pem", tls_dir / "key.pem", tls_dir / "ca.pem"
        if not ca_file.exists():
            ca = trustme.CA()
            issued = ca.issue_cert("localhost", "127.0.0.1")
            tls_dir.mkdir(exist_ok=True)
            issued.private_key_pem.write_to_path(str(key))
            cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
            ca.cert_pem.write_to_path(str(ca_file))
        return cert, key, ca_file

    def start_tls_relay(self, *, node_echo: bool = False) -> Target:
        """A simulator (or, ``node_echo``, the Node echo upstream) serving ``wss://`` with
        a throwaway CA, and a relay verifying it."""
        cert, key, ca_file = self.tls_files()
        if node_echo:
            upstream_port = self.start_echo_upstream(tls=(cert, key))
        else:
            upstream_port = self.start_simulator(tls=(cert, key))
        return self.start_relay("relay/tls", f"wss://localhost:{upstream_port}/v1", str(ca_file))

    def start_echo_upstream(
        self, *, tls: tuple[Path, Path] | None = None, mode: str = "echo"
    ) -> int:
        """The Node ``ws`` echo upstream (``bench/node/echo_upstream.mjs``) on the load's
        core: ``session.created``, then every message echoed. Plain, it is ``direct``.

        ``mode="delta"``: each append answered with an audio delta carrying its audio
        (and ``relay.audio.v1`` spoken when offered); plain, it is ``direct/delta``.
        """
        port = free_port()
        command = [node_binary(), str(NODE_DIR / "echo_upstream.mjs"), "--port", str(port)]
        command += ["--mode", mode]
        if tls is not None:
            command += ["--cert", str(tls[0]), "--key", str(tls[1])]
        process = self._spawn(command, cpus=self.load_cpus)
        self._ready(port, process, self.load_cpus)
        self.echo_pids.append(process.pid)
        if tls is None:
            name = "direct" if mode == "echo" else f"direct/{mode}"
            self.targets[name] = Target(name, f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid)
        return port

    def start_light_echo_upstream(self) -> int:
        """The C echo upstream (``bench/c/echo_upstream.c``, built on first use) on the
        load's core: what the Node echo does by default, at a fraction of its CPU, so the
        concurrency ramp's load side stays unsaturated. It is ``direct/light``."""
        port = free_port()
        process = self._spawn([str(build_light_echo()), "--port", str(port)], cpus=self.load_cpus)
        self._ready(port, process, self.load_cpus)
        self.echo_pids.append(process.pid)
        self.targets["direct/light"] = Target(
            "direct/light", f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid
        )
        return port

    def start_light_sse_upstream(
        self, *, chunk_interval_ms: int, stream_chunks: int, chunk_jitter_ms: int = 0
    ) -> int:
        """The C streamed chat completions upstream (``bench/c/sse_upstream.c``, built on
        first use) on the load's core: the simulator's bytes and pacing for
        ``POST /v1/chat/completions`` with ``stream: true``, at a fraction of its CPU. It
        is ``direct``."""
        port = free_port()
        command = [
            str(build_light_sse()),
            *("--port", str(port), "--api-key", SIM_KEY),
            *("--chunk-interval-ms", str(chunk_interval_ms)),
            *("--chunk-jitter-ms", str(chunk_jitter_ms)),
            *("--stream-chunks", str(stream_chunks)),
        ]
        process = self._spawn(command, cpus=self.load_cpus)
        self._ready(port, process, self.load_cpus)
        self.targets["direct"] = Target("direct", f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid)
        return port

    def start_websockets_relay(self, upstream_url: str) -> Target:
        """``bench/websockets_relay.py``: the relay a user would write with websockets + uvloop."""
        program = [sys.executable, str(REPO / "bench/websockets_relay.py")]
        return self._start_baseline_relay("websockets+uvloop", program, upstream_url)

    def start_node_relay(self, upstream_url: str) -> Target:
        """``bench/node/ws_relay.mjs``: the relay a user would write with Node's ws."""
        program = [node_binary(), str(NODE_DIR / "ws_relay.mjs")]
        return self._start_baseline_relay("node-ws", program, upstream_url)

    def _start_baseline_relay(self, name: str, program: list[str], upstream_url: str) -> Target:
        """A fifty-line relay taking ``--port`` and ``--upstream``, on the servers' cores."""
        port = free_port()
        process = self._spawn(
            [*program, "--port", str(port), "--upstream", upstream_url], cpus=self.server_cpus
        )
        self._ready(port, process, self.server_cpus)
        target = Target(name, f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid)
        self.targets[name] = target
        return target

    def start_server(
        self,
        name: str,
        command: list[str],
        port: int,
        key: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> Target:
        """A proxy under test that brings its own command and listens on ``port``
        (``bench/rest.py``'s LiteLLM), on the servers' cores; its output is kept in the
        run's directory (``<name>.log``, see :meth:`server_log`)."""
        process = self._spawn(
            command, env, cpus=self.server_cpus, cwd=cwd, output=self.server_log(name)
        )
        wait_for_port(port, process, timeout_s)
        for proc, _ in _tree(process.pid):
            pin(int(proc.name), self.server_cpus)
        target = Target(name, f"ws://127.0.0.1:{port}/v1", key, process.pid)
        self.targets[name] = target
        return target

    def server_log(self, name: str) -> Path:
        return self.work_dir / f"{name.replace('/', '-')}.log"

    def start_splice(self, upstream_port: int) -> Target:
        port = free_port()
        process = self._spawn(
            [
                sys.executable,
                str(REPO / "bench/raw_splice.py"),
                "--port",
                str(port),
                "--upstream-port",
                str(upstream_port),
            ],
            cpus=self.server_cpus,
        )
        self._ready(port, process, self.server_cpus)
        target = Target("splice", f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid)
        self.targets["splice"] = target
        return target

    def start_nginx(self, upstream_port: int, conf_template: str = NGINX_CONF) -> Target | None:
        """nginx in front of ``upstream_port``; ``conf_template`` (``{tmp}``, ``{port}``,
        ``{upstream}``) replaces the WebSocket proxy's conf (``bench/rest.py``: plain HTTP)."""
        nginx = find_nginx()
        if nginx is None:
            return None
        tmp = self.work_dir / "nginx"
        tmp.mkdir(exist_ok=True)
        port = free_port()
        (tmp / "nginx.conf").write_text(
            conf_template.format(tmp=tmp, port=port, upstream=upstream_port)
        )
        process = self._spawn(
            [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf")], cpus=self.server_cpus
        )
        wait_for_port(port, process)
        for proc, _ in _tree(process.pid):
            pin(int(proc.name), self.server_cpus)
        target = Target("nginx", f"ws://127.0.0.1:{port}/v1", SIM_KEY, process.pid)
        self.targets["nginx"] = target
        return target

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()


@contextmanager
def rig(*, pinned: bool, relay_log_level: str = "info") -> Iterator[Rig]:
    """A :class:`Rig` whose processes end with the block; pinned: servers CPU 0, load CPU 1."""
    work_dir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    running = Rig(
        work_dir,
        server_cpus={0} if pinned else None,
        load_cpus={1} if pinned else None,
        relay_log_level=relay_log_level,
    )
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(work_dir, ignore_errors=True)


def with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}" if query else url


@dataclass
class Measured:
    """One load run against one target, with the target's OS figures over it."""

    target: str
    result: LoadResult
    #: The target's CPU over the measured window (user + sys) and the window's length.
    cpu_s: float
    window_s: float
    #: The target's resident memory before the sessions opened and with all of them open.
    rss_before_kib: int
    rss_ready_kib: int
    peak_rss_kib: int

    @property
    def messages(self) -> int:
        return self.result.window_sent + self.result.window_received

    @property
    def us_per_message(self) -> float:
        return self.cpu_s / self.messages * 1e6 if self.messages else float("nan")

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / self.window_s if self.window_s else float("nan")

    @property
    def kib_per_session(self) -> float:
        opened = self.result.sessions_opened
        return (self.rss_ready_kib - self.rss_before_kib) / opened if opened else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "result": self.result.to_json(),
            "target_cpu_s": self.cpu_s,
            "window_s": self.window_s,
            "target_us_per_msg": self.us_per_message,
            "target_cpu_percent": self.cpu_percent,
            "rss_before_kib": self.rss_before_kib,
            "rss_ready_kib": self.rss_ready_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "kib_per_session": self.kib_per_session,
        }


def measure(
    running: Rig,
    target: Target,
    spec: LoadSpec,
    *,
    query: str = "",
    load_procs: int = 1,
    progress_label: str | None = None,
) -> Measured:
    """Run ``spec`` against ``target`` (its url, plus ``query``, and its key); read the OS."""
    spec = msgspec.structs.replace(spec, url=with_query(target.url, query), key=target.key)
    reset_peak_rss(target.pid)
    rss_before = memory_kib(target.pid, "VmRSS")
    samples: dict[str, float] = {}

    def on_ready(opened: int) -> None:
        del opened
        samples["rss_ready"] = memory_kib(target.pid, "VmRSS")

    def on_window(phase: str) -> None:
        samples[f"cpu_{phase}"] = cpu_seconds(target.pid)
        samples[f"at_{phase}"] = time.monotonic()

    progress = (
        ProgressBar(progress_label, spec.warmup_s + spec.duration_s, sys.stderr)
        if progress_label is not None
        else None
    )
    result = trio.run(
        lambda: run_load(
            spec,
            processes=max(1, load_procs),
            cpus=running.load_cpus,
            on_ready=on_ready,
            on_window=on_window,
            progress=progress,
        )
    )
    return Measured(
        target=target.name,
        result=result,
        cpu_s=samples.get("cpu_end", 0.0) - samples.get("cpu_start", 0.0),
        window_s=samples.get("at_end", 0.0) - samples.get("at_start", 0.0),
        rss_before_kib=rss_before,
        rss_ready_kib=int(samples.get("rss_ready", rss_before)),
        peak_rss_kib=memory_kib(target.pid, "VmHWM"),
    )


# ---------------------------------------------------------------- repetitions


def rotated(paths: list[_T], by: int) -> list[_T]:
    """The paths in a round's order: rotated by the round number, so none always goes first."""
    by %= max(1, len(paths))
    return paths[by:] + paths[:by]


@dataclass
class Spread:
    """One figure over repeated runs: the median and the min-max spread (NaNs left out)."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        kept = [value for value in values if not math.isnan(value)]
        if not kept:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(statistics.median(kept), min(kept), max(kept), len(kept))

    def show(self, spec: str = ".1f") -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}–{self.high:{spec}})"

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}
