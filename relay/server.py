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

The realtime handshake: admission decides in one ordered, pure step
(:mod:`relay.dataplane.admission`: request, query, Origin, credential, drain and
capacity, per-credential limits); the registry (:mod:`relay.dataplane.registry`)
holds capacity and any single-use token while the upstream is dialed (its
refusal becomes this handshake's HTTP answer); only when the upstream said
``101`` is the token spent, and then the client gets ``101`` with exactly
``Sec-WebSocket-Protocol: realtime`` when offered.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import socket
import ssl
from typing import Final

import orjson
import trio

from relay import logs
from relay.config import ServeConfig
from relay.control.app import create_app
from relay.control.hosting import ControlPlaneHost
from relay.credentials.checkers import (
    CredentialChecker,
    NoAuthChecker,
    RelayTokenChecker,
    ReplayStore,
    StaticKeyChecker,
)
from relay.credentials.digests import digest_hex
from relay.credentials.keyfiles import AppKeyStore, KeyringFile
from relay.credentials.minting import Minter, http_base_for
from relay.credentials.tokens import Keyring, new_signing_key
from relay.credentials.watch import KEY_FILE_POLL_INTERVAL_S, KeyFilePoller
from relay.dataplane.admission import (
    REPLAY_STORE_FULL,
    AdmissionPolicy,
    Admitted,
    Refused,
    admit,
)
from relay.dataplane.lock import LockedStart, LockedStartDone, LockedStartFailed, SessionLock
from relay.dataplane.policy import EndKind
from relay.dataplane.registry import SessionContext, SessionRegistry
from relay.dataplane.routing import Routed, Router
from relay.dataplane.session import RelaySession, SessionLimits
from relay.dataplane.upstream import UpstreamRefused
from relay.metrics import RelayMetrics
from relay.net import http
from relay.net.hub import current_hub
from relay.net.timers import current_timers
from relay.net.transport import (
    Transport,
    TransportClosed,
    accept,
    open_listener,
    server_tls_context,
    tls_handshake,
    wrap_server_tls,
)
from relay.net.websocket import OP_TEXT, ConnectionClosed, WebSocket
from relay.protocol import binary_audio, handshake
from relay.protocol.handshake import HandshakeError, RequestHead
from relay.rest.proxy import RestProxy, next_request_head
from relay.upstreams.chooser import UpstreamHealth
from relay.upstreams.table import LiveSessions, UpstreamTable, build_upstream_table
from relay.upstreams.urls import UpstreamKind

LOGGER = logging.getLogger("relay.server")
ACCESS_LOG = logging.getLogger("relay.access")

#: Connections accepted in a row before the accept loop yields to the scheduler
#: (a yield per connection was a scheduler pass every short session paid).
ACCEPTS_PER_CHECKPOINT: Final = 8

REALTIME_PATHS: Final = frozenset({"/v1/realtime", "/realtime"})


def build_checker(config: ServeConfig) -> CredentialChecker:
    if config.no_auth:
        return NoAuthChecker()
    digests = [*config.client_key_sha256, *(digest_hex(k) for k in config.client_keys)]
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
        upstreams: UpstreamTable | None = None,
        checker: CredentialChecker | None = None,
        key_file_poll_interval_s: float = KEY_FILE_POLL_INTERVAL_S,
    ) -> None:
        self.keyring = build_keyring(config)
        self.replay = ReplayStore(config.replay_store_max_entries)
        self.metrics = RelayMetrics(
            live_sessions=lambda: len(self.registry.sessions),
            draining=lambda: float(self.registry.draining),
            dropped_log_lines=lambda: float(logs.dropped_lines()),
        )
        self.registry = SessionRegistry(self.replay, self.metrics)
        self._fixed_checker = checker
        self._tls = (
            server_tls_context(config.tls_cert_file, config.tls_key_file)
            if config.tls_cert_file
            else None
        )
        table = upstreams if upstreams is not None else build_upstream_table(config)
        # Health and live counts outlive a reload: sessions started on the old table
        # still hold their keys, and a key cooling down stays so.
        self.router = Router(table, UpstreamHealth(table.policy), LiveSessions(), self.metrics)
        self.metrics.watch_upstream_keys(lambda: self.router.key_states())
        self._configure(config, table)
        # Handshakes and mint calls read keys from memory; this task re-reads the files.
        self.key_files = KeyFilePoller(
            lambda: (self.app_keys, self.keyring),
            interval_s=key_file_poll_interval_s,
            on_failure=self.metrics.count_key_file_reload_failure,
        )
        self.control = ControlPlaneHost(create_app(self))
        self.rest = RestProxy(self)

    def _configure(self, config: ServeConfig, table: UpstreamTable) -> None:
        """Everything new handshakes read from the configuration, built in one place
        (start-up and SIGHUP); live sessions keep what they started with."""
        checker = self._fixed_checker or RelayTokenChecker(
            self.keyring.current, build_checker(config), self.replay
        )
        app_keys = AppKeyStore(config.app_keys_file)
        minter = _minter(config, table, app_keys, self.keyring)
        limits = session_limits(config)
        policy = AdmissionPolicy(
            max_sessions=config.max_sessions,
            allowed_origins=config.allowed_origins,
            upstream_query_params=config.upstream_query_params,
            max_sessions_per_token=config.max_sessions_per_token,
            max_session_starts_per_token=config.max_session_starts_per_token,
            served_models=table.served_models,
        )
        # Swapped together, with no await in between: a handshake sees the old
        # configuration or the new one, never half of each.
        self.config, self.checker = config, checker
        self.app_keys, self.minter, self.limits = app_keys, minter, limits
        self.admission_policy = policy
        router = self.router
        if router.table is not table:
            # A reload: keys marked bad get another chance (they may have been replaced).
            router.health.clear_bad_keys()
        router.table, router.health.policy = table, table.policy

    # ControlState
    @property
    def sessions(self) -> dict[str, RelaySession]:
        return self.registry.sessions

    @property
    def live_sessions(self) -> int:
        return len(self.registry.sessions)

    @property
    def sessions_in_use(self) -> int:
        return self.registry.occupancy().sessions

    @property
    def max_sessions(self) -> int:
        return self.config.max_sessions

    @property
    def draining(self) -> bool:
        return self.registry.draining

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
                await nursery.start(self.key_files.run)
                current_hub()  # the sessions' read hub, a system task from now on
                current_timers()  # the sessions' clocks, another
                LOGGER.info(
                    "relay listening on %s:%d, upstreams %s",
                    self.config.host,
                    port,
                    ", ".join(
                        f"{up.name} ({up.target.host_header}, {len(up.keys)} key(s))"
                        for up in self.router.table.upstreams
                    ),
                )
                task_status.started(port)
                accepted_without_yield = 0
                while True:
                    sock, peer = await accept(listener)
                    sock = wrap_server_tls(sock, self._tls)
                    nursery.start_soon(self.serve_connection, sock, peer)
                    # A burst of pending connections is taken without a wait: yield now
                    # and then so the sessions already open keep running meanwhile.
                    accepted_without_yield += 1
                    if accepted_without_yield >= ACCEPTS_PER_CHECKPOINT:
                        accepted_without_yield = 0
                        await trio.lowlevel.checkpoint()
        finally:
            listener.close()
            self.rest.pool.close_all()

    async def serve_connection(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        """Serve one accepted connection; nothing raised here reaches the listener.

        This is the per-connection barrier: a bug or an input nobody foresaw ends
        this connection only (an HTTP 500 with OpenAI's envelope if no answer was
        started, else just the socket), is logged once with its traceback and is
        counted as ``relay_errors{kind="connection_internal_error"}``.
        """
        transport = Transport(sock, peer=peer)
        try:
            await self._route_connection(transport)
        except Exception:
            self.metrics.errors.labels(kind="connection_internal_error").inc()
            LOGGER.exception("connection from %s failed; other connections are unaffected", peer[0])
            if not transport.answered and not transport.closed:
                await http.send_error(
                    transport,
                    500,
                    "The relay failed while handling this request.",
                    error_type="server_error",
                    code="internal_error",
                )
        finally:
            transport.close()

    async def _route_connection(self, transport: Transport) -> None:
        try:
            head: RequestHead | None = None
            # A bare scope, not trio.fail_after (a generator context manager: a few
            # microseconds more per connection for the same deadline).
            deadline_s = self.config.handshake_timeout_s
            with trio.CancelScope(deadline=trio.current_time() + deadline_s) as head_deadline:
                if transport.is_tls:
                    try:
                        await tls_handshake(transport)
                    except (OSError, ssl.SSLError):
                        return  # not TLS, or a client that gave up: nothing to answer
                head = await http.read_request_head(transport)
            if head_deadline.cancelled_caught:
                raise trio.TooSlowError
            if head is None:
                return
            if head.path in REALTIME_PATHS and head.is_websocket_upgrade():
                await self._realtime(transport, head)
            elif self.rest.handles(head):
                await self._rest(transport, head)
            elif head.is_websocket_upgrade():
                raise HandshakeError(404, "No WebSocket endpoint at this path.", code="not_found")
            else:
                # hypercorn answers and closes the socket itself; our close is then a no-op.
                transport.answered = True
                await self.control.handle(transport, head)
        except HandshakeError as exc:
            await http.send_error(
                transport,
                exc.status,
                exc.message,
                code=exc.code,
                param=exc.param,
                extra_headers=exc.headers,
            )
        except trio.TooSlowError:
            await http.send_error(
                transport, 408, "The request head did not arrive in time.", code="timeout"
            )
        except TransportClosed:
            pass

    async def _rest(self, transport: Transport, head: RequestHead) -> None:
        """REST requests on one keep-alive connection, until it closes or idles out; a
        request that is not for the REST proxy ends the loop where it belongs."""
        while True:
            leftover = await self.rest.serve(transport, head)
            if leftover is None:
                return
            # None also when idle for too long between requests (a timer, not a scope).
            next_head = await next_request_head(
                transport, leftover, self.config.rest_keep_alive_timeout_s
            )
            if next_head is None:
                return
            head = next_head
            if not self.rest.handles(head):
                break
        if head.path in REALTIME_PATHS and head.is_websocket_upgrade():
            await self._realtime(transport, head)
        else:
            transport.answered = True
            await self.control.handle(transport, head)

    async def _refuse(self, transport: Transport, head: RequestHead, refusal: Refused) -> None:
        self.metrics.errors.labels(kind=refusal.code).inc()
        ACCESS_LOG.info(
            "realtime handshake refused",
            extra={
                "fields": {
                    "event": "access",
                    "path": head.path,
                    "status": refusal.status,
                    "code": refusal.code,
                    "client": self.client_address(head, transport.peer),
                }
            },
        )
        await http.send_error(
            transport,
            refusal.status,
            refusal.message,
            error_type=refusal.error_type,
            code=refusal.code,
            param=refusal.param,
            extra_headers=refusal.headers,
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
        registry = self.registry
        decision = admit(
            head,
            checker=self.checker,
            policy=self.admission_policy,
            occupancy=registry.occupancy(),
            app_session_limit=self._app_session_limit,
        )
        if isinstance(decision, Refused):
            await self._refuse(transport, head, decision)
            return
        if decision.query.dropped:
            LOGGER.info(
                "dropped query parameters not forwarded upstream: %s",
                ", ".join(decision.query.dropped),
            )
        if handshake.has_beta_marker(head):
            LOGGER.info(
                "stripped the retired beta marker (OpenAI-Beta / openai-beta.realtime-v1) "
                "from a client handshake; the upstream gets the GA protocol"
            )
        claims = decision.claims
        # Everything that can fail is built before the 101: after it, only the
        # session's own close table answers the client.
        limits = self.limits
        lock: SessionLock | None = None
        if claims is not None:
            if claims.max_session_s:
                limits = dataclasses.replace(
                    limits, max_session_s=min(limits.max_session_s, claims.max_session_s)
                )
            if claims.session:
                lock = SessionLock(orjson.loads(claims.session))
        reservation = registry.reserve(decision)
        routed: Routed | None = None
        try:
            routed = await self._dial(transport, decision)
            if routed is None:
                return
            upstream = routed.websocket
            if routed.upstream.max_session_s:
                limits = dataclasses.replace(
                    limits, max_session_s=min(limits.max_session_s, routed.upstream.max_session_s)
                )
            first_events: tuple[bytes, ...] = ()
            if lock is not None:
                started = await self._start_locked(upstream, lock)
                if started is None:
                    upstream.transport.close()
                    await self._refuse(
                        transport,
                        head,
                        Refused(
                            502,
                            "The upstream did not accept the session config.",
                            "upstream_refused_session_config",
                            "server_error",
                        ),
                    )
                    return
                first_events = started
            client = WebSocket(
                transport,
                client_side=False,
                max_message_bytes=self.config.max_message_bytes,
                initial_data=head.trailing,
            )
            audio_path = binary_audio.selects_audio_path(
                head.subprotocols, enabled=self.config.binary_audio_enabled
            )
            session = RelaySession(
                client,
                upstream,
                limits,
                remask_upstream=_needs_remask(self.config, upstream),
                session_id=registry.new_session_id(),
                lock=lock,
                first_client_events=first_events,
                binary_audio_max_message_bytes=(
                    self.config.binary_audio_max_message_bytes if audio_path else None
                ),
            )
            session.credential_id = decision.credential_id
            session.upstream_name = routed.key.upstream
            session.upstream_key_id = routed.key.key_id
            spent = registry.establish(reservation, session)
            if spent is not True:
                upstream.transport.close()
                await self._refuse(
                    transport,
                    head,
                    # Another handshake with this single-use token won the race to 101,
                    # or the replay store filled up while this one dialed.
                    Refused(401, "This single-use token was already used.", "token_used")
                    if spent is False
                    else REPLAY_STORE_FULL,
                )
                return
            transport.answered = True
            try:
                await transport.send_all(
                    handshake.accept_response(
                        head,
                        selected_subprotocol=binary_audio.AUDIO_SUBPROTOCOL if audio_path else None,
                    )
                )
            except BaseException:
                registry.remove(session, claims)
                upstream.transport.close()
                raise
            self.metrics.handshake_seconds.observe(trio.current_time() - handshake_started)
            context = SessionContext(
                decision.credential_id, claims, self.client_address(head, transport.peer)
            )
            registry.release(reservation)
            try:
                await session.run()
            finally:
                registry.remove(session, claims)
                upstream.transport.close()
        finally:
            registry.release(reservation)
            if routed is not None:
                # The key's live count, held since its dial, ends with the session.
                self.router.live.remove(routed.key)
        try:
            registry.record_end(session, context)
        except Exception:
            # Accounting must never take the connection (or the process) with it.
            self.metrics.errors.labels(kind="session_accounting_error").inc()
            LOGGER.exception("session %s: recording its end failed", session.session_id)

    async def _dial(self, transport: Transport, admitted: Admitted) -> Routed | None:
        """The upstream leg, or None once its refusal has been answered to the client."""
        router = self.router
        try:
            return await router.dial(
                router.table.route(admitted.query.model),
                admitted.query,
                extra_headers=admitted.upstream_headers,
                max_message_bytes=self.config.max_message_bytes,
                timeout_s=self.config.upstream_connect_timeout_s,
            )
        except UpstreamRefused as refusal:
            LOGGER.info("upstream refused a session: %s", refusal.detail)
            self.metrics.errors.labels(kind=f"upstream_{refusal.status}").inc()
            transport.answered = True
            await transport.send_all(
                handshake.http_response(refusal.status, refusal.body, extra_headers=refusal.headers)
            )
            return None

    async def _start_locked(
        self, upstream: WebSocket, lock: SessionLock
    ) -> tuple[bytes, ...] | None:
        """Apply a token's locked config before the client's 101, invisibly: the
        client's first events (a ``session.created`` carrying the applied session),
        or None when the upstream refused it (logged)."""
        start = LockedStart()
        with trio.move_on_after(self.config.upstream_connect_timeout_s):
            try:
                await upstream.send_text(lock.initial_update())
                while True:
                    opcode, payload = await upstream.receive_message()
                    if opcode != OP_TEXT:
                        outcome: LockedStartDone | LockedStartFailed | None = LockedStartFailed(
                            "the upstream sent a binary message before the session"
                        )
                    else:
                        outcome = start.feed(payload)
                    if isinstance(outcome, LockedStartDone):
                        return outcome.client_events
                    if isinstance(outcome, LockedStartFailed):
                        LOGGER.warning("locked session config not applied: %s", outcome.detail)
                        return None
            except (ConnectionClosed, TransportClosed):
                LOGGER.warning("locked session config not applied: the upstream went away")
                return None
        LOGGER.warning("locked session config not applied: the upstream did not answer in time")
        return None

    def _app_session_limit(self, app: str) -> int:
        key = self.app_keys.check_name(app)
        return key.max_concurrent_sessions if key is not None else 0

    @property
    def admin_key_sha256(self) -> str:
        return self.config.admin_key_sha256

    def list_sessions(self) -> list[dict[str, object]]:
        return self.registry.listing()

    def list_upstreams(self) -> list[dict[str, object]]:
        router = self.router
        states: dict[str, list[dict[str, object]]] = {}
        for state in router.key_states():
            states.setdefault(state.upstream, []).append(
                {
                    "key_id": state.key_id,
                    "live_sessions": state.live_sessions,
                    "cool_down_s": state.cooling_s,
                    "rejected": state.rejected,
                    "handshakes": state.handshakes,
                }
            )
        return [
            upstream.describe()
            | {
                "live_sessions": router.live.by_upstream.get(upstream.name, 0),
                "keys": states.get(upstream.name, []),
            }
            for upstream in router.table.upstreams
        ]

    def end_session(self, session_id: str) -> bool:
        return self.registry.end(session_id)

    def start_drain(self) -> None:
        """Stop taking sessions: readiness and new handshakes answer 503 from now on."""
        self.registry.draining = True

    async def drain(self, timeout_s: float, *, hurry: trio.Event) -> None:
        """Let live sessions finish for up to ``timeout_s`` (or until ``hurry``), then end
        the rest with an ``error`` event and 1001; returns when every session has closed."""
        self.start_drain()
        registry = self.registry
        with trio.move_on_after(timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_set, hurry, nursery.cancel_scope)
                while registry.busy:
                    await registry.wait_changed()
                nursery.cancel_scope.cancel()
        if registry.sessions:
            LOGGER.info("drain: ending %d live session(s) with 1001", len(registry.sessions))
            registry.end_all(EndKind.SHUTDOWN)
        while registry.busy:
            # A handshake admitted before the drain may still become a session: end it too.
            registry.end_all(EndKind.SHUTDOWN)
            await registry.wait_changed()

    def apply_config(
        self, config: ServeConfig, upstreams: UpstreamTable | None = None
    ) -> list[str]:
        """Adopt a reloaded configuration for new sessions; live sessions keep theirs
        (their upstream and key included). ``upstreams``: the table ``config``
        describes, built by the caller so a bad key file refuses the reload before
        anything changed; None builds it here.

        Returns the settings that only take effect after a restart.
        """
        table = upstreams if upstreams is not None else build_upstream_table(config)
        needs_restart = [
            name for name in ("host", "port") if getattr(config, name) != getattr(self.config, name)
        ]
        self._configure(config, table)
        logging.getLogger("relay").setLevel(config.log_level.upper())
        return needs_restart


def _minter(
    config: ServeConfig, table: UpstreamTable, app_keys: AppKeyStore, keyring: KeyringFile
) -> Minter:
    """The client-secret minter: OpenAI's ``client_secrets`` on the first OpenAI-shaped
    upstream (by priority) and its first key, for ``ek_`` secrets."""
    shaped = sorted(
        (up for up in table.upstreams if up.spec.kind is not UpstreamKind.AZURE),
        key=lambda up: up.priority,
    )
    if not shaped:
        base, key, ca_file = config.upstream_url, "", config.upstream_ca_file
    else:
        first = shaped[0]
        base, key = first.spec.base_url, first.keys[0].credential().value.reveal()
        ca_file = first.ca_file
    return Minter(
        app_keys,
        keyring.current,
        upstream_http_base=http_base_for(base),
        upstream_api_key=key,
        upstream_ca_file=ca_file,
    )


def session_limits(config: ServeConfig) -> SessionLimits:
    """The per-session limits a configuration sets."""
    return SessionLimits(
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
    return peer is None or not _is_loopback(peer[0])


@functools.lru_cache(maxsize=256)
def _is_loopback(address: str) -> bool:
    """Per upstream address, once: every session dials the same few."""
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
