"""Sharing one registry between worker processes on one machine.

The primary process owns the registry. Each worker holds a mirror, fed over a
socket pair as JSON lines: a snapshot first, then every change (heartbeats
included, so leases end on time in the workers too). Workers send their
request statistics back once a second, so /metrics on the primary counts every
worker's traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from registry.core.models import REGISTRATION_FIELDS, Instance
from registry.core.store import Registry

log = logging.getLogger("registry.feed")


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _put(instance: Instance) -> bytes:
    fields = {name: getattr(instance, name) for name in REGISTRATION_FIELDS}
    return _line({"op": "put", "service": instance.service, "instance": fields})


class RegistryFeed:
    """In the primary: streams the registry to workers, collects their statistics."""

    def __init__(self, registry: Registry, on_stats: Callable[[int, Any], None]) -> None:
        self.registry = registry
        self._on_stats = on_stats
        self._writers: list[asyncio.StreamWriter] = []
        registry.subscribe(self._on_event)

    def _on_event(self, event: str, service: str, instance: Instance) -> None:
        if event in ("deregistered", "evicted"):
            line = _line({"op": "del", "service": service, "id": instance.id})
        else:
            line = _put(instance)
        for writer in self._writers:
            if not writer.is_closing():
                writer.write(line)

    async def serve(
        self, worker: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Feed one worker until it goes away."""
        registry = self.registry
        for name in registry.service_names():
            writer.write(_line({"op": "service", "service": name}))
            for instance in registry.instances(name):
                writer.write(_put(instance))
        writer.write(_line({"op": "ready"}))
        self._writers.append(writer)
        try:
            while line := await reader.readline():
                message = json.loads(line)
                if message.get("op") == "stats":
                    self._on_stats(worker, message["stats"])
        except (ConnectionError, ValueError) as exc:
            log.warning("worker %d feed broke: %s", worker, exc)
        finally:
            self._writers.remove(writer)
            self._on_stats(worker, None)
            writer.close()


async def follow(registry: Registry, reader: asyncio.StreamReader, ready: asyncio.Event) -> None:
    """In a worker: apply the primary's feed to the mirror until it ends."""
    while line := await reader.readline():
        message = json.loads(line)
        op = message["op"]
        if op == "put":
            registry.mirror(message["service"], message["instance"])
        elif op == "del":
            registry.unmirror(message["service"], message["id"])
        elif op == "service":
            registry.declare(message["service"])
        elif op == "ready":
            ready.set()


def stats_line(stats: Any) -> bytes:
    return _line({"op": "stats", "stats": stats})
