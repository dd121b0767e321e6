"""Hot reload of routes.yaml: on SIGHUP and when the file changes on disk.

A new valid file replaces the routing table in one assignment; requests in
flight keep the route they have, connections and registrations are untouched.
An invalid file is logged with its file:line messages, counted, and ignored.
The file is read, parsed, validated and indexed in a thread (a 10,000-route file
takes ~0.5 s, which on the loop would stall every request), and only swapped in on
the loop; one reload runs at a time, and requests meanwhile make one more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.config.loader import load_config
from gateway.config.model import Config
from gateway.dataplane.routing import RouteTable

log = logging.getLogger("gateway.reload")

POLL = 0.5  # seconds between looks at the file: a change is picked up within a second


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _load(path: Path) -> tuple[Config, RouteTable]:
    config = load_config(path)
    return config, RouteTable(config.routes)


async def load_off_loop(path: Path) -> tuple[Config, RouteTable]:
    """The config file and its routing table, made in a thread; ConfigError if invalid."""
    return await asyncio.to_thread(_load, path)


class FileWatcher:
    """Awaits ``on_change`` when the file's mtime, size or inode changes (looked at every
    ``poll`` seconds; never if None) and when asked to (SIGHUP), one call at a time."""

    def __init__(
        self, path: Path, on_change: Callable[[], Awaitable[object]], poll: float | None = POLL
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.poll = poll
        self._seen = _signature(path)
        self._asked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def ask(self) -> None:
        """Reload now (or, if a reload is running, once more after it)."""
        self._asked.set()

    def changed(self) -> bool:
        signature = _signature(self.path)
        if signature == self._seen or signature is None:
            return False  # unchanged, or gone for a moment (an editor replacing it)
        self._seen = signature
        return True

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll):
                    await self._asked.wait()
            asked = self._asked.is_set()
            self._asked.clear()
            # changed() also notes the file as seen: asked and changed loads it once.
            if (self.poll is not None and self.changed()) or asked:
                try:
                    await self.on_change()
                except Exception:  # a bug must not end hot reload for good
                    log.exception("reload of %s failed", self.path)
