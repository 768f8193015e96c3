"""Configuration: one frozen, typed object per command, from TOML, environment and flags.

This module owns every setting's name, type, unit and default, and the merge
order that builds them: defaults < TOML file (``--config``) < environment
(``RELAY_<SECTION>_<FIELD>``, e.g. ``RELAY_SERVE_PORT``) < command-line flags.
The merged mapping is validated by msgspec into a frozen struct that refuses
unknown keys; any bad value raises :class:`ConfigError` whose one-line message
names the key (``serve.port: Expected `int`, got `str```).

Units are in the names: ``_s`` seconds, ``_ms`` milliseconds, ``_bytes`` bytes.
Secrets (API keys) are typed :class:`Secret`-bearing strings and are never
printed by :func:`redacted`.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
PositiveSeconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]

#: OpenAI accepts 15 MiB of audio per append, about 20 MiB once base64 and JSON
#: wrap it; we default to 24 MiB so every legal event fits.
DEFAULT_MAX_MESSAGE_BYTES: Final = 24 * 1024 * 1024
#: OpenAI ends Realtime sessions after 60 minutes.
DEFAULT_MAX_SESSION_S: Final = 3600.0
#: Keys the simulator accepts when none are configured, so the demo needs no setup.
DEFAULT_SIMULATOR_API_KEY: Final = "sk-sim-local-demo-key"

SimulatorMode = Literal["normal", "echo", "raw-echo"]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class SimulatorConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay simulate``: the stand-in for OpenAI's Realtime server."""

    host: str = "127.0.0.1"
    port: Port = 8765
    #: API keys (``sk-…``) the simulator accepts; client secrets it mints are accepted too.
    api_keys: tuple[str, ...] = (DEFAULT_SIMULATOR_API_KEY,)
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


class ServeConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay serve``: the relay."""

    host: str = "127.0.0.1"
    port: Port = 8080
    #: Terminate TLS here (``wss://``) with this PEM certificate chain and key, for
    #: deployments without nginx in front; empty = plain ``ws://`` behind a TLS proxy.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    #: Upstream base URL; the relay dials ``<upstream_url>/realtime?<client query>``.
    upstream_url: str = "wss://api.openai.com/v1"
    #: The relay's upstream key (``sk-…``). Empty means: start the built-in simulator.
    upstream_api_key: str = ""
    #: CA bundle for a private upstream (tests use a throwaway CA); empty = system store.
    upstream_ca_file: str = ""
    #: SHA-256 hex digests of accepted client keys (see ``relay keys hash``).
    client_key_sha256: tuple[str, ...] = ()
    #: Plain client keys; hashed at start-up and never kept.
    client_keys: tuple[str, ...] = ()
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
    admin_key_sha256: str = ""


class DemoConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``relay demo``: a scripted voice session that prints the event flow."""

    url: str = ""
    api_key: str = ""
    model: str = "gpt-realtime"
    turns: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    speech_ms: Annotated[int, msgspec.Meta(ge=20, le=30_000)] = 600
    chunk_ms: Annotated[int, msgspec.Meta(ge=10, le=1000)] = 20


class ConfigError(Exception):
    """A setting failed validation; ``str()`` is one line naming the key."""


SectionT = TypeVar("SectionT", bound=_Section)

_SECTIONS: Final[dict[str, type[_Section]]] = {
    "simulate": SimulatorConfig,
    "serve": ServeConfig,
    "demo": DemoConfig,
}
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
        return msgspec.convert(merged, section_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_one_line(name, str(exc))) from None


def redacted(section: _Section) -> dict[str, Any]:
    """The effective settings with every secret replaced, for the start-up log line."""
    out: dict[str, Any] = msgspec.to_builtins(section)
    for key in list(out):
        if any(word in key for word in ("key", "secret", "token")) and out[key]:
            out[key] = "<redacted>" if isinstance(out[key], str) else ["<redacted>"] * len(out[key])
    return out


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
    unknown = sorted(set(document) - set(_SECTIONS))
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown section in {path} (known: {', '.join(_SECTIONS)})"
        )
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"{name}: expected a table in {path}")
    return dict(section)


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
