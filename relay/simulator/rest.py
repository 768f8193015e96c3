"""The simulator's REST endpoints: OpenAI's (or an Azure resource's) HTTP API, over HTTP/1.1.

This module owns every request under ``/v1/`` (openai flavor) or ``/openai/``
(azure flavor) that is not the realtime upgrade; the bodies answered are
:mod:`relay.simulator.rest_payloads`', the realtime side is
:mod:`relay.simulator.server`'s:

- the connection: h11 over the simulator's :class:`~relay.net.transport.Transport`,
  several requests per connection (keep-alive; ``Connection: close`` and HTTP/1.0
  honoured), request bodies framed by ``Content-Length`` or chunked; an idle
  connection is closed after :data:`REST_KEEPALIVE_IDLE_S`, and a realtime upgrade
  arriving on a connection that served REST is handed to the realtime side;
- bounded memory: bodies are read as they arrive, one read at a time
  (:data:`REST_READ_BYTES`), hashed (SHA-256) and counted; a JSON body is kept up
  to :data:`REST_JSON_MAX_BODY_BYTES` (413 past that), a multipart upload's file
  is never kept (:mod:`relay.simulator.multipart`), only its size and hash;
  ``SimulatorConfig.rest_read_bytes_per_s`` reads bodies no faster than that;
- the routes (:func:`resolve_route`). openai: ``POST /v1/chat/completions``,
  ``/v1/responses``, ``/v1/audio/speech``, ``/v1/audio/transcriptions``,
  ``/v1/embeddings``; ``GET /v1/models`` and ``/v1/models/{id}``. azure: the
  deployment form ``/openai/deployments/{deployment}/{chat/completions,
  embeddings, audio/transcriptions, audio/speech}?api-version=…`` (api-version
  required, the deployment checked against ``azure_deployments``),
  ``/openai/responses?api-version=…`` and the GA ``/openai/v1/{chat/completions,
  responses, embeddings, audio/transcriptions, audio/speech, models}`` whose
  deployment is the body's ``model``;
- auth as for the realtime handshakes: openai's ``Authorization: Bearer`` (or
  ``api-key``) holding one of ``api_keys`` (``ek_`` client secrets are for realtime
  only); azure's ``api-key`` header or ``Authorization: Bearer`` holding an Entra
  token (or an API key, as Azure's v1 API accepts); keys revoked in
  ``sim.faults`` are refused here too;
- errors: OpenAI's envelope ``{"error": {message, type, param, code}}``; under
  azure, auth, URL and deployment errors in Azure's ``{"error": {code, message}}``
  (request-body validation keeps OpenAI's envelope, which Azure passes on);
- faults and the log: each request takes one fault from ``sim.rest_faults``
  (:class:`~relay.simulator.faults.RestFaults`, a queue apart from the
  handshakes'), after the route is known and before auth, as a handshake does;
  each is recorded in ``sim.rest_requests``
  (:class:`~relay.simulator.faults.RestRecord`) from its head to its end;
- streams (chat and responses SSE, speech audio, streamed transcriptions): one
  HTTP chunk per SSE event or audio chunk, ``rest_chunk_interval_ms`` apart; while
  a stream is sent the connection is watched, so a client that hangs up midway is
  seen at once (``client_disconnected``) rather than at the next write.

Every request body is read to its end before the answer (a refusal included), so
a refused request leaves the connection reusable.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, unquote

import h11
import orjson
import trio

from relay.config import SimulatorFlavor
from relay.net.transport import Transport, TransportClosed
from relay.protocol.events import http_error_body, new_id
from relay.protocol.handshake import MAX_HEAD_BYTES, RequestHead
from relay.simulator import flavors, rest_payloads
from relay.simulator.faults import PlannedFault, RestRecord
from relay.simulator.flavors import Refusal
from relay.simulator.multipart import (
    MultipartError,
    MultipartReader,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)

if TYPE_CHECKING:
    from relay.simulator.server import Simulator

#: Bytes per read from a REST connection (the transport's receive size).
REST_READ_BYTES: Final = 64 * 1024
#: A JSON request body is kept (to be parsed) up to this size (bytes); past it the
#: rest is still read and hashed, and the answer is 413. OpenAI's own limits are
#: per endpoint; this bounds one request's memory.
REST_JSON_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
#: ``client_secrets`` bodies on a reused connection (bytes), as on a fresh one.
REST_SECRETS_MAX_BODY_BYTES: Final = 256 * 1024
#: A multipart field other than the file is kept up to this size (bytes).
REST_FORM_FIELD_MAX_BYTES: Final = 64 * 1024
#: An idle keep-alive connection is closed after this long (seconds): long enough
#: for a relay's pool to reuse it between test steps, short enough not to pile up.
REST_KEEPALIVE_IDLE_S: Final = 60.0
#: A request body that stops arriving for this long ends the connection (seconds).
REST_BODY_IDLE_S: Final = 60.0
#: With ``rest_read_bytes_per_s`` set, bodies are read in about this many reads a
#: second, so the pace is smooth rather than one burst a second.
REST_PACED_READS_PER_S: Final = 20
#: Read size while a stalled request waits for its peer to hang up (bytes).
REST_STALL_READ_BYTES: Final = 4096
#: Read size of the hang-up watch while a stream is sent (bytes): an end of stream
#: needs no room, and a pipelined request waits in the kernel past this.
REST_WATCH_READ_BYTES: Final = 4096
#: Azure's ``api-version`` values are not checked, only required.
AZURE_API_VERSION_PARAM: Final = "api-version"
SSE_CONTENT_TYPE: Final = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE: Final = "application/json"

Endpoint = Literal[
    "chat", "responses", "speech", "transcriptions", "embeddings", "models", "model", "secrets"
]
#: The POST endpoints by the path after the API's prefix.
_POST_ENDPOINTS: Final[dict[str, Endpoint]] = {
    "chat/completions": "chat",
    "responses": "responses",
    "audio/speech": "speech",
    "audio/transcriptions": "transcriptions",
    "embeddings": "embeddings",
}
#: Azure's deployment-form routes (``/openai/deployments/{name}/…``).
_AZURE_DEPLOYMENT_ENDPOINTS: Final = frozenset({"chat", "speech", "transcriptions", "embeddings"})
#: Azure's name for each operation, as its rate-limit message quotes it.
_AZURE_OPERATIONS: Final[dict[Endpoint, str]] = {
    "chat": "ChatCompletions_Create",
    "responses": "Responses_Create",
    "speech": "AudioSpeech_Create",
    "transcriptions": "AudioTranscriptions_Create",
    "embeddings": "Embeddings_Create",
    "models": "Models_List",
    "model": "Models_Get",
}
_INVALID_JSON: Final = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
    "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
    "sent was not valid JSON. If you have trouble figuring out how to fix this, please "
    "contact us through our help center at help.openai.com.)"
)
_MISSING_KEY: Final = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password "
    "field (with blank username) if you're accessing the API from your browser and are "
    "prompted for a username and password. You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)
_SPEECH_FORMATS: Final = frozenset(rest_payloads.SPEECH_CONTENT_TYPES)
_TRANSCRIPTION_FORMATS: Final = frozenset({"json", "text", "srt", "vtt", "verbose_json"})


@dataclass(frozen=True, slots=True)
class Route:
    """What a REST request asks for: the endpoint, and the deployment (azure's
    URL form) or model id (``GET …/models/{id}``) its URL names."""

    endpoint: Endpoint
    deployment: str = ""
    model_id: str = ""


def is_rest_path(flavor: SimulatorFlavor, path: str) -> bool:
    """Whether this path belongs to the REST side (every other path is realtime's)."""
    if flavor == "azure":
        return path.startswith("/openai/") and path not in flavors.AZURE_REALTIME_PATHS
    return path.startswith("/v1/") and path not in flavors.OPENAI_REALTIME_PATHS


def resolve_route(flavor: SimulatorFlavor, method: str, path: str, query: dict[str, str]) -> Route:
    """The route of a REST request, or the flavor's refusal (404; azure 400 without
    an api-version on the routes that need one)."""
    if flavor == "azure":
        return _azure_route(method, path, query)
    rest = path.removeprefix("/v1/")
    if method == "POST" and rest in _POST_ENDPOINTS:
        return Route(_POST_ENDPOINTS[rest])
    if method == "POST" and rest == "realtime/client_secrets":
        return Route("secrets")
    if method == "GET" and rest == "models":
        return Route("models")
    if method == "GET" and rest.startswith("models/") and len(rest) > len("models/"):
        return Route("model", model_id=unquote(rest.removeprefix("models/")))
    raise flavors.not_found(flavor, method, path)


def _azure_route(method: str, path: str, query: dict[str, str]) -> Route:
    if path.startswith("/openai/v1/"):
        route = resolve_route("openai", method, "/v1/" + path.removeprefix("/openai/v1/"), query)
        if route.endpoint != "secrets":
            return route
    elif path.startswith("/openai/deployments/") and method == "POST":
        deployment, _, rest = path.removeprefix("/openai/deployments/").partition("/")
        endpoint = _POST_ENDPOINTS.get(rest)
        if deployment and endpoint in _AZURE_DEPLOYMENT_ENDPOINTS and endpoint is not None:
            flavors.check_azure_route(flavors.AZURE_PREVIEW_PATH, query)
            return Route(endpoint, deployment=unquote(deployment))
    elif path == "/openai/responses" and method == "POST":
        flavors.check_azure_route(flavors.AZURE_PREVIEW_PATH, query)
        return Route("responses")
    raise flavors.not_found("azure", method, path)


async def serve_connection(sim: Simulator, transport: Transport, head: RequestHead) -> None:
    """Serve REST requests on this connection, starting with the one whose head was read."""
    await _RestConnection(sim, transport, sim.new_rest_connection()).run(head)


@dataclass(slots=True)
class _Answer:
    """A complete answer (JSON or text), or a stream of chunks sent paced."""

    status: int
    content_type: str = JSON_CONTENT_TYPE
    body: bytes = b""
    chunks: Iterable[bytes] | None = None
    headers: tuple[tuple[str, str], ...] = ()


class _Body:
    """What is kept of a request body while it is hashed and counted."""

    def __init__(self, keep_bytes: int) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0
        self._keep_bytes = keep_bytes
        self.kept = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        if self.overflow:
            return
        if len(self.kept) + len(data) > self._keep_bytes:
            self.overflow = True
            self.kept.clear()
            return
        self.kept += data


class _FormBody(_Body):
    """A ``multipart/form-data`` body: the small fields kept, the file hashed only."""

    def __init__(self, boundary: bytes | None) -> None:
        super().__init__(keep_bytes=0)
        self.reader = MultipartReader(boundary) if boundary is not None else None
        self.fields: dict[str, bytearray] = {}
        self.file_sha256 = hashlib.sha256()
        self.file_bytes = 0
        self.has_file = False
        self.problem: str | None = None if boundary is not None else "not multipart"
        self._part: str | None = None
        self._in_file = False

    def feed(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        if self.reader is None or self.problem is not None:
            return
        try:
            events = self.reader.feed(data)
        except MultipartError as exc:
            self.problem = str(exc)
            return
        for event in events:
            if isinstance(event, PartStart):
                self._in_file = event.name == "file" and event.filename is not None
                self.has_file = self.has_file or self._in_file
                self._part = event.name
                if not self._in_file:
                    self.fields[event.name] = bytearray()
            elif isinstance(event, PartData):
                if self._in_file:
                    self.file_sha256.update(event.data)
                    self.file_bytes += len(event.data)
                elif self._part is not None:
                    value = self.fields[self._part]
                    if len(value) + len(event.data) > REST_FORM_FIELD_MAX_BYTES:
                        self.problem = (
                            f"A form field is larger than {REST_FORM_FIELD_MAX_BYTES} bytes."
                        )
                    else:
                        value += event.data
            elif isinstance(event, PartEnd):
                self._part = None
                self._in_file = False

    def field(self, name: str) -> str:
        return self.fields.get(name, bytearray()).decode("utf-8", "replace")

    @property
    def model(self) -> str:
        return self.field("model")


class _RestConnection:
    """One connection's h11 state and the requests on it, one at a time."""

    def __init__(self, sim: Simulator, transport: Transport, number: int) -> None:
        self.sim = sim
        self.config = sim.config
        self.transport = transport
        self.number = number
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        self._buffer = bytearray(REST_READ_BYTES)
        self._watch_buffer = bytearray(REST_WATCH_READ_BYTES)
        #: Set when this connection must end after the current request.
        self._closing = False

    async def run(self, head: RequestHead) -> None:
        self.conn.receive_data(head.raw + head.trailing)
        first = True
        while True:
            try:
                if first:
                    event = self.conn.next_event()
                else:
                    with trio.fail_after(REST_KEEPALIVE_IDLE_S):
                        event = await self._next_event()
            except h11.RemoteProtocolError:
                await self._refuse_malformed()
                return
            except trio.TooSlowError:
                return
            first = False
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed, or a peer that ended mid-head
            request = _head_of(event)
            if not is_rest_path(self.config.flavor, request.path):
                await self._hand_to_realtime(request)
                return
            await self._exchange(request)
            if self._closing or self.conn.our_state is not h11.DONE:
                return
            if self.conn.their_state is not h11.DONE:
                return
            self.conn.start_next_cycle()

    async def _next_event(self) -> Any:
        """The next h11 event, reading as needed (``NEED_DATA`` never returned)."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self._receive(REST_READ_BYTES)

    async def _receive(self, nbytes: int) -> int:
        try:
            received = await self.transport.recv_into(self._buffer, nbytes)
        except TransportClosed:
            received = 0
        self.conn.receive_data(bytes(self._buffer[:received]))
        return received

    async def _refuse_malformed(self) -> None:
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = http_error_body("Malformed HTTP request.", code="malformed_request")
            try:
                await self._send(
                    h11.Response(status_code=400, headers=self._headers(JSON_CONTENT_TYPE, body))
                )
                await self._send(h11.Data(data=body))
                await self._send(h11.EndOfMessage())
            except (TransportClosed, h11.LocalProtocolError):
                pass

    async def _hand_to_realtime(self, request: RequestHead) -> None:
        """A realtime upgrade (or anything else not REST) after REST requests: the
        realtime side answers it, with the bytes h11 holds past its head."""
        trailing = b""
        try:
            if self.conn.next_event() is h11.PAUSED:
                trailing = self.conn.trailing_data[0]
        except h11.RemoteProtocolError:
            pass
        await self.sim.serve_request(
            self.transport,
            RequestHead(
                method=request.method,
                target=request.target,
                headers=request.headers,
                http_version=request.http_version,
                trailing=trailing,
            ),
        )

    # --- one request -------------------------------------------------------------------

    async def _exchange(self, head: RequestHead) -> None:
        record = RestRecord(connection=self.number, method=head.method, path=head.path)
        self.sim.rest_request_started(record)
        try:
            await self._serve(head, record)
        finally:
            record.finished = True
            self.sim.rest_request_finished(record)

    async def _serve(self, head: RequestHead, record: RestRecord) -> None:
        flavor = self.config.flavor
        query = {k: v[-1] for k, v in parse_qs(head.query, keep_blank_values=True).items()}
        route: Route | None = None
        refusal: Refusal | None = None
        fault: PlannedFault | None = None
        try:
            route = resolve_route(flavor, head.method, head.path, query)
            record.model = route.deployment
            fault = self.sim.rest_faults.take_next()
            if fault is None or fault.kind != "refuse":
                self._authorize(head, record)
        except Refusal as refused:
            refusal = refused
        body = self._body_for(route, head)
        if not await self._read_body(body, record):
            return
        if route is not None and not record.model:
            record.model = _model_of(body)
        if fault is not None and fault.kind == "stall":
            await self._stall(record)
            return
        if fault is not None and fault.kind == "drop" and fault.after_chunks == 0:
            self._drop()
            return
        if fault is not None and fault.kind == "refuse" and route is not None:
            refusal = flavors.fault_refusal(
                flavor,
                fault.status,
                model=record.model,
                retry_after_s=fault.retry_after_s,
                body=fault.body,
                operation=_AZURE_OPERATIONS.get(route.endpoint, "Realtime"),
            )
        if refusal is not None or route is None:
            assert refusal is not None
            await self._send_answer(
                _Answer(refusal.status, body=refusal.body, headers=refusal.headers), record
            )
            return
        try:
            answer = self._answer(route, head, body)
        except Refusal as refused:
            answer = _Answer(refused.status, body=refused.body, headers=refused.headers)
        drop_after = fault.after_chunks if fault is not None and fault.kind == "drop" else None
        await self._send_answer(answer, record, drop_after_chunks=drop_after)

    def _authorize(self, head: RequestHead, record: RestRecord) -> None:
        """The flavor's credential check (no body needed); raises the flavor's 401."""
        sim = self.sim
        azure = self.config.flavor == "azure"
        presented = flavors.presented_credential(self.config.flavor, head, {})
        credential = presented.credential
        record.auth_scheme = presented.scheme
        if credential is not None and presented.scheme != "entra":
            index = sim.api_key_index(credential)
            record.key_index = index if index >= 0 else None
        if azure:
            if credential is None or sim.faults.is_revoked(credential):
                raise flavors.azure_unauthorized(presented.scheme)
            if presented.scheme != "entra":
                if record.key_index is None:
                    raise flavors.azure_unauthorized(presented.scheme)
                return
            if sim.is_entra_token(credential):
                return
            # Azure's v1 API also takes the resource key as a bearer token.
            index = sim.api_key_index(credential)
            if index < 0:
                raise flavors.azure_unauthorized(presented.scheme)
            record.auth_scheme = "bearer"
            record.key_index = index
            return
        if credential is None:
            raise Refusal(401, http_error_body(_MISSING_KEY, code=None))
        if record.key_index is None or sim.faults.is_revoked(credential):
            raise Refusal(
                401,
                http_error_body(
                    f"Incorrect API key provided: {flavors.masked_key(credential)}. You can "
                    "find your API key at https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                ),
            )

    def _body_for(self, route: Route | None, head: RequestHead) -> _Body:
        if route is not None and route.endpoint == "transcriptions":
            return _FormBody(boundary_of(head.header(b"content-type") or ""))
        if route is None or route.endpoint in ("models", "model"):
            return _Body(keep_bytes=0)
        if route.endpoint == "secrets":
            return _Body(keep_bytes=REST_SECRETS_MAX_BODY_BYTES)
        return _Body(keep_bytes=REST_JSON_MAX_BODY_BYTES)

    async def _read_body(self, body: _Body, record: RestRecord) -> bool:
        """Read the request body to its end into ``body``; ``False``: the client left."""
        rate = self.config.rest_read_bytes_per_s
        read_bytes = REST_READ_BYTES
        if rate > 0:
            read_bytes = max(1, min(REST_READ_BYTES, rate // REST_PACED_READS_PER_S))
        started = trio.current_time()
        paced = 0
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    if self.conn.they_are_waiting_for_100_continue:
                        await self._send(h11.InformationalResponse(status_code=100, headers=[]))
                    with trio.fail_after(REST_BODY_IDLE_S):
                        received = await self._receive(read_bytes)
                    if received == 0:
                        record.client_disconnected = True
                        self._closing = True
                        return False
                    if rate > 0:
                        # The schedule: byte n may arrive no sooner than n / rate seconds in.
                        paced += received
                        await trio.sleep_until(started + paced / rate)
                    continue
                if isinstance(event, h11.Data):
                    body.feed(bytes(event.data))
                    record.request_bytes = body.size
                elif isinstance(event, h11.EndOfMessage):
                    record.request_sha256 = body.sha256.hexdigest()
                    return True
                else:
                    self._closing = True
                    return False
        except (h11.RemoteProtocolError, trio.TooSlowError, TransportClosed):
            record.client_disconnected = True
            self._closing = True
            return False

    async def _stall(self, record: RestRecord) -> None:
        """Answer nothing; read (and drop) until the peer hangs up."""
        self._closing = True
        buffer = bytearray(REST_STALL_READ_BYTES)
        try:
            while await self.transport.recv_into(buffer):
                pass
        except TransportClosed:
            pass
        record.client_disconnected = True

    def _drop(self) -> None:
        self._closing = True
        self.transport.abort()

    # --- the answers -------------------------------------------------------------------

    def _answer(self, route: Route, head: RequestHead, body: _Body) -> _Answer:
        endpoint = route.endpoint
        if endpoint == "models":
            return _json(200, rest_payloads.model_list(self._served_models()))
        if endpoint == "model":
            served = self._served_names()
            if served and route.model_id not in served:
                raise _model_not_found(route.model_id)
            return _json(200, rest_payloads.model_object(route.model_id))
        if isinstance(body, _FormBody):
            return self._transcription(route, body)
        if body.overflow:
            secrets = endpoint == "secrets"
            limit = REST_SECRETS_MAX_BODY_BYTES if secrets else REST_JSON_MAX_BODY_BYTES
            raise Refusal(
                413,
                http_error_body(f"Request body larger than {limit} bytes.", code="body_too_large"),
            )
        if endpoint == "secrets":
            # The key was checked by _authorize, as the fresh-connection path checks it.
            status, payload = self.sim.secrets.mint(bytes(body.kept), time.time())
            return _Answer(status, body=payload)
        request = _json_object(body)
        model = self._check_model(route, request.get("model"))
        pieces = self.config.rest_stream_chunks
        stream = request.get("stream") is True
        if endpoint == "chat":
            messages = request.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _missing("messages")
            prompt_chars = rest_payloads.chat_prompt_chars(messages)
            if stream:
                options = request.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return _stream(
                    rest_payloads.chat_completion_stream(
                        model, prompt_chars, pieces, include_usage=include_usage
                    )
                )
            return _json(200, rest_payloads.chat_completion(model, prompt_chars, pieces))
        if endpoint == "responses":
            if stream:
                return _stream(rest_payloads.response_stream(request, model, pieces))
            return _json(200, rest_payloads.response(request, model, pieces))
        if endpoint == "speech":
            return self._speech(request)
        return self._embeddings(request, model)

    def _served_names(self) -> tuple[str, ...]:
        """The models (azure: deployments) configured; empty: any name is served."""
        if self.config.flavor == "azure":
            return self.config.azure_deployments
        return self.config.models

    def _served_models(self) -> tuple[str, ...]:
        return self._served_names() or rest_payloads.DEFAULT_REST_MODELS

    def _check_model(self, route: Route, value: object) -> str:
        """The model (azure: deployment) the request names, checked against the served ones."""
        azure = self.config.flavor == "azure"
        model = route.deployment or (value if isinstance(value, str) else "")
        if not model:
            if azure:
                raise flavors.azure_error(400, "BadRequest", "Missing required parameter: 'model'.")
            raise Refusal(400, http_error_body("you must provide a model parameter"))
        served = self._served_names()
        if served and model not in served:
            if azure:
                raise flavors.azure_error(
                    404, "DeploymentNotFound", flavors.AZURE_DEPLOYMENT_NOT_FOUND
                )
            raise _model_not_found(model)
        return model

    def _speech(self, request: dict[str, Any]) -> _Answer:
        text = request.get("input")
        if not isinstance(text, str) or not text:
            raise _missing("input")
        if len(text) > rest_payloads.SPEECH_MAX_INPUT_CHARS:
            raise Refusal(
                400,
                http_error_body(
                    f"Input is longer than {rest_payloads.SPEECH_MAX_INPUT_CHARS} characters.",
                    param="input",
                    code="string_above_max_length",
                ),
            )
        if not isinstance(request.get("voice"), str | dict):
            raise _missing("voice")
        response_format = request.get("response_format", "mp3")
        if response_format not in _SPEECH_FORMATS:
            raise _invalid("response_format", f"Unsupported response_format {response_format!r}.")
        if request.get("stream_format", "audio") != "audio":
            raise _invalid("stream_format", "The simulator streams speech as audio bytes only.")
        audio = rest_payloads.speech_audio(text, str(response_format))
        return _Answer(
            200,
            content_type=audio.content_type,
            chunks=audio.chunks(self.config.rest_stream_chunks),
        )

    def _transcription(self, route: Route, body: _FormBody) -> _Answer:
        if body.problem is not None or body.reader is None or not body.reader.complete:
            raise Refusal(
                400,
                http_error_body(
                    "Could not parse multipart form: " + (body.problem or "incomplete body.")
                ),
            )
        if not body.has_file:
            raise _missing("file")
        model = self._check_model(route, body.model)
        response_format = body.field("response_format") or "json"
        if response_format not in _TRANSCRIPTION_FORMATS:
            raise _invalid("response_format", f"Unsupported response_format {response_format!r}.")
        sha_hex = body.file_sha256.hexdigest()
        if body.field("stream").lower() == "true":
            if model in rest_payloads.DURATION_BILLED_TRANSCRIBE_MODELS:
                raise _invalid("stream", f"Streaming is not supported for the model {model}.")
            return _stream(rest_payloads.transcription_stream(model, body.file_bytes, sha_hex))
        payload = rest_payloads.transcription(model, body.file_bytes, sha_hex, response_format)
        content_type = JSON_CONTENT_TYPE if "json" in response_format else "text/plain"
        return _Answer(200, content_type=content_type, body=payload)

    def _embeddings(self, request: dict[str, Any], model: str) -> _Answer:
        raw = request.get("input")
        inputs: list[str]
        if isinstance(raw, str):
            inputs, tokens = [raw], rest_payloads.tokens_of(len(raw))
        elif isinstance(raw, list) and raw and all(isinstance(i, str) for i in raw):
            inputs = list(raw)
            tokens = sum(rest_payloads.tokens_of(len(i)) for i in raw)
        elif isinstance(raw, list) and raw and all(isinstance(i, int) for i in raw):
            inputs, tokens = [orjson.dumps(raw).decode()], len(raw)
        elif isinstance(raw, list) and raw and all(isinstance(i, list) for i in raw):
            inputs = [orjson.dumps(i).decode() for i in raw]
            tokens = sum(len(i) for i in raw)
        else:
            raise _missing("input")
        native = rest_payloads.EMBEDDING_DIMENSIONS.get(
            model, rest_payloads.DEFAULT_EMBEDDING_DIMENSIONS
        )
        dimensions = request.get("dimensions", native)
        if not isinstance(dimensions, int) or not 1 <= dimensions <= native:
            raise _invalid("dimensions", f"dimensions must be between 1 and {native}.")
        encoding = request.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _invalid("encoding_format", "encoding_format must be 'float' or 'base64'.")
        return _json(
            200,
            rest_payloads.embeddings(
                model,
                inputs,
                dimensions=dimensions,
                encoding_format=str(encoding),
                token_count=tokens,
            ),
        )

    # --- writing -----------------------------------------------------------------------

    def _headers(self, content_type: str, body: bytes | None) -> list[tuple[str, str]]:
        headers = [("Content-Type", content_type), ("x-request-id", new_id("req_"))]
        if body is not None:
            headers.append(("Content-Length", str(len(body))))
        return headers

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.transport.send_all(data)

    async def _send_answer(
        self, answer: _Answer, record: RestRecord, *, drop_after_chunks: int | None = None
    ) -> None:
        if answer.chunks is None:
            headers = self._headers(answer.content_type, answer.body)
            headers.extend(answer.headers)
            try:
                await self._send(h11.Response(status_code=answer.status, headers=headers))
                record.status = answer.status
                if drop_after_chunks is not None:
                    # An answer sent whole has one chunk: the reset comes after its head.
                    self._drop()
                    return
                await self._send(h11.Data(data=answer.body))
                record.response_bytes = len(answer.body)
                await self._send(h11.EndOfMessage())
            except TransportClosed:
                record.client_disconnected = True
                self._closing = True
            return
        await self._send_stream(answer, record, drop_after_chunks)

    async def _send_stream(
        self, answer: _Answer, record: RestRecord, drop_after_chunks: int | None
    ) -> None:
        """Head, then one HTTP chunk per piece, paced; the peer's hang-up ends it early."""
        assert answer.chunks is not None
        headers = self._headers(answer.content_type, None)
        if answer.content_type == SSE_CONTENT_TYPE:
            headers.append(("Cache-Control", "no-cache"))
        interval_s = self.config.rest_chunk_interval_ms / 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_for_hang_up, record, nursery.cancel_scope)
            try:
                await self._send(h11.Response(status_code=answer.status, headers=headers))
                record.status = answer.status
                for index, chunk in enumerate(answer.chunks):
                    if index == drop_after_chunks:
                        self._drop()
                        break
                    if index and interval_s > 0:
                        await trio.sleep(interval_s)
                    await self._send(h11.Data(data=chunk))
                    record.response_bytes += len(chunk)
                else:
                    await self._send(h11.EndOfMessage())
            except TransportClosed:
                record.client_disconnected = True
                self._closing = True
            nursery.cancel_scope.cancel()

    async def _watch_for_hang_up(self, record: RestRecord, scope: trio.CancelScope) -> None:
        """Read while a stream is sent: an end of stream means the client left.

        Bytes that do arrive (a pipelined next request) go to h11 for later, and the
        watch ends there: at most one read is held.
        """
        try:
            received = await self.transport.recv_into(self._watch_buffer)
        except TransportClosed:
            received = 0
        if received == 0:
            record.client_disconnected = True
            self._closing = True
            scope.cancel()
            return
        self.conn.receive_data(bytes(self._watch_buffer[:received]))


def _head_of(event: h11.Request) -> RequestHead:
    return RequestHead(
        method=event.method.decode("ascii", "replace"),
        target=event.target.decode("ascii", "replace"),
        headers=tuple((bytes(name), bytes(value)) for name, value in event.headers),
        http_version=event.http_version.decode("ascii", "replace"),
    )


def _model_of(body: _Body) -> str:
    """The model a body names, for the log (even when the request is refused)."""
    if isinstance(body, _FormBody):
        return body.model
    if body.overflow or not body.kept:
        return ""
    try:
        value = orjson.loads(body.kept)
    except orjson.JSONDecodeError:
        return ""
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else ""


def _json_object(body: _Body) -> dict[str, Any]:
    try:
        value = orjson.loads(body.kept)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise Refusal(400, http_error_body(_INVALID_JSON))
    return value


def _json(status: int, payload: dict[str, Any]) -> _Answer:
    return _Answer(status, body=orjson.dumps(payload))


def _stream(chunks: Iterator[bytes]) -> _Answer:
    return _Answer(200, content_type=SSE_CONTENT_TYPE, chunks=chunks)


def _missing(param: str) -> Refusal:
    return Refusal(
        400,
        http_error_body(
            f"Missing required parameter: '{param}'.",
            param=param,
            code="missing_required_parameter",
        ),
    )


def _invalid(param: str, message: str) -> Refusal:
    return Refusal(400, http_error_body(message, param=param, code="invalid_value"))


def _model_not_found(model: str) -> Refusal:
    quoted = model[: flavors.MAX_QUOTED_MODEL_CHARS]
    return Refusal(
        404,
        http_error_body(
            f"The model `{quoted}` does not exist or you do not have access to it.",
            code="model_not_found",
        ),
    )


__all__ = [
    "REST_JSON_MAX_BODY_BYTES",
    "REST_KEEPALIVE_IDLE_S",
    "REST_READ_BYTES",
    "Route",
    "is_rest_path",
    "resolve_route",
    "serve_connection",
]
