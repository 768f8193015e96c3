"""Keep-alive connections to the upstreams, for the REST proxy.

This module owns the idle upstream connections between REST requests: per upstream
(its name, host, port and TLS), at most ``max_idle`` of them, each for at most
``idle_timeout_s``; the newest is reused first (the likeliest to be alive). A plain
connection is peeked before reuse, so one the upstream closed while idle is dropped
here; over TLS a peek is not possible, and the proxy retries a reused connection
that fails before any response byte once on a fresh one. Nothing here dials: the
proxy does, and gives a connection back only when its response was read to the end.
"""

from __future__ import annotations

import socket
import ssl
from collections import deque
from typing import Final

from relay.net.transport import Transport

#: Idle connections kept per upstream by default.
DEFAULT_MAX_IDLE_PER_UPSTREAM: Final = 256
#: Seconds an idle connection is kept by default (below the usual 60 s of load balancers).
DEFAULT_IDLE_TIMEOUT_S: Final = 30.0

#: (upstream name, host, port, TLS): not a key of a key pool (relay.upstreams.table).
ConnectionKey = tuple[str, str, int, bool]


class ConnectionPool:
    """Idle upstream connections, newest first, bounded per upstream."""

    def __init__(
        self,
        *,
        max_idle: int = DEFAULT_MAX_IDLE_PER_UPSTREAM,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.max_idle = max_idle
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[ConnectionKey, deque[tuple[Transport, float]]] = {}

    def take(self, key: ConnectionKey, now: float) -> Transport | None:
        """A live idle connection for ``key``, or None (dial one)."""
        idle = self._idle.get(key)
        while idle:
            transport, since = idle.pop()
            if now - since <= self.idle_timeout_s and not _closed_while_idle(transport):
                return transport
            transport.close()
        return None

    def give(self, key: ConnectionKey, transport: Transport, now: float) -> None:
        """Keep ``transport`` (whose last response was read whole) for the next request."""
        if transport.closed:
            return
        idle = self._idle.setdefault(key, deque())
        idle.append((transport, now))
        while len(idle) > self.max_idle:
            oldest, _ = idle.popleft()
            oldest.close()

    def idle_count(self, key: ConnectionKey) -> int:
        return len(self._idle.get(key, ()))

    def close_all(self) -> None:
        for idle in self._idle.values():
            for transport, _ in idle:
                transport.close()
        self._idle.clear()


def _closed_while_idle(transport: Transport) -> bool:
    """Whether the upstream closed (or sent stray bytes on) an idle plain connection."""
    sock = transport.sock
    if isinstance(sock, ssl.SSLSocket):
        return False  # no peek through TLS; the proxy's retry covers it
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False  # nothing to read: alive and quiet
    except OSError:
        return True
    # b"" (closed) or a byte (the upstream spoke out of turn): unusable either way.
    return True
