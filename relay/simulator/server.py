"""The simulator's Trio shell: a listener that speaks OpenAI's Realtime wire protocol.

This module owns the I/O around the sans-I/O session engine
(:mod:`relay.simulator.engine`) and client-secret store
(:mod:`relay.simulator.secrets`):

- one accept loop, one task per connection; the head is read with a timeout;
- ``POST /v1/realtime/client_secrets`` (standard key only) mints ``ek_`` secrets;
- ``GET /v1/realtime`` (or ``/realtime``) upgrades: auth by ``Authorization: Bearer``
  or the browser subprotocol, else 401 with OpenAI's envelope; a model outside
  ``models`` (when set) is refused; the answer selects
  exactly ``realtime`` when offered (or ``relay.audio.v1``, below); the beta marker
  is accepted and then refused the way OpenAI does (``error`` event, close 4000
  ``invalid_request_error.beta_api_shape_disabled``);
- the binary audio path (``docs/binary-audio.md``): a client offering
  ``relay.audio.v1`` gets it selected (except in ``raw-echo``, which mirrors frames
  and speaks no contract). Then each binary message is audio in the session's input
  format, turned into the ``input_audio_buffer.append`` the engine reads
  (:func:`relay.protocol.binary_audio.append_event`) or refused with the relay's
  ``error`` events (empty, over :data:`BINARY_AUDIO_MAX_MESSAGE_BYTES`, a partial
  sample); each ``response.output_audio.delta`` the engine sends (echo mode
  included) goes out as a binary frame of its audio, after a
  ``relay.output_audio.start`` marker for each new content part. Without the
  opt-in a binary message is answered ``invalid_event``, as OpenAI's JSON-only
  protocol would;
- the azure flavor (``flavor = "azure"``): an Azure OpenAI resource instead, its
  paths, ``api-key``/Entra auth, deployments and error bodies
  (:mod:`relay.simulator.flavors`); the session ends at Azure's 30 minutes;
- in-process faults and the handshake log (:mod:`relay.simulator.faults`):
  ``Simulator.faults`` refuses, stalls or de-authorizes the next handshakes, and
  ``Simulator.handshakes`` records each realtime handshake (path, model, auth
  scheme, key index, status), whatever ``faults_enabled`` says;
- the REST endpoints (everything else under ``/v1/``, or ``/openai/`` under azure:
  chat completions, responses, speech, transcriptions, embeddings, models), served
  over keep-alive HTTP/1.1 by :mod:`relay.simulator.rest`, with their own fault
  queue ``Simulator.rest_faults`` and log ``Simulator.rest_requests``
  (:meth:`Simulator.wait_rest_requests` waits for a count of them);
- modes: ``normal`` (the engine), ``echo`` (the engine's lean echo path, replies
  sent from the reading task itself: no extra scheduler pass), ``raw-echo`` (every
  data frame written back unchanged, text or binary);
- test hooks when ``faults_enabled``: ``?sim_mode=normal|echo|raw-echo`` picks the
  mode per connection and ``?sim_fault=`` injects a fault:
  ``close:<code>:<reason>`` (after ``session.created``), ``stall`` (stop reading and
  writing), ``garbage`` (bytes that are not a WebSocket frame), ``drop`` (TCP reset,
  no close frame), ``refuse:<status>`` (HTTP error on the handshake),
  ``hang`` (never answer the handshake); ``?sim_start=session`` makes ``raw-echo``
  open the session the way OpenAI does first (``session.created``, and the first
  ``session.update`` answered by ``session.updated`` instead of echoed), for a relay
  that applies a locked session config before it lets the client in;
- a test hook, ``Simulator(config, record_audio=True)``: ``Simulator.received_audio``
  holds one :class:`~relay.simulator.received_audio.ReceivedAudio` per session
  (newest last, the latest
  :data:`~relay.simulator.received_audio.RECEIVED_AUDIO_MAX_SESSIONS`): the decoded
  audio of its appends (text or binary), the first
  :data:`~relay.simulator.received_audio.RECEIVED_AUDIO_MAX_BYTES` of it kept, with
  its RMS, level and checksum.

The simulator uses the same frame codec and transport as the relay, so it is never
the bottleneck of a benchmark that puts the relay in front of it.
"""

