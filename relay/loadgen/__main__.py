"""``python -m relay.loadgen``: one load worker process (see :mod:`relay.loadgen.fanout`).

Reads its run specification from stdin, so the key never sits on a command line.
People run ``relay bench``; this entry point is for the parent process.
"""

from __future__ import annotations

import sys

import trio

from relay.loadgen.fanout import serve_worker


def main() -> int:
    async def run() -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        await serve_worker(stdin, sys.stdout)

    trio.run(run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
