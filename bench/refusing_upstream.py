"""A stand-in for a rate-limited upstream: every request is answered HTTP 429.

Listens on ``--port``; reads each request head (bounded) and answers OpenAI's
rate-limit error envelope with ``Retry-After: 0`` and ``Connection: close``, the way
an upstream over its limit refuses a Realtime handshake. ``bench/failover.py`` puts it
first in a relay's upstream table so that every handshake pays one failed attempt
before it reaches the healthy upstream.
"""

from __future__ import annotations

import argparse
from typing import Final

import trio

from relay.net.transport import Transport, TransportClosed, accept, open_listener
from relay.protocol.events import http_error_body
from relay.protocol.handshake import http_response

#: The longest request head read before answering anyway, in bytes.
MAX_HEAD_BYTES: Final = 16 * 1024
#: Seconds a client may take to send its head.
HEAD_TIMEOUT_S: Final = 5.0
REFUSAL: Final = http_response(
    429,
    http_error_body(
        "Rate limit reached for requests (the benchmark's refusing upstream).",
        error_type="requests",
        code="rate_limit_exceeded",
    ),
    extra_headers=(("Retry-After", "0"),),
)


async def _refuse(transport: Transport) -> None:
    head = bytearray()
    buffer = bytearray(4096)
    try:
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
                received = await transport.recv_into(memoryview(buffer))
                if received == 0:
                    return
                head += buffer[:received]
            await transport.send_all(REFUSAL)
    except TransportClosed:
        pass
    finally:
        transport.close()


async def serve(port: int) -> None:
    listener = open_listener("127.0.0.1", port)
    async with trio.open_nursery() as nursery:
        while True:
            sock, peer = await accept(listener)
            nursery.start_soon(_refuse, Transport(sock, peer=peer))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        trio.run(serve, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