from __future__ import annotations

import collections
import hmac
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs

import orjson
import trio

from relay.config import SimulatorConfig, SimulatorMode
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
from relay.net.websocket import ConnectionClosed, WebSocket
from relay.protocol import frames, handshake
from relay.protocol.binary_audio import (
    AUDIO_SUBPROTOCOL,
    DEFAULT_MAX_AUDIO_MESSAGE_BYTES,
    AudioFormat,
    DeltaConverter,
    append_event,
    audio_problem,
    is_audio_delta,
)
from relay.protocol.events import error_event, new_id
from relay.protocol.frames import (
    OP_BINARY,
    OP_TEXT,
    Frame,
    FrameChunk,
    FrameProtocolError,
    FrameStart,
)
from relay.protocol.handshake import HandshakeError, RequestHead
from relay.simulator import flavors, rest
from relay.simulator.engine import SimulatedSession
from relay.simulator.faults import (
    HANDSHAKE_LOG_MAX_RECORDS,
    REST_LOG_MAX_RECORDS,
    HandshakeFaults,
    HandshakeRecord,
    RestFaults,
    RestRecord,
    credential_digest,
)
from relay.simulator.flavors import Presented, Refusal
from relay.simulator.received_audio import RECEIVED_AUDIO_MAX_SESSIONS, ReceivedAudio
from relay.simulator.secrets import ClientSecretStore

LOGGER = logging.getLogger("relay.simulator")

HANDSHAKE_TIMEOUT_S: Final = 10.0
#: ``client_secrets`` request bodies are small JSON documents.
MAX_SECRETS_BODY_BYTES: Final = 256 * 1024
REALTIME_PATHS: Final = flavors.OPENAI_REALTIME_PATHS
#: Read size while a stalled handshake waits for its peer to hang up (bytes).
STALL_READ_BYTES: Final = 4096
CLIENT_SECRETS_PATHS: Final = frozenset({"/v1/realtime/client_secrets", "/realtime/client_secrets"})
BETA_CLOSE_CODE: Final = 4000
BETA_CLOSE_REASON: Final = "invalid_request_error.beta_api_shape_disabled"
#: Largest binary audio message turned into an append (bytes; the relay's default).
BINARY_AUDIO_MAX_MESSAGE_BYTES: Final = DEFAULT_MAX_AUDIO_MESSAGE_BYTES


