"""Relay tokens: short-lived, scoped, signed client credentials. Sans-I/O.

This module owns the token format, minting and verification, and the signing
keyring. A relay token looks like an OpenAI client secret (unmodified browser
SDKs only accept browser keys that start with ``ek_``)::

    ek_r1.<kid>.<claims>.<mac>

- ``r1``: format version;
- ``kid``: id of the signing key, so keys rotate without invalidating tokens
  already issued: a retired key keeps verifying until every token it signed has
  expired (``retired_at + MAX_TOKEN_TTL_S``), then it is dropped;
- ``claims``: base64url (no padding) of a msgpack array, zlib-compressed when
  that is shorter (first byte says which), bounded before and after inflation
  (:data:`MAX_CLAIMS_BYTES`, checked by :func:`mint` too, so a token is never
  issued that :func:`verify` would refuse);
- ``mac``: base64url of HMAC-SHA256 over ``ek_r1.<kid>.<claims>`` with the key,
  compared in constant time *before* anything inside the claims is parsed.

Only canonical base64url is accepted (the url-safe alphabet, no padding, no
stray trailing bits): every token has exactly one spelling. Signing keys are at
least :data:`MIN_SIGNING_KEY_BYTES` long; :class:`Keyring` refuses shorter ones.

Verification needs no shared state: the key and the token are enough. Single-use
tokens are the exception and need a replay store
(:class:`relay.credentials.checkers.ReplayStore`).

Parsing is tiny and total: every malformed, truncated or tampered token is a
:class:`TokenRefusal`, never an exception (fuzzed in ``tests/test_tokens.py``).
Nothing here logs, and refusals never quote the token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

TOKEN_PREFIX: Final = "ek_"
FORMAT_VERSION: Final = "r1"
_HEAD: Final = f"{TOKEN_PREFIX}{FORMAT_VERSION}."
#: OpenAI's client-secret TTL bounds, which we share.
MIN_TOKEN_TTL_S: Final = 10
MAX_TOKEN_TTL_S: Final = 7200
DEFAULT_TOKEN_TTL_S: Final = 600
#: Tokens travel in a header or a subprotocol; nginx's default header buffer is 8 KiB.
MAX_TOKEN_CHARS: Final = 6 * 1024
#: Claims are refused if they inflate past this (zip-bomb guard).
MAX_CLAIMS_BYTES: Final = 32 * 1024
#: Clock skew tolerated on ``iat`` between relay instances.
MAX_CLOCK_SKEW_S: Final = 60
#: Signing keys: 32 random bytes; ids are short and URL-safe.
SIGNING_KEY_BYTES: Final = 32
#: Shortest signing key accepted, in bytes (HMAC-SHA256's output size, RFC 2104 §3).
MIN_SIGNING_KEY_BYTES: Final = 32
_MAC_BYTES: Final = 32
_RAW: Final = b"\x00"
_DEFLATED: Final = b"\x01"
_KID_ALPHABET: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
#: base64url (RFC 4648 §5) without padding: the same characters as key ids.
_B64URL_ALPHABET: Final = _KID_ALPHABET
MAX_KID_CHARS: Final = 32


class TokenClaims(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """What a token binds. Encoded as a msgpack array: compact and positional."""

    #: Unique token id: replay store key and per-token limit key.
    jti: str
    #: Name of the app key that minted it.
    app: str
    issued_at: int
    expires_at: int
    #: Models the token may open (``?model=``); empty means the session config's model.
    models: tuple[str, ...] = ()
    #: The session config to enforce, as GA JSON bytes (``session`` of client_secrets).
    session: bytes = b""
    #: End user id, already hashed; forwarded as ``OpenAI-Safety-Identifier``.
    user: str = ""
    #: Allowed browser Origins; empty means any (the relay's global allowlist still applies).
    origins: tuple[str, ...] = ()
    #: Maximum session length this token allows; 0 = the relay's own limit.
    max_session_s: int = 0
    single_use: bool = False
    #: Whether the token may call the REST proxy (``/v1/responses``, ``/v1/chat/...``)
    #: with the relay's keys, for the token's ``models`` only when it names some. Off
    #: unless the backend minting it says so: a browser token must not spend the key
    #: on arbitrary chat calls. (Last field: tokens minted before it decode as False.)
    rest: bool = False


@dataclass(frozen=True, slots=True)
class TokenRefusal:
    """Why a token was refused, in OpenAI's error terms (never quoting the token)."""

    status: int
    code: str
    message: str


MALFORMED = TokenRefusal(401, "invalid_api_key", "Invalid relay token.")
UNKNOWN_KEY = TokenRefusal(401, "invalid_api_key", "Relay token signed by an unknown key.")
BAD_SIGNATURE = TokenRefusal(401, "invalid_api_key", "Invalid relay token.")
EXPIRED = TokenRefusal(401, "expired_api_key", "Relay token has expired.")
NOT_YET_VALID = TokenRefusal(401, "invalid_api_key", "Relay token is not valid yet.")

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(TokenClaims)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    secret: bytes = b""
    #: Unix seconds when this key stopped signing; None while it is the active key.
    retired_at: float | None = None

    def __repr__(self) -> str:  # the secret never reaches a log
        return f"SigningKey(kid={self.kid!r}, retired_at={self.retired_at!r})"


