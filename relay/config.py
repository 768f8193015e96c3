"""Configuration: one frozen, typed object per command, from TOML, environment and flags.

This module owns every setting's name, type, unit and default, and the merge
order that builds them: defaults < TOML file (``--config``) < environment
(``RELAY_<SECTION>_<FIELD>``, e.g. ``RELAY_SERVE_PORT``) < command-line flags.
The merged mapping is validated by msgspec into a frozen struct that refuses
unknown keys; any bad value raises :class:`ConfigError` whose one-line message
names the key (``serve.port: Expected `int`, got `str```).

Units are in the names: ``_s`` seconds, ``_ms`` milliseconds, ``_bytes`` bytes.
Secrets (API keys, client keys and their digests) are typed
:class:`~relay.credentials.secret.Secret`: decoded from TOML and the environment
like any string (same checks, same messages), never shown by ``str``/``repr``, and
hidden by :func:`redacted` because of their type (:data:`SECRET_FIELDS` lists them,
derived from the types).

Typing cannot say everything: :func:`serve_config_problems` checks a loaded
``[serve]`` section for what can be known without binding a socket (TLS files
that load, digests that are hex, proxies that are addresses, key files that
exist and parse, an upstream key or an explicit choice of the built-in
simulator) and returns one line per problem, each naming the setting and never
quoting a secret; :func:`check_serve_config` raises them as one
:class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import time
import tomllib
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar, get_args, get_origin

import msgspec

from relay.credentials.digests import parse_digest_hex
from relay.credentials.secret import Secret
from relay.protocol import binary_audio
from relay.rest.messages import DEFAULT_REST_PATHS

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

#: OpenAI accepts 15 MiB of audio per append, about 20 MiB once base64 and JSON
#: wrap it; we default to 24 MiB so every legal event fits.
DEFAULT_MAX_MESSAGE_BYTES: Final = 24 * 1024 * 1024
#: OpenAI ends Realtime sessions after 60 minutes.
DEFAULT_MAX_SESSION_S: Final = 3600.0
#: Azure OpenAI ends Realtime sessions after 30 minutes (Microsoft's Realtime docs).
AZURE_MAX_SESSION_S: Final = 1800.0
#: Keys the simulator accepts when none are configured, so the demo needs no setup.
DEFAULT_SIMULATOR_API_KEY: Final = "sk-sim-local-demo-key"

SimulatorMode = Literal["normal", "echo", "raw-echo"]
SimulatorFlavor = Literal["openai", "azure"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    def __post_init__(self) -> None:
        # A section built directly (tests, ``relay demo``, the built-in simulator) may
        # hold plain strings in secret fields: wrap them, so no display shows them.
        for name in _secret_fields(type(self)):
            value = getattr(self, name)
            if isinstance(value, tuple):
                wrapped: object = tuple(_as_secret(item) for item in value)
            else:
                wrapped = _as_secret(value)
            msgspec.structs.force_setattr(self, name, wrapped)


def _as_secret(value: object) -> object:
    return Secret(value) if isinstance(value, str) else value


@cache
def _secret_fields(section_type: type[_Section]) -> frozenset[str]:
    """The fields typed ``Secret`` or ``tuple[Secret, ...]``."""
    return frozenset(
        field.name
        for field in msgspec.structs.fields(section_type)
        if field.type is Secret
        or (get_origin(field.type) is tuple and Secret in get_args(field.type))
    )


class SimulatorConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay simulate``: the stand-in for OpenAI's Realtime server."""

    host: str = "127.0.0.1"
    port: Port = 8765
    #: API keys (``sk-…``) the simulator accepts; client secrets it mints are accepted too.
    api_keys: tuple[Secret, ...] = (Secret(DEFAULT_SIMULATOR_API_KEY),)
    #: normal: a full model turn per response; echo: each append answered by one
    #: audio delta; raw-echo: every frame echoed unchanged.
    mode: SimulatorMode = "normal"
    #: True: audio deltas paced at real time; False: as fast as the socket takes them.
    realtime_pacing: bool = True
    #: Length of the spoken answer the normal mode generates.
    response_audio_ms: Annotated[int, msgspec.Meta(ge=20, le=60_000)] = 1200
    #: Size of each ``response.output_audio.delta`` in the normal mode.
    delta_audio_ms: Annotated[int, msgspec.Meta(ge=10, le=1000)] = 100
    max_message_bytes: PositiveInt = DEFAULT_MAX_MESSAGE_BYTES
    #: Whether the faults query (``?sim_fault=…``) is honoured; tests turn it on.
    faults_enabled: bool = False
    #: Serve ``wss://`` with this certificate chain and key (PEM); empty = plain ``ws://``.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: The upstream it plays: ``openai`` (``/v1/realtime``, Bearer keys) or ``azure``
    #: (an Azure OpenAI resource: GA ``/openai/v1/realtime?model=<deployment>`` and
    #: preview ``/openai/realtime?api-version=…&deployment=…``, ``api-key`` header or
    #: Entra ``Authorization: Bearer``, Azure's error bodies).
    flavor: SimulatorFlavor = "openai"
    #: openai flavor: the models served; another is refused at the handshake. Empty = any.
    models: tuple[str, ...] = ()
    #: azure flavor: Entra ID access tokens accepted as ``Authorization: Bearer``.
    entra_tokens: tuple[Secret, ...] = ()
    #: azure flavor: the deployments that exist; another is 404 ``DeploymentNotFound``.
    #: Empty = any name.
    azure_deployments: tuple[str, ...] = ()
    #: Sessions end (``error`` ``session_expired``, then close 4000) after this long;
    #: 0 = the flavor's own cap: OpenAI's 60 minutes, Azure's 30.
    max_session_s: NonNegativeSeconds = 0.0
    #: REST streams (SSE events, speech audio, relay.simulator.rest): milliseconds
    #: between two chunks; 0 = as fast as the socket takes them.
    rest_chunk_interval_ms: Annotated[int, msgspec.Meta(ge=0, le=60_000)] = 20
    #: REST streams: content pieces per answer (text deltas, audio chunks); the
    #: answer's completion tokens are this many.
    rest_stream_chunks: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 20
    #: REST request bodies are read at most this fast (bytes per second), like a
    #: slow upstream; 0 = as fast as they arrive.
    rest_read_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        # A setting the chosen flavor never reads is a mistake to report, not to ignore.
        if self.flavor != "azure" and (self.entra_tokens or self.azure_deployments):
            raise ValueError("entra_tokens and azure_deployments need flavor = 'azure'")
        if self.flavor != "openai" and self.models:
            raise ValueError("models needs flavor = 'openai' (Azure serves azure_deployments)")

    def session_cap_s(self) -> float:
        """How long a session may last (seconds): ``max_session_s``, else the flavor's cap."""
        if self.max_session_s > 0:
            return self.max_session_s
        return AZURE_MAX_SESSION_S if self.flavor == "azure" else DEFAULT_MAX_SESSION_S


