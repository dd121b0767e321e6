"""What every exchange of the data plane shares: the routing table, the registry,
metrics, the upstream pool, and the set of exchanges waiting for a response head."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.metrics import GatewayMetrics, method_label
from gateway.pool import ConnectionPool
from gateway.routing import RouteTable
from registry.store import Registry

if TYPE_CHECKING:
    from gateway.exchange import Exchange


class Proxy:
    def __init__(self, table: RouteTable, registry: Registry, metrics: GatewayMetrics) -> None:
        self.table = table  # swapped whole on reload; an exchange reads it once
        self.registry = registry
        self.metrics = metrics
        self.pool = ConnectionPool()
        self.waiting: set[Exchange] = set()  # sent upstream, no response head yet
        self.loop = asyncio.get_running_loop()
        self._method_labels: dict[bytes, str] = {}

    def method_label(self, method: bytes) -> str:
        label = self._method_labels.get(method)
        if label is None:
            label = method_label(method.decode("latin-1"))
            if len(self._method_labels) < 64:
                self._method_labels[method] = label
        return label

    def expire_waiting(self, now: float) -> None:
        """504 for exchanges whose response head is overdue."""
        for exchange in [e for e in self.waiting if e.deadline <= now]:
            self.waiting.discard(exchange)
            exchange.timed_out()
