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
  :data:`HANDSHAKE_LOG_MAX_RECORDS` are kept;
- :class:`RestFaults` (``sim.rest_faults``): the same refusals and stalls for the
  REST requests (:mod:`relay.simulator.rest`), in a queue of their own so a test
  that mixes realtime sessions and REST calls knows which one a fault hits, plus
  :meth:`~RestFaults.drop_next` (a TCP reset before or in the middle of the
  answer). Revoking a key stays on ``sim.faults`` and applies to both kinds: a
  key belongs to the account, not to one API;
- :class:`RestRecord` (``sim.rest_requests``): per REST request, what arrived and
  what was answered (sizes, status, whether the client left early); the latest
  :data:`REST_LOG_MAX_RECORDS` are kept.

Faults belong to one simulator instance: two simulators in one test play two
upstreams. Nothing here does I/O; the server asks :meth:`HandshakeFaults.take_next`
once per realtime handshake (:meth:`RestFaults.take_next` once per REST request)
and builds the answer in its flavor's shape (:mod:`relay.simulator.flavors`).
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
#: REST requests remembered in ``Simulator.rest_requests`` (records; oldest dropped first).
REST_LOG_MAX_RECORDS: Final = 1024

AuthScheme = Literal["bearer", "api-key", "entra", "subprotocol", "none"]
FaultKind = Literal["refuse", "stall", "drop"]


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
class RestRecord:
    """One REST request as the simulator saw and answered it (no credential).

    Added when the request head is read and updated as it goes, so a test can see
    a request in flight (``finished`` False). ``connection``: the number of the TCP
    connection that carried it (1, 2, ... per simulator), so requests sharing a
    keep-alive connection share it. ``path``: without the query. ``model``: from
    the JSON body or the multipart ``model`` field, or the Azure deployment in the
    URL; "" when none was read. ``auth_scheme`` and ``key_index`` as in
    :class:`HandshakeRecord` (an Azure ``Authorization: Bearer`` holding an API
    key, as the v1 API allows, is ``bearer``). ``status``: the answer's HTTP
    status, ``None`` while unanswered or for a stall or drop before the head.
    ``request_bytes``: body bytes received (after de-chunking);
    ``request_sha256``: their SHA-256 (hex). ``response_bytes``: body bytes sent
    (after chunk framing is removed). ``client_disconnected``: the client went
    away before the answer was complete (mid-upload, mid-stream, or while stalled).
    """

    connection: int
    method: str
    path: str
    auth_scheme: AuthScheme = "none"
    key_index: int | None = None
    model: str = ""
    status: int | None = None
    request_bytes: int = 0
    request_sha256: str = ""
    response_bytes: int = 0
    client_disconnected: bool = False
    finished: bool = False


@dataclass(slots=True)
class PlannedFault:
    """A programmed fault and how many more requests it takes.

    ``after_chunks`` (``drop`` only): response body chunks sent before the reset.
    """

    kind: FaultKind
    remaining: int
    status: int = 0
    retry_after_s: float | None = None
    body: bytes | None = None
    after_chunks: int = 0


class PlannedFaults:
    """Refusals and stalls for the next requests of one kind, used in order."""

    def __init__(self) -> None:
        self._planned: collections.deque[PlannedFault] = collections.deque()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(planned={self.pending})"

    @property
    def pending(self) -> int:
        """Requests the programmed faults will still take."""
        return sum(fault.remaining for fault in self._planned)

    def refuse_next(
        self,
        status: int,
        *,
        count: int = 1,
        retry_after_s: float | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer the next ``count`` requests (handshakes: not 101) with HTTP ``status``.

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
        """Read the next ``count`` requests and never answer them.

        The connection stays open until its peer closes it (a connect deadline's test).
        """
        self._plan(PlannedFault("stall", _positive(count)))

    def clear(self) -> None:
        """Forget every programmed fault."""
        self._planned.clear()

    # --- the server's side -----------------------------------------------------------

    def take_next(self) -> PlannedFault | None:
        """The fault for this request (one use of the oldest programmed), or ``None``."""
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


class HandshakeFaults(PlannedFaults):
    """The faults programmed into one simulator's handshakes (``sim.faults``), used in
    order, and the keys revoked (for handshakes and REST requests alike)."""

    def __init__(self) -> None:
        super().__init__()
        self._revoked: set[bytes] = set()

    def __repr__(self) -> str:
        # Counts only: a revoked key is a secret even as a digest (guesses can be tested).
        return f"HandshakeFaults(planned={self.pending}, revoked={len(self._revoked)})"

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
        super().clear()
        self._revoked.clear()

    def is_revoked(self, credential: str) -> bool:
        candidate = credential_digest(credential)
        # Every digest compared in constant time, as for the configured keys.
        found = False
        for digest in self._revoked:
            if hmac.compare_digest(candidate, digest):
                found = True
        return found


class RestFaults(PlannedFaults):
    """The faults programmed into one simulator's REST requests (``sim.rest_faults``).

    :meth:`refuse_next` and :meth:`stall_next` work as for handshakes (a refusal is
    answered once the request body has been read, on a connection kept alive; a
    stall reads the body and never answers). Revoked keys are ``sim.faults``'.
    """

    def drop_next(self, count: int = 1, *, after_chunks: int = 0) -> None:
        """Reset the connection of the next ``count`` REST requests (no FIN, no answer
        end), once the request body is read: before the response head when
        ``after_chunks`` is 0, else after that many body chunks of a streamed answer
        (SSE events, audio chunks), or after the head of an answer sent whole."""
        if after_chunks < 0:
            raise ValueError("drop_next: after_chunks must be >= 0")
        self._plan(PlannedFault("drop", _positive(count), after_chunks=after_chunks))


def _positive(count: int) -> int:
    if count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    return count


__all__ = [
    "HANDSHAKE_LOG_MAX_RECORDS",
    "REST_LOG_MAX_RECORDS",
    "AuthScheme",
    "HandshakeFaults",
    "HandshakeRecord",
    "PlannedFault",
    "PlannedFaults",
    "RestFaults",
    "RestRecord",
    "credential_digest",
]