class Simulator:
    """Shared state of one simulator: accepted keys, minted secrets, connection count.

    ``record_audio``: keep what each session received in :attr:`received_audio`.
    """

    def __init__(self, config: SimulatorConfig, *, record_audio: bool = False) -> None:
        self.config = config
        self.record_audio = record_audio
        #: With ``record_audio``: one record per session, newest last (bounded).
        self.received_audio: list[ReceivedAudio] = []
        self._key_digests = tuple(credential_digest(k) for k in config.api_keys)
        self._entra_digests = tuple(credential_digest(t) for t in config.entra_tokens)
        #: Programmed refusals, stalls and revoked keys for the next handshakes.
        self.faults = HandshakeFaults()
        #: Every realtime handshake answered (or stalled), oldest first (bounded).
        self.handshakes: list[HandshakeRecord] = []
        #: Programmed refusals, stalls and drops for the next REST requests (keys
        #: are revoked in ``faults``, for both kinds).
        self.rest_faults = RestFaults()
        #: Every REST request, from its head on, oldest first (bounded).
        self.rest_requests: list[RestRecord] = []
        #: REST requests whose head was read / that ended, since the start (unbounded
        #: counts, unlike the log).
        self.rest_requests_started = 0
        self.rest_requests_finished = 0
        #: Connections that carried a REST request (keep-alive reuse shows here).
        self.rest_connections = 0
        self._rest_changed = trio.Event()
        self.secrets = ClientSecretStore()
        self.sessions_opened = 0
        self.live_sessions = 0
        #: Sessions opened per configured API key (by position), e.g. to see key rotation.
        self.sessions_by_key_index: collections.Counter[int] = collections.Counter()
        self.last_safety_identifier: str | None = None
        self.ssl_context: ssl.SSLContext | None = None
        if config.tls_cert_file:
            self.ssl_context = server_tls_context(config.tls_cert_file, config.tls_key_file)

    def is_api_key(self, credential: str) -> bool:
        """Constant-time check against every configured key (digests, so lengths don't leak)."""
        return self.api_key_index(credential) >= 0

    def api_key_index(self, credential: str) -> int:
        """Which configured key this is (its position), or -1; every digest is compared."""
        return _digest_index(credential, self._key_digests)

    def is_entra_token(self, credential: str) -> bool:
        return _digest_index(credential, self._entra_digests) >= 0

    async def wait_rest_requests(self, count: int, *, started: bool = False) -> None:
        """Return once ``count`` REST requests have ended (``started``: had their head
        read) since this simulator started; at once if they already have."""
        while (self.rest_requests_started if started else self.rest_requests_finished) < count:
            await self._rest_changed.wait()

    def new_rest_connection(self) -> int:
        """Number a connection that carries REST requests (1, 2, ...)."""
        self.rest_connections += 1
        return self.rest_connections

    def rest_request_started(self, record: RestRecord) -> None:
        self.rest_requests.append(record)
        if len(self.rest_requests) > REST_LOG_MAX_RECORDS:
            del self.rest_requests[0]
        self.rest_requests_started += 1
        self._notify_rest()

    def rest_request_finished(self, record: RestRecord) -> None:
        self.rest_requests_finished += 1
        self._notify_rest()

    def _notify_rest(self) -> None:
        # One event per change, replaced: every waiter re-checks its own count.
        self._rest_changed.set()
        self._rest_changed = trio.Event()

    async def serve_request(self, transport: Transport, head: RequestHead) -> None:
        """Answer one request whose head was read (the REST side hands on a realtime
        upgrade that follows REST requests on one connection)."""
        await self._route(transport, head)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve forever; ``task_status.started(port)``."""
        listener = open_listener(self.config.host, self.config.port)
        try:
            port = int(listener.getsockname()[1])
            LOGGER.info(
                "simulator listening on %s:%d mode=%s flavor=%s",
                self.config.host,
                port,
                self.config.mode,
                self.config.flavor,
            )
            async with trio.open_nursery() as nursery:
                task_status.started(port)
                while True:
                    sock, peer = await accept(listener)
                    sock = wrap_server_tls(sock, self.ssl_context)
                    nursery.start_soon(self._handle_connection, Transport(sock, peer=peer))
                    await trio.lowlevel.checkpoint()
        finally:
            listener.close()

    async def _handle_connection(self, transport: Transport) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                if transport.is_tls:
                    try:
                        await tls_handshake(transport)
                    except (OSError, ssl.SSLError):
                        return
                head = await http.read_request_head(transport)
            if head is None:
                return
            await self._route(transport, head)
        except HandshakeError as exc:
            await http.send_error(transport, exc.status, exc.message, code=exc.code)
        except Refusal as refusal:
            await _send_refusal(transport, refusal)
        except (TransportClosed, trio.TooSlowError):
            pass
        finally:
            transport.close()

    async def _route(self, transport: Transport, head: RequestHead) -> None:
        """Dispatch by path; a realtime handshake takes its programmed fault (if any),
        then the checks, and is logged with its answer before the session runs."""
        path = head.path
        flavor = self.config.flavor
        if flavor == "openai" and path in CLIENT_SECRETS_PATHS:
            await self._client_secrets(transport, head)
            return
        if rest.is_rest_path(flavor, path):
            await rest.serve_connection(self, transport, head)
            return
        if not flavors.is_realtime_path(flavor, path):
            raise flavors.not_found(flavor, head.method, path)
        query = {k: v[-1] for k, v in parse_qs(head.query, keep_blank_values=True).items()}
        presented = flavors.presented_credential(flavor, head, query)
        key_index: int | None = None
        if presented.credential is not None and presented.scheme != "entra":
            key_index = self.api_key_index(presented.credential)
            key_index = key_index if key_index >= 0 else None
        model = flavors.requested_model(flavor, path, query)

        def record(status: int | None) -> None:
            self._log_handshake(HandshakeRecord(path, model, presented.scheme, key_index, status))

        try:
            problem = handshake.websocket_request_problem(head)
            if problem is not None:
                raise problem
            planned = self.faults.take_next()
            if planned is not None and planned.kind == "stall":
                record(None)
                await _stall(transport)
                return
            if planned is not None:
                raise flavors.fault_refusal(
                    flavor,
                    planned.status,
                    model=model,
                    retry_after_s=planned.retry_after_s,
                    body=planned.body,
                )
            fault = query.get("sim_fault", "") if self.config.faults_enabled else ""
            if fault == "hang":
                record(None)
                await trio.sleep_forever()
            admission = self._admit(head, query, presented, fault)
        except (HandshakeError, Refusal) as refused:
            record(refused.status)
            raise
        record(101)
        await self._open_session(transport, head, query, admission)

    def _log_handshake(self, entry: HandshakeRecord) -> None:
        self.handshakes.append(entry)
        if len(self.handshakes) > HANDSHAKE_LOG_MAX_RECORDS:
            del self.handshakes[0]
        if entry.status == 101 and entry.key_index is not None:
            self.sessions_by_key_index[entry.key_index] += 1

    def _admit(
        self, head: RequestHead, query: dict[str, str], presented: Presented, fault: str
    ) -> _Admission:
        """The checks between a valid upgrade request and the 101, in the flavor's order."""
        if fault.startswith("refuse:"):
            status = int(fault.partition(":")[2] or "500")
            raise HandshakeError(status, f"Simulated refusal with HTTP {status}.", code="simulated")
        azure = self.config.flavor == "azure"
        if azure:
            flavors.check_azure_route(head.path, query)
        now = time.time()
        initial_session = self._authorize(presented, now)
        # What the upstream saw of the relay's handshake, for tests (never a credential).
        self.last_safety_identifier = head.header(b"openai-safety-identifier")
        if "call_id" in query:
            raise HandshakeError(
                404, "No session found for the provided call_id", code="call_id_not_found"
            )
        requested = flavors.requested_model(self.config.flavor, head.path, query)
        model = requested or str((initial_session or {}).get("model") or "")
        transcription = query.get("intent") == "transcription"
        if azure:
            flavors.check_azure_deployment(
                head.path, model, self.config.azure_deployments, transcription=transcription
            )
        elif not model and not transcription:
            raise HandshakeError(400, "Missing required parameter: 'model'.", code="missing_model")
        elif model and self.config.models and model not in self.config.models:
            raise flavors.model_not_found(model)
        return _Admission(model=model, initial_session=initial_session, now=now, fault=fault)

    def _authorize(self, presented: Presented, now: float) -> dict[str, object] | None:
        """Check the credential; the client secret's session config when it is one."""
        credential = presented.credential
        if self.config.flavor == "azure":
            valid = (
                credential is not None
                and not self.faults.is_revoked(credential)
                and (
                    self.is_entra_token(credential)
                    if presented.scheme == "entra"
                    else self.is_api_key(credential)
                )
            )
            if not valid:
                raise flavors.azure_unauthorized(presented.scheme)
            return None
        if credential is None:
            raise HandshakeError(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        initial_session: dict[str, object] | None = None
        revoked = self.faults.is_revoked(credential)
        if credential.startswith("ek_") and not revoked:
            initial_session = self.secrets.lookup(credential, now)
            if initial_session is None:
                raise HandshakeError(
                    401, "Invalid or expired ephemeral key.", code="invalid_api_key"
                )
        elif revoked or not self.is_api_key(credential):
            # OpenAI's wording, which quotes the key's ends: a relay must not pass it on.
            raise HandshakeError(
                401,
                f"Incorrect API key provided: {flavors.masked_key(credential)}. You can find your "
                "API key at https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return initial_session

    async def _open_session(
        self,
        transport: Transport,
        head: RequestHead,
        query: dict[str, str],
        admission: _Admission,
    ) -> None:
        """Send the 101 and run the session until either side ends it."""
        model, fault, now = admission.model, admission.fault, admission.now
        initial_session = admission.initial_session
        mode: SimulatorMode = self.config.mode
        requested_mode = query.get("sim_mode") if self.config.faults_enabled else None
        if requested_mode in ("normal", "echo", "raw-echo"):
            mode = requested_mode  # type: ignore[assignment]

        binary_audio = mode != "raw-echo" and AUDIO_SUBPROTOCOL in head.subprotocols
        await transport.send_all(
            handshake.accept_response(
                head, selected_subprotocol=AUDIO_SUBPROTOCOL if binary_audio else None
            )
        )
        ws = WebSocket(
            transport,
            client_side=False,
            max_message_bytes=self.config.max_message_bytes,
            initial_data=head.trailing,
        )
        self.sessions_opened += 1
        self.live_sessions += 1
        try:
            if handshake.has_beta_marker(head):
                await ws.send_text(
                    error_event(
                        message="The Realtime Beta API is no longer supported. "
                        "Please use /v1/realtime for the GA API.",
                        code="beta_api_shape_disabled",
                    )
                )
                await ws.close(BETA_CLOSE_CODE, BETA_CLOSE_REASON)
                return
            if mode == "raw-echo":
                opens_like_openai = (
                    self.config.faults_enabled and query.get("sim_start") == "session"
                )
                if opens_like_openai and not await _open_session_like_openai(
                    ws, model or "gpt-realtime"
                ):
                    return
                await _raw_echo(ws)
                return
            engine = SimulatedSession(
                self._engine_config(mode),
                model=model or "gpt-realtime",
                now=now,
                initial_session=initial_session,
                on_audio=self._new_record(binary_audio),
            )
            await _run_session(ws, engine, fault, binary_audio=binary_audio)
        finally:
            self.live_sessions -= 1

    def _new_record(self, binary_audio: bool) -> Callable[[bytes, str], None] | None:
        """The engine's audio observer for a new session (``None``: not recording)."""
        if not self.record_audio:
            return None
        record = ReceivedAudio(binary_path=binary_audio)
        self.received_audio.append(record)
        if len(self.received_audio) > RECEIVED_AUDIO_MAX_SESSIONS:
            del self.received_audio[0]
        return record.add

    def _engine_config(self, mode: SimulatorMode) -> SimulatorConfig:
        if mode == self.config.mode:
            return self.config
        fields = {f: getattr(self.config, f) for f in self.config.__struct_fields__}
        fields["mode"] = mode
        return SimulatorConfig(**fields)

    async def _client_secrets(self, transport: Transport, head: RequestHead) -> None:
        if head.method != "POST":
            raise HandshakeError(405, "Use POST.", code="method_not_allowed")
        credential = handshake.client_credential(head)
        if (
            credential is None
            or not self.is_api_key(credential)
            or self.faults.is_revoked(credential)
        ):
            raise HandshakeError(401, "Incorrect API key provided.", code="invalid_api_key")
        body = await http.read_body(
            transport, head.trailing, _content_length(head), max_bytes=MAX_SECRETS_BODY_BYTES
        )
        status, payload = self.secrets.mint(body, time.time())
        await transport.send_all(handshake.http_response(status, payload))


@dataclass(frozen=True, slots=True)
class _Admission:
    """What the checks let through to the session: its model and starting config."""

    model: str
    initial_session: dict[str, object] | None
    now: float
    fault: str


def _digest_index(credential: str, digests: tuple[bytes, ...]) -> int:
    """The position of the credential's digest, or -1; every digest is compared."""
    candidate = credential_digest(credential)
    found = -1
    for index, digest in enumerate(digests):
        if hmac.compare_digest(candidate, digest):
            found = index
    return found


async def _send_refusal(transport: Transport, refusal: Refusal) -> None:
    transport.answered = True
    try:
        await transport.send_all(
            handshake.http_response(refusal.status, refusal.body, extra_headers=refusal.headers)
        )
    except TransportClosed:
        pass


async def _stall(transport: Transport) -> None:
    """Answer nothing; read (and drop) until the peer hangs up."""
    buffer = bytearray(STALL_READ_BYTES)
    while await transport.recv_into(buffer):
        pass


def _content_length(head: RequestHead) -> int | None:
    value = head.header(b"content-length")
    return int(value) if value is not None and value.strip().isdigit() else None


async def _run_session(
    ws: WebSocket, engine: SimulatedSession, fault: str, *, binary_audio: bool = False
) -> None:
    """Drive one engine: the reading task answers at once; a timer task sends paced events.

    ``binary_audio``: the session speaks ``relay.audio.v1`` (binary audio both ways).
    """
    send_lock = trio.Lock()
    wakeup = trio.Event()
    converter = DeltaConverter() if binary_audio else None

    async def flush(refusal: bytes | None = None) -> None:
        # Popping and sending under one lock keeps server events in engine order.
        try:
            send_lock.acquire_nowait()
        except trio.WouldBlock:
            await send_lock.acquire()
        try:
            if refusal is not None:
                await ws.send_text(refusal)
            for payload in engine.pop_due(trio.current_time() + _clock_offset):
                if converter is None:
                    await ws.send_text(payload)
                else:
                    await ws.send_raw(_binary_path_frames(converter, payload))
        finally:
            send_lock.release()

    close_with: tuple[int, str] = (frames.CLOSE_NORMAL, "")

    async def timer(cancel_scope: trio.CancelScope) -> None:
        nonlocal wakeup, close_with
        try:
            while True:
                due = engine.next_due()
                deadline = math.inf if due is None else due - _clock_offset
                with trio.move_on_at(deadline):
                    await wakeup.wait()
                wakeup = trio.Event()
                await flush()
                if engine.close_request is not None:
                    # Closed below, once the reading task is cancelled: the close
                    # handshake reads the socket, which only one task may do.
                    close_with = engine.close_request
                    break
        except TransportClosed:
            pass
        cancel_scope.cancel()

    _clock_offset = time.time() - trio.current_time()
    engine.start(time.time())
    await flush()
    if await _apply_fault(ws, fault):
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(timer, nursery.cancel_scope)
            try:
                while True:
                    opcode, payload = await ws.receive_message()
                    if opcode == OP_BINARY and binary_audio:
                        refusal = audio_problem(
                            len(payload),
                            AudioFormat(engine.input_format).sample_bytes,
                            BINARY_AUDIO_MAX_MESSAGE_BYTES,
                        )
                        if refusal is not None:
                            await flush(refusal)
                            continue
                        payload = append_event(payload)
                    elif opcode == OP_BINARY:
                        # OpenAI's Realtime API speaks JSON text only.
                        await ws.send_text(
                            error_event(
                                message="Binary frames are not supported; send JSON text events.",
                                code="invalid_event",
                            )
                        )
                        continue
                    engine.receive(payload, time.time())
                    await flush()
                    if engine.next_due() is not None or engine.close_request is not None:
                        wakeup.set()
            except (ConnectionClosed, TransportClosed):
                pass
            nursery.cancel_scope.cancel()
    finally:
        await ws.close(*close_with)


def _binary_path_frames(converter: DeltaConverter, payload: bytes) -> bytes:
    """One server event as ``relay.audio.v1`` sends it: an audio delta as a binary frame
    (after a start marker for a new content part), any other event as its text frame."""
    if is_audio_delta(payload):
        converted = converter.convert(payload)
        if converted is not None:
            marker, pcm = converted
            binary = frames.encode_frame(OP_BINARY, pcm)
            if marker is None:
                return binary
            return frames.encode_frame(OP_TEXT, marker) + binary
    return frames.encode_frame(OP_TEXT, payload)


async def _apply_fault(ws: WebSocket, fault: str) -> bool:
    """Inject a fault after ``session.created``; ``True`` when the session is over."""
    if not fault:
        return False
    kind, _, argument = fault.partition(":")
    if kind == "close":
        code_text, _, reason = argument.partition(":")
        await ws.close(int(code_text or "1000"), reason)
        return True
    if kind == "stall":
        await trio.sleep_forever()
    if kind == "garbage":
        # A reserved opcode with RSV bits set: no WebSocket peer may accept this.
        await ws.send_raw(b"\xff\xff\x00garbage-not-a-frame")
        await trio.sleep(0.5)
        ws.transport.close()
        return True
    if kind == "drop":
        ws.transport.abort()
        return True
    return False


async def _open_session_like_openai(ws: WebSocket, model: str) -> bool:
    """``session.created``, then the first ``session.update`` answered with
    ``session.updated`` carrying its session; False if the peer went away."""
    session_id = new_id("sess_")
    created = {
        "type": "session.created",
        "event_id": new_id("event_"),
        "session": {"id": session_id, "model": model},
    }
    try:
        await ws.send_text(orjson.dumps(created))
        opcode, payload = await ws.receive_message()
        update = orjson.loads(payload) if opcode == frames.OP_TEXT else None
        if not isinstance(update, dict) or update.get("type") != "session.update":
            await ws.send_raw(frames.encode_frame(opcode, payload))
            return True
        session = {"id": session_id, "model": model, **(update.get("session") or {})}
        await ws.send_text(
            orjson.dumps(
                {"type": "session.updated", "event_id": new_id("event_"), "session": session}
            )
        )
    except (ConnectionClosed, TransportClosed, orjson.JSONDecodeError):
        ws.transport.close()
        return False
    return True


async def _raw_echo(ws: WebSocket) -> None:
    """Write every data frame back unchanged (re-framed unmasked), text or binary."""
    try:
        while True:
            try:
                event = await ws.next_frame_event()
            except FrameProtocolError as exc:
                await ws.close_quietly(exc.close_code, exc.reason)
                return
            if isinstance(event, Frame):
                if event.opcode >= frames.OP_CLOSE:
                    if event.opcode == frames.OP_CLOSE:
                        code, reason = frames.decode_close_payload(event.payload())
                        await ws.close(code if code != frames.CLOSE_NO_STATUS else 1000, reason)
                        return
                    if event.opcode == frames.OP_PING:
                        await ws.send_pong(event.payload())
                    continue
                await ws.send_raw(frames.encode_frame(event.opcode, event.payload(), fin=event.fin))
            elif isinstance(event, FrameStart):
                parts: list[bytes] = []
                mask_key = event.mask_key
                while True:
                    chunk = await ws.next_frame_event()
                    assert isinstance(chunk, FrameChunk)
                    data = bytes(chunk.data)
                    parts.append(
                        frames.xor_mask(data, mask_key, chunk.offset) if mask_key else data
                    )
                    if chunk.last:
                        break
                await ws.send_raw(frames.encode_frame(event.opcode, b"".join(parts), fin=event.fin))
    except (ConnectionClosed, TransportClosed):
        pass
    finally:
        ws.transport.close()


async def serve_simulator(
    config: SimulatorConfig, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a simulator until cancelled; ``task_status.started(port)``."""
    await Simulator(config).serve(task_status=task_status)


__all__ = ["OP_TEXT", "Simulator", "serve_simulator"]
