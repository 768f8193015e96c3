"""The upstream table: every configured upstream, its key pool and the models it serves.

This module owns turning ``[upstreams.NAME]`` settings (or the one-upstream
shorthand ``upstream_url``/``upstream_api_key``) into what a handshake reads:

- :class:`UpstreamTable`: the upstreams, which of them serve a model
  (:meth:`UpstreamTable.route`), the model allowlist, and each upstream's keys.
  Built whole by :func:`build_upstream_table` and swapped whole on SIGHUP: a
  handshake sees one table, never half of two.
- :class:`PoolKey`: one key of a pool. Its id (:data:`~relay.upstreams.urls.KEY_ID_HEX_CHARS`
  hex characters of the key's SHA-256, taken when the table is built) is what logs,
  metrics, the admin API and the chooser name. A key read from a file is re-read
  when the file changes (an Entra token is replaced before it expires); it keeps
  its id until the next reload, so metrics keep one series per configured key.
- :class:`LiveSessions`: live sessions (and dials in flight) per key and per
  upstream, kept by the server across reloads, so a reloaded table still sees
  what the sessions started on the old one hold.

Keys come from the environment (``api_key_env``) or files (``api_key_file``),
never from the TOML. A missing variable, an unreadable or empty file, a key with
characters a header cannot carry, two equal keys in one pool, an Azure upstream
without deployments: each is a :class:`UpstreamTableError` naming the setting,
never the key.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from relay.config import ServeConfig, UpstreamSettings
from relay.credentials.digests import digest_hex
from relay.credentials.secret import Secret
from relay.dataplane.upstream import TlsResumption
from relay.protocol.handshake import UpstreamTarget
from relay.upstreams.chooser import ChooserPolicy, KeyRef, LiveCounts, UpstreamCandidate
from relay.upstreams.urls import (
    KEY_ID_HEX_CHARS,
    CredentialScheme,
    UpstreamCredential,
    UpstreamKind,
    UpstreamSpec,
)

#: The name the one-upstream shorthand (``upstream_url``/``upstream_api_key``) gets.
DEFAULT_UPSTREAM_NAME: Final = "default"
#: Azure OpenAI ends Realtime sessions at 30 minutes.
AZURE_MAX_SESSION_S: Final = 1800.0
#: Longest key file read, in bytes: a key or an Entra token is a few KiB at most.
MAX_KEY_FILE_BYTES: Final = 64 * 1024
_Item = TypeVar("_Item")
_SCHEMES: Final = {
    "bearer": CredentialScheme.BEARER,
    "entra": CredentialScheme.BEARER,
    "api-key": CredentialScheme.AZURE_API_KEY,
}


class UpstreamTableError(ValueError):
    """A setting of ``[upstreams.NAME]`` cannot be used; the message names it, never a key."""


class PoolKey:
    """One key of an upstream's pool: from a variable (fixed) or a file (re-read on change)."""

    __slots__ = ("_mtime_ns", "_value", "key_id", "path", "scheme", "source")

    def __init__(
        self, value: str, *, scheme: CredentialScheme, source: str, path: str = ""
    ) -> None:
        self._value = Secret(value)
        self.scheme = scheme
        #: Where the key comes from, for messages: ``env:NAME`` or ``file:PATH``.
        self.source = source
        self.path = path
        self._mtime_ns = _mtime_ns(path) if path else 0
        self.key_id = digest_hex(value)[:KEY_ID_HEX_CHARS]

    def credential(self) -> UpstreamCredential:
        """The key as it is now: a file that changed since the last dial is read again.

        A file that is gone or unreadable keeps the last value (the dial then fails
        or succeeds on its own merits): a rotation half done must not take the key away.
        """
        if self.path:
            mtime_ns = _mtime_ns(self.path)
            if mtime_ns and mtime_ns != self._mtime_ns:
                try:
                    self._value = Secret(_read_key_file(self.path))
                    self._mtime_ns = mtime_ns
                except (OSError, UnicodeDecodeError, ValueError):
                    pass
        return UpstreamCredential(self._value, self.scheme)

    def __repr__(self) -> str:  # never the key
        return f"PoolKey({self.key_id}, {self.source})"


@dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    """One upstream as new sessions dial it."""

    name: str
    spec: UpstreamSpec
    target: UpstreamTarget
    priority: int
    max_sessions: int
    #: Sessions here end after this long; 0 = the relay's own limit only.
    max_session_s: float
    keys: tuple[PoolKey, ...]
    #: The client model names served; None = every model.
    models: frozenset[str] | None
    ssl_context: ssl.SSLContext | None
    #: The CA bundle ``ssl_context`` trusts (empty: the system store), for REST calls.
    ca_file: str = ""
    resumption: TlsResumption = field(default_factory=TlsResumption)

    def serves(self, model: str | None) -> bool:
        if self.models is None:
            return True
        return model is not None and model in self.models

    def candidate(self) -> UpstreamCandidate:
        return UpstreamCandidate(
            name=self.name,
            priority=self.priority,
            key_ids=tuple(key.key_id for key in self.keys),
            max_sessions=self.max_sessions,
        )

    def key(self, key_id: str) -> PoolKey:
        for key in self.keys:
            if key.key_id == key_id:
                return key
        raise KeyError(key_id)

    def describe(self) -> dict[str, object]:
        """What the admin API shows: no key, only key ids."""
        return {
            "name": self.name,
            "kind": self.spec.kind.value,
            "host": self.target.host_header,
            "priority": self.priority,
            "max_sessions": self.max_sessions,
            "max_session_s": self.max_session_s,
            "models": sorted(self.models) if self.models is not None else None,
        }


@dataclass(frozen=True, slots=True)
class UpstreamTable:
    """All upstreams of one configuration, and how the chooser treats them."""

    upstreams: tuple[Upstream, ...]
    policy: ChooserPolicy

    def route(self, model: str | None) -> tuple[Upstream, ...]:
        """The upstreams that serve ``model`` (None: the client named none)."""
        return tuple(upstream for upstream in self.upstreams if upstream.serves(model))

    @property
    def served_models(self) -> frozenset[str] | None:
        """The model allowlist: every model some upstream serves; None when one serves all."""
        names: set[str] = set()
        for upstream in self.upstreams:
            if upstream.models is None:
                return None
            names |= upstream.models
        return frozenset(names)

    def upstream(self, name: str) -> Upstream:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    def key_refs(self) -> tuple[KeyRef, ...]:
        return tuple(KeyRef(up.name, key.key_id) for up in self.upstreams for key in up.keys)


class LiveSessions:
    """Live sessions and dials in flight, per key and per upstream (the chooser's counts)."""

    __slots__ = ("_counts", "by_key", "by_upstream")

    def __init__(self) -> None:
        self.by_key: Counter[KeyRef] = Counter()
        self.by_upstream: Counter[str] = Counter()
        # The counters themselves, wrapped once: planning is synchronous, nothing
        # changes under it, and a REST request plans once or more.
        self._counts = LiveCounts(by_key=self.by_key, by_upstream=self.by_upstream)

    def add(self, key: KeyRef) -> None:
        self.by_key[key] += 1
        self.by_upstream[key.upstream] += 1

    def remove(self, key: KeyRef) -> None:
        # Zero counts are dropped, so the counters hold only what is live.
        _decrement(self.by_key, key)
        _decrement(self.by_upstream, key.upstream)

    def counts(self) -> LiveCounts:
        return self._counts


def _decrement(counter: Counter[_Item], item: _Item) -> None:
    left = counter[item] - 1
    if left > 0:
        counter[item] = left
    else:
        counter.pop(item, None)


def chooser_policy(config: ServeConfig) -> ChooserPolicy:
    return ChooserPolicy(
        default_cool_down_s=config.upstream_cool_down_s,
        max_cool_down_s=config.upstream_max_cool_down_s,
        attempt_timeout_s=min(config.upstream_attempt_timeout_s, config.upstream_connect_timeout_s),
        max_attempts=config.upstream_max_attempts,
    )


def build_upstream_table(
    config: ServeConfig, *, environ: Mapping[str, str] | None = None
) -> UpstreamTable:
    """The table ``config`` describes, its keys read now; :class:`UpstreamTableError` if not."""
    env = os.environ if environ is None else environ
    if not config.upstreams:
        # One key: nothing to fail over to, so its one dial gets the whole deadline.
        policy = dataclasses.replace(
            chooser_policy(config), attempt_timeout_s=config.upstream_connect_timeout_s
        )
        return UpstreamTable((_shorthand(config),), policy)
    upstreams = tuple(
        _build_upstream(name, settings, env) for name, settings in config.upstreams.items()
    )
    return UpstreamTable(upstreams, chooser_policy(config))


def _shorthand(config: ServeConfig) -> Upstream:
    target = UpstreamTarget.from_url(config.upstream_url)
    key = PoolKey(
        config.upstream_api_key.reveal(),
        scheme=CredentialScheme.BEARER,
        source="serve.upstream_api_key",
    )
    return Upstream(
        name=DEFAULT_UPSTREAM_NAME,
        spec=UpstreamSpec(kind=UpstreamKind.OPENAI, base_url=config.upstream_url),
        target=target,
        priority=0,
        max_sessions=0,
        max_session_s=0.0,
        keys=(key,),
        models=None,
        ssl_context=_ssl_context(target, config.upstream_ca_file),
        ca_file=config.upstream_ca_file,
    )


