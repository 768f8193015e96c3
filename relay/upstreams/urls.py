"""Where and how to open one upstream's Realtime WebSocket, for each kind. Sans-I/O.

This module owns the upstream handshake target: from an upstream's settings
(:class:`UpstreamSpec`), the client's query as admission read it
(:class:`~relay.protocol.handshake.RealtimeQuery`) and one key of the upstream's pool
(:class:`UpstreamCredential`), :func:`handshake_target` builds host, port, TLS,
request target (path and query) and headers (:class:`HandshakeTarget`). It dials
nothing; :mod:`relay.dataplane.upstream` does, with what this returns.

The forms (``<base>`` is the configured base URL's path, without a trailing ``/``):

- ``openai`` and ``compatible``: ``<base>/realtime?<the client's query>``, as the
  one-upstream shorthand always built it,
  with ``Authorization: Bearer <key>``. The client's parameters keep their order and
  their encoding; only ``model``'s value changes, and only when the model map names
  another model for it.
- ``azure``, GA: ``<base>/openai/v1/realtime?model=<deployment>&<the rest>`` with
  the ``api-key`` header, or ``Authorization: Bearer`` for an Entra token.
- ``azure`` with an ``azure_api_version`` (the preview API):
  ``<base>/openai/realtime?api-version=<version>&deployment=<deployment>&<the rest>``.

For Azure the relay names the deployment itself: the client's own ``model`` (and any
``deployment`` or ``api-version`` it sent) is dropped before the relay's are put
first, so Azure never reads two of them. A base URL given with Azure's SDK path
(``https://res.openai.azure.com/openai/v1/``) means the same resource as without it.

Secrets: the credential is kept out of every ``repr``; :meth:`HandshakeTarget.wire_headers`
is the one place its value is revealed, for the request bytes.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote_plus

from relay.credentials.digests import digest_hex
from relay.credentials.secret import Secret
from relay.protocol.handshake import RealtimeQuery, UpstreamTarget

AZURE_API_KEY_HEADER: Final = "api-key"
#: Hex characters of a key's SHA-256 kept as its id: what logs, metrics and the chooser
#: name. 32 bits tell a pool's keys apart (configuration should refuse a clash) and,
#: keys being long random strings, say nothing about the key.
KEY_ID_HEX_CHARS: Final = 8
#: Path suffixes of an Azure base URL that name the API rather than the resource.
_AZURE_API_PATHS: Final = ("/openai/v1", "/openai")
#: Query parameters only the relay sets on an Azure handshake.
_AZURE_RELAY_PARAMS: Final = frozenset({"model", "deployment", "api-version"})


class UpstreamKind(enum.Enum):
    OPENAI = "openai"
    AZURE = "azure"
    #: Any server speaking OpenAI's Realtime API at a base URL of its own.
    COMPATIBLE = "compatible"


class CredentialScheme(enum.Enum):
    """How the key travels: OpenAI and compatible servers take only ``BEARER``."""

    #: ``Authorization: Bearer <value>``: an OpenAI key, or an Azure Entra token.
    BEARER = "bearer"
    #: ``api-key: <value>``: an Azure resource key.
    AZURE_API_KEY = "azure_api_key"


@dataclass(frozen=True, slots=True)
class UpstreamCredential:
    value: Secret = field(repr=False)
    scheme: CredentialScheme = CredentialScheme.BEARER

    @property
    def key_id(self) -> str:
        """The key's id (a digest prefix): what :class:`~relay.upstreams.chooser.KeyRef` names."""
        return digest_hex(self.value.reveal())[:KEY_ID_HEX_CHARS]

    def header(self) -> tuple[str, str]:
        """The credential header with the value revealed: for the request bytes only."""
        if self.scheme is CredentialScheme.AZURE_API_KEY:
            return (AZURE_API_KEY_HEADER, self.value.reveal())
        return ("Authorization", f"Bearer {self.value.reveal()}")


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    """What the handshake target depends on, of one ``[upstreams.NAME]`` table."""

    kind: UpstreamKind
    #: ``ws://``, ``wss://``, ``http://`` or ``https://`` (the last two mean the first two).
    base_url: str
    #: The client's model -> the upstream's model, or the Azure deployment serving it;
    #: a model missing here is sent as the client asked.
    model_names: Mapping[str, str] = field(default_factory=dict)
    #: Azure only: the preview API's ``api-version``; empty for the GA ``/openai/v1`` form.
    azure_api_version: str = ""


