"""The REST proxy's Trio shell: one client request through to the upstream and back.

This module owns the bytes of a proxied request (:class:`RestProxy`), in order:

1. HTTP/1.1 only (505 otherwise); the client's credential as for Realtime (client
   keys, relay tokens whose ``rest`` claim allows it, 403 otherwise); the browser
   Origin allowlist; the path allowlist (404 in OpenAI's envelope); a body with a
   ``Content-Length`` (411 for a chunked upload: every SDK sends the length) within
   its limit (413).
2. The model: a JSON body (at most ``rest_max_json_body_bytes``) is read whole and its
   ``model`` read; a multipart upload is read only until its ``model`` field, and the
   rest (the file) streams through unbuffered. ``GET /v1/models`` answers from the
   model map when every upstream names its models.
3. The upstreams serving that model, in the chooser's order
   (:mod:`relay.upstreams.chooser`, the same health, cool-downs and live counts as
   Realtime sessions), each attempt on a pooled keep-alive connection
   (:mod:`relay.rest.pool`) or a fresh one within ``rest_connect_timeout_s``. A
   refused connection, a timeout before the response head, a 429 or 5xx or a 401/403
   moves on to the next candidate: before the first response byte only, and only for a
   body the relay still holds (a JSON body; a streamed upload gets one attempt). The
   last refusal reaches the client with its status, body and the headers that matter.
4. The response streams back as it arrives, in the upstream's own framing (chunked
   bodies forwarded verbatim, never re-chunked), with ``rest_idle_timeout_s`` between
   reads. A client that goes away mid-response ends the upstream request at once:
   its connection is closed, not returned to the pool. Over plain sockets the body's
   reads are made by the read hub (:mod:`relay.net.hub`): each chunk is read, scanned
   and written inline, no task woken, and the client is watched from there too (a
   callback, not a task per response); a write the client did not take whole is
   finished by the request's own task, which reads nothing meanwhile.
5. Usage from the response (:class:`~relay.rest.messages.UsageReader`) into
   ``relay_usage_tokens`` by model, a ``rest_request`` log line per request, and
   ``relay_rest_requests_total`` / ``relay_rest_first_byte_seconds``.

Memory per request is bounded whatever the body sizes: a response body is read into a
buffer every request of the thread shares (:data:`~relay.net.transport.RECEIVE_BYTES`);
a request body's own receive buffer, a JSON body up to
``rest_max_json_body_bytes``, a multipart prefix up to
:data:`~relay.rest.messages.MAX_MULTIPART_PREFIX_BYTES`, and the usage reader's bounds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import orjson
import trio

from relay.config import ServeConfig
from relay.credentials.checkers import AuthRefusal, CredentialChecker, TokenGrant
from relay.dataplane.admission import quoted
from relay.dataplane.routing import Router
from relay.metrics import RelayMetrics
from relay.net import http
from relay.net.timers import Timer, current_timers
from relay.net.transport import (
    RECEIVE_BYTES,
    WRITE_WOULD_BLOCK,
    Transport,
    TransportClosed,
    open_transport,
)
from relay.protocol import handshake
from relay.protocol.events import http_error_body
from relay.protocol.handshake import HandshakeError, RequestHead, ResponseHead
from relay.rest import messages
from relay.rest.messages import (
    ChunkedScanner,
    MultipartField,
    MultipartModel,
    RestRequestError,
    UpstreamFramingError,
    UsageReader,
)
from relay.rest.pool import ConnectionKey, ConnectionPool
from relay.upstreams.chooser import (
    FAILS_OVER,
    KeyRef,
    Outcome,
    UpstreamCandidate,
    outcome_for_status,
    plan_attempts,
)
from relay.upstreams.table import Upstream, UpstreamTable
from relay.upstreams.urls import UpstreamKind

LOGGER = logging.getLogger("relay.rest")
_T = TypeVar("_T")
#: Largest upstream error body kept to pass on to the client.
MAX_REFUSAL_BODY_BYTES: Final = 64 * 1024
#: Seconds an upstream's refusal body may take to arrive before it is passed on cut.
REFUSAL_BODY_TIMEOUT_S: Final = 5.0
#: Upstream response headers named in the log line (never a credential).
_LOGGED_REQUEST_ID: Final = b"x-request-id"
#: Routes kept per upstream table (one per model asked for); past it they are built anew
#: (a table whose upstream serves every model would otherwise keep one per name sent).
MAX_CACHED_ROUTES: Final = 1024


class RestState(Protocol):
    """What the proxy reads of the server, per request (swapped whole on SIGHUP)."""

    @property
    def config(self) -> ServeConfig: ...

    @property
    def checker(self) -> CredentialChecker: ...

    @property
    def router(self) -> Router: ...

    @property
    def metrics(self) -> RelayMetrics: ...

    def client_address(self, head: RequestHead, peer: tuple[str, int] | None) -> str: ...


@dataclass(slots=True)
class _Body:
    """The request body as far as the relay holds it; ``rest`` bytes still on the socket."""

    held: bytes
    rest: int
    content_length: int | None
    #: Where a multipart upload's ``model`` value sits in ``held`` (for an alias).
    model_field: MultipartField | None = None

    @property
    def replayable(self) -> bool:
        return self.rest == 0


@dataclass(slots=True)
class _Refusal:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(slots=True)
class _Exchange:
    """What the log line and the metrics say about one request."""

    model: str | None = None
    #: Who the client is (a key digest prefix or a token id), never the credential.
    credential_id: str = ""
    upstream: str = ""
    key_id: str = ""
    status: int = 0
    attempts: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    first_byte_s: float | None = None
    client_disconnected: bool = False
    request_id: str = ""
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Route:
    """What the attempts of one model need of the upstream table, built once per table:
    the upstreams serving it, by name, as the chooser's candidates, and their pool keys.
    Nothing here changes while the table lives (a reload swaps the table whole); health,
    cool-downs and live counts are read afresh by every plan."""

    upstreams: tuple[Upstream, ...]
    by_name: dict[str, Upstream]
    candidates: tuple[UpstreamCandidate, ...]
    pool_keys: dict[str, ConnectionKey]

    @classmethod
    def of(cls, upstreams: tuple[Upstream, ...]) -> _Route:
        return cls(
            upstreams,
            {upstream.name: upstream for upstream in upstreams},
            tuple(upstream.candidate() for upstream in upstreams),
            {
                upstream.name: (
                    upstream.name,
                    upstream.target.host,
                    upstream.target.port,
                    upstream.target.tls,
                )
                for upstream in upstreams
            },
        )


class _ClientGone(Exception):
    """The client closed its connection while the response was on its way."""


class RestProxy:
    """Serves proxied REST requests on client connections the server routed here."""

    def __init__(self, state: RestState, clock: Callable[[], float] | None = None) -> None:
        """``clock``: Trio time by default, the run's clock read directly once the first
        request is served (``trio.current_time`` is two more calls per read, and a request
        reads the time nine times); the proxy serves one Trio run."""
        self._state = state
        self._clock: Callable[[], float] = clock or trio.current_time
        self._clock_bound = clock is not None
        config = state.config
        self.pool = ConnectionPool(
            max_idle=config.rest_pool_max_idle, idle_timeout_s=config.rest_pool_idle_timeout_s
        )
        #: Routes by (model, a model-less read's fallback), for ``_routes_table`` only.
        self._routes: dict[tuple[str | None, bool], _Route] = {}
        self._routes_table: UpstreamTable | None = None

    def handles(self, head: RequestHead) -> bool:
        config = self._state.config
        return (
            config.rest_proxy_enabled
            and head.path.startswith("/v1/")
            and not head.is_websocket_upgrade()
            and head.path not in messages.RELAY_OWN_PATHS
        )

    async def serve(self, transport: Transport, head: RequestHead) -> bytes | None:
        """Answer one request; the bytes after it when the connection stays open, else None."""
        if not self._clock_bound:
            self._clock = trio.lowlevel.current_clock().current_time
            self._clock_bound = True
        started = self._clock()
        exchange = _Exchange()
        keep_alive: bytes | None = None
        try:
            keep_alive = await self._serve(transport, head, exchange)
        except RestRequestError as exc:
            exchange.status = exc.status
            await http.send_error(
                transport,
                exc.status,
                exc.message,
                error_type="server_error" if exc.status >= 500 else "invalid_request_error",
                code=exc.code,
                param=exc.param,
            )
        except HandshakeError as exc:
            exchange.status = exc.status
            await http.send_error(
                transport, exc.status, exc.message, code=exc.code or "invalid_request"
            )
        except (TransportClosed, _ClientGone):
            exchange.client_disconnected = True
        finally:
            self._record(head, transport, exchange, self._clock() - started)
        return keep_alive

    async def _serve(
        self, transport: Transport, head: RequestHead, exchange: _Exchange
    ) -> bytes | None:
        state = self._state
        config = state.config
        if head.http_version != "1.1":
            raise RestRequestError(505, "The REST proxy speaks HTTP/1.1.", "http_version")
        claims_models = self._authorize(head, exchange)
        if not messages.is_proxied(head.path, config.rest_paths):
            raise RestRequestError(404, f"No endpoint at {head.path[:100]}.", "not_found")
        if head.header(b"transfer-encoding") is not None:
            raise RestRequestError(
                411, "Send the request body with a Content-Length.", "length_required"
            )
        length = _content_length(head)
        table = state.router.table
        if head.method == "GET" and head.path == "/v1/models" and table.served_models is not None:
            await self._models(transport, sorted(table.served_models))
            return _leftover(head)
        expect = head.header(b"expect")
        if expect is not None and expect.lower() == "100-continue":
            await transport.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        body, model = await self._read_head_of_body(transport, head, length)
        early = head.trailing[length or 0 :]  # the next request's bytes, sent early
        exchange.model = model
        exchange.request_bytes = length or 0
        if claims_models and (model is None or model not in claims_models):
            raise RestRequestError(
                403, "This token does not allow this model.", "model_not_allowed", "model"
            )
        route = self._candidates(model, head)
        leftover = await self._proxy(transport, head, body, model, route, exchange)
        return None if leftover is None else early + leftover

    def _authorize(self, head: RequestHead, exchange: _Exchange) -> tuple[str, ...]:
        """The client's credential and Origin; the models a token limits it to."""
        state = self._state
        origin = head.header(b"origin")
        allowed = state.config.allowed_origins
        if allowed and origin is not None and origin not in allowed:
            raise RestRequestError(403, "This Origin is not allowed.", "origin_not_allowed")
        decision = state.checker.check(handshake.client_credential(head), head)
        if isinstance(decision, AuthRefusal):
            raise RestRequestError(decision.status, decision.message, decision.code)
        exchange.credential_id = decision.credential_id
        if isinstance(decision, TokenGrant) and decision.claims is not None:
            claims = decision.claims
            if not claims.rest or claims.single_use:
                raise RestRequestError(
                    403,
                    "This token is for Realtime sessions; it does not allow REST calls.",
                    "rest_not_allowed",
                )
            return claims.models
        return ()

    async def _read_head_of_body(
        self, transport: Transport, head: RequestHead, length: int | None
    ) -> tuple[_Body, str | None]:
        """Read what routing needs: a JSON body whole, a multipart body to its model."""
        config = self._state.config
        content_type = head.header(b"content-type")
        already = head.trailing
        if not length:
            return _Body(b"", 0, length), None
        if messages.is_json(content_type):
            if length > config.rest_max_json_body_bytes:
                raise RestRequestError(
                    413,
                    f"JSON request bodies are limited to {config.rest_max_json_body_bytes} bytes.",
                    "request_too_large",
                )
            held = await self._read_exactly(transport, already, length)
            return _Body(held, 0, length), messages.json_model(held)
        if length > config.rest_max_upload_bytes:
            raise RestRequestError(
                413,
                f"Request bodies are limited to {config.rest_max_upload_bytes} bytes.",
                "request_too_large",
            )
        boundary = messages.multipart_boundary(content_type)
        if boundary is None:
            held = already[:length]
            return _Body(held, length - len(held), length), None
        finder = MultipartModel(boundary)
        held_buffer = bytearray(already[:length])
        finder.feed(held_buffer)
        chunk = bytearray(RECEIVE_BYTES)
        while finder.found is None and not finder.hopeless and len(held_buffer) < length:
            received = await _client_read(
                transport, chunk, length - len(held_buffer), config.rest_idle_timeout_s
            )
            held_buffer += chunk[:received]
            finder.feed(memoryview(chunk)[:received])
        if finder.found is None:
            raise RestRequestError(
                400,
                "Put the 'model' field before the file in a multipart upload.",
                "missing_model",
                "model",
            )
        found = finder.found
        return _Body(bytes(held_buffer), length - len(held_buffer), length, found), found.value

    async def _read_exactly(self, transport: Transport, already: bytes, length: int) -> bytes:
        if len(already) >= length:
            return already[:length]  # the usual JSON body: it came with the head
        buffer = bytearray(already)
        # Read into the shared body buffer, each read copied out before the next await.
        chunk, view = _BODY_BUFFER.buffer, _BODY_BUFFER.view
        idle_s = self._state.config.rest_idle_timeout_s
        while len(buffer) < length:
            received = await _client_read(transport, chunk, length - len(buffer), idle_s)
            buffer += view[:received]
        return bytes(buffer)

    def _route(self, model: str | None, shaped: bool) -> _Route:
        """The route of ``model`` in the table of the moment (``shaped``: the OpenAI-shaped
        upstreams, for a read that names no model), cached while that table lasts."""
        table = self._state.router.table
        routes = self._routes
        if table is not self._routes_table:
            routes.clear()  # a reload: the old table's upstreams are not reused
            self._routes_table = table
        route = routes.get((model, shaped))
        if route is None:
            if shaped:
                upstreams = tuple(
                    up for up in table.upstreams if up.spec.kind is not UpstreamKind.AZURE
                )
            else:
                upstreams = table.route(model)
            route = _Route.of(upstreams)
            if len(routes) >= MAX_CACHED_ROUTES:
                routes.clear()
            routes[(model, shaped)] = route
        return route

    def _candidates(self, model: str | None, head: RequestHead) -> _Route:
        route = self._route(model, False)
        if route.upstreams:
            return route
        if model is not None:
            raise RestRequestError(
                400,
                f"The model '{quoted(model)}' does not exist or is not served by this relay.",
                "model_not_found",
                "model",
            )
        if head.method == "POST":
            raise RestRequestError(
                400,
                "Name the model: this relay chooses the upstream by model.",
                "missing_model",
                "model",
            )
        # A read without a model (GET /v1/responses/<id>): the OpenAI-shaped upstreams.
        shaped = self._route(None, True)
        if not shaped.upstreams:
            raise RestRequestError(404, f"No endpoint at {head.path[:100]}.", "not_found")
        return shaped

    async def _models(self, transport: Transport, names: list[str]) -> None:
        transport.answered = True
        body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "relay"}
                    for name in names
                ],
            }
        )
        await transport.send_all(
            messages.response_head(
                200,
                [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
            )
            + body
        )

    # ------------------------------------------------------------------ the attempts

    async def _proxy(
        self,
        transport: Transport,
        head: RequestHead,
        body: _Body,
        model: str | None,
        route: _Route,
        exchange: _Exchange,
    ) -> bytes | None:
        state = self._state
        config, router = state.config, state.router
        by_name, candidates = route.by_name, route.candidates
        policy = router.health.policy
        tried: set[KeyRef] = set()
        last: _Refusal | None = None
        while True:
            now = self._clock()
            plan = plan_attempts(
                candidates,
                router.health,
                router.live.counts(),
                now=now,
                deadline=now + policy.max_attempts * config.rest_connect_timeout_s,
                tried=tried,
            )
            if not plan or (tried and not body.replayable) or len(tried) >= policy.max_attempts:
                if last is None:
                    raise RestRequestError(
                        503,
                        "No upstream can take this request now; retry shortly.",
                        "upstream_unavailable",
                    )
                exchange.status = last.status
                transport.answered = True
                await transport.send_all(
                    messages.response_head(
                        last.status,
                        [
                            *messages.forwarded_response_headers(last.headers, keep_alive=False),
                            (b"content-length", b"%d" % len(last.body)),
                        ],
                    )
                    + last.body
                )
                return None
            key = plan[0].key
            upstream = by_name[key.upstream]
            tried.add(key)
            exchange.attempts += 1
            router.live.add(key)
            try:
                outcome = await self._attempt(
                    transport,
                    head,
                    body,
                    model,
                    upstream,
                    route.pool_keys[upstream.name],
                    key,
                    exchange,
                )
            finally:
                router.live.remove(key)
            if isinstance(outcome, _Refusal):
                last = outcome
                continue
            return outcome

    async def _attempt(
        self,
        transport: Transport,
        head: RequestHead,
        body: _Body,
        model: str | None,
        upstream: Upstream,
        pool_key: ConnectionKey,
        key: KeyRef,
        exchange: _Exchange,
    ) -> _Refusal | bytes | None:
        """One upstream: a refusal to fail over from, or the response streamed (the
        client's leftover bytes, or None to close)."""
        state = self._state
        config = state.config
        request = self._upstream_request(head, body, model, upstream, key)
        started = self._clock()
        connection: Transport | None = None
        response: ResponseHead | None = None
        try:
            for reused in (True, False):
                connection = (
                    self.pool.take(pool_key, started) if reused and body.replayable else None
                )
                if connection is None:
                    reused = False
                    connection = await self._dial(upstream)
                try:
                    await connection.send_all(request)
                    if body.rest:
                        await _copy_exactly(
                            transport, connection, body.rest, config.rest_idle_timeout_s
                        )
                    response = await _first_response_head(
                        connection, config.rest_first_byte_timeout_s
                    )
                    break
                except TransportClosed:
                    connection.close()
                    if not reused:
                        raise
                    # A pooled connection the upstream had closed: once more, fresh.
        except OSError as exc:
            return self._refused(
                key, Outcome.REFUSED, None, f"connect failed: {exc.strerror or exc}"
            )
        except trio.TooSlowError:
            if connection is not None:
                connection.close()
            return self._refused(key, Outcome.TIMEOUT, None, "no response head in time")
        except (TransportClosed, HandshakeError) as exc:
            if connection is not None:
                connection.close()
            return self._refused(key, Outcome.SERVER_ERROR, None, f"upstream failed: {exc}")
        except BaseException:  # cancelled (the client went, the relay stops): no leak
            if connection is not None:
                connection.close()
            raise
        assert connection is not None
        assert response is not None
        exchange.first_byte_s = self._clock() - started
        status = response.status
        outcome = outcome_for_status(status)
        retry_after_s = response.retry_after_s
        if outcome in FAILS_OVER:
            try:
                refusal_body = await _read_refusal_body(connection, response)
            finally:
                connection.close()
            self._learn(key, outcome, retry_after_s, f"HTTP {status}")
            if outcome is Outcome.KEY_REJECTED:
                refusal = _Refusal(
                    502,
                    [(b"content-type", b"application/json")],
                    http_error_body(
                        "The relay could not authenticate with the upstream API.",
                        error_type="server_error",
                        code="upstream_auth_failed",
                    ),
                )
            else:
                refusal = _Refusal(status, list(response.headers), refusal_body)
            return refusal
        self._learn(key, outcome, retry_after_s, f"HTTP {status}")
        exchange.upstream, exchange.key_id, exchange.status = key.upstream, key.key_id, status
        request_id = messages.header_value(response.headers, _LOGGED_REQUEST_ID)
        exchange.request_id = request_id.decode("latin-1")[:100] if request_id else ""
        state.metrics.rest_first_byte_seconds.observe((key.upstream,), exchange.first_byte_s)
        return await self._stream_response(
            transport, head, connection, response, pool_key, exchange
        )

    def _upstream_request(
        self, head: RequestHead, body: _Body, model: str | None, upstream: Upstream, key: KeyRef
    ) -> bytes:
        config = self._state.config
        spec = upstream.spec
        upstream_model = spec.model_names.get(model, model) if model is not None else None
        azure = spec.kind is UpstreamKind.AZURE
        held = body.held
        in_body = not azure or messages.azure_names_model_in_body(head.path)
        if model is not None and upstream_model != model and in_body and held:
            # An alias: the upstream is asked for its own name (for Azure's deployment
            # form it is in the URL instead).
            if body.model_field is not None:
                held = messages.multipart_with_model(
                    held, body.model_field, upstream_model or model
                )
            else:
                held = messages.json_with_model(held, upstream_model or model)
        length = None if body.content_length is None else len(held) + body.rest
        target = messages.upstream_target(
            azure=azure,
            base_path=upstream.target.base_path,
            path=head.path,
            query=head.query,
            deployment=upstream_model,
            azure_api_version=spec.azure_api_version or config.rest_azure_api_version,
        )
        credential = upstream.key(key.key_id).credential()
        return (
            messages.request_head(
                head.method,
                target,
                host_header=upstream.target.host_header,
                headers=messages.forwarded_request_headers(head.headers),
                credential=credential.header(),
                content_length=length,
            )
            + held
        )

    async def _dial(self, upstream: Upstream) -> Transport:
        with trio.fail_after(self._state.config.rest_connect_timeout_s):
            transport = await open_transport(
                upstream.target.host,
                upstream.target.port,
                ssl_context=upstream.ssl_context,
                tls_session=upstream.resumption.session,
            )
        upstream.resumption.remember(transport)
        return transport

    def _refused(
        self, key: KeyRef, outcome: Outcome, retry_after_s: float | None, detail: str
    ) -> _Refusal:
        self._learn(key, outcome, retry_after_s, detail)
        status, code = (
            (504, "upstream_timeout")
            if outcome is Outcome.TIMEOUT
            else (502, "upstream_unreachable")
        )
        return _Refusal(
            status,
            [(b"content-type", b"application/json")],
            http_error_body(
                "The upstream API did not answer in time."
                if status == 504
                else "The relay could not reach the upstream API.",
                error_type="server_error",
                code=code,
            ),
        )

    def _learn(
        self, key: KeyRef, outcome: Outcome, retry_after_s: float | None, detail: str
    ) -> None:
        self._state.router.learn(key, outcome, retry_after_s, detail)

    # ------------------------------------------------------------------ the response

    async def _stream_response(
        self,
        transport: Transport,
        head: RequestHead,
        connection: Transport,
        response: ResponseHead,
        pool_key: ConnectionKey,
        exchange: _Exchange,
    ) -> bytes | None:
        config = self._state.config
        headers = list(response.headers)
        chunked = messages.is_chunked(headers)
        length = response.content_length
        no_body = (
            head.method == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
        )
        close_delimited = not no_body and not chunked and length is None
        upstream_reusable = not close_delimited and not messages.wants_close(headers)
        client_keep_alive = not close_delimited and not messages.wants_close(head.headers)
        transport.answered = True
        response_head = messages.response_head(
            response.status,
            messages.forwarded_response_headers(headers, keep_alive=client_keep_alive),
        )
        usage = UsageReader(response.header(b"content-type"))
        complete = pooled = False
        pipelined: bytes | None = b""
        try:
            if no_body:
                await transport.send_all(response_head)
                complete = True
            else:
                pump = _BodyPump(connection, transport, chunked, length, usage, exchange)
                complete, pipelined = await _watched_body(
                    pump, response_head, response.trailing, config.rest_idle_timeout_s
                )
                if pipelined is None:
                    exchange.client_disconnected = True
                    return None
            usage.finish()
            if usage.usage is not None:
                exchange.usage = {k: v for k, v in usage.usage.as_kinds().items() if v}
                model = usage.model or exchange.model or "unknown"
                usage_tokens = self._state.metrics.usage_tokens
                for kind, value in exchange.usage.items():
                    usage_tokens.inc((model, kind), value)
            if complete and upstream_reusable:
                self.pool.give(pool_key, connection, self._clock())
                pooled = True
        finally:
            # Every other way out (a cut, a client gone, a cancellation) closes it:
            # a connection whose response was not read to its end is never reused.
            if not pooled:
                connection.close()
        if not (complete and client_keep_alive):
            return None
        return pipelined

    def _record(
        self, head: RequestHead, transport: Transport, exchange: _Exchange, duration_s: float
    ) -> None:
        state = self._state
        status = str(exchange.status) if exchange.status else "none"
        state.metrics.rest_requests.inc((exchange.upstream or "none", status))
        if not LOGGER.isEnabledFor(logging.INFO):
            return  # the fields below cost more than the rest of a small request's record
        LOGGER.info(
            "rest request",
            extra={
                "fields": {
                    "event": "rest_request",
                    "method": head.method,
                    "path": head.path[:100],
                    "model": exchange.model,
                    "credential_id": exchange.credential_id,
                    "upstream": exchange.upstream,
                    "upstream_key_id": exchange.key_id,
                    "status": exchange.status,
                    "attempts": exchange.attempts,
                    "request_bytes": exchange.request_bytes,
                    "response_bytes": exchange.response_bytes,
                    "first_byte_ms": (
                        round(exchange.first_byte_s * 1e3, 2)
                        if exchange.first_byte_s is not None
                        else None
                    ),
                    "duration_ms": round(duration_s * 1e3, 2),
                    "client_disconnected": exchange.client_disconnected,
                    "upstream_request_id": exchange.request_id,
                    "usage": exchange.usage,
                    "client": state.client_address(head, transport.peer),
                }
            },
        )


class _SharedBodyBuffer(threading.local):
    """Where response bodies are read: one buffer per thread (one Trio run), shared by
    its responses, each done with its bytes before its next await (a write the client's
    socket did not take whole is copied by ``send_all`` before it waits)."""

    def __init__(self) -> None:
        self.buffer = bytearray(RECEIVE_BYTES)
        self.view = memoryview(self.buffer)
        #: A client watch's read (its bytes are copied out at once).
        self.watch_view = memoryview(bytearray(handshake.MAX_HEAD_BYTES))


_BODY_BUFFER: Final = _SharedBodyBuffer()
#: What a body pump's :meth:`_BodyPump.forward` returns besides None (read on): the body
#: ended (``complete`` says whether where its framing says); the client's socket did not
#: take the whole write (``unsent`` is what is left); the read filled the buffer (more
#: may be there with no edge to come: the pump's own loop reads on).
_ENDED: Final = object()
_UNSENT: Final = object()
_FULL: Final = object()


class _BodyPump:
    """One response body's bytes from the upstream to the client, one read at a time.

    :meth:`forward` takes a read's bytes (in the shared buffer) through the framing,
    the usage reader and a write that does not wait; the awaited loop
    (:func:`_relay_body`) and the read hub's handler (:meth:`hub_handler`) both call it.
    """

    __slots__ = (
        "_buffer",
        "_client",
        "_client_send",
        "_exchange",
        "_feed_usage",
        "_left",
        "_scanner",
        "_upstream",
        "_view",
        "alarm",
        "complete",
        "read",
        "unsent",
    )

    def __init__(
        self,
        upstream: Transport,
        client: Transport,
        chunked: bool,
        length: int | None,
        usage: UsageReader,
        exchange: _Exchange,
    ) -> None:
        self._upstream = upstream
        self._client = client
        self._client_send = client.sock.send
        self._scanner = ChunkedScanner() if chunked else None
        self._left = length if not chunked else None
        self._feed_usage = usage.feed_span
        self._exchange = exchange
        # This thread's shared buffer, looked up once (a thread-local's attributes cost
        # a dictionary look-up each): the body is read and forwarded in this thread only.
        self._buffer, self._view = _BODY_BUFFER.buffer, _BODY_BUFFER.view
        self.complete = False
        #: The bytes of the last write the client's socket did not take at once.
        self.unsent: bytes | memoryview = b""
        #: The idle timeout (see :func:`_relay_body`), and whether a read came since
        #: its last check: a flag each read sets, not a clock each read reads.
        self.alarm: _IdleAlarm | None = None
        self.read = False

    def forward(self, size: int, prefix: bytes = b"") -> object:
        """The ``size`` bytes just read into the shared buffer, to the client after
        ``prefix`` (the response head, with the bytes that came with it); 0: the upstream
        closed. Raises :class:`_ClientGone` when the client's socket fails."""
        self.read = True
        if size == 0:
            # The upstream closed: the end of a close-delimited body, else a cut.
            self.complete = self._scanner is None and self._left is None
            return _ENDED
        buffer, view = self._buffer, self._view
        scanner = self._scanner
        if scanner is not None:
            try:
                used, spans = scanner.feed(buffer, 0, size, view)
            except UpstreamFramingError:
                self.complete = False
                return _ENDED
            for start, stop in spans:
                self._feed_usage(buffer, start, stop)
            done = scanner.done
        else:
            left = self._left
            used = size if left is None else min(size, left)
            self._feed_usage(buffer, 0, used)
            if left is not None:
                self._left = left = left - used
            done = left == 0
        out: bytes | memoryview = prefix + view[:used] if prefix else view[:used]
        try:
            # The kernel's first try without a coroutine (Transport.send_now's, without
            # its frame); only a full socket waits.
            sent = self._client_send(out)
        except WRITE_WOULD_BLOCK:
            sent = 0
        except (OSError, ValueError):  # the socket failed, or is closed
            raise _ClientGone from None
        self._exchange.response_bytes += used
        self.complete = done
        if sent < len(out):
            self.unsent = out[sent:]
            return _UNSENT
        return _ENDED if done else None

    def hub_handler(self) -> Callable[[], object]:
        """The read hub's handler for this body: one read of the upstream (a plain
        socket), forwarded inline (:meth:`Transport.hub_reader`; ``_FULL`` when the read
        filled the buffer)."""
        return self._upstream.hub_reader(self._view, self.forward, _FULL)


#: A body's idle timeout is checked this many times per timeout: a check that finds no
#: read since the one before counts, and this many such checks in a row cut the body. A
#: silent upstream is cut after one to (1 + 1 / this) idle timeouts, and a read costs a
#: flag, not a look at the clock and a move of a heap entry.
IDLE_CHECKS_PER_TIMEOUT: Final = 4


class _IdleAlarm:
    """A body's idle timeout, and the end of its relay when the client goes: a timer
    (one heap entry in the run's :class:`~relay.net.timers.Timers`), not a cancel scope
    around the body (a scope's entry and exit cost several times a timer's), that
    checks every ``idle_s / IDLE_CHECKS_PER_TIMEOUT`` whether the pump read since (its
    :attr:`_BodyPump.read`). When it fires it closes both connections (an incomplete
    body ends both anyway), which wakes the body's task, parked or waiting on either,
    with ``TransportClosed`` (or :class:`_ClientGone`); :func:`_relay_body` tells that
    from a peer's own failure by :attr:`fired`."""

    __slots__ = ("_check_s", "_pump", "_quiet_checks", "_timer", "_timers", "fired")

    def __init__(self, idle_s: float, pump: _BodyPump) -> None:
        self._pump = pump
        self._check_s = idle_s / IDLE_CHECKS_PER_TIMEOUT
        self._quiet_checks = 0
        self._timers = current_timers()
        pump.read = False
        self._timer: Timer | None = self._timers.call_at(
            trio.current_time() + self._check_s, self._check
        )
        self.fired = False

    def _check(self) -> None:
        """A check is due (the timers' task calls this): cut the body after
        ``IDLE_CHECKS_PER_TIMEOUT`` checks in a row without a read, else check again."""
        pump = self._pump
        if pump.read:
            pump.read = False
            self._quiet_checks = 0
        else:
            self._quiet_checks += 1
            if self._quiet_checks >= IDLE_CHECKS_PER_TIMEOUT:
                self.fire()
                return
        self._timer = self._timers.call_at(trio.current_time() + self._check_s, self._check)

    def fire(self) -> None:
        """The body was idle too long: end the relay now (the timers' task calls this)."""
        self._timer = None
        self.fired = True
        self._pump._upstream.close()
        self._pump._client.close()

    def client_gone(self) -> None:
        """The client went (a read-hub watch saw its end): end the relay now, as the
        deadline would (the hub lets a watch's callback close its own socket)."""
        self.stop()
        self.fire()

    def stop(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            self._timers.cancel(timer)


async def _watched_body(
    pump: _BodyPump, response_head: bytes, already: bytes, idle_s: float
) -> tuple[bool, bytes | None]:
    """The body relayed while the client is watched: (complete, the client's pipelined
    bytes, b"" for none) or (False, None) when the client went away.

    A plain client socket is watched from the read hub (a callback, no task); any other
    (TLS, a test double's stream) by a task reading it (:class:`_ClientWatcher`).
    """
    client = pump._client
    hub = client.hub if type(client) is Transport else None
    if hub is not None:
        watch = _HubWatch(client, pump)
        complete = False
        hub.watch(client.sock, watch.readable)
        try:
            if not watch.gone:  # (a watch may see the client gone at once)
                complete = await _relay_body(pump, response_head, already, idle_s)
        finally:
            hub.unwatch(client.sock)
        if watch.gone:
            return False, None
        return complete, watch.pipelined
    watcher = _ClientWatcher(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run, nursery.cancel_scope)
        complete = await _relay_body(pump, response_head, already, idle_s)
        nursery.cancel_scope.cancel()
    if watcher.gone:
        return False, None
    return complete, watcher.pipelined if watcher.pipelined is not None else b""


class _HubWatch:
    """A plain client socket watched from the read hub while its response streams: the
    client gone fires the body's idle alarm at once (one timer for both ends); its next
    request's first bytes are kept."""

    __slots__ = ("_client", "_pump", "gone", "pipelined")

    def __init__(self, client: Transport, pump: _BodyPump) -> None:
        self._client = client
        self._pump = pump
        self.gone = False
        #: Bytes of the client's next request, sent before this response ended.
        self.pipelined = b""

    def readable(self) -> bool:
        try:
            received = self._client.recv_now(_BODY_BUFFER.watch_view)
        except TransportClosed:
            received = 0
        if received < 0:
            return False  # nothing after all: watch on
        if received == 0:
            self.gone = True
            alarm = self._pump.alarm
            if alarm is not None:
                alarm.client_gone()
        else:
            self.pipelined = bytes(_BODY_BUFFER.watch_view[:received])
        return True


class _ClientWatcher:
    """Notices a client that goes away while its response streams, and cancels it."""

    __slots__ = ("_transport", "gone", "pipelined")

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.gone = False
        #: Bytes of the client's next request, sent before this response ended.
        self.pipelined: bytes | None = None

    async def run(self, scope: trio.CancelScope) -> None:
        buffer = bytearray(handshake.MAX_HEAD_BYTES)
        try:
            received = await self._transport.recv_into(buffer)
        except TransportClosed:
            if self._transport.closed:
                return  # closed by the relay (the body's idle alarm): the client stayed
            received = 0
        if received == 0:
            self.gone = True
            scope.cancel()
            return
        self.pipelined = bytes(buffer[:received])


async def _relay_body(pump: _BodyPump, response_head: bytes, already: bytes, idle_s: float) -> bool:
    """Forward the response body as it arrives; True once it ended where its framing says.

    A plain upstream socket's reads are made by the read hub (:meth:`_BodyPump.hub_handler`
    inline, no task woken per chunk) while nothing else is needed; a write the client
    did not take whole, a full read, TLS or a test double's stream come here.
    """
    upstream, client = pump._upstream, pump._client
    hub = upstream.hub if type(upstream) is Transport else None
    buffer = pump._buffer
    # One alarm for the whole body, not one per read (it costs more than the read); a
    # read only sets the pump's flag (see IDLE_CHECKS_PER_TIMEOUT).
    alarm = pump.alarm = _IdleAlarm(idle_s, pump)
    try:
        # The bytes that came with the head go out with it, in one write.
        prefix, woken = response_head, None
        while already:
            size = min(len(already), len(buffer))
            buffer[:size], already = already[:size], already[size:]
            woken, prefix = pump.forward(size, prefix), b""
            if woken is not None:
                break
        if prefix:
            await _send_all(client, prefix)
        handler = pump.hub_handler() if hub is not None else None
        while woken is not _ENDED:
            if alarm.fired:
                return False  # fired while this task was about to run: both are closed
            if woken is _UNSENT:
                rest, pump.unsent = pump.unsent, b""
                await _send_all(client, rest)
                if pump.complete:
                    break
            if handler is not None and upstream.drained:
                assert hub is not None
                woken = await hub.serve(upstream.sock, handler)
            else:
                woken = pump.forward(await upstream.recv_into(buffer))
        return pump.complete
    except _ClientGone:
        if alarm.fired:
            return False  # the upstream was silent for idle_s, or the client went
        raise
    except TransportClosed:
        # The upstream's read failed (a write to the client that fails is _ClientGone):
        # a reset mid-body is a cut, as a close before the framing's end is, not the
        # client going away. (With the alarm fired, both were closed on purpose.)
        return False
    finally:
        alarm.stop()
        pump.alarm = None


async def _send_all(client: Transport, data: bytes | memoryview) -> None:
    try:
        await client.send_all(data)
    except TransportClosed:
        raise _ClientGone from None


async def _copy_exactly(
    source: Transport, destination: Transport, count: int, idle_s: float
) -> None:
    """The rest of the client's request body to the upstream, as it arrives."""
    buffer = bytearray(RECEIVE_BYTES)
    view = memoryview(buffer)
    while count > 0:
        received = await _client_read(source, buffer, count, idle_s)
        await destination.send_all(view[:received])
        count -= received


async def _client_read(transport: Transport, buffer: bytearray, most: int, idle_s: float) -> int:
    """Up to ``most`` bytes of the client's request body (at least one).

    The client's failures are its own: silent for ``idle_s`` is a 408, gone is
    :class:`_ClientGone`. Neither may reach the upstream's outcome (a cool-down, a
    failover) the way an upstream read's failure does.
    """
    try:
        with trio.fail_after(idle_s):
            received = await transport.recv_into(buffer, min(len(buffer), most))
    except trio.TooSlowError:
        raise RestRequestError(408, "The request body did not arrive in time.", "timeout") from None
    except TransportClosed:
        raise _ClientGone from None
    if received == 0:
        raise _ClientGone
    return received


class _CloseAlarm:
    """A timeout on one read of a connection: a timer (one heap entry in the run's
    :class:`~relay.net.timers.Timers`) that closes the connection when it comes due,
    instead of a cancel scope around the read (a scope's entry and exit cost several
    times a timer's). The read it cuts raises ``TransportClosed``; :attr:`fired` tells
    that from the peer's own close. Used where the connection is closed on a timeout
    anyway: the first byte of an upstream's answer, a keep-alive client's next request."""

    __slots__ = ("_transport", "fired")

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self._transport.close()


async def _read_closing_after(transport: Transport, timeout_s: float, read: Awaitable[_T]) -> _T:
    """``read`` (a read of ``transport``), or ``trio.TooSlowError`` when it did not end
    within ``timeout_s``: a :class:`_CloseAlarm` then closed the connection, which cut it."""
    alarm = _CloseAlarm(transport)
    timers = current_timers()
    timer = timers.call_at(trio.current_time() + timeout_s, alarm.fire)
    try:
        return await read
    except TransportClosed:
        if alarm.fired:
            raise trio.TooSlowError from None
        raise
    finally:
        timers.cancel(timer)


def _first_response_head(connection: Transport, timeout_s: float) -> Awaitable[ResponseHead]:
    """The upstream's response head, interim answers skipped; ``trio.TooSlowError`` when
    it did not come within ``timeout_s`` (the connection is then closed). (The read
    itself, not a coroutine around it: each level of awaits is paid again on a wake.)"""
    read = http.read_response_head(connection, skip_informational=True)
    return _read_closing_after(connection, timeout_s, read)


async def next_request_head(
    transport: Transport, leftover: bytes, timeout_s: float
) -> RequestHead | None:
    """A keep-alive client's next request head (``leftover``: its bytes already read);
    None when the client closed, or sent nothing for ``timeout_s`` (then its connection
    is closed)."""
    try:
        return await _read_closing_after(
            transport, timeout_s, http.read_request_head(transport, leftover)
        )
    except trio.TooSlowError:
        return None  # idle for too long between requests


async def _read_refusal_body(connection: Transport, response: ResponseHead) -> bytes:
    body = bytearray(response.trailing)
    chunk = bytearray(8192)
    if messages.is_chunked(response.headers):
        scanner = ChunkedScanner()
        payload = bytearray()
        _, spans = scanner.feed(body, 0, len(body))
        for start, stop in spans:
            payload += body[start:stop]
        with trio.move_on_after(REFUSAL_BODY_TIMEOUT_S):
            while not scanner.done and len(payload) <= MAX_REFUSAL_BODY_BYTES:
                received = await connection.recv_into(chunk)
                if received == 0:
                    break
                _, spans = scanner.feed(chunk, 0, received)
                for start, stop in spans:
                    payload += chunk[start:stop]
        return bytes(payload[:MAX_REFUSAL_BODY_BYTES])
    length = response.content_length
    with trio.move_on_after(REFUSAL_BODY_TIMEOUT_S):
        while (length is None or len(body) < length) and len(body) <= MAX_REFUSAL_BODY_BYTES:
            try:
                received = await connection.recv_into(chunk)
            except TransportClosed:
                break
            if received == 0:
                break
            body += chunk[:received]
    return bytes(body[: length if length is not None else MAX_REFUSAL_BODY_BYTES])


def _content_length(head: RequestHead) -> int | None:
    values = [value for name, value in head.headers if name == b"content-length"]
    if not values:
        return None
    if len(set(values)) > 1 or not values[0].strip().isdigit():
        raise RestRequestError(400, "Invalid Content-Length.", "invalid_request")
    return int(values[0])


def _leftover(head: RequestHead) -> bytes | None:
    """After a bodiless request: the next request's bytes already read, or None to close."""
    return None if messages.wants_close(head.headers) else head.trailing
