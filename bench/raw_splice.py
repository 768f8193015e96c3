"""Baseline: a Trio byte splice that parses nothing, the floor no Trio relay can beat.

Listens on ``--port`` and, per connection, dials ``--upstream-port`` and copies bytes
both ways with the same try-first socket I/O the relay uses (``relay.net.transport``):
no HTTP parsing, no frames, no auth. Used by ``bench/relay_throughput.py --baselines``.
"""

from __future__ import annotations

import argparse

import trio

from relay.net.transport import (
    RECEIVE_BYTES,
    Transport,
    TransportClosed,
    accept,
    open_listener,
    open_transport,
)


async def _pipe(source: Transport, destination: Transport) -> None:
    buffer = bytearray(RECEIVE_BYTES)
    view = memoryview(buffer)
    try:
        while True:
            received = await source.recv_into(view)
            if received == 0:
                break
            await destination.send_all(view[:received])
    except TransportClosed:
        pass
    destination.shutdown_write()


async def _splice(client: Transport, upstream_port: int) -> None:
    try:
        upstream = await open_transport("127.0.0.1", upstream_port)
    except OSError:
        client.close()
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, upstream)
            nursery.start_soon(_pipe, upstream, client)
    finally:
        client.close()
        upstream.close()


async def serve(port: int, upstream_port: int) -> None:
    listener = open_listener("127.0.0.1", port)
    async with trio.open_nursery() as nursery:
        while True:
            sock, peer = await accept(listener)
            nursery.start_soon(_splice, Transport(sock, peer=peer), upstream_port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    trio.run(serve, args.port, args.upstream_port)


if __name__ == "__main__":
    main()
