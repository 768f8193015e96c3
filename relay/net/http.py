"""Reading HTTP/1.1 heads and small bodies from a :class:`Transport`.

This module owns the I/O half of the handshakes whose sans-I/O half lives in
:mod:`relay.protocol.handshake`: read until a complete head (bounded by
``MAX_HEAD_BYTES``), read a ``Content-Length`` body (bounded by the caller), and
write one response. Timeouts are the caller's cancel scopes.
"""

from __future__ import annotations

import threading
from typing import Final

from relay.net.transport import Transport, TransportClosed
from relay.protocol import handshake
from relay.protocol.events import http_error_body
from relay.protocol.handshake import HandshakeError, RequestHead, ResponseHead

#: Read size while waiting for a head: heads are small.
HEAD_READ_BYTES: Final = 8 * 1024


class _HeadReads(threading.local):
    """Where heads and small bodies are read: one buffer per thread (one Trio run),
    shared by its connections. Each read's bytes are copied out before the reader's
    next await (``Transport.recv_into`` lets nothing run between the bytes landing and
    its return), so no two readers ever hold it at once; a buffer per read was 8 KiB
    allocated and zeroed per head."""

    def __init__(self) -> None:
        self.chunk = bytearray(HEAD_READ_BYTES)
        self.view = memoryview(self.chunk)


_HEAD_READS: Final = _HeadReads()


async def read_request_head(transport: Transport, initial: bytes = b"") -> RequestHead | None:
    """Read one request head; ``None`` if the peer closed before sending anything.

    ``initial``: bytes already read from the connection (a keep-alive connection's
    next request, sent early).
    """
    buffer = bytearray(initial)
    if buffer:
        head = handshake.parse_request_head(buffer)
        if head is not None:
            return head
    reads = _HEAD_READS
    while True:
        received = await transport.recv_into(reads.chunk)
        if received == 0:
            if buffer:
                raise HandshakeError(400, "Connection closed in the middle of a request head.")
            return None
        buffer += reads.view[:received]
        head = handshake.parse_request_head(buffer)
        if head is not None:
            return head


async def read_response_head(
    transport: Transport, *, skip_informational: bool = False
) -> ResponseHead:
    """Read the upstream's response head; raises ``TransportClosed`` if it hung up.

    ``skip_informational``: interim answers (100 Continue, 103 Early Hints, any number
    of them) are read past to the final one; never for a WebSocket dial, whose 101 is
    the answer.
    """
    buffer = bytearray()
    reads = _HEAD_READS
    while True:
        received = await transport.recv_into(reads.chunk)
        if received == 0:
            raise TransportClosed("upstream closed before its response head")
        buffer += reads.view[:received]
        head = handshake.parse_response_head(buffer)
        while head is not None and skip_informational and 100 <= head.status < 200:
            buffer = bytearray(head.trailing)
            head = handshake.parse_response_head(buffer)
        if head is not None:
            return head


async def read_body(
    transport: Transport, already: bytes, content_length: int | None, *, max_bytes: int
) -> bytes:
    """Read a body of ``content_length`` bytes (or to end of stream when unknown).

    Raises :class:`HandshakeError` 413 when it is larger than ``max_bytes``.
    """
    if content_length is not None and content_length > max_bytes:
        raise HandshakeError(413, f"Request body larger than {max_bytes} bytes.")
    body = bytearray(already)
    reads = _HEAD_READS
    while content_length is None or len(body) < content_length:
        received = await transport.recv_into(reads.chunk)
        if received == 0:
            break
        body += reads.view[:received]
        if len(body) > max_bytes:
            raise HandshakeError(413, f"Body larger than {max_bytes} bytes.")
    return bytes(body if content_length is None else body[:content_length])


async def send_error(
    transport: Transport,
    status: int,
    message: str,
    *,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    extra_headers: tuple[tuple[str, str], ...] = (),
) -> None:
    """Answer with OpenAI's error envelope and ``Connection: close``."""
    body = http_error_body(message, error_type=error_type, code=code, param=param)
    transport.answered = True
    try:
        await transport.send_all(handshake.http_response(status, body, extra_headers=extra_headers))
    except TransportClosed:
        pass
