"""Relay tokens: minting, verification, rotation, and a fuzzed parser. No event loop."""

from __future__ import annotations

import base64
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from relay import tokens
from relay.tokens import Keyring, SigningKey, TokenClaims, TokenRefusal

NOW = 1_800_000_000.0


def claims(**overrides: object) -> TokenClaims:
    fields: dict[str, object] = {
        "jti": "jti-1",
        "app": "app",
        "issued_at": int(NOW),
        "expires_at": int(NOW) + 600,
        "models": ("gpt-realtime",),
        "session": b'{"instructions":"x"}',
    }
    fields.update(overrides)
    return TokenClaims(**fields)  # type: ignore[arg-type]


KEY = SigningKey("k1", b"k" * 32)
RING = Keyring([KEY])


def test_round_trip_and_prefix() -> None:
    token = tokens.mint(claims(), KEY)
    assert token.startswith("ek_r1.k1.")
    assert tokens.verify(token, RING, NOW) == claims()


def test_expired_and_not_yet_valid() -> None:
    token = tokens.mint(claims(), KEY)
    assert tokens.verify(token, RING, NOW + 600) == tokens.EXPIRED
    early = tokens.mint(claims(issued_at=int(NOW) + 3600, expires_at=int(NOW) + 4000), KEY)
    assert tokens.verify(early, RING, NOW) == tokens.NOT_YET_VALID


def test_tampered_claims_or_key_refused() -> None:
    token = tokens.mint(claims(), KEY)
    head, kid, _body, mac = token.split(".")
    other = tokens.mint(claims(models=("gpt-realtime-2",)), KEY).split(".")[2]
    assert tokens.verify(".".join((head, kid, other, mac)), RING, NOW) == tokens.BAD_SIGNATURE
    forged = tokens.mint(claims(), SigningKey("k1", b"z" * 32))
    assert tokens.verify(forged, RING, NOW) == tokens.BAD_SIGNATURE
    assert tokens.verify(token.replace(".k1.", ".k9."), RING, NOW) == tokens.UNKNOWN_KEY


def test_rotation_keeps_old_tokens_until_their_expiry() -> None:
    old = SigningKey("old", b"o" * 32)
    token = tokens.mint(claims(), old)
    rotated = Keyring([SigningKey("old", b"o" * 32, retired_at=NOW), SigningKey("new", b"n" * 32)])
    assert rotated.active.kid == "new"
    assert isinstance(tokens.verify(token, rotated, NOW + 100), TokenClaims)
    # After the longest TTL the retired key is gone.
    late = claims(issued_at=int(NOW) + 7000, expires_at=int(NOW) + 7300)
    assert tokens.verify(tokens.mint(late, old), rotated, NOW + 7201) == tokens.UNKNOWN_KEY


def test_large_session_is_compressed_and_bounded() -> None:
    big = claims(session=b'{"instructions":"' + b"be kind " * 2000 + b'"}')
    token = tokens.mint(big, KEY)
    assert len(token) < tokens.MAX_TOKEN_CHARS
    assert tokens.verify(token, RING, NOW) == big


def test_zip_bomb_refused_after_a_valid_mac() -> None:
    import hashlib
    import hmac
    import zlib

    bomb = b"\x01" + zlib.compress(b"\x00" * (tokens.MAX_CLAIMS_BYTES * 4))
    body = base64.urlsafe_b64encode(bomb).rstrip(b"=").decode()
    signed = f"ek_r1.k1.{body}"
    mac = hmac.new(KEY.secret, signed.encode(), hashlib.sha256).digest()
    token = f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    assert tokens.verify(token, RING, NOW) == tokens.MALFORMED


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_random_tokens_are_refused_never_raise(text: str) -> None:
    assert isinstance(tokens.verify(text, RING, NOW), TokenRefusal)
    assert isinstance(tokens.verify("ek_r1." + text, RING, NOW), TokenRefusal)


@settings(max_examples=400, deadline=None)
@given(st.integers(min_value=0), st.binary(min_size=1, max_size=4))
def test_mutated_tokens_are_refused_never_raise(position: int, junk: bytes) -> None:
    token = tokens.mint(claims(), KEY)
    index = position % len(token)
    mutated = token[:index] + junk.decode("latin-1") + token[index + 1 :]
    result = tokens.verify(mutated, RING, NOW)
    if mutated != token:
        assert isinstance(result, TokenRefusal)


_ = time
