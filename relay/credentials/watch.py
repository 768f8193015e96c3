"""The key-file poller: app keys and signing keys re-read on a timer, not per request.

This module owns when the key files are looked at and what is said about it. A
small Trio task (:meth:`KeyFilePoller.run`, started by ``RelayServer.serve``)
``stat``\\ s each file every :data:`KEY_FILE_POLL_INTERVAL_S` and re-reads one whose
stamp changed (:meth:`relay.credentials.keyfiles.AppKeyStore.reload_if_changed`),
so a handshake or a mint call reads keys from memory and makes no syscall, and a
change is in effect within one interval.

A version that does not load keeps the previous keys. It is logged once per
distinct failure, with the file and the reason (never a secret), and counted
(``relay_key_file_reload_failures_total{file=…}``); polls that find the same broken
file say nothing more. The reload that follows a failure is logged once too, as a
recovery.

The stat and the (rare) read happen on the Trio thread: the files are a few KiB
on local disk, and a worker thread would make readers race a half-swapped store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Final, Protocol

import trio

from relay.credentials.keyfiles import Reload

LOGGER = logging.getLogger("relay.credentials")

#: Seconds between two looks at the key files: a change is in effect within this.
KEY_FILE_POLL_INTERVAL_S: Final = 2.0


class WatchedKeyFile(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def path(self) -> Path | None: ...

    def reload_if_changed(self) -> Reload: ...

    def describe(self) -> str: ...


def _ignore(label: str) -> None:
    pass


class KeyFilePoller:
    """Looks at every key file ``files()`` names, each ``interval_s``.

    ``files`` is called on every poll, so stores swapped by a configuration reload
    are the ones watched. ``on_failure(label)`` counts each failure that is logged.
    """

    def __init__(
        self,
        files: Callable[[], Iterable[WatchedKeyFile]],
        *,
        interval_s: float = KEY_FILE_POLL_INTERVAL_S,
        on_failure: Callable[[str], None] = _ignore,
    ) -> None:
        self.files = files
        self.interval_s = interval_s
        self.on_failure = on_failure
        self.polls = 0
        self._polled = trio.Event()

    def poll(self) -> None:
        """One look at every file; logs and counts what changed."""
        for watched in self.files():
            reload = watched.reload_if_changed()
            if reload.changed:
                self._report(watched, reload)

    def _report(self, watched: WatchedKeyFile, reload: Reload) -> None:
        fields = {"event": "key_file_reload", "file": watched.label}
        if reload.error is not None:
            if reload.error == reload.previous_error:
                return  # the same failure, already logged and counted
            self.on_failure(watched.label)
            LOGGER.warning(
                "%s: reload failed, keeping the previous keys: %s",
                watched.label,
                reload.error,
                extra={"fields": {**fields, "ok": False}},
            )
        else:
            LOGGER.info(
                "%s: %s %s (%s)",
                watched.label,
                watched.path,
                "reloaded after a failed reload" if reload.previous_error else "reloaded",
                watched.describe(),
                extra={"fields": {**fields, "ok": True}},
            )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Poll until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self.interval_s)
            self.poll()
            self.polls += 1
            self._polled.set()
            self._polled = trio.Event()

    async def wait_polled(self) -> None:
        """Return once a poll that started after this call has finished.

        ``poll`` has no checkpoint, so the next poll to finish also started after us.
        """
        await self._polled.wait()