@dataclass(frozen=True, slots=True)
class HandshakeTarget:
    """One upstream handshake, ready for :func:`relay.protocol.handshake.upgrade_request`."""

    tls: bool
    host: str
    port: int
    host_header: str
    #: Path and query: the request line's target.
    request_target: str
    #: The model or deployment the upstream is asked for (None: the client named none).
    upstream_model: str | None
    #: Headers besides the credential (none of them secret).
    headers: tuple[tuple[str, str], ...]
    credential: UpstreamCredential = field(repr=False)

    def wire_headers(self) -> list[tuple[str, str]]:
        """Every header to send, the credential's value revealed: for the request bytes only."""
        return [self.credential.header(), *self.headers]


def upstream_model(spec: UpstreamSpec, client_model: str | None) -> str | None:
    """The model (or Azure deployment) the upstream is asked for, for the client's model."""
    if client_model is None:
        return None
    return spec.model_names.get(client_model, client_model)


def handshake_target(
    spec: UpstreamSpec,
    query: RealtimeQuery,
    credential: UpstreamCredential,
    *,
    extra_headers: Sequence[tuple[str, str]] = (),
) -> HandshakeTarget:
    """The handshake for ``spec``, the client's admitted ``query`` and one key.

    Raises ``ValueError`` for a base URL that is not ``ws(s)``/``http(s)``, an
    ``api-key`` credential for a non-Azure upstream, or an Azure handshake with no
    model to name the deployment by (configuration and admission rule these out
    before a dial; the error is for the code that forgot).
    """
    target = _parsed_base_url(spec.base_url)
    model = upstream_model(spec, query.model)
    if spec.kind is UpstreamKind.AZURE:
        request_target = _azure_request_target(spec, target.base_path, model, query.forwarded)
    else:
        if credential.scheme is not CredentialScheme.BEARER:
            raise ValueError(f"a {spec.kind.value} upstream takes only a Bearer credential")
        forwarded = query.forwarded
        if model is not None and model != query.model:
            forwarded = _with_model(forwarded, model)
        path = f"{target.base_path}/realtime"
        request_target = f"{path}?{forwarded}" if forwarded else path
    return HandshakeTarget(
        tls=target.tls,
        host=target.host,
        port=target.port,
        host_header=target.host_header,
        request_target=request_target,
        upstream_model=model,
        headers=tuple(extra_headers),
        credential=credential,
    )


@functools.lru_cache(maxsize=256)
def _parsed_base_url(url: str) -> UpstreamTarget:
    """Per base URL once (an immutable answer): every session dials the same few."""
    return UpstreamTarget.from_url(url)


def _azure_request_target(
    spec: UpstreamSpec, base_path: str, deployment: str | None, forwarded: str
) -> str:
    if deployment is None:
        raise ValueError("an Azure handshake needs the client's model to name its deployment")
    resource_path = _azure_resource_path(base_path)
    rest = _without_params(forwarded, _AZURE_RELAY_PARAMS)
    if spec.azure_api_version:
        path = f"{resource_path}/openai/realtime"
        ours = f"api-version={_encode(spec.azure_api_version)}&deployment={_encode(deployment)}"
    else:
        path = f"{resource_path}/openai/v1/realtime"
        ours = f"model={_encode(deployment)}"
    return f"{path}?{ours}&{rest}" if rest else f"{path}?{ours}"


def _azure_resource_path(base_path: str) -> str:
    """The base path without Azure's API suffix, so ``…/openai/v1`` is not doubled."""
    for suffix in _AZURE_API_PATHS:
        if base_path.endswith(suffix):
            return base_path[: -len(suffix)]
    return base_path


def _pieces(query: str) -> Iterable[tuple[str, str]]:
    """``(decoded name, piece as sent)``, read the way admission reads the query."""
    for piece in query.split("&"):
        if piece:
            yield unquote_plus(piece.partition("=")[0]), piece


def _without_params(query: str, names: frozenset[str]) -> str:
    return "&".join(piece for name, piece in _pieces(query) if name not in names)


def _with_model(query: str, model: str) -> str:
    """``query`` with ``model``'s value replaced in place (admission allows one ``model``)."""
    return "&".join(
        f"model={_encode(model)}" if name == "model" else piece for name, piece in _pieces(query)
    )


def _encode(value: str) -> str:
    return quote(value, safe="")
