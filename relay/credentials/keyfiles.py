"""App keys and signing keys on disk: what ``relay keys`` manages and the relay reloads.

This module owns two small JSON files:

- the **app key file** (``serve.app_keys_file``): the keys voice-app backends use to
  call ``POST /v1/realtime/client_secrets``. Only SHA-256 digests are stored; a new
  key is printed once by ``relay keys create NAME``. Each key has a mode: ``relay``
  (mint relay tokens) or ``passthrough`` (mint a real OpenAI ``ek_`` from the
  upstream). :class:`AppKeyStore` holds them in memory for the mint endpoint.
- the **signing key file** (``serve.signing_keys_file``): relay-token signing keys
  with ids. ``relay keys rotate-signing`` adds a new active key and retires the
  old one, which keeps verifying tokens until they have all expired.
  :class:`KeyringFile` holds them in memory for minting and verification.

Both stores are re-read when their file changes, by a timer task
(:mod:`relay.credentials.watch`), never on a request: keys are added, revoked and
rotated without a restart and without touching live sessions. A version that does
not load keeps the previous keys (:class:`Reload` says why).

Files are written atomically (temp file + rename) with mode 0600. A configured
file that does not exist is an error (:class:`KeyFileError`), except for the
commands that create it (``relay keys create``, ``relay keys rotate-signing``).
Loading validates every entry: app key digests are SHA-256 hex, signing secrets
are standard base64 of at least
:data:`relay.credentials.tokens.MIN_SIGNING_KEY_BYTES` bytes; errors name the file
and the key, never a secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import msgspec

from relay.credentials.digests import digest_hex, matches_any, parse_digest_hex
from relay.credentials.tokens import (
    MAX_TOKEN_TTL_S,
    MIN_SIGNING_KEY_BYTES,
    Keyring,
    SigningKey,
    new_signing_key,
)

AppKeyMode = Literal["relay", "passthrough"]
APP_KEY_PREFIX: Final = "rk_"
#: Random bytes in a new app key.
APP_KEY_RANDOM_BYTES: Final = 24


class AppKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    sha256: str
    mode: AppKeyMode = "relay"
    created_at: int = 0
    #: Concurrent sessions opened with tokens from this key; 0 = no per-key limit.
    max_concurrent_sessions: int = 0


class AppKeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[AppKey] = msgspec.field(default_factory=list)


class StoredSigningKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kid: str
    secret_b64: str
    retired_at: float | None = None


class SigningKeyFile(msgspec.Struct, forbid_unknown_fields=True):
    keys: list[StoredSigningKey] = msgspec.field(default_factory=list)


class KeyFileError(Exception):
    """A key file is missing, unreadable or invalid; the message names the file."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _read(
    path: Path,
    kind: type[AppKeyFile] | type[SigningKeyFile],
    *,
    missing_ok: bool = False,
) -> AppKeyFile | SigningKeyFile:
    """The file's document; a missing file is an empty one only with ``missing_ok``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return kind()
        command = "create NAME" if kind is AppKeyFile else "rotate-signing"
        raise KeyFileError(
            f"{path}: no such file (create it with `relay keys {command} --file {path}`)"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.DecodeError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


# ------------------------------------------------------------------ watched files

#: Metric labels (``relay_key_file_reload_failures{file=…}``) and log names of the files.
APP_KEYS_LABEL: Final = "app_keys"
SIGNING_KEYS_LABEL: Final = "signing_keys"

#: What ``stat`` says about a file's version: inode, size, mtime and ctime (ns).
#: The inode catches an atomic replace inside one mtime tick, ctime a ``chmod`` that
#: makes an unreadable file readable; None when the file cannot be stat'ed.
FileStamp = tuple[int, int, int, int] | None


def file_stamp(path: Path) -> FileStamp:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class Reload:
    """What one look at a key file found."""

    #: The file changed since the last look (so it was read again).
    changed: bool = False
    #: Why the new version was refused (the previous keys stay), naming the file.
    error: str | None = None
    #: The refusal of the look before, if that one failed too.
    previous_error: str | None = None


UNCHANGED: Final = Reload()


class _WatchedFile:
    """A key file loaded into memory, re-read only by :meth:`reload_if_changed`.

    Nothing that serves a request touches the disk: a timer task
    (:class:`relay.credentials.watch.KeyFilePoller`) calls :meth:`reload_if_changed`.
    The file is loaded at construction and a broken one raises :class:`KeyFileError`
    then; later, a broken version keeps the previous keys.
    """

    label: str

    def __init__(self, path: str) -> None:
        self.path = Path(path) if path else None
        self.last_error: str | None = None
        self._stamp: FileStamp = None
        if self.path is not None:
            # Stamp first: a change while we read shows as a new stamp next time.
            self._stamp = file_stamp(self.path)
            self._load(self.path)

    def _load(self, path: Path) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """What is loaded, for the reload log line (names and counts, never a secret)."""
        raise NotImplementedError

    def reload_if_changed(self) -> Reload:
        """Re-read the file if its stamp changed; a broken file keeps the previous keys."""
        if self.path is None:
            return UNCHANGED
        stamp = file_stamp(self.path)
        if stamp == self._stamp:
            return UNCHANGED
        self._stamp = stamp
        previous, self.last_error = self.last_error, None
        try:
            self._load(self.path)
        except KeyFileError as exc:
            self.last_error = str(exc)
        return Reload(changed=True, error=self.last_error, previous_error=previous)


# ------------------------------------------------------------------ app keys


def load_app_keys(path: Path, *, missing_ok: bool = False) -> AppKeyFile:
    """The app key file, every digest checked; missing is empty only with ``missing_ok``."""
    document = _read(path, AppKeyFile, missing_ok=missing_ok)
    assert isinstance(document, AppKeyFile)
    for key in document.keys:
        try:
            parse_digest_hex(key.sha256)
        except ValueError as exc:
            raise KeyFileError(f"{path}: app key {key.name!r}: sha256 is {exc}") from None
    return document


def create_app_key(
    path: Path, name: str, mode: AppKeyMode = "relay", *, max_concurrent_sessions: int = 0
) -> str:
    """Add a key named ``name``; returns the key (shown once, never stored).

    Creates the file when it does not exist yet.
    """
    document = load_app_keys(path, missing_ok=True)
    if any(key.name == name for key in document.keys):
        raise KeyFileError(f"{path}: an app key named {name!r} exists; revoke it first")
    key = APP_KEY_PREFIX + secrets.token_urlsafe(APP_KEY_RANDOM_BYTES)
    created = AppKey(
        name=name,
        sha256=digest_hex(key),
        mode=mode,
        created_at=int(time.time()),
        max_concurrent_sessions=max_concurrent_sessions,
    )
    document.keys.append(created)
    _write_atomic(path, msgspec.json.format(msgspec.json.encode(document)))
    return key


def revoke_app_key(path: Path, name: str) -> bool:
    document = load_app_keys(path)
    kept = [key for key in document.keys if key.name != name]
    if len(kept) == len(document.keys):
        return False
    document.keys = kept
    _write_atomic(path, msgspec.json.format(msgspec.json.encode(document)))
    return True


class AppKeyStore(_WatchedFile):
    """App keys in memory, checked with no syscall; :meth:`reload_if_changed` refreshes them."""

    label = APP_KEYS_LABEL

    def __init__(self, path: str) -> None:
        self._digests: tuple[bytes, ...] = ()
        self._keys: tuple[AppKey, ...] = ()
        super().__init__(path)

    def _load(self, path: Path) -> None:
        document = load_app_keys(path)
        # Swapped together: a check sees the old keys or the new ones, never a mix.
        self._digests, self._keys = (
            tuple(bytes.fromhex(key.sha256) for key in document.keys),
            tuple(document.keys),
        )

    def describe(self) -> str:
        return f"{len(self._keys)} app key(s)"

    def check(self, credential: str | None) -> AppKey | None:
        """The app key ``credential`` is, compared in constant time against every key."""
        if not credential:
            return None
        index = matches_any(credential, self._digests)
        return None if index is None else self._keys[index]

    def check_name(self, name: str) -> AppKey | None:
        for key in self._keys:
            if key.name == name:
                return key
        return None

    def __len__(self) -> int:
        return len(self._keys)


# ------------------------------------------------------------------ signing keys


def _signing_secret(path: Path, stored: StoredSigningKey) -> bytes:
    """The secret of one stored key, checked; errors name the file and kid, never the secret."""
    try:
        secret = base64.b64decode(stored.secret_b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileError(
            f"{path}: signing key {stored.kid!r}: secret_b64 is not valid base64"
        ) from None
    if len(secret) < MIN_SIGNING_KEY_BYTES:
        raise KeyFileError(
            f"{path}: signing key {stored.kid!r}: secret is {len(secret)} bytes, at least "
            f"{MIN_SIGNING_KEY_BYTES} are needed (`relay keys rotate-signing` makes one)"
        )
    return secret


def load_keyring(path: Path, now: float) -> Keyring:
    """The keys of a signing key file still inside their window; every entry is checked."""
    document = _read(path, SigningKeyFile)
    assert isinstance(document, SigningKeyFile)
    keys = [
        SigningKey(kid=k.kid, secret=_signing_secret(path, k), retired_at=k.retired_at)
        for k in document.keys
    ]
    keys = [k for k in keys if k.retired_at is None or now <= k.retired_at + MAX_TOKEN_TTL_S]
    if not keys:
        raise KeyFileError(f"{path}: no signing key; run `relay keys rotate-signing`")
    try:
        return Keyring(keys)
    except ValueError as exc:
        raise KeyFileError(f"{path}: {exc}") from None


def rotate_signing_key(path: Path, now: float) -> str:
    """Add a new active signing key, retire the current one; returns the new key id.

    Creates the file when it does not exist yet.
    """
    document = _read(path, SigningKeyFile, missing_ok=True)
    assert isinstance(document, SigningKeyFile)
    fresh = new_signing_key()
    kept = [
        StoredSigningKey(k.kid, k.secret_b64, k.retired_at if k.retired_at is not None else now)
        for k in document.keys
        if k.retired_at is None or now <= k.retired_at + MAX_TOKEN_TTL_S
    ]
    kept.append(StoredSigningKey(fresh.kid, base64.b64encode(fresh.secret).decode("ascii")))
    _write_atomic(path, msgspec.json.format(msgspec.json.encode(SigningKeyFile(kept))))
    return fresh.kid


class KeyringFile(_WatchedFile):
    """The signing keyring in memory (rotation without a restart): :meth:`current` makes
    no syscall; :meth:`reload_if_changed` refreshes it. Without a file, ``fallback`` is
    the keyring for the life of the process."""

    label = SIGNING_KEYS_LABEL

    def __init__(self, path: str, fallback: Keyring | None = None) -> None:
        if not path:
            assert fallback is not None
            self._keyring = fallback
        super().__init__(path)

    def _load(self, path: Path) -> None:
        self._keyring = load_keyring(path, time.time())

    def describe(self) -> str:
        return f"{len(self._keyring.kids)} signing key(s), active {self._keyring.active.kid!r}"

    def current(self) -> Keyring:
        return self._keyring
