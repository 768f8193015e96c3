"""Relay tokens: minting, verification, rotation, and a fuzzed parser. No event loop."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.credentials import keyfiles, tokens
from relay.credentials.tokens import Keyring, SigningKey, TokenClaims, TokenRefusal

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


def _resign(body: str, key: SigningKey = KEY) -> str:
    """A token with this exact claims text and a valid MAC over it."""
    import hashlib
    import hmac

    signed = f"ek_r1.{key.kid}.{body}"
    mac = hmac.new(key.secret, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


_URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_only_canonical_base64url_is_accepted() -> None:
    token = tokens.mint(claims(), KEY)
    head, kid, body, mac = token.split(".")
    assert isinstance(tokens.verify(token, RING, NOW), TokenClaims)
    # A 32-byte MAC is 43 characters; the last one carries 2 unused bits, which
    # must be zero. Setting one decodes to the same bytes: a second spelling.
    last = _URLSAFE.index(mac[-1])
    odd_mac = mac[:-1] + _URLSAFE[last ^ 1]
    padded_mac = mac + "="
    for variant in (
        ".".join((head, kid, body, odd_mac)),
        ".".join((head, kid, body, padded_mac)),
        ".".join((head, kid, body[:5] + "!" + body[5:], mac)),  # a lenient decoder drops "!"
        ".".join((head, kid, body, mac[:7] + "\n" + mac[7:])),
    ):
        assert tokens.verify(variant, RING, NOW) == tokens.MALFORMED, variant
    # The same checks apply to the claims, even under a valid MAC.
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    standard = base64.b64encode(raw).decode()
    if "+" in standard or "/" in standard:
        assert tokens.verify(_resign(standard.rstrip("=")), RING, NOW) == tokens.MALFORMED
    assert tokens.verify(_resign(body + "=" * (-len(body) % 4 or 4)), RING, NOW) == (
        tokens.MALFORMED
    )
    assert tokens.verify(_resign(body), RING, NOW) == claims()


def test_claims_past_the_verifier_limit_are_refused_at_mint() -> None:
    # 40 KB of instructions compress to a short token that would inflate past the limit.
    huge = claims(session=b'{"instructions":"' + b"be kind " * 5000 + b'"}')
    with pytest.raises(ValueError, match=r"limit 32768 bytes"):
        tokens.mint(huge, KEY)
    # Right at the limit, mint and verify agree.
    overhead = len(tokens._ENCODER.encode(claims(session=b"x" * 1000))) - 1000
    at_limit = claims(session=b"x" * (tokens.MAX_CLAIMS_BYTES - overhead))
    assert len(tokens._ENCODER.encode(at_limit)) == tokens.MAX_CLAIMS_BYTES
    assert tokens.verify(tokens.mint(at_limit, KEY), RING, NOW) == at_limit
    over = claims(session=at_limit.session + b"x")
    with pytest.raises(ValueError):
        tokens.mint(over, KEY)


def test_short_signing_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"signing key 'k0' is 0 bytes; at least 32"):
        Keyring([SigningKey("k0", b"")])
    with pytest.raises(ValueError, match=r"'old' is 31 bytes"):
        Keyring([SigningKey("old", b"o" * 31, retired_at=NOW), SigningKey("new", b"n" * 32)])


def _signing_file(tmp_path: Path, *entries: dict[str, object]) -> Path:
    path = tmp_path / "signing.json"
    path.write_text(json.dumps({"keys": list(entries)}))
    return path


@pytest.mark.parametrize(
    ("secret_b64", "message"),
    [
        ("", r"signing key 'k0': secret is 0 bytes, at least 32 are needed"),
        (base64.b64encode(b"s" * 16).decode(), r"signing key 'k0': secret is 16 bytes"),
        ("not base64!!", r"signing key 'k0': secret_b64 is not valid base64"),
        ("c2VjcmV0", r"signing key 'k0': secret is 6 bytes"),
        (base64.b64encode(b"s" * 32).decode()[:-3], r"signing key 'k0': secret_b64 is not valid"),
    ],
)
def test_signing_key_file_refuses_empty_short_and_invalid_secrets(
    tmp_path: Path, secret_b64: str, message: str
) -> None:
    path = _signing_file(tmp_path, {"kid": "k0", "secret_b64": secret_b64})
    with pytest.raises(keyfiles.KeyFileError, match=message) as caught:
        keyfiles.load_keyring(path, NOW)
    assert str(caught.value).startswith(f"{path}: ")
    if secret_b64:
        assert secret_b64 not in str(caught.value)


def test_short_retired_signing_key_is_refused_too(tmp_path: Path) -> None:
    good = base64.b64encode(b"g" * 32).decode()
    path = _signing_file(
        tmp_path,
        {"kid": "old", "secret_b64": "", "retired_at": NOW - 10 * tokens.MAX_TOKEN_TTL_S},
        {"kid": "new", "secret_b64": good},
    )
    with pytest.raises(keyfiles.KeyFileError, match=r"signing key 'old'"):
        keyfiles.load_keyring(path, NOW)


_ = time