def _build_upstream(name: str, settings: UpstreamSettings, env: Mapping[str, str]) -> Upstream:
    where = f"upstreams.{name}"
    kind = UpstreamKind(settings.kind)
    if not settings.url:
        raise UpstreamTableError(f"{where}.url: not set (the upstream's base URL)")
    try:
        target = UpstreamTarget.from_url(settings.url)
    except ValueError as exc:
        raise UpstreamTableError(f"{where}.url: {exc}") from None
    auth = settings.auth or ("api-key" if kind is UpstreamKind.AZURE else "bearer")
    if auth != "bearer" and kind is not UpstreamKind.AZURE:
        raise UpstreamTableError(
            f"{where}.auth: {auth!r} is for Azure; a {kind.value} upstream takes bearer keys"
        )
    if settings.azure_api_version and kind is not UpstreamKind.AZURE:
        raise UpstreamTableError(f'{where}.azure_api_version: only for kind = "azure"')
    scheme = _SCHEMES[auth]
    keys = _pool(where, settings, scheme, env)
    if isinstance(settings.models, dict):
        model_names = dict(settings.models)
    else:
        model_names = {model: model for model in settings.models}
    if kind is UpstreamKind.AZURE and not model_names:
        raise UpstreamTableError(
            f"{where}.models: an Azure upstream needs its deployments named "
            '(models = { "gpt-realtime" = "<deployment>" } or a list of deployment names)'
        )
    for model, upstream_name in model_names.items():
        if not model or not upstream_name:
            raise UpstreamTableError(f"{where}.models: empty model or deployment name")
    max_session_s = settings.max_session_s
    if kind is UpstreamKind.AZURE and not max_session_s:
        max_session_s = AZURE_MAX_SESSION_S
    return Upstream(
        name=name,
        spec=UpstreamSpec(
            kind=kind,
            base_url=settings.url,
            model_names=model_names,
            azure_api_version=settings.azure_api_version,
        ),
        target=target,
        priority=settings.priority,
        max_sessions=settings.max_sessions,
        max_session_s=max_session_s,
        keys=keys,
        models=frozenset(model_names) if model_names else None,
        ssl_context=_ssl_context(target, settings.ca_file, where=f"{where}.ca_file"),
        ca_file=settings.ca_file,
    )


def _pool(
    where: str, settings: UpstreamSettings, scheme: CredentialScheme, env: Mapping[str, str]
) -> tuple[PoolKey, ...]:
    keys: list[PoolKey] = []
    for index, variable in enumerate(settings.api_key_env):
        setting = f"{where}.api_key_env[{index}]"
        value = env.get(variable, "")
        if not value:
            raise UpstreamTableError(f"{setting}: the environment variable {variable} is not set")
        keys.append(PoolKey(_checked(setting, value), scheme=scheme, source=f"env:{variable}"))
    for index, path in enumerate(settings.api_key_file):
        setting = f"{where}.api_key_file[{index}]"
        try:
            value = _read_key_file(path)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise UpstreamTableError(f"{setting}: cannot use {path}: {why}") from None
        keys.append(
            PoolKey(_checked(setting, value), scheme=scheme, source=f"file:{path}", path=path)
        )
    if not keys:
        raise UpstreamTableError(
            f"{where}: no key; name environment variables (api_key_env) or files "
            "(api_key_file) that hold them"
        )
    seen: dict[str, str] = {}
    for key in keys:
        if key.key_id in seen:
            raise UpstreamTableError(
                f"{where}: {key.source} and {seen[key.key_id]} hold the same key"
            )
        seen[key.key_id] = key.source
    return tuple(keys)


def _checked(setting: str, value: str) -> str:
    if not (value.isascii() and value.isprintable() and " " not in value):
        raise UpstreamTableError(
            f"{setting}: the key has spaces, control or non-ASCII characters "
            "(a stray newline or quote?)"
        )
    return value


def _read_key_file(path: str) -> str:
    with Path(path).open("rb") as handle:
        raw = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"over {MAX_KEY_FILE_BYTES} bytes: not a key")
    value = raw.decode("ascii").strip()
    if not value:
        raise ValueError("the file is empty")
    return value


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _ssl_context(
    target: UpstreamTarget, ca_file: str, *, where: str = "upstream_ca_file"
) -> ssl.SSLContext | None:
    if not target.tls:
        return None
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamTableError(f"{where}: cannot load {ca_file}: {exc}") from None
