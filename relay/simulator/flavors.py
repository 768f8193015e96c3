"""What each upstream the simulator plays looks like from the outside, before the 101.

This module owns, per :data:`~relay.config.SimulatorFlavor`, the sans-I/O half of a
realtime handshake that differs between OpenAI and an Azure OpenAI resource:

- the paths: openai ``/v1/realtime`` (and ``/realtime``); azure the GA
  ``/openai/v1/realtime?model=<deployment>`` and the preview
  ``/openai/realtime?api-version=<v>&deployment=<deployment>``; every other path is
  404 in the flavor's shape;
- where the credential comes from (:func:`presented_credential`): openai's
  ``Authorization: Bearer``, ``api-key`` header or browser subprotocol; azure's
  ``api-key`` header (or the preview's ``api-key`` query) or an Entra token as
  ``Authorization: Bearer``;
- the refusals' bodies: OpenAI's envelope ``{"error": {message, type, param,
  code}}``, Azure's ``{"error": {code, message}}``, worded as each service words
  them, and never quoting a credential.

A refusal is a :class:`Refusal`: the whole HTTP answer (status, JSON body, extra
headers), raised by the server's checks and written by its shell.

Azure facts are from Microsoft's Realtime docs (``realtime-protocol.md`` §1.8) and
Azure's published error bodies; a detail not confirmed for the realtime endpoint
says so where it is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import orjson

from relay.config import SimulatorFlavor
from relay.credentials.secret import Secret
from relay.protocol.events import http_error_body
from relay.protocol.handshake import API_KEY_SUBPROTOCOL_PREFIX, RequestHead
from relay.simulator.faults import AuthScheme

OPENAI_REALTIME_PATHS: Final = frozenset({"/v1/realtime", "/realtime"})
AZURE_GA_PATH: Final = "/openai/v1/realtime"
AZURE_PREVIEW_PATH: Final = "/openai/realtime"
AZURE_REALTIME_PATHS: Final = frozenset({AZURE_GA_PATH, AZURE_PREVIEW_PATH})
#: A requested model name quoted back in OpenAI's ``model_not_found`` (characters):
#: OpenAI quotes it; a longer query value is cut rather than reflected whole.
MAX_QUOTED_MODEL_CHARS: Final = 64
#: A wrong key of at most this many characters is quoted as ``****`` only: its
#: first 8 and last 4 would be most of it.
MASKED_KEY_MIN_CHARS: Final = 12

AZURE_KEY_DENIED: Final = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API "
    "endpoint for your resource."
)
AZURE_TOKEN_DENIED: Final = (
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired."
)
AZURE_DEPLOYMENT_NOT_FOUND: Final = (
    "The API deployment for this resource does not exist. If you created the deployment "
    "within the last 5 minutes, please wait a moment and try again."
)


class Refusal(Exception):
    """A handshake answered with an HTTP error instead of 101: the whole answer."""

    def __init__(
        self, status: int, body: bytes, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Presented:
    """The credential a handshake carried and how (``credential`` never displays)."""

    scheme: AuthScheme
    credential: Secret | None


def is_realtime_path(flavor: SimulatorFlavor, path: str) -> bool:
    return path in (AZURE_REALTIME_PATHS if flavor == "azure" else OPENAI_REALTIME_PATHS)


def not_found(flavor: SimulatorFlavor, method: str, path: str) -> Refusal:
    """A path this upstream does not have."""
    if flavor == "azure":
        return azure_error(404, "404", "Resource not found")
    # OpenAI quotes method and path; both passed the head parser (no control bytes).
    return Refusal(404, http_error_body(f"Invalid URL ({method} {path})", code="not_found"))


def presented_credential(
    flavor: SimulatorFlavor, head: RequestHead, query: dict[str, str]
) -> Presented:
    """Which credential the handshake presented, by the flavor's rules (not checked)."""
    authorization = head.header(b"authorization")
    bearer: str | None = None
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = value.strip()
    api_key = (head.header(b"api-key") or "").strip()
    if flavor == "azure":
        # The SDK sends one of the two; Azure's preview also takes the key as a query.
        if api_key:
            return Presented("api-key", Secret(api_key))
        if head.path == AZURE_PREVIEW_PATH and query.get("api-key"):
            return Presented("api-key", Secret(query["api-key"]))
        if bearer is not None:
            return Presented("entra", Secret(bearer))
        return Presented("none", None)
    # The openai flavor's order is relay.protocol.handshake.client_credential's.
    if bearer is not None:
        return Presented("bearer", Secret(bearer))
    if api_key:
        return Presented("api-key", Secret(api_key))
    for protocol in head.subprotocols:
        if protocol.startswith(API_KEY_SUBPROTOCOL_PREFIX):
            value = protocol[len(API_KEY_SUBPROTOCOL_PREFIX) :]
            return Presented("subprotocol", Secret(value)) if value else Presented("none", None)
    return Presented("none", None)


def requested_model(flavor: SimulatorFlavor, path: str, query: dict[str, str]) -> str:
    """The model (openai) or deployment (azure) the handshake asks for; "" if none."""
    if flavor == "azure" and path == AZURE_PREVIEW_PATH:
        return query.get("deployment", "")
    return query.get("model", "")


