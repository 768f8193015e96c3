"""``POST /v1/realtime/client_secrets`` on the relay: app backends get client credentials.

This module owns the endpoint's decisions (the quart route is a thin shell in
:mod:`relay.control.app`):

- the caller authenticates with an app key
  (:class:`relay.credentials.keyfiles.AppKeyStore`);
- the body is OpenAI's GA shape, validated with OpenAI's rules and wording
  (TTL 10–7200 s, default 600), so a backend written for OpenAI points at the
  relay unchanged. Relay-only options ride in one optional top-level object,
  ``"relay": {"user", "origins", "single_use", "max_session_s", "models"}``, that
  an OpenAI backend simply never sends;
- the answer is OpenAI's shape ``{"value", "expires_at", "session"}`` where
  ``value`` is a relay token (``ek_r1.…``) binding the expiry, the models, the
  session config to enforce, and the options above;
- a session config too large for a token (over
  :data:`relay.credentials.tokens.MAX_CLAIMS_BYTES` once packed, which the verifier
  would refuse) is answered 400 with OpenAI's envelope, code ``session_too_large``,
  param ``session``: no token is issued;
- an app key in ``passthrough`` mode instead gets a real OpenAI ``ek_`` minted by
  the upstream with the relay's key (for clients that go to OpenAI directly over
  WebRTC); the upstream's answer is passed on as it came.

The end-user id is never stored or forwarded raw: it is hashed before it enters
the token and is forwarded upstream as ``OpenAI-Safety-Identifier``.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import httpx
import msgspec
import orjson

from relay.credentials.keyfiles import AppKey, AppKeyStore
from relay.credentials.secret import Secret
from relay.credentials.tokens import Keyring, TokenClaims, mint, new_token_id
from relay.protocol.client_secrets import SessionObjects, parse_request
from relay.protocol.events import http_error_body
from relay.protocol.validation import ClientEventError

LOGGER = logging.getLogger("relay.credentials.minting")

#: Timeout for a passthrough mint at the upstream.
PASSTHROUGH_TIMEOUT_S: Final = 10.0
MAX_ORIGINS: Final = 16
MAX_MODELS: Final = 16


class RelayOptions(msgspec.Struct, forbid_unknown_fields=True):
    user: str = ""
    origins: list[str] = msgspec.field(default_factory=list)
    single_use: bool = False
    max_session_s: int = 0
    models: list[str] = msgspec.field(default_factory=list)
    #: Let the token call the REST proxy too (its ``models`` only, when it names some).
    rest: bool = False


@dataclass(frozen=True, slots=True)
class MintAnswer:
    status: int
    body: bytes


def _error(status: int, message: str, code: str | None, param: str | None = None) -> MintAnswer:
    return MintAnswer(status, http_error_body(message, code=code, param=param))


def hash_end_user(app: str, user: str) -> str:
    """A stable pseudonymous id per (app, end user); the raw id never leaves the relay."""
    return hashlib.sha256(f"{app}\x00{user}".encode()).hexdigest()[:32]


class Minter:
    def __init__(
        self,
        app_keys: AppKeyStore,
        keyring: Callable[[], Keyring],
        *,
        upstream_http_base: str,
        upstream_api_key: str,
        upstream_ca_file: str = "",
    ) -> None:
        self.app_keys = app_keys
        self.keyring = keyring
        self.upstream_http_base = upstream_http_base.rstrip("/")
        self.upstream_api_key = Secret(upstream_api_key)
        self.upstream_ca_file = upstream_ca_file
        self._session_objects = SessionObjects()

    async def mint(self, app: AppKey, body: bytes, now: float) -> MintAnswer:
        """Mint for ``app``, whose key the caller checked before reading ``body``."""
        if app.mode == "passthrough":
            return await self._passthrough(body)
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            document = None
        options = RelayOptions()
        if isinstance(document, dict) and "relay" in document:
            try:
                options = msgspec.convert(document.pop("relay"), RelayOptions)
            except msgspec.ValidationError as exc:
                return _error(400, f"Invalid 'relay' options: {exc}", "invalid_value", "relay")
            body = orjson.dumps(document)
        if len(options.origins) > MAX_ORIGINS or len(options.models) > MAX_MODELS:
            return _error(400, "Too many origins or models.", "invalid_value", "relay")
        try:
            ttl_s, session = parse_request(body)
        except ClientEventError as exc:
            return _error(400, exc.message, exc.code, exc.param)
        models = tuple(options.models) or ((str(session["model"]),) if "model" in session else ())
        claims = TokenClaims(
            jti=new_token_id(),
            app=app.name,
            issued_at=int(now),
            expires_at=int(now) + ttl_s,
            models=models,
            session=orjson.dumps(session),
            user=hash_end_user(app.name, options.user) if options.user else "",
            origins=tuple(options.origins),
            max_session_s=max(0, options.max_session_s),
            single_use=options.single_use,
            rest=options.rest,
        )
        try:
            token = mint(claims, self.keyring().active)
        except ValueError as exc:
            return _error(400, str(exc), "session_too_large", "session")
        answer: dict[str, Any] = {
            "value": token,
            "expires_at": claims.expires_at,
            "session": self._session_objects.session_object(session),
        }
        return MintAnswer(200, orjson.dumps(answer))

    async def _passthrough(self, body: bytes) -> MintAnswer:
        if not self.upstream_api_key:
            # Only Azure upstreams: OpenAI's ek_ secrets have no upstream to come from.
            return MintAnswer(
                501,
                http_error_body(
                    "This relay has no OpenAI upstream to mint client secrets with; use a "
                    "relay-mode app key (relay tokens).",
                    error_type="server_error",
                    code="passthrough_unavailable",
                ),
            )
        url = f"{self.upstream_http_base}/realtime/client_secrets"
        verify: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=self.upstream_ca_file)
            if self.upstream_ca_file
            else True
        )
        try:
            async with httpx.AsyncClient(timeout=PASSTHROUGH_TIMEOUT_S, verify=verify) as http:
                response = await http.post(
                    url,
                    content=body,
                    headers={
                        "Authorization": f"Bearer {self.upstream_api_key.reveal()}",
                        "Content-Type": "application/json",
                    },
                )
        except httpx.HTTPError as exc:
            LOGGER.warning("passthrough mint failed: %s", type(exc).__name__)
            return MintAnswer(
                502,
                http_error_body(
                    "The upstream could not mint a client secret.",
                    error_type="server_error",
                    code="upstream_unreachable",
                ),
            )
        return MintAnswer(response.status_code, response.content)


def http_base_for(upstream_ws_url: str) -> str:
    """``wss://host/v1`` -> ``https://host/v1`` (the REST side of the same upstream)."""
    if upstream_ws_url.startswith("wss://"):
        return "https://" + upstream_ws_url[len("wss://") :]
    if upstream_ws_url.startswith("ws://"):
        return "http://" + upstream_ws_url[len("ws://") :]
    return upstream_ws_url
