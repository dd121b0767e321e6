"""The registry's asyncio shell: lease reaper and long-poll wake-ups."""

from __future__ import annotations

import asyncio
import logging

from registry.core.models import Instance
from registry.core.store import Registry

log = logging.getLogger("registry")


class LeaseTimer:
    """Runs next to a Registry: evicts leases at their expiry, wakes long polls."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._events: dict[str, asyncio.Event] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        registry.subscribe(self._on_event)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    async def wait_for_change(self, service: str, index: int, timeout: float) -> None:
        """Return when the service's index goes above ``index``, or after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.registry.service_index(service) <= index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            event = self._events.setdefault(service, asyncio.Event())
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return

    def _on_event(self, event: str, service: str, instance: Instance) -> None:
        if event != "heartbeat":
            waiting = self._events.pop(service, None)
            if waiting is not None:
                waiting.set()
        if event == "evicted":
            log.info("lease of %s/%s expired; instance removed", service, instance.id)
        expires_at = instance.expires_at
        if expires_at is not None and (self._timer_at is None or expires_at < self._timer_at):
            self._schedule()

    def _schedule(self) -> None:
        if self._loop is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        expiry = self.registry.next_expiry()
        self._timer_at = expiry
        if expiry is None:
            self._timer = None
            return
        delay = max(0.0, expiry - self.registry.clock())
        self._timer = self._loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.registry.expire()
        self._schedule()
