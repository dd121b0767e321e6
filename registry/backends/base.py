"""RegistryBackend: where registrations live, behind one interface.

Every backend keeps a local copy, a registry.core.store.Registry (``store``), that
reads and the data plane use without waiting on anything: routing never blocks on
the backend. Writes (register, renew, update, deregister) go through the backend,
which applies them to wherever registrations are kept and to the copy.

Implementations: memory (this process is the registry: leases timed here, saved
to a snapshot file). etcd (several gateways share one registry) comes next.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

from registry.core.models import Instance
from registry.core.store import Registry


class RegistryBackend(abc.ABC):
    store: Registry

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin timing leases, writing, watching: whatever the backend runs."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop it all; the changes made so far are kept (written, flushed)."""

    @abc.abstractmethod
    async def register(self, service: str, body: Mapping[str, Any]) -> tuple[Instance, bool]:
        """Register (or re-register) an instance; True when it is new. InvalidField."""

    @abc.abstractmethod
    async def renew(self, service: str, instance_id: str) -> Instance:
        """Renew an instance's lease (a heartbeat). UnknownService, UnknownInstance."""

    @abc.abstractmethod
    async def update(self, service: str, instance_id: str, body: Mapping[str, Any]) -> Instance:
        """Change state, weight or metadata (PATCH). InvalidField, UnknownInstance."""

    @abc.abstractmethod
    async def deregister(self, service: str, instance_id: str) -> None:
        """Remove an instance. UnknownService, UnknownInstance."""

    def problem(self) -> str | None:
        """Why the backend cannot take writes now (the gateway is not ready), or None."""
        return None

    @abc.abstractmethod
    async def wait_for_change(self, service: str, index: int, timeout: float) -> None:
        """Return when the service's index in ``store`` goes above ``index``, or after
        ``timeout`` seconds (a long poll)."""
