"""Hot reload of routes.yaml: on SIGHUP and when the file changes on disk.

A new valid file replaces the routing table in one assignment; requests in
flight keep the route they have, connections and registrations are untouched.
An invalid file is logged with its file:line messages, counted, and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("gateway.reload")

POLL = 0.5  # seconds between looks at the file: a change is picked up within a second


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


class FileWatcher:
    """Calls ``on_change`` when the file's mtime, size or inode changes."""

    def __init__(self, path: Path, on_change: Callable[[], object]) -> None:
        self.path = path
        self.on_change = on_change
        self._seen = _signature(path)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def changed(self) -> bool:
        signature = _signature(self.path)
        if signature == self._seen or signature is None:
            return False  # unchanged, or gone for a moment (an editor replacing it)
        self._seen = signature
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(POLL)
            if self.changed():
                self.on_change()