def new_signing_key(kid: str | None = None) -> SigningKey:
    return SigningKey(
        kid=kid or secrets.token_urlsafe(6), secret=secrets.token_bytes(SIGNING_KEY_BYTES)
    )


class Keyring:
    """The active signing key plus retired keys still inside their verification window."""

    def __init__(self, keys: Iterable[SigningKey]) -> None:
        self._keys = {key.kid: key for key in keys}
        for kid, key in self._keys.items():
            if not kid or len(kid) > MAX_KID_CHARS or not set(kid) <= _KID_ALPHABET:
                raise ValueError(f"invalid signing key id {kid!r}: use [A-Za-z0-9_-], at most 32")
            if len(key.secret) < MIN_SIGNING_KEY_BYTES:
                raise ValueError(
                    f"signing key {kid!r} is {len(key.secret)} bytes; at least "
                    f"{MIN_SIGNING_KEY_BYTES} are needed (`relay keys rotate-signing` makes one)"
                )
        active = [key for key in self._keys.values() if key.retired_at is None]
        if len(active) != 1:
            raise ValueError(f"exactly one active signing key is needed, found {len(active)}")
        self.active = active[0]

    def verifier_for(self, kid: str, now: float) -> SigningKey | None:
        key = self._keys.get(kid)
        if key is None:
            return None
        if key.retired_at is not None and now > key.retired_at + MAX_TOKEN_TTL_S:
            return None
        return key

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Canonical unpadded base64url only: anything :func:`_b64encode` would not write is None."""
    if not set(text) <= _B64URL_ALPHABET or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    # Non-zero trailing bits decode to the same bytes; re-encoding tells them apart.
    return data if _b64encode(data) == text else None


def _mac(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def mint(claims: TokenClaims, key: SigningKey) -> str:
    """Encode and sign ``claims``.

    Raises ``ValueError`` if the claims exceed :data:`MAX_CLAIMS_BYTES` (the
    verifier would refuse the token) or the token :data:`MAX_TOKEN_CHARS`.
    """
    packed = _ENCODER.encode(claims)
    if len(packed) > MAX_CLAIMS_BYTES:
        raise ValueError(
            f"session config is {len(packed)} bytes once packed (limit {MAX_CLAIMS_BYTES} "
            "bytes): shorten the session config"
        )
    deflated = zlib.compress(packed, 6)
    body = _DEFLATED + deflated if len(deflated) < len(packed) else _RAW + packed
    signed_part = f"{_HEAD}{key.kid}.{_b64encode(body)}"
    token = f"{signed_part}.{_b64encode(_mac(key.secret, signed_part))}"
    if len(token) > MAX_TOKEN_CHARS:
        raise ValueError(
            f"token would be {len(token)} characters (limit {MAX_TOKEN_CHARS}): "
            "shorten the session config"
        )
    return token


def looks_like_relay_token(credential: str) -> bool:
    return credential.startswith(_HEAD)


def verify(token: str, keyring: Keyring, now: float) -> TokenClaims | TokenRefusal:
    """Check a token completely; returns its claims or why it is refused."""
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.startswith(_HEAD):
        return MALFORMED
    parts = token[len(_HEAD) :].split(".")
    if len(parts) != 3:
        return MALFORMED
    kid, body_text, mac_text = parts
    key = keyring.verifier_for(kid, now)
    if key is None:
        return UNKNOWN_KEY
    mac = _b64decode(mac_text)
    if mac is None or len(mac) != _MAC_BYTES:
        return MALFORMED
    if not hmac.compare_digest(mac, _mac(key.secret, f"{_HEAD}{kid}.{body_text}")):
        return BAD_SIGNATURE
    claims = _decode_claims(body_text)
    if claims is None:
        return MALFORMED
    if claims.issued_at > now + MAX_CLOCK_SKEW_S:
        return NOT_YET_VALID
    if now >= claims.expires_at:
        return EXPIRED
    return claims


def _decode_claims(body_text: str) -> TokenClaims | None:
    body = _b64decode(body_text)
    if not body:
        return None
    flag, payload = body[:1], body[1:]
    if flag == _DEFLATED:
        inflater = zlib.decompressobj()
        try:
            # One byte over the limit tells "exactly at the limit" from "past it".
            payload = inflater.decompress(payload, MAX_CLAIMS_BYTES + 1)
        except zlib.error:
            return None
        if len(payload) > MAX_CLAIMS_BYTES or inflater.unconsumed_tail or not inflater.eof:
            return None
    elif flag != _RAW:  # raw claims are bounded by MAX_TOKEN_CHARS already
        return None
    try:
        return _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def new_token_id() -> str:
    return secrets.token_urlsafe(12)


def hash_end_user(user_id: str, *, salt: bytes) -> str:
    """The ``OpenAI-Safety-Identifier`` for an end user: a salted hash, never the raw id."""
    return hashlib.sha256(salt + user_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