UpstreamKindName = Literal["openai", "azure", "compatible"]
UpstreamAuth = Literal["bearer", "api-key", "entra"]


class UpstreamSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One ``[upstreams.NAME]`` table: an upstream, its key pool and the models it serves.

    Keys are never written here: ``api_key_env`` names environment variables and
    ``api_key_file`` names files that hold them, one key per variable or file, all
    of them the pool (read by :mod:`relay.upstreams.table`).
    """

    #: ``openai``, ``azure`` (an Azure OpenAI resource) or ``compatible`` (any server
    #: speaking OpenAI's Realtime API at its own base URL).
    kind: UpstreamKindName = "openai"
    #: Base URL: ``wss://api.openai.com/v1``; for Azure the resource,
    #: ``https://<resource>.openai.azure.com`` (``/openai/v1`` may be included).
    url: str = ""
    #: Environment variables holding this upstream's keys (a pool when several).
    api_key_env: tuple[str, ...] = ()
    #: Files holding one key each, re-read when they change (Entra tokens expire).
    api_key_file: tuple[str, ...] = ()
    #: How keys travel: ``bearer`` (OpenAI, compatible), ``api-key`` (Azure resource
    #: key) or ``entra`` (an Azure Entra token, sent as Bearer). Empty: by kind.
    auth: UpstreamAuth | Literal[""] = ""
    #: The client's model names this upstream serves. A list serves each name as
    #: itself; a table maps the client's name to the upstream's (an Azure deployment:
    #: ``{"gpt-realtime" = "voice-prod"}``). Empty: every model (not for Azure,
    #: whose deployments must be named).
    models: tuple[str, ...] | dict[str, str] = ()
    #: Lower is tried first; equal priorities share the load.
    priority: int = 0
    #: Live sessions this upstream may hold; 0 = no limit of its own.
    max_sessions: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Sessions here end after this long (Azure ends them at 30 minutes); 0: the
    #: relay's ``max_session_s`` (Azure: 1800).
    max_session_s: NonNegativeSeconds = 0.0
    #: Azure only: the preview API's ``api-version`` (``/openai/realtime``); empty:
    #: the GA ``/openai/v1/realtime`` form.
    azure_api_version: str = ""
    #: CA bundle for this upstream's TLS; empty: the system store.
    ca_file: str = ""


class ServeConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay serve``: the relay."""

    host: str = "127.0.0.1"
    port: Port = 8080
    #: Terminate TLS here (``wss://``) with this PEM certificate chain and key, for
    #: deployments without nginx in front; empty = plain ``ws://`` behind a TLS proxy.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Upstream base URL; the relay dials ``<upstream_url>/realtime?<client query>``.
    #: ``simulator`` (``relay serve --simulator``): the built-in simulator, for local runs.
    upstream_url: str = "wss://api.openai.com/v1"
    #: The relay's upstream key (``sk-…``); required unless the upstream is ``simulator``.
    upstream_api_key: Secret = Secret()
    #: CA bundle for a private upstream (tests use a throwaway CA); empty = system store.
    upstream_ca_file: str = ""
    #: Named upstreams (``[upstreams.NAME]`` tables, :class:`UpstreamSettings`),
    #: chosen per session by the client's model; empty: ``upstream_url`` and
    #: ``upstream_api_key`` are the one upstream, serving every model.
    upstreams: dict[str, UpstreamSettings] = {}
    #: Seconds one upstream dial may take before the next candidate is tried (the
    #: whole handshake stays within ``upstream_connect_timeout_s``).
    upstream_attempt_timeout_s: PositiveSeconds = 5.0
    #: Seconds a key or upstream is skipped after a 429, 5xx, refused connection or
    #: timeout that named no ``Retry-After``; never longer than the cap below.
    upstream_cool_down_s: NonNegativeSeconds = 10.0
    upstream_max_cool_down_s: NonNegativeSeconds = 300.0
    #: Dials per client handshake at most.
    upstream_max_attempts: PositiveInt = 4
    #: SHA-256 hex digests of accepted client keys (see ``relay keys hash``).
    client_key_sha256: tuple[Secret, ...] = ()
    #: Plain client keys; hashed at start-up and never kept.
    client_keys: tuple[Secret, ...] = ()
    #: Local development only: accept every client without a credential.
    no_auth: bool = False
    #: App keys for ``POST /v1/realtime/client_secrets`` (managed by ``relay keys``).
    app_keys_file: str = ""
    #: Relay-token signing keys (``relay keys rotate-signing``); empty: a key made at
    #: start-up, so tokens die with the process and work on this instance only.
    signing_keys_file: str = ""
    #: Browser Origins allowed to open sessions; empty allows any Origin.
    allowed_origins: tuple[str, ...] = ()
    #: Concurrent sessions per relay token; 0 = no limit.
    max_sessions_per_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Sessions one relay token may start over its lifetime; 0 = no limit.
    max_session_starts_per_token: Annotated[int, msgspec.Meta(ge=0)] = 0
    #: Single-use token ids remembered per instance (until each token expires).
    replay_store_max_entries: PositiveInt = 100_000
    max_message_bytes: PositiveInt = DEFAULT_MAX_MESSAGE_BYTES
    handshake_timeout_s: PositiveSeconds = 10.0
    upstream_connect_timeout_s: PositiveSeconds = 10.0
    #: A session with no message either way for this long is ended.
    idle_timeout_s: PositiveSeconds = 600.0
    max_session_s: PositiveSeconds = DEFAULT_MAX_SESSION_S
    max_sessions: PositiveInt = 1000
    #: Per-session limits on what the client sends, counting every frame (control
    #: frames too), so one flooding client cannot starve the other sessions; a rate
    #: of 0 turns that limit off. Over either: ``error`` (``rate_limit_exceeded``)
    #: then close 1008. Real-time audio is about 50 appends/s: 1000 frames/s is 20x
    #: that, and the burst of 5000 lets a client send 100 s of 20 ms chunks at once.
    client_max_frames_per_s: Annotated[int, msgspec.Meta(ge=0)] = 1000
    client_frame_burst: PositiveInt = 5000
    #: 8 MiB/s is over 100x real-time 24 kHz PCM16 in base64 (64 KiB/s). The burst
    #: must admit one message of ``max_message_bytes`` (a 15 MiB append is about
    #: 20 MiB of JSON), hence 32 MiB: keep it at or above ``max_message_bytes``.
    client_max_bytes_per_s: Annotated[int, msgspec.Meta(ge=0)] = 8 * 1024 * 1024
    client_byte_burst_bytes: PositiveInt = 32 * 1024 * 1024
    #: The ``relay.audio.v1`` binary audio path (docs/binary-audio.md): a client that
    #: offers the subprotocol gets raw audio frames on its leg; off, it is answered
    #: ``realtime`` and speaks JSON. Clients that do not offer it never see a change.
    binary_audio_enabled: bool = True
    #: Largest binary audio message turned into one append; larger ones are refused
    #: with an ``error`` event (``binary_audio_too_large``) and not forwarded.
    binary_audio_max_message_bytes: Annotated[
        int, msgspec.Meta(ge=2, le=binary_audio.MAX_AUDIO_MESSAGE_BYTES_LIMIT)
    ] = binary_audio.DEFAULT_MAX_AUDIO_MESSAGE_BYTES
    ping_interval_s: PositiveSeconds = 20.0
    pong_timeout_s: PositiveSeconds = 20.0
    close_timeout_s: PositiveSeconds = 2.0
    #: On SIGTERM, live sessions may continue this long before they are ended (1001).
    drain_timeout_s: NonNegativeSeconds = 60.0
    #: Re-mask client frames with a fresh key towards a plain ``ws://`` upstream that
    #: is not on loopback (RFC 6455 §10.3); over TLS the client's own mask is forwarded.
    remask_plain_upstream: bool = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: ``json``: one JSON object per line (production); ``text``: for a terminal.
    log_format: Literal["json", "text"] = "json"
    #: Proxies (e.g. nginx) whose X-Forwarded-For / X-Real-IP are trusted for the client address.
    trusted_proxies: tuple[str, ...] = ()
    #: SHA-256 hex of the admin key that ``/metrics`` and ``/admin/*`` require; empty:
    #: ``/metrics`` is open and the admin API is off.
    admin_key_sha256: Secret = Secret()
    #: Query parameters forwarded upstream besides the documented ``model``,
    #: ``call_id`` and ``intent`` (e.g. an Azure ``api-version``); others are dropped.
    upstream_query_params: tuple[str, ...] = ()
    # -- The REST proxy (relay/rest/): the rest of /v1 through the same keys ----------
    #: Proxy ``rest_paths`` to the upstream chosen by the request's model.
    rest_proxy_enabled: bool = True
    #: Paths proxied (each with its sub-paths); anything else under /v1 answers 404.
    rest_paths: tuple[str, ...] = DEFAULT_REST_PATHS
    #: Largest JSON request body, read whole to route by its ``model`` (and to fail
    #: over); larger ones get 413. Other bodies (uploads) stream through unbuffered.
    rest_max_json_body_bytes: PositiveInt = 8 * 1024 * 1024
    #: Largest streamed request body (OpenAI takes 25 MB audio files).
    rest_max_upload_bytes: PositiveInt = 32 * 1024 * 1024
    #: TCP + TLS to the upstream, per attempt.
    rest_connect_timeout_s: PositiveSeconds = 10.0
    #: Request sent to response head (a long non-streamed answer takes minutes).
    rest_first_byte_timeout_s: PositiveSeconds = 600.0
    #: Longest silence between two reads of a body, either way (a response body is cut
    #: within a quarter of this more: its alarm checks four times per timeout).
    rest_idle_timeout_s: PositiveSeconds = 120.0
    #: A client connection may wait this long for its next request.
    rest_keep_alive_timeout_s: PositiveSeconds = 60.0
    #: Idle keep-alive connections kept per upstream, and for how long.
    rest_pool_max_idle: Annotated[int, msgspec.Meta(ge=0)] = 256
    rest_pool_idle_timeout_s: PositiveSeconds = 30.0
    #: Azure's ``api-version`` for the REST deployment form
    #: (``/openai/deployments/<deployment>/chat/completions?api-version=…``).
    rest_azure_api_version: str = "2024-10-21"
    # -- The browser voice page (relay/control/browser_demo.py, relay/web/) ---------
    #: Serve the browser voice page at ``/demo/`` and its demo token endpoint
    #: (``POST /demo/token``), which mints a single-use relay token for any request
    #: whose Origin is in ``allowed_origins`` (which must then list the page's
    #: origin). Off by default: it lets every visitor of that origin open a session.
    browser_demo_enabled: bool = False
    #: The model the demo page's tokens open (and lock).
    browser_demo_model: str = "gpt-realtime"


class DemoConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay demo``: a scripted voice session that prints the event flow."""

    url: str = ""
    api_key: Secret = Secret()
    model: str = "gpt-realtime"
    turns: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    speech_ms: Annotated[int, msgspec.Meta(ge=20, le=30_000)] = 600
    chunk_ms: Annotated[int, msgspec.Meta(ge=10, le=1000)] = 20
    # -- relay demo --browser (relay/launch.py run_browser_demo) --------------------
    #: Serve the browser voice page (a relay in front of the built-in simulator on
    #: 127.0.0.1) instead of the scripted session; runs until Ctrl-C.
    browser: bool = False
    #: That relay's port on 127.0.0.1; 0 picks a free one.
    browser_port: Port = 8080


class ConfigError(Exception):
    """A setting failed validation; ``str()`` is one line naming the key."""


SectionT = TypeVar("SectionT", bound=_Section)

_SECTIONS: Final[dict[str, type[_Section]]] = {
    "simulate": SimulatorConfig,
    "serve": ServeConfig,
    "demo": DemoConfig,
}
#: The top-level TOML table of named upstreams, read into ``serve.upstreams``.
_UPSTREAMS_TABLE: Final = "upstreams"
#: Settings that are tables of tables: TOML only, no ``RELAY_…`` environment form.
TOML_TABLE_FIELDS: Final = frozenset({_UPSTREAMS_TABLE})
_ENV_PREFIX: Final = "RELAY_"
_PATH_RE: Final = re.compile(r"at `\$\.?(?P<path>[^`]*)`")


def load(
    section_type: type[SectionT],
    *,
    toml_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SectionT:
    """Build and validate one section: defaults < TOML < environment < ``overrides``.

    ``overrides`` are values from command-line flags; ``None`` values are ignored so
    unset flags do not mask the environment.
    """
    name = _section_name(section_type)
    merged: dict[str, Any] = {}
    if toml_path is not None:
        merged.update(_toml_section(Path(toml_path), name))
    merged.update(_env_section(os.environ if environ is None else environ, name))
    if overrides:
        merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(merged, section_type, strict=False, dec_hook=_decode_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(name, str(exc))) from None


def _decode_hook(target: type, value: Any) -> Any:
    if target is Secret:
        # msgspec's own str check, so a wrong value reads exactly as for a str field;
        # raised as TypeError so msgspec adds where it is (`$.client_keys[0]`).
        try:
            return Secret(msgspec.convert(value, str, strict=False))
        except msgspec.ValidationError as exc:
            raise TypeError(str(exc)) from None
    raise NotImplementedError(f"no decoder for {target!r}")


#: The fields whose values are secrets, or digests an attacker could test guesses
#: against: those typed ``Secret``. Chosen by type, not by name pattern.
SECRET_FIELDS: Final[Mapping[type[_Section], frozenset[str]]] = {
    section_type: _secret_fields(section_type)
    for section_type in (SimulatorConfig, ServeConfig, DemoConfig)
}


def redacted(section: _Section) -> dict[str, Any]:
    """The effective settings with every secret replaced, for the start-up log line.

    A secret shows as ``<redacted>`` (or empty when unset); a list of secrets says
    how many, never which.
    """
    shown: dict[str, Any] = msgspec.to_builtins(section, enc_hook=_display)
    for name in _secret_fields(type(section)):
        if isinstance(shown[name], tuple):
            shown[name] = list(shown[name])
    return shown


def _display(value: Any) -> Any:
    if isinstance(value, Secret):
        return str(value) if value else ""
    raise NotImplementedError(f"cannot display {type(value).__name__}")


def _section_name(section_type: type[_Section]) -> str:
    for name, cls in _SECTIONS.items():
        if cls is section_type:
            return name
    raise TypeError(f"not a config section: {section_type!r}")


def _toml_section(path: Path, name: str) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    unknown = sorted(set(document) - set(_SECTIONS) - {_UPSTREAMS_TABLE})
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown section in {path} "
            f"(known: {', '.join(_SECTIONS)}, {_UPSTREAMS_TABLE})"
        )
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a table in {path}")
    section = dict(section)
    if name == "serve" and _UPSTREAMS_TABLE in document:
        # ``[upstreams.NAME]`` at the top level is ``[serve.upstreams.NAME]``: only
        # the relay reads it. Both at once would leave which one wins to guesswork.
        if _UPSTREAMS_TABLE in section:
            raise ConfigError(
                f"upstreams: given both as [upstreams.NAME] and [serve.upstreams.NAME] in "
                f"{path}; keep one"
            )
        section[_UPSTREAMS_TABLE] = document[_UPSTREAMS_TABLE]
    return section


def _env_section(environ: Mapping[str, str], name: str) -> dict[str, Any]:
    prefix = f"{_ENV_PREFIX}{name.upper()}_"
    fields = {f.upper(): f for f in _SECTIONS[name].__struct_fields__}
    out: dict[str, Any] = {}
    for env_key, raw in environ.items():
        if not env_key.startswith(prefix):
            continue
        field = fields.get(env_key[len(prefix) :])
        if field is None:
            raise ConfigError(f"{env_key}: unknown setting for `relay {name}`")
        out[field] = _env_value(raw, _SECTIONS[name], field)
    return out


def _env_value(raw: str, section_type: type[_Section], field: str) -> Any:
    """Environment values are strings; tuples are comma-separated, the rest coerce."""
    default = getattr(section_type(), field)
    if field in TOML_TABLE_FIELDS:
        raise ConfigError(
            f"{_ENV_PREFIX}{_section_name(section_type).upper()}_{field.upper()}: "
            f"{field} is a table of tables; set it in the TOML file"
        )
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw


def _one_line(section: str, msgspec_message: str) -> str:
    match = _PATH_RE.search(msgspec_message)
    detail = _PATH_RE.sub("", msgspec_message).strip(" -")
    if match and match.group("path"):
        key = match.group("path").split("[")[0]
        return f"{section}.{key}: {detail}"
    if "unknown field" in msgspec_message.lower():
        field = msgspec_message.split("`")[1] if "`" in msgspec_message else "?"
        return f"{section}.{field}: unknown setting"
    return f"{section}: {detail}"


# ------------------------------------------------------------------ [serve] checks

#: ``upstream_url`` value choosing the built-in simulator (``relay serve --simulator``).
SIMULATOR_UPSTREAM: Final = "simulator"
#: Longest DNS name (RFC 1035 §2.3.4), in characters.
MAX_HOSTNAME_CHARS: Final = 253
_HOST_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_ORIGIN_RE: Final = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\sA-Z]+")
_WS_SCHEMES: Final = ("ws://", "wss://")
_PEM_CERTIFICATE: Final = b"-----BEGIN CERTIFICATE-----"
_SSL_SOURCE_RE: Final = re.compile(r"^\[SSL\] | \(_ssl\.c:\d+\)$")


def uses_builtin_simulator(config: ServeConfig) -> bool:
    """Whether ``relay serve`` is to start the built-in simulator as its upstream."""
    return config.upstream_url == SIMULATOR_UPSTREAM


def check_serve_config(config: ServeConfig, *, now: float | None = None) -> None:
    """Raise :class:`ConfigError` with every problem of ``config`` on one line."""
    problems = serve_config_problems(config, now=now)
    if problems:
        raise ConfigError("; ".join(problems))


def serve_config_problems(config: ServeConfig, *, now: float | None = None) -> list[str]:
    """Everything wrong with ``config`` that shows without binding a socket.

    Reads the files the settings name (TLS, CA, key files) but opens no socket.
    Each problem is one line starting with ``serve.<setting>``; secrets are never
    quoted. ``now`` (Unix seconds) decides which retired signing keys still count.
    """
    problems = [
        *_upstream_problems(config),
        *_listen_problems(config),
        *_client_auth_problems(config),
        *_key_file_problems(config, time.time() if now is None else now),
        *_limit_problems(config),
        *_browser_demo_problems(config),
    ]
    return [f"serve.{problem}" for problem in problems]


def _limit_problems(config: ServeConfig) -> list[str]:
    if config.client_max_bytes_per_s and config.client_byte_burst_bytes < config.max_message_bytes:
        # A message larger than the burst could never be admitted: refused by the
        # rate limit although max_message_bytes allows it.
        return [
            f"client_byte_burst_bytes: {config.client_byte_burst_bytes} is below "
            f"max_message_bytes ({config.max_message_bytes}); one maximum-size message "
            "must fit the burst"
        ]
    return []


def _upstream_problems(config: ServeConfig) -> list[str]:
    if config.upstreams:
        return _upstream_table_problems(config)
    problems: list[str] = []
    if uses_builtin_simulator(config):
        if config.upstream_api_key:
            problems.append(
                "upstream_api_key: set, but the upstream is the built-in simulator "
                f'(--simulator or upstream_url = "{SIMULATOR_UPSTREAM}"); drop one of the two'
            )
    else:
        if not config.upstream_url.startswith(_WS_SCHEMES):
            problems.append(
                "upstream_url: must start with ws:// or wss:// (e.g. wss://api.openai.com/v1), "
                f'or be "{SIMULATOR_UPSTREAM}" for the built-in simulator'
            )
        else:
            from relay.protocol.handshake import UpstreamTarget

            try:
                UpstreamTarget.from_url(config.upstream_url)
            except ValueError as exc:
                problems.append(f"upstream_url: {exc}")
        if not config.upstream_api_key:
            problems.append(
                "upstream_api_key: not set; relay serve needs the upstream's API key "
                "(RELAY_SERVE_UPSTREAM_API_KEY), or --simulator for a local run against "
                "the built-in simulator"
            )
    if config.upstream_api_key and not _is_token_text(config.upstream_api_key):
        problems.append(
            "upstream_api_key: has spaces, control or non-ASCII characters "
            "(a stray newline or quote?)"
        )
    if config.upstream_ca_file:
        try:
            ssl.create_default_context(cafile=config.upstream_ca_file)
        except (OSError, ssl.SSLError) as exc:
            problems.append(f"upstream_ca_file: cannot load {config.upstream_ca_file}: {_why(exc)}")
    return problems


def _upstream_table_problems(config: ServeConfig) -> list[str]:
    """``[upstreams.NAME]`` tables: the shorthand left alone, every table buildable."""
    from relay.upstreams.table import UpstreamTableError, build_upstream_table

    defaults = ServeConfig()
    problems = [
        f"{name}: set, but [upstreams.NAME] tables are given too; name this upstream there instead"
        for name in ("upstream_url", "upstream_api_key", "upstream_ca_file")
        if getattr(config, name) != getattr(defaults, name)
    ]
    if config.upstream_attempt_timeout_s > config.upstream_connect_timeout_s:
        problems.append(
            f"upstream_attempt_timeout_s: {config.upstream_attempt_timeout_s} is over "
            f"upstream_connect_timeout_s ({config.upstream_connect_timeout_s}), the whole "
            "handshake's deadline; no second attempt could start"
        )
    # One table at a time, so every broken one is named, not just the first.
    for name, settings in config.upstreams.items():
        try:
            build_upstream_table(msgspec.structs.replace(ServeConfig(), upstreams={name: settings}))
        except UpstreamTableError as exc:
            problems.append(str(exc))
    return problems


def _listen_problems(config: ServeConfig) -> list[str]:
    problems: list[str] = []
    if not _is_host(config.host):
        problems.append(
            f"host: {config.host!r} is not an IP address or host name "
            "(0.0.0.0 or :: for every interface; no brackets, no port)"
        )
    if config.tls_key_file and not config.tls_cert_file:
        problems.append("tls_key_file: set tls_cert_file too (the key alone would serve plaintext)")
    elif config.tls_cert_file:
        problems.extend(_tls_problems(config.tls_cert_file, config.tls_key_file))
    return problems


def _tls_problems(cert_file: str, key_file: str) -> list[str]:
    for setting, path in (("tls_cert_file", cert_file), ("tls_key_file", key_file)):
        if path:
            try:
                text = Path(path).read_bytes()
            except OSError as exc:
                return [f"{setting}: cannot read {path}: {_why(exc)}"]
            if setting == "tls_cert_file" and _PEM_CERTIFICATE not in text:
                return [f"tls_cert_file: {path} holds no PEM certificate"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        # No password prompt at start-up: an encrypted key is refused here.
        context.load_cert_chain(cert_file, key_file or None, password=_no_password)
    except (OSError, ssl.SSLError) as exc:
        if not key_file:
            return [
                f"tls_cert_file: {cert_file} does not hold both the certificate chain and its "
                f"private key ({_why(exc)}); set tls_key_file"
            ]
        return [
            f"tls_key_file: {key_file} is not an unencrypted PEM private key matching "
            f"tls_cert_file {cert_file} ({_why(exc)})"
        ]
    return []


def _client_auth_problems(config: ServeConfig) -> list[str]:
    problems: list[str] = []
    digests = [(f"client_key_sha256[{i}]", d) for i, d in enumerate(config.client_key_sha256)]
    if config.admin_key_sha256:
        digests.append(("admin_key_sha256", config.admin_key_sha256))
    for setting, text in digests:
        try:
            parse_digest_hex(text)
        except ValueError as exc:
            problems.append(f"{setting}: {exc}; make one with `relay keys hash`")
    for index, key in enumerate(config.client_keys):
        if not _is_token_text(key):
            problems.append(
                f"client_keys[{index}]: empty, or has spaces, control or non-ASCII characters "
                "(clients send keys in HTTP headers: printable ASCII only)"
            )
    for index, proxy in enumerate(config.trusted_proxies):
        try:
            canonical = str(ipaddress.ip_address(proxy))
        except ValueError:
            hint = "; networks are not supported" if "/" in proxy else ""
            problems.append(
                f"trusted_proxies[{index}]: {proxy!r} is not an IP address (list each proxy's "
                f"address{hint})"
            )
            continue
        if canonical != proxy:
            problems.append(
                f"trusted_proxies[{index}]: write {proxy!r} as {canonical!r} (compared as text "
                "with the connection's address)"
            )
    for index, origin in enumerate(config.allowed_origins):
        if origin == "*":
            problems.append(
                f'allowed_origins[{index}]: "*" would be taken literally and match no browser; '
                "leave allowed_origins empty to allow any Origin"
            )
        elif origin != "null" and not _ORIGIN_RE.fullmatch(origin):
            problems.append(
                f"allowed_origins[{index}]: {origin!r} is not an Origin (scheme://host[:port], "
                "lower case, no path or trailing slash)"
            )
    return problems


def _key_file_problems(config: ServeConfig, now: float) -> list[str]:
    from relay.credentials.keyfiles import KeyFileError, load_app_keys, load_keyring

    problems: list[str] = []
    if config.app_keys_file:
        try:
            load_app_keys(Path(config.app_keys_file))
        except KeyFileError as exc:
            problems.append(f"app_keys_file: {exc}")
    if config.signing_keys_file:
        try:
            load_keyring(Path(config.signing_keys_file), now)
        except KeyFileError as exc:
            problems.append(f"signing_keys_file: {exc}")
    return problems


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    name = host[:-1] if host.endswith(".") else host
    return (
        0 < len(name) <= MAX_HOSTNAME_CHARS
        and name.isascii()
        and all(_HOST_LABEL_RE.fullmatch(label) for label in name.split("."))
    )


def _is_token_text(value: str) -> bool:
    """Non-empty printable ASCII without spaces: what an HTTP credential can carry."""
    return bool(value) and value.isascii() and value.isprintable() and " " not in value


def _no_password() -> bytes:
    raise ssl.SSLError("the key is encrypted; give an unencrypted key")


def _why(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or _SSL_SOURCE_RE.sub("", str(exc.strerror or exc))
    return str(exc.strerror or exc)


def _browser_demo_problems(config: ServeConfig) -> list[str]:
    """The demo token endpoint mints for listed Origins only: the list must exist."""
    if config.browser_demo_enabled and not config.allowed_origins:
        return [
            "browser_demo_enabled: set allowed_origins to the page's origin too (e.g. "
            '"http://127.0.0.1:8080"): the demo mints tokens for listed Origins only'
        ]
    return []
