"""The browser voice page and its demo token endpoint, on the control plane.

This module owns the HTTP side of the browser demo (``browser_demo_enabled``,
``relay serve --browser-demo``, ``relay demo --browser``):

- ``GET /demo/`` and the page's files (``/demo/<file>``): the static ES modules
  of :mod:`relay.web`, read once from the installed package and answered from
  memory with a strict Content-Security-Policy (same origin only, no inline
  script, no third party);
- ``POST /demo/token``: the page's "backend". It plays the part of an app
  server that calls ``POST /v1/realtime/client_secrets``: it mints a relay token
  with the same :class:`~relay.credentials.minting.Minter`, under the app name
  :data:`DEMO_APP_NAME`, single use, valid :data:`DEMO_TOKEN_TTL_S`, bound to
  the request's ``Origin`` and to a locked session config (model, instructions,
  voice). Neither an app key nor the upstream key ever reaches the page.

The ``Origin`` header is required and must be one of the relay's
``allowed_origins`` (the configuration check makes that list non-empty when the
page is on), so another site cannot mint tokens through a visitor's browser; a
refusal is OpenAI's ``{"error": {...}}`` envelope (403).

While the setting is off every one of these paths answers exactly as an unknown
path does (404, ``not_found``): nothing of the demo is reachable. The setting
is read per request, so a SIGHUP that turns it on or off takes effect at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Final

import orjson
from quart import Response, request

from relay.credentials.keyfiles import AppKey
from relay.protocol.events import http_error_body

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from relay.control.app import ControlState

#: Where the page lives on the control plane.
DEMO_PAGE_PATH: Final = "/demo/"
DEMO_TOKEN_PATH: Final = "/demo/token"
#: The app name the demo's tokens carry (logs and per-app limits see this name).
DEMO_APP_NAME: Final = "browser-demo"
#: A demo token is spent by the page's next handshake; it lives this long if unused.
DEMO_TOKEN_TTL_S: Final = 60
#: A demo session lasts at most this long (the relay's own limit still applies).
DEMO_SESSION_MAX_S: Final = 900
#: The locked part of every demo session: the page cannot change these.
DEMO_INSTRUCTIONS: Final = (
    "You are the voice assistant of the relay's browser demo. Answer briefly and warmly."
)
DEMO_VOICE: Final = "marin"

#: The page's files and their content types: everything /demo/ serves.
PAGE_FILES: Final[dict[str, str]] = {
    "index.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "main.js": "text/javascript; charset=utf-8",
    "realtime.js": "text/javascript; charset=utf-8",
    "audio.js": "text/javascript; charset=utf-8",
    "pcm.js": "text/javascript; charset=utf-8",
    "resampler.js": "text/javascript; charset=utf-8",
    "capture-worklet.js": "text/javascript; charset=utf-8",
    "playback-worklet.js": "text/javascript; charset=utf-8",
}
#: Same origin only. ``'self'`` covers ws:/wss: to the page's own host (CSP Level 3).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "microphone=(self)",
    "Cache-Control": "no-cache",
}
_DEMO_APP_KEY: Final = AppKey(name=DEMO_APP_NAME, sha256="", mode="relay")
_ALL_METHODS: Final = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@dataclass(frozen=True, slots=True)
class PageFile:
    body: bytes
    content_type: str


def load_page_files() -> dict[str, PageFile]:
    """The page's files from the installed :mod:`relay.web` package."""
    package = resources.files("relay.web")
    return {
        name: PageFile(package.joinpath(name).read_bytes(), content_type)
        for name, content_type in PAGE_FILES.items()
    }


def token_request_body(model: str, origin: str) -> bytes:
    """What the demo backend asks ``client_secrets`` for: OpenAI's shape plus ``relay``."""
    return orjson.dumps(
        {
            "expires_after": {"anchor": "created_at", "seconds": DEMO_TOKEN_TTL_S},
            "session": {
                "type": "realtime",
                "model": model,
                "instructions": DEMO_INSTRUCTIONS,
                "audio": {"output": {"voice": DEMO_VOICE}},
            },
            "relay": {
                "origins": [origin],
                "single_use": True,
                "max_session_s": DEMO_SESSION_MAX_S,
            },
        }
    )


def register(app: QuartTrio, state: ControlState) -> None:
    """Add the page's routes to the control app; they answer 404 while the setting is off."""
    files = load_page_files()

    def json_answer(body: bytes, status: int) -> Response:
        # A credential (or a refusal) is never kept by a cache along the way.
        return Response(
            body,
            status=status,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    def not_found() -> Response:
        # Exactly the control plane's answer to an unknown path.
        return Response(
            http_error_body("Not found.", code="not_found"),
            status=404,
            content_type="application/json",
        )

    def method_not_allowed() -> Response:
        return json_answer(http_error_body("Method not allowed.", code="method_not_allowed"), 405)

    def page_file(name: str) -> Response:
        page = files.get(name)
        if page is None:
            return not_found()
        if request.method not in ("GET", "HEAD"):
            return method_not_allowed()
        return Response(
            page.body, status=200, content_type=page.content_type, headers=dict(_PAGE_HEADERS)
        )

    async def demo_token() -> Response:
        if request.method != "POST":
            return method_not_allowed()
        origin = request.headers.get("Origin")
        if not origin:
            return json_answer(
                http_error_body(
                    "An Origin header is required: the demo token is bound to the page's Origin.",
                    code="origin_required",
                ),
                403,
            )
        config = state.config
        if origin not in config.allowed_origins:
            return json_answer(
                http_error_body("This Origin is not allowed.", code="origin_not_allowed"), 403
            )
        # The request body is never read: everything the token binds is the relay's choice.
        answer = await state.minter.mint(
            _DEMO_APP_KEY, token_request_body(config.browser_demo_model, origin), time.time()
        )
        return json_answer(answer.body, answer.status)

    # Every method on every /demo path comes here, so that while the setting is off the
    # answers are exactly an unknown path's (a route that only took GET would say 405).
    @app.route("/demo", methods=_ALL_METHODS)
    @app.route(DEMO_PAGE_PATH, methods=_ALL_METHODS)
    @app.route(f"{DEMO_PAGE_PATH}<path:name>", methods=_ALL_METHODS)
    async def demo(name: str = "index.html") -> Response:
        if not state.config.browser_demo_enabled:
            return not_found()
        if f"{DEMO_PAGE_PATH}{name}" == DEMO_TOKEN_PATH:
            return await demo_token()
        return page_file(name)


__all__ = [
    "CONTENT_SECURITY_POLICY",
    "DEMO_APP_NAME",
    "DEMO_PAGE_PATH",
    "DEMO_SESSION_MAX_S",
    "DEMO_TOKEN_PATH",
    "DEMO_TOKEN_TTL_S",
    "PAGE_FILES",
    "load_page_files",
    "register",
    "token_request_body",
]
