"""Baseline: the ~50-line relay a user would write with ``websockets`` on ``uvloop``.

Accepts a client, dials ``--upstream`` + ``/realtime`` (with the client's query and
its own bearer key) and relays messages both ways: each text message is parsed with
``orjson.loads`` (as any relay that looks at events must) and the original text is
forwarded, binary as it came. When one leg closes, the other is closed. The
``websockets+uvloop`` path of ``bench/stranger.py``.
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


Connection = ClientConnection | ServerConnection


async def _pipe(source: Connection, sink: Connection) -> None:
    try:
        async for message in source:
            if isinstance(message, str):
                orjson.loads(message)
            await sink.send(message)
    except (ConnectionClosed, orjson.JSONDecodeError):
        pass
    finally:
        await sink.close()


async def _relay(client: ServerConnection, upstream_base: str, key: str) -> None:
    path = client.request.path if client.request is not None else "/"
    query = path[path.index("?") :] if "?" in path else ""
    async with connect(
        f"{upstream_base}/realtime{query}",
        additional_headers={"Authorization": f"Bearer {key}"},
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=None,
    ) as upstream:
        await asyncio.gather(_pipe(client, upstream), _pipe(upstream, client))


async def _serve(port: int, upstream_base: str, key: str) -> None:
    async with serve(
        lambda client: _relay(client, upstream_base, key),
        "127.0.0.1",
        port,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        ping_interval=None,
    ) as server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="ws://host:port/v1")
    parser.add_argument("--key", default="sk-websockets-relay")
    args = parser.parse_args()
    uvloop.run(_serve(args.port, args.upstream, args.key))


if __name__ == "__main__":
    main()
