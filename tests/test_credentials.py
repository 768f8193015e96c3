"""The credentials package's own pieces: the one digest comparison, the Secret type,
and key files re-read by a timer task instead of on every handshake."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import pytest

from relay.credentials import digests
from relay.credentials.digests import digest, digest_hex, matches_any, parse_digest_hex

# ------------------------------------------------------------------ digests

ALPHA, BRAVO, CHARLIE = "key-alpha", "key-bravo", "key-charlie"


@dataclass(frozen=True)
class MatchCase:
    name: str
    candidate: str
    known: tuple[str, ...]
    index: int | None


MATCH_CASES = [
    MatchCase("only-key", ALPHA, (ALPHA,), 0),
    MatchCase("last-of-three", CHARLIE, (ALPHA, BRAVO, CHARLIE), 2),
    MatchCase("middle", BRAVO, (ALPHA, BRAVO, CHARLIE), 1),
    MatchCase("no-match", "key-delta", (ALPHA, BRAVO, CHARLIE), None),
    MatchCase("none-known", ALPHA, (), None),
    MatchCase("prefix-is-not-a-match", "key-alph", (ALPHA,), None),
    MatchCase("case-matters", ALPHA.upper(), (ALPHA,), None),
    MatchCase("empty-candidate", "", (ALPHA,), None),
    MatchCase("duplicate-gives-the-first", BRAVO, (ALPHA, BRAVO, BRAVO), 1),
    MatchCase("lone-surrogate-is-hashed-not-an-error", "k\udc80", ("k\udc80",), 0),
]


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda case: case.name)
def test_matches_any(case: MatchCase) -> None:
    assert matches_any(case.candidate, [digest(k) for k in case.known]) == case.index


@pytest.mark.parametrize("case", MATCH_CASES, ids=lambda case: case.name)
def test_matches_any_compares_every_digest_whatever_the_outcome(
    case: MatchCase, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(digests, "compare_digest", counting)
    known = [digest(k) for k in case.known]
    matches_any(case.candidate, known)
    # Each digest once, in order: no early exit after a match, none skipped before one.
    assert compared == known


def test_digest_is_sha256_of_utf8() -> None:
    assert digest("clé") == hashlib.sha256("clé".encode()).digest()
    assert digest_hex("clé") == hashlib.sha256("clé".encode()).hexdigest()
    assert parse_digest_hex(f"  {digest_hex('x').upper()}\n") == digest("x")


@pytest.mark.parametrize("text", ["", "abcd", "zz" * 32, "ab" * 33, "ab " * 32])
def test_parse_digest_hex_refuses_what_is_not_a_digest_without_quoting_it(text: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_digest_hex(text)
    assert str(caught.value) == "not a SHA-256 hex digest (64 hex characters)"
