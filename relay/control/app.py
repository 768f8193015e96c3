"""The HTTP control plane: a quart-trio app for everything that is not a realtime upgrade.

This module owns the control-plane routes and their answers: ``/healthz``
(the process is up), ``/readyz`` (new sessions are accepted: 503 while
draining or at the session limit), ``POST /v1/realtime/client_secrets``
(minting, see :mod:`relay.credentials.minting`; the app key is checked before the body is
read, and bodies over :data:`MAX_BODY_BYTES` answer 413), ``/metrics`` (Prometheus; requires the
admin key when one is configured) and the admin API behind the admin key
(``GET /admin/sessions``, ``POST /admin/sessions/<id>/end``), and the browser voice
page with its demo token endpoint under ``/demo/`` when ``browser_demo_enabled``
(:mod:`relay.control.browser_demo`; 404 like any unknown path while off). Unknown routes
answer 404 and errors answer with OpenAI's ``{"error": {...}}`` envelope, never
an HTML page or a traceback. One access log line per request.

The app reads live state through :class:`ControlState`, a small protocol the
data plane implements, so the app can be built and tested on its own.
"""

from __future__ import annotations

import logging
import time
from typing import Final, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relay.config import ServeConfig
from relay.control import browser_demo
from relay.credentials.digests import matches_any, parse_digest_hex
from relay.credentials.minting import Minter
from relay.metrics import RelayMetrics
from relay.protocol.events import http_error_body


class ControlState(Protocol):
    @property
    def config(self) -> ServeConfig:
        """The configuration new requests follow (swapped whole on SIGHUP)."""
        ...

    @property
    def live_sessions(self) -> int: ...

    @property
    def sessions_in_use(self) -> int:
        """Live sessions plus handshakes in flight: what capacity is judged by."""
        ...

    @property
    def max_sessions(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    @property
    def minter(self) -> Minter: ...

    @property
    def metrics(self) -> RelayMetrics: ...

    @property
    def admin_key_sha256(self) -> str: ...

    def list_sessions(self) -> list[dict[str, object]]: ...

    def list_upstreams(self) -> list[dict[str, object]]:
        """Each upstream with its key ids, live counts, cool-downs (never a key)."""
        ...

    def end_session(self, session_id: str) -> bool: ...


ACCESS_LOG = logging.getLogger("relay.access")

#: The largest request body the control plane reads (a mint request is a few KiB).
MAX_BODY_BYTES: Final = 1024 * 1024


def _json(body: bytes, status: int) -> Response:
    return Response(body, status=status, content_type="application/json")


def bearer_credential() -> str | None:
    """The credential of an ``Authorization: Bearer`` header, or ``None``."""
    scheme, _, value = (request.headers.get("Authorization") or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def too_large() -> Response:
    return _json(
        http_error_body(
            f"Request body larger than {MAX_BODY_BYTES} bytes.", code="request_too_large"
        ),
        413,
    )


def create_app(state: ControlState) -> QuartTrio:
    app = QuartTrio("relay")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(b'{"status":"ok"}', 200)

    @app.get("/readyz")
    async def readyz() -> Response:
        # The same count admission refuses by: live sessions and handshakes in flight.
        live, limit = state.sessions_in_use, state.max_sessions
        if state.draining:
            return _json(b'{"status":"draining"}', 503)
        if live >= limit:
            return _json(b'{"status":"full"}', 503)
        return _json(b'{"status":"ready"}', 200)

    @app.post("/v1/realtime/client_secrets")
    @app.post("/realtime/client_secrets")
    async def client_secrets() -> Response:
        # The app key first: an unauthenticated body is never read, let alone buffered.
        app_key = state.minter.app_keys.check(bearer_credential())
        if app_key is None:
            return _json(
                http_error_body("Incorrect app key provided.", code="invalid_api_key"), 401
            )
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return too_large()
        body = await request.get_data()  # chunked bodies: quart stops at MAX_CONTENT_LENGTH
        assert isinstance(body, bytes)
        answer = await state.minter.mint(app_key, body, time.time())
        return _json(answer.body, answer.status)

    def admin_refusal() -> Response | None:
        expected = state.admin_key_sha256
        if not expected:
            return None
        key = bearer_credential()
        # A digest that is not hex (refused by the configuration check) matches nothing.
        try:
            digests: tuple[bytes, ...] = (parse_digest_hex(expected),)
        except ValueError:
            digests = ()
        if key is None or matches_any(key, digests) is None:
            return _json(http_error_body("Admin key required.", code="invalid_api_key"), 401)
        return None

    def admin_api_refusal() -> Response | None:
        """404 while the admin API is off (no admin key configured), else the key check."""
        if not state.admin_key_sha256:
            return _json(http_error_body("The admin API is off.", code="not_found"), 404)
        return admin_refusal()

    @app.get("/metrics")
    async def metrics() -> Response:
        refusal = admin_refusal()
        if refusal is not None:
            return refusal
        return Response(state.metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)

    @app.get("/admin/sessions")
    async def admin_sessions() -> Response:
        refusal = admin_api_refusal()
        if refusal is not None:
            return refusal
        return _json(orjson.dumps({"sessions": state.list_sessions()}), 200)

    @app.get("/admin/upstreams")
    async def admin_upstreams() -> Response:
        refusal = admin_api_refusal()
        if refusal is not None:
            return refusal
        return _json(orjson.dumps({"upstreams": state.list_upstreams()}), 200)

    @app.post("/admin/sessions/<session_id>/end")
    async def admin_end_session(session_id: str) -> Response:
        refusal = admin_api_refusal()
        if refusal is not None:
            return refusal
        if not state.end_session(session_id):
            return _json(http_error_body("No such session.", code="session_not_found"), 404)
        return _json(b'{"ended":true}', 200)

    browser_demo.register(app, state)

    @app.after_request
    async def access_log(response: Response) -> Response:
        ACCESS_LOG.info(
            "http request",
            extra={
                "fields": {
                    "event": "access",
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                }
            },
        )
        return response

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        if status == 413:
            return too_large()
        message = {404: "Not found.", 405: "Method not allowed."}.get(status, error.name)
        code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
        return _json(http_error_body(message, code=code), status)

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        app.logger.exception("control plane request failed")
        return _json(
            http_error_body("Internal error.", error_type="server_error", code="internal_error"),
            500,
        )

    return app