def check_azure_route(path: str, query: dict[str, str]) -> None:
    """Azure's checks on the URL itself, made before the credential's."""
    if path == AZURE_PREVIEW_PATH and not query.get("api-version"):
        # [unconfirmed for the realtime endpoint] Azure's wording for a request
        # without an api-version on its other preview routes.
        raise azure_error(
            400,
            "MissingApiVersionParameter",
            "The api-version query parameter (?api-version=) is required for all requests.",
        )


def check_azure_deployment(
    path: str, deployment: str, deployments: tuple[str, ...], *, transcription: bool
) -> None:
    """A deployment must be named (unless a transcription session) and must exist."""
    if not deployment:
        if transcription:
            return
        # [assumed] Azure's shape with OpenAI's wording; not captured from Azure.
        param = "deployment" if path == AZURE_PREVIEW_PATH else "model"
        raise azure_error(400, "BadRequest", f"Missing required parameter: '{param}'.")
    if deployments and deployment not in deployments:
        raise azure_error(404, "DeploymentNotFound", AZURE_DEPLOYMENT_NOT_FOUND)


def model_not_found(model: str) -> Refusal:
    """OpenAI's answer to a model this upstream does not serve.

    [assumed] The status for the realtime handshake is not recorded (OpenAI's REST
    routes answer ``model_not_found`` with 404); 400 with the REST wording and code
    is what this simulator sends.
    """
    quoted = model[:MAX_QUOTED_MODEL_CHARS]
    return Refusal(
        400,
        http_error_body(
            f"The model `{quoted}` does not exist or you do not have access to it.",
            code="model_not_found",
        ),
    )


def azure_unauthorized(scheme: AuthScheme) -> Refusal:
    """Azure's 401: the key wording, or the token wording for an Entra bearer."""
    return azure_error(401, "401", AZURE_TOKEN_DENIED if scheme == "entra" else AZURE_KEY_DENIED)


def azure_error(status: int, code: str, message: str) -> Refusal:
    return Refusal(status, orjson.dumps({"error": {"code": code, "message": message}}))


def fault_refusal(
    flavor: SimulatorFlavor,
    status: int,
    *,
    model: str,
    retry_after_s: float | None,
    body: bytes | None,
    operation: str = "Realtime",
) -> Refusal:
    """A programmed refusal (:meth:`HandshakeFaults.refuse_next`) in the flavor's shape.

    ``operation``: the Azure operation its 429 names (a REST request's, e.g.
    ``ChatCompletions_Create``).
    """
    headers: tuple[tuple[str, str], ...] = ()
    if retry_after_s is not None:
        # Retry-After takes whole seconds (RFC 9110 §10.2.3); OpenAI also sends the
        # exact wait in milliseconds, which its SDKs prefer.
        headers = (
            ("Retry-After", str(math.ceil(retry_after_s))),
            ("retry-after-ms", str(round(retry_after_s * 1000))),
        )
    if body is None:
        body = (
            _azure_fault_body(status, retry_after_s, operation)
            if flavor == "azure"
            else _openai_fault_body(status, model, retry_after_s)
        )
    return Refusal(status, body, headers=headers)


def _openai_fault_body(status: int, model: str, retry_after_s: float | None) -> bytes:
    if status == 429:
        wait = f" Please try again in {retry_after_s:g}s." if retry_after_s is not None else ""
        return http_error_body(
            f"Rate limit reached for {model[:MAX_QUOTED_MODEL_CHARS] or 'this model'} in "
            f"organization org-simulator on requests per min (RPM): Limit 100, Used 100, "
            f"Requested 1.{wait} Visit https://platform.openai.com/account/rate-limits to "
            "learn more.",
            error_type="requests",
            code="rate_limit_exceeded",
        )
    if status >= 500:
        message = (
            "The engine is currently overloaded, please try again later."
            if status == 503
            else "The server had an error while processing your request. Sorry about that!"
        )
        return http_error_body(message, error_type="server_error")
    return http_error_body(f"Simulated refusal with HTTP {status}.", code="simulated")


def _azure_fault_body(status: int, retry_after_s: float | None, operation: str) -> bytes:
    if status == 429:
        wait = math.ceil(retry_after_s) if retry_after_s is not None else 1
        return orjson.dumps(
            {
                "error": {
                    "code": "429",
                    "message": f"Requests to the {operation} Operation under Azure OpenAI API "
                    "have exceeded call rate limit of your current OpenAI S0 pricing tier. "
                    f"Please retry after {wait} seconds.",
                }
            }
        )
    if status >= 500:
        return orjson.dumps(
            {
                "error": {
                    "code": "InternalServerError",
                    "message": "The service is temporarily unable to process your request. "
                    "Please try again later.",
                }
            }
        )
    return orjson.dumps({"error": {"code": str(status), "message": "Simulated refusal."}})


def masked_key(key: str) -> str:
    """A key the way OpenAI quotes a wrong one: its first and last characters only."""
    if len(key) <= MASKED_KEY_MIN_CHARS:
        return "****"
    return f"{key[:8]}****{key[-4:]}"


__all__ = [
    "AZURE_GA_PATH",
    "AZURE_PREVIEW_PATH",
    "OPENAI_REALTIME_PATHS",
    "Presented",
    "Refusal",
    "azure_error",
    "azure_unauthorized",
    "check_azure_deployment",
    "check_azure_route",
    "fault_refusal",
    "is_realtime_path",
    "masked_key",
    "model_not_found",
    "not_found",
    "presented_credential",
    "requested_model",
]
