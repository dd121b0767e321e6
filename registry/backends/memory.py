"""The memory backend: this process is the registry.

The store is the registry itself; leases are timed here (registry.backends.leases)
and, when ``registry.snapshot`` is set, every change is saved to a file
(registry.backends.snapshot) that the next start loads. Workers of ``--workers N``
get a copy over a socket (registry.backends.feed, run by gateway.control.workers).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from registry.backends.base import RegistryBackend
from registry.backends.leases import LeaseTimer
from registry.backends.snapshot import SnapshotWriter, load_snapshot
from registry.core.models import Instance
from registry.core.store import Registry


class MemoryBackend(RegistryBackend):
    def __init__(self, store: Registry, snapshot: Path | None = None) -> None:
        """Loads ``snapshot`` now: create the backend before anything subscribes to
        the store (a restored registration is not a new one)."""
        self.store = store
        if snapshot is not None:
            load_snapshot(store, snapshot)
        self._writer = SnapshotWriter(store, snapshot) if snapshot is not None else None
        self._leases = LeaseTimer(store)

    async def start(self) -> None:
        self._leases.start()
        if self._writer is not None:
            self._writer.start()

    async def stop(self) -> None:
        self._leases.stop()
        if self._writer is not None:
            await self._writer.stop()  # the last changes reach the file

    async def register(self, service: str, body: Mapping[str, Any]) -> tuple[Instance, bool]:
        return self.store.register(service, body)

    async def renew(self, service: str, instance_id: str) -> Instance:
        return self.store.renew(service, instance_id)

    async def update(self, service: str, instance_id: str, body: Mapping[str, Any]) -> Instance:
        return self.store.update(service, instance_id, body)

    async def deregister(self, service: str, instance_id: str) -> None:
        self.store.deregister(service, instance_id)

    async def wait_for_change(self, service: str, index: int, timeout: float) -> None:
        await self._leases.wait_for_change(service, index, timeout)
