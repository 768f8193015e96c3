"""Stored credential digests and the one way they are compared. Sans-I/O.

This module owns how a credential the relay keeps (static client keys, app keys,
the admin key) is reduced to a SHA-256 digest, how a digest is written (64 hex
characters, what ``relay keys hash`` prints and configuration holds), and how a
presented credential is checked against a set of digests: :func:`matches_any`,
the only place a credential is compared.

The comparison hashes the candidate once and compares it with *every* digest in
constant time (:func:`hmac.compare_digest`), without stopping at a match, so the
time taken depends on how many digests there are, not on which one matched or
how close a guess came. Comparing digests rather than keys also hides the keys'
lengths. Nothing here logs, and no error quotes a credential or a digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from hmac import compare_digest
from typing import Final

#: A SHA-256 digest, in bytes and in hex characters.
DIGEST_BYTES: Final = 32
DIGEST_HEX_CHARS: Final = 2 * DIGEST_BYTES
_DIGEST_HEX_RE: Final = re.compile(rf"[0-9a-fA-F]{{{DIGEST_HEX_CHARS}}}")


def digest(secret: str) -> bytes:
    """The SHA-256 digest of ``secret`` (UTF-8; lone surrogates kept, never an error)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def digest_hex(secret: str) -> str:
    """:func:`digest` as the lower-case hex stored in configuration and key files."""
    return digest(secret).hex()


def is_digest_hex(text: str) -> bool:
    """Whether ``text`` is a SHA-256 hex digest (either case, nothing around it)."""
    return _DIGEST_HEX_RE.fullmatch(text) is not None


def parse_digest_hex(text: str) -> bytes:
    """The digest ``text`` writes (surrounding blanks ignored); ``ValueError`` if it is not one."""
    stripped = text.strip()
    if not is_digest_hex(stripped):
        raise ValueError(f"not a SHA-256 hex digest ({DIGEST_HEX_CHARS} hex characters)")
    return bytes.fromhex(stripped)


def matches_any(candidate: str, digests: Sequence[bytes]) -> int | None:
    """The index of the first digest ``candidate`` hashes to, or None.

    Every digest is compared, in constant time, whatever the outcome.
    """
    probe = digest(candidate)
    found: int | None = None
    for index, known in enumerate(digests):
        # compare_digest runs first, on every digest: no early exit after a match.
        if compare_digest(probe, known) and found is None:
            found = index
    return found
