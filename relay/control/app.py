"""The HTTP control plane: a quart-trio app for everything that is not a realtime upgrade.

This module owns the control-plane routes and their answers: ``/healthz``
(the process is up) and ``/readyz`` (new sessions are accepted: 503 while
draining or at the session limit). Unknown routes answer 404 and errors answer
with OpenAI's ``{"error": {...}}`` envelope, never an HTML page or a traceback.
Later issues add client secrets, metrics and the admin API here.

The app reads live state through :class:`ControlState`, a small protocol the
data plane implements, so the app can be built and tested on its own.
"""

from __future__ import annotations

import time
from typing import Protocol

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from relay.minting import Minter
from relay.protocol.events import http_error_body


class ControlState(Protocol):
    @property
    def live_sessions(self) -> int: ...

    @property
    def max_sessions(self) -> int: ...

    @property
    def draining(self) -> bool: ...

    @property
    def minter(self) -> Minter: ...


def _json(body: bytes, status: int) -> Response:
    return Response(body, status=status, content_type="application/json")


def create_app(state: ControlState) -> QuartTrio:
    app = QuartTrio("relay")

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json(b'{"status":"ok"}', 200)

    @app.get("/readyz")
    async def readyz() -> Response:
        live, limit = state.live_sessions, state.max_sessions
        if state.draining:
            return _json(b'{"status":"draining"}', 503)
        if live >= limit:
            return _json(b'{"status":"full"}', 503)
        return _json(b'{"status":"ready"}', 200)

    @app.post("/v1/realtime/client_secrets")
    @app.post("/realtime/client_secrets")
    async def client_secrets() -> Response:
        body = await request.get_data()
        assert isinstance(body, bytes)
        answer = await state.minter.mint(request.headers.get("Authorization"), body, time.time())
        return _json(answer.body, answer.status)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
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
