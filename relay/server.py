"""``relay serve``: one process, one public port, two planes.

This module owns the front listener and the realtime handshake. How the port is
shared:

1. One non-blocking listening socket; each accepted connection gets a task.
2. The task reads the request head (bounded size, ``handshake_timeout_s``) and
   parses it with h11 (:mod:`relay.protocol.handshake`).
3. ``GET /v1/realtime`` (or ``/realtime``) with ``Upgrade: websocket`` stays
   here: the data plane answers the handshake itself, dials the upstream first,
   and relays frames on its own codec (:mod:`relay.dataplane.session`). Any other
   WebSocket upgrade is refused here (404), so hypercorn never terminates a
   WebSocket and never negotiates permessage-deflate.
4. Every other request is handed, socket and already-read bytes, to hypercorn
   running the quart-trio control app in this same ``trio.run``
   (:mod:`relay.control.hosting`).

The realtime handshake, in order: valid RFC 6455 request; credential check
before anything else (401 with OpenAI's envelope); session capacity (503);
the retired beta marker stripped and logged; upstream dialed (its refusal
becomes this handshake's HTTP answer); only then ``101`` with exactly
``Sec-WebSocket-Protocol: realtime`` when offered.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import logging
import socket
import ssl
import time
from collections import Counter
from typing import Final

import orjson
import trio

from relay import logs
from relay.appkeys import AppKeyStore, KeyringFile
from relay.config import ServeConfig
from relay.control.app import create_app
from relay.control.hosting import ControlPlaneHost
from relay.dataplane.auth import (
    AuthRefusal,
    CredentialChecker,
    NoAuthChecker,
    RelayTokenChecker,
    ReplayStore,
    StaticKeyChecker,
    TokenGrant,
    key_digest,
)
from relay.dataplane.lock import SessionLock
from relay.dataplane.policy import Ending, EndKind
from relay.dataplane.session import RelaySession, SessionLimits
from relay.dataplane.upstream import UpstreamEndpoint, UpstreamRefused, dial_upstream
from relay.metrics import RelayMetrics
from relay.minting import Minter, http_base_for
from relay.net import http
from relay.net.transport import (
    Transport,
    TransportClosed,
    accept,
    open_listener,
    server_tls_context,
    tls_handshake,
    wrap_server_tls,
)
from relay.net.websocket import WebSocket
from relay.protocol import handshake
from relay.protocol.events import new_id
from relay.protocol.handshake import HandshakeError, RequestHead
from relay.tokens import Keyring, TokenClaims, new_signing_key

LOGGER = logging.getLogger("relay.server")
ACCESS_LOG = logging.getLogger("relay.access")
SESSION_LOG = logging.getLogger("relay.session")

REALTIME_PATHS: Final = frozenset({"/v1/realtime", "/realtime"})
#: Token ids whose start counts are kept before expired ones are pruned.
MAX_TRACKED_TOKENS: Final = 100_000
#: Client request headers forwarded to the upstream (everything else stays here).
FORWARDED_CLIENT_HEADERS: Final = (b"openai-safety-identifier",)


def build_checker(config: ServeConfig) -> CredentialChecker:
    if config.no_auth:
        return NoAuthChecker()
    digests = [*config.client_key_sha256, *(key_digest(k) for k in config.client_keys)]
    return StaticKeyChecker(digests)


def build_keyring(config: ServeConfig) -> KeyringFile:
    """Signing keys from their file, or one made now (tokens then die with the process)."""
    if config.signing_keys_file:
        return KeyringFile(config.signing_keys_file)
    LOGGER.warning(
        "no signing_keys_file: relay tokens are signed with a key made at start-up; they "
        "stop working on restart and on other instances"
    )
    return KeyringFile("", fallback=Keyring([new_signing_key()]))


class RelayServer:
    """The relay process's state: configuration, live sessions, the two planes."""

    def __init__(
        self,
        config: ServeConfig,
        *,
        upstream: UpstreamEndpoint,
        checker: CredentialChecker | None = None,
    ) -> None:
        self.config = config
        self.upstream = upstream
        self.keyring = build_keyring(config)
        self.replay = ReplayStore(config.replay_store_max_entries)
        self.checker = checker or RelayTokenChecker(
            self.keyring.current, build_checker(config), self.replay
        )
        self.app_keys = AppKeyStore(config.app_keys_file)
        self.minter = Minter(
            self.app_keys,
            self.keyring.current,
            upstream_http_base=http_base_for(config.upstream_url),
            upstream_api_key=config.upstream_api_key,
            upstream_ca_file=config.upstream_ca_file,
        )
        self.sessions: dict[str, RelaySession] = {}
        #: Live sessions per relay token id and per app, and sessions started per token.
        self._live_by_token: Counter[str] = Counter()
        self._live_by_app: Counter[str] = Counter()
        self._starts_by_token: dict[str, tuple[int, float]] = {}
        self._draining = False
        #: Set (and replaced) whenever a session ends; drain waits on it.
        self._sessions_changed = trio.Event()
        self._session_numbers = itertools.count(1)
        self.limits = SessionLimits(
            idle_timeout_s=config.idle_timeout_s,
            max_session_s=config.max_session_s,
            ping_interval_s=config.ping_interval_s,
            pong_timeout_s=config.pong_timeout_s,
            close_timeout_s=config.close_timeout_s,
            client_max_frames_per_s=config.client_max_frames_per_s,
            client_frame_burst=config.client_frame_burst,
            client_max_bytes_per_s=config.client_max_bytes_per_s,
            client_byte_burst_bytes=config.client_byte_burst_bytes,
        )
        self._tls = (
            server_tls_context(config.tls_cert_file, config.tls_key_file)
            if config.tls_cert_file
            else None
        )
        self.metrics = RelayMetrics(
            live_sessions=lambda: len(self.sessions),
            draining=lambda: float(self._draining),
            dropped_log_lines=lambda: float(logs.dropped_lines()),
        )
        self.control = ControlPlaneHost(create_app(self))
        #: Handshakes in progress count against capacity too.
        self._pending_handshakes = 0

    # ControlState
    @property
    def live_sessions(self) -> int:
        return len(self.sessions)

    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def draining(self) -> bool:
        return self._draining

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until cancelled; ``task_status.started(port)``."""
        if self.config.no_auth:
            LOGGER.warning(
                "AUTHENTICATION IS OFF (--no-auth): anyone who can reach this port uses "
                "the relay's upstream key. Local development only."
            )
        listener = open_listener(self.config.host, self.config.port)
        try:
            port = int(listener.getsockname()[1])
            async with trio.open_nursery() as nursery:
                await nursery.start(self.control.run)
                LOGGER.info(
                    "relay listening on %s:%d, upstream %s",
                    self.config.host,
                    port,
                    self.upstream.target.host_header,
                )
                task_status.started(port)
                while True:
                    sock, peer = await accept(listener)
                    sock = wrap_server_tls(sock, self._tls)
                    nursery.start_soon(self._handle_connection, sock, peer)
                    await trio.lowlevel.checkpoint()
        finally:
            listener.close()

    async def _handle_connection(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        transport = Transport(sock, peer=peer)
        try:
            with trio.fail_after(self.config.handshake_timeout_s):
                if transport.is_tls:
                    try:
                        await tls_handshake(transport)
                    except (OSError, ssl.SSLError):
                        return  # not TLS, or a client that gave up: nothing to answer
                head = await http.read_request_head(transport)
            if head is None:
                return
            if head.path in REALTIME_PATHS and head.is_websocket_upgrade():
                await self._realtime(transport, head)
            elif head.is_websocket_upgrade():
                raise HandshakeError(
                    404, f"No WebSocket endpoint at {head.path}.", code="not_found"
                )
            else:
                # hypercorn closes the socket itself; our close below is then a no-op.
                await self.control.handle(transport, head.raw + head.trailing)
        except HandshakeError as exc:
            await http.send_error(transport, exc.status, exc.message, code=exc.code)
        except trio.TooSlowError:
            await http.send_error(
                transport, 408, "The request head did not arrive in time.", code="timeout"
            )
        except TransportClosed:
            pass
        finally:
            transport.close()

    async def _refuse(
        self,
        transport: Transport,
        head: RequestHead,
        status: int,
        message: str,
        *,
        code: str,
        error_type: str = "invalid_request_error",
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.metrics.errors.labels(kind=code).inc()
        ACCESS_LOG.info(
            "realtime handshake refused",
            extra={
                "fields": {
                    "event": "access",
                    "path": head.path,
                    "status": status,
                    "code": code,
                    "client": self.client_address(head, transport.peer),
                }
            },
        )
        await http.send_error(
            transport,
            status,
            message,
            error_type=error_type,
            code=code,
            extra_headers=extra_headers,
        )

    def client_address(self, head: RequestHead, peer: tuple[str, int] | None) -> str:
        """The client's address: the socket peer, or what a trusted proxy says it is."""
        address = peer[0] if peer else "unknown"
        if address not in self.config.trusted_proxies:
            return address
        real_ip = head.header(b"x-real-ip")
        if real_ip:
            return real_ip.strip()
        forwarded = head.header(b"x-forwarded-for")
        if forwarded:
            # The rightmost address not added by one of our own proxies.
            for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
                if hop not in self.config.trusted_proxies:
                    return hop
        return address

    async def _realtime(self, transport: Transport, head: RequestHead) -> None:
        handshake_started = trio.current_time()
        problem = handshake.websocket_request_problem(head)
        if problem is not None:
            raise problem
        origin = head.header(b"origin")
        if (
            self.config.allowed_origins
            and origin is not None
            and (origin not in self.config.allowed_origins)
        ):
            # Cross-site WebSocket hijacking: refused whatever the credential.
            await self._refuse(
                transport, head, 403, "This Origin is not allowed.", code="origin_not_allowed"
            )
            return
        decision = self.checker.check(handshake.client_credential(head), head)
        if isinstance(decision, AuthRefusal):
            await self._refuse(
                transport,
                head,
                decision.status,
                decision.message,
                error_type=decision.error_type,
                code=decision.code,
            )
            return
        if self._draining:
            await self._refuse(
                transport,
                head,
                503,
                "The relay is shutting down; retry shortly.",
                error_type="server_error",
                code="server_shutdown",
            )
            return
        if len(self.sessions) + self._pending_handshakes >= self.config.max_sessions:
            await self._refuse(
                transport,
                head,
                503,
                "The relay is at its session limit; retry shortly.",
                error_type="server_error",
                code="server_busy",
                extra_headers=(("Retry-After", "1"),),
            )
            return
        claims = decision.claims if isinstance(decision, TokenGrant) else None
        grant_id = decision.credential_id
        limit_refusal = self._credential_limit_refusal(claims)
        if limit_refusal is not None:
            await self._refuse(transport, head, 429, limit_refusal, code="rate_limit_exceeded")
            return
        if handshake.has_beta_marker(head):
            LOGGER.info(
                "stripped the retired beta marker (OpenAI-Beta / openai-beta.realtime-v1) "
                "from a client handshake; the upstream gets the GA protocol"
            )
        extra = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in head.headers
            if name in FORWARDED_CLIENT_HEADERS and claims is None
        ]
        if claims is not None and claims.user:
            extra.append(("OpenAI-Safety-Identifier", claims.user))
        self._pending_handshakes += 1
        try:
            dial_started = trio.current_time()
            try:
                upstream = await dial_upstream(
                    self.upstream,
                    client_query=head.query,
                    extra_headers=extra,
                    max_message_bytes=self.config.max_message_bytes,
                    timeout_s=self.config.upstream_connect_timeout_s,
                )
            except UpstreamRefused as refusal:
                LOGGER.info("upstream refused a session: %s", refusal.detail)
                self.metrics.errors.labels(kind=f"upstream_{refusal.status}").inc()
                await transport.send_all(handshake.http_response(refusal.status, refusal.body))
                return
            self.metrics.upstream_connect_seconds.observe(trio.current_time() - dial_started)
            try:
                await transport.send_all(handshake.accept_response(head))
            except BaseException:
                upstream.transport.close()
                raise
        finally:
            self._pending_handshakes -= 1
        self.metrics.handshake_seconds.observe(trio.current_time() - handshake_started)
        client = WebSocket(
            transport,
            client_side=False,
            max_message_bytes=self.config.max_message_bytes,
            initial_data=head.trailing,
        )
        session_id = f"rs_{next(self._session_numbers)}_{new_id('')[:8]}"
        limits = self.limits
        lock: SessionLock | None = None
        if claims is not None:
            if claims.max_session_s:
                limits = dataclasses.replace(
                    limits, max_session_s=min(limits.max_session_s, claims.max_session_s)
                )
            if claims.session:
                lock = SessionLock(orjson.loads(claims.session))
        session = RelaySession(
            client,
            upstream,
            limits,
            remask_upstream=_needs_remask(self.config, upstream),
            session_id=session_id,
            lock=lock,
        )
        session.credential_id = grant_id
        self.sessions[session_id] = session
        self._count_start(claims)
        try:
            await session.run()
        finally:
            del self.sessions[session_id]
            self._count_end(claims)
            upstream.transport.close()
            self._sessions_changed.set()
            self._sessions_changed = trio.Event()
        self._record_session_end(session, head, transport, grant_id, claims)

    def _record_session_end(
        self,
        session: RelaySession,
        head: RequestHead,
        transport: Transport,
        credential_id: str,
        claims: TokenClaims | None,
    ) -> None:
        stats = session.stats
        ending = stats.ending
        plan = session.close_plan
        client_close = plan.client if plan is not None else None
        upstream_close = plan.upstream if plan is not None else None
        ended_by = ending.side.value if ending and ending.side else "relay"
        client_code = str(client_close.code) if client_close and client_close.send_close else "none"
        metrics = self.metrics
        metrics.sessions_ended.labels(close_code=client_code, ended_by=ended_by).inc()
        metrics.messages.labels(direction="up").inc(stats.messages_up)
        metrics.messages.labels(direction="down").inc(stats.messages_down)
        metrics.bytes.labels(direction="up").inc(session.client.bytes_received)
        metrics.bytes.labels(direction="down").inc(session.upstream.bytes_received)
        usage = stats.tap.usage
        model = stats.tap.upstream_model or "unknown"
        for kind, value in (
            ("input_text", usage.input_text_tokens),
            ("input_audio", usage.input_audio_tokens),
            ("input_image", usage.input_image_tokens),
            ("input_cached", usage.input_cached_tokens),
            ("output_text", usage.output_text_tokens),
            ("output_audio", usage.output_audio_tokens),
        ):
            if value:
                metrics.usage_tokens.labels(model=model, kind=kind).inc(value)
        if ending is not None and ending.kind is EndKind.INTERNAL_ERROR:
            metrics.errors.labels(kind="session_internal_error").inc()
        SESSION_LOG.info(
            "session ended",
            extra={
                "fields": {
                    "event": "session_end",
                    "session_id": session.session_id,
                    "upstream_session_id": stats.tap.upstream_session_id,
                    "client": self.client_address(head, transport.peer),
                    "credential_id": credential_id,
                    "model": stats.tap.upstream_model,
                    "duration_s": round(trio.current_time() - stats.started_at, 3),
                    "messages_up": stats.messages_up,
                    "messages_down": stats.messages_down,
                    "bytes_up": session.client.bytes_received,
                    "bytes_down": session.upstream.bytes_received,
                    "ended_by": ended_by,
                    "end_kind": ending.kind.value if ending else None,
                    "client_close": [client_close.code, client_close.reason]
                    if client_close
                    else None,
                    "upstream_close": (
                        [upstream_close.code, upstream_close.reason] if upstream_close else None
                    ),
                    "locked_fields_removed": stats.locked_fields_removed,
                    "usage": {
                        "responses": usage.responses,
                        "total_tokens": usage.total_tokens,
                        "input_text": usage.input_text_tokens,
                        "input_audio": usage.input_audio_tokens,
                        "input_cached": usage.input_cached_tokens,
                        "output_text": usage.output_text_tokens,
                        "output_audio": usage.output_audio_tokens,
                    },
                    "token_app": claims.app if claims else None,
                }
            },
        )

    def _credential_limit_refusal(self, claims: TokenClaims | None) -> str | None:
        """Why a token may not open another session now, or None."""
        if claims is None:
            return None
        config = self.config
        if config.max_sessions_per_token and (
            self._live_by_token[claims.jti] >= config.max_sessions_per_token
        ):
            return "This token has reached its concurrent session limit."
        started = self._starts_by_token.get(claims.jti, (0, 0.0))[0]
        if config.max_session_starts_per_token and started >= config.max_session_starts_per_token:
            return "This token has opened as many sessions as it may."
        app = self.app_keys.check_name(claims.app)
        if (
            app is not None
            and app.max_concurrent_sessions
            and (self._live_by_app[claims.app] >= app.max_concurrent_sessions)
        ):
            return "This app key has reached its concurrent session limit."
        return None

    def _count_start(self, claims: TokenClaims | None) -> None:
        if claims is None:
            return
        self._live_by_token[claims.jti] += 1
        self._live_by_app[claims.app] += 1
        count = self._starts_by_token.get(claims.jti, (0, 0.0))[0]
        self._starts_by_token[claims.jti] = (count + 1, float(claims.expires_at))
        if len(self._starts_by_token) > MAX_TRACKED_TOKENS:
            now = time.time()
            self._starts_by_token = {k: v for k, v in self._starts_by_token.items() if v[1] > now}

    def _count_end(self, claims: TokenClaims | None) -> None:
        if claims is None:
            return
        for counter, key in ((self._live_by_token, claims.jti), (self._live_by_app, claims.app)):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def end_all_sessions(self, kind: EndKind = EndKind.SHUTDOWN) -> None:
        for session in list(self.sessions.values()):
            session.end(Ending(kind))

    @property
    def admin_key_sha256(self) -> str:
        return self.config.admin_key_sha256

    def list_sessions(self) -> list[dict[str, object]]:
        now = trio.current_time()
        return [
            {
                "id": session_id,
                "age_s": round(now - session.stats.started_at, 3),
                "model": session.stats.tap.upstream_model,
                "credential_id": session.credential_id,
                "bytes_up": session.client.bytes_received,
                "bytes_down": session.upstream.bytes_received,
                "messages_up": session.stats.messages_up,
                "messages_down": session.stats.messages_down,
            }
            for session_id, session in self.sessions.items()
        ]

    def end_session(self, session_id: str) -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        session.end(Ending(EndKind.ADMIN))
        return True

    def start_drain(self) -> None:
        """Stop taking sessions: readiness and new handshakes answer 503 from now on."""
        self._draining = True

    async def drain(self, timeout_s: float, *, hurry: trio.Event) -> None:
        """Let live sessions finish for up to ``timeout_s`` (or until ``hurry``), then end
        the rest with an ``error`` event and 1001; returns when every session has closed."""
        self.start_drain()
        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, hurry, nursery.cancel_scope)
                while self.sessions:
                    await self._sessions_changed.wait()
                nursery.cancel_scope.cancel()
        if self.sessions:
            LOGGER.info("drain: ending %d live session(s) with 1001", len(self.sessions))
            self.end_all_sessions(EndKind.SHUTDOWN)
        while self.sessions:
            await self._sessions_changed.wait()

    def apply_config(self, config: ServeConfig, upstream: UpstreamEndpoint) -> list[str]:
        """Adopt a reloaded configuration for new sessions; live sessions keep theirs.

        Returns the settings that only take effect after a restart.
        """
        needs_restart = [
            name for name in ("host", "port") if getattr(config, name) != getattr(self.config, name)
        ]
        self.config = config
        self.upstream = upstream
        self.checker = RelayTokenChecker(self.keyring.current, build_checker(config), self.replay)
        self.app_keys = AppKeyStore(config.app_keys_file)
        self.minter = Minter(
            self.app_keys,
            self.keyring.current,
            upstream_http_base=http_base_for(config.upstream_url),
            upstream_api_key=config.upstream_api_key,
            upstream_ca_file=config.upstream_ca_file,
        )
        self.limits = SessionLimits(
            idle_timeout_s=config.idle_timeout_s,
            max_session_s=config.max_session_s,
            ping_interval_s=config.ping_interval_s,
            pong_timeout_s=config.pong_timeout_s,
            close_timeout_s=config.close_timeout_s,
            client_max_frames_per_s=config.client_max_frames_per_s,
            client_frame_burst=config.client_frame_burst,
            client_max_bytes_per_s=config.client_max_bytes_per_s,
            client_byte_burst_bytes=config.client_byte_burst_bytes,
        )
        logging.getLogger("relay").setLevel(config.log_level.upper())
        return needs_restart


async def _cancel_when_set(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _needs_remask(config: ServeConfig, upstream: WebSocket) -> bool:
    """Re-mask client frames only where RFC 6455 §10.3's threat exists.

    Masking protects intermediaries on a cleartext path from attacker-chosen
    bytes. Over TLS nobody on the path sees them; on loopback there is no path.
    """
    if not config.remask_plain_upstream or upstream.transport.is_tls:
        return False
    peer = upstream.transport.peer
    if peer is None:
        return True
    try:
        return not ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return True
