"""In-process handshake faults and the handshake log of one simulator.

This module owns what a test programs into a running :class:`~relay.simulator.server.Simulator`
without going through the request (the relay does not forward a ``?sim_fault=``
query to every upstream), and what the simulator remembers of each realtime
handshake so a test can assert on the relay's dialling:

- :class:`HandshakeFaults` (``sim.faults``): the next handshakes refused with an
  HTTP status (:meth:`~HandshakeFaults.refuse_next`) or read and never answered
  (:meth:`~HandshakeFaults.stall_next`), in the order they were programmed; and
  keys revoked (:meth:`~HandshakeFaults.revoke_key`), kept as digests only;
- :class:`HandshakeRecord` (``sim.handshakes``): per realtime handshake, the path,
  the model or deployment asked for, the auth scheme, which configured key (its
  index, never the key) and the status answered; the latest
  :data:`HANDSHAKE_LOG_MAX_RECORDS` are kept.

Faults belong to one simulator instance: two simulators in one test play two
upstreams. Nothing here does I/O; the server asks :meth:`HandshakeFaults.take_next`
once per realtime handshake and builds the answer in its flavor's shape
(:mod:`relay.simulator.flavors`).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from dataclasses import dataclass
from typing import Final, Literal

#: Handshakes remembered in ``Simulator.handshakes`` (records; oldest dropped first).
HANDSHAKE_LOG_MAX_RECORDS: Final = 1024
#: Refusals and stalls programmed but not yet used (entries, each with its count):
#: a test programs a handful; this bounds a runaway loop's memory.
MAX_PLANNED_FAULTS: Final = 1024
#: Keys revoked at once (entries).
MAX_REVOKED_KEYS: Final = 1024

AuthScheme = Literal["bearer", "api-key", "entra", "subprotocol", "none"]
FaultKind = Literal["refuse", "stall"]


def credential_digest(credential: str) -> bytes:
    """The SHA-256 a credential is compared by (so lengths do not leak, nor is it kept)."""
    return hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class HandshakeRecord:
    """One realtime handshake as the simulator saw and answered it (no credential).

    ``auth_scheme``: ``bearer`` (``Authorization: Bearer`` on the openai flavor),
    ``api-key`` (the ``api-key`` header, or the preview's ``api-key`` query on
    azure), ``entra`` (``Authorization: Bearer`` on azure), ``subprotocol`` (the
    browser's ``openai-insecure-api-key.`` subprotocol), ``none``.
    ``key_index``: the position in ``api_keys`` of the key presented, ``None`` for
    anything else (no credential, a wrong one, an ``ek_`` secret, an Entra token).
    ``status``: 101, the HTTP status of the refusal, or ``None`` for a handshake
    stalled on purpose (read, never answered).
    """

    path: str
    model: str
    auth_scheme: AuthScheme
    key_index: int | None
    status: int | None


@dataclass(slots=True)
class PlannedFault:
    """A programmed fault and how many more handshakes it takes."""

    kind: FaultKind
    remaining: int
    status: int = 0
    retry_after_s: float | None = None
    body: bytes | None = None


class HandshakeFaults:
    """The faults programmed into one simulator (``sim.faults``), used in order."""

    def __init__(self) -> None:
        self._planned: collections.deque[PlannedFault] = collections.deque()
        self._revoked: set[bytes] = set()

    def __repr__(self) -> str:
        # Counts only: a revoked key is a secret even as a digest (guesses can be tested).
        return f"HandshakeFaults(planned={self.pending}, revoked={len(self._revoked)})"

    @property
    def pending(self) -> int:
        """Handshakes the programmed refusals and stalls will still take."""
        return sum(fault.remaining for fault in self._planned)

    def refuse_next(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after_s: float | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the next ``count`` realtime handshakes with HTTP ``status``, not 101.

        429 carries the flavor's rate-limit body (and ``Retry-After`` when
        ``retry_after_s`` is given); 5xx a server-error body; ``body`` replaces the
        body verbatim (as ``application/json``).
        """
        if not 400 <= status <= 599:
            raise ValueError(f"refuse_next: status must be 4xx or 5xx, not {status}")
        if retry_after_s is not None and retry_after_s < 0:
            raise ValueError("refuse_next: retry_after_s must be >= 0")
        self._plan(
            PlannedFault(
                "refuse", _positive(count), status=status, retry_after_s=retry_after_s, body=body
            )
        )

    def stall_next(self, count: int = 1) -> None:
        """Read the next ``count`` realtime handshakes and never answer them.

        The connection stays open until its peer closes it (a connect deadline's test).
        """
        self._plan(PlannedFault("stall", _positive(count)))

    def revoke_key(self, key: str) -> None:
        """From now on this API key (or Entra token) is answered 401, like a deleted key."""
        if len(self._revoked) >= MAX_REVOKED_KEYS:
            raise ValueError(f"revoke_key: at most {MAX_REVOKED_KEYS} revoked keys")
        self._revoked.add(credential_digest(key))

    def restore_key(self, key: str) -> None:
        """Undo :meth:`revoke_key` for this key."""
        self._revoked.discard(credential_digest(key))

    def clear(self) -> None:
        """Forget every programmed refusal, stall and revocation."""
        self._planned.clear()
        self._revoked.clear()

    # --- the server's side -----------------------------------------------------------

    def is_revoked(self, credential: str) -> bool:
        candidate = credential_digest(credential)
        # Every digest compared in constant time, as for the configured keys.
        found = False
        for digest in self._revoked:
            if hmac.compare_digest(candidate, digest):
                found = True
        return found

    def take_next(self) -> PlannedFault | None:
        """The fault for this handshake (one use of the oldest programmed), or ``None``."""
        if not self._planned:
            return None
        fault = self._planned[0]
        fault.remaining -= 1
        if fault.remaining == 0:
            self._planned.popleft()
        return fault

    def _plan(self, fault: PlannedFault) -> None:
        if len(self._planned) >= MAX_PLANNED_FAULTS:
            raise ValueError(f"at most {MAX_PLANNED_FAULTS} programmed faults")
        self._planned.append(fault)


def _positive(count: int) -> int:
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    return count


__all__ = [
    "HANDSHAKE_LOG_MAX_RECORDS",
    "AuthScheme",
    "HandshakeFaults",
    "HandshakeRecord",
    "PlannedFault",
    "credential_digest",
]
