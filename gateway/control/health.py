"""Active health checks (services.<name>.health_check): HTTP path or TCP connect.

Each instance of a checked service is probed every ``interval``, at its own offset
in the interval so checks are spread out, never fired all at once. A verdict
needs ``unhealthy`` failures in a row to mark an instance failing (one blip never
removes it) and ``healthy`` successes in a row to bring it back. The verdict goes
to the registry, so the pick, the listing and the metrics all see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping

import aiohttp

from gateway.config.model import HealthCheckConfig
from registry.core.errors import UnknownInstance
from registry.core.models import Instance
from registry.core.store import Registry

log = logging.getLogger("gateway.health")


class Verdicts:
    """Consecutive results -> health. Pure: fed one result at a time."""

    __slots__ = ("healthy", "unhealthy", "failing", "_run")

    def __init__(self, healthy: int, unhealthy: int) -> None:
        self.healthy = healthy
        self.unhealthy = unhealthy
        self.failing = False
        self._run = 0  # > 0: successes in a row, < 0: failures in a row

    def record(self, ok: bool) -> bool | None:
        """Feed one result; returns the new failing state when it changes, else None."""
        if ok:
            self._run = self._run + 1 if self._run > 0 else 1
            if self.failing and self._run >= self.healthy:
                self.failing = False
                return False
        else:
            self._run = self._run - 1 if self._run < 0 else -1
            if not self.failing and -self._run >= self.unhealthy:
                self.failing = True
                return True
        return None


async def probe(
    instance: Instance, check: HealthCheckConfig, session: aiohttp.ClientSession
) -> str | None:
    """One check; None when it passed, else why it failed."""
    try:
        async with asyncio.timeout(check.timeout):
            if check.tcp or check.path is None:
                _, writer = await asyncio.open_connection(instance.host, instance.port)
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                return None
            url = f"{instance.scheme}://{instance.address}{check.path}"
            async with session.get(url, allow_redirects=False) as response:
                low, high = check.expected_status
                if low <= response.status <= high:
                    return None
                return f"status {response.status}"
    except TimeoutError:
        return f"no answer within {check.timeout:g}s"
    except (OSError, aiohttp.ClientError) as exc:
        return str(exc) or type(exc).__name__


class HealthChecker:
    """Runs the checks of every configured service against its current instances."""

    def __init__(self, registry: Registry, checks: Mapping[str, HealthCheckConfig]) -> None:
        self.registry = registry
        self.checks = dict(checks)
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        registry.subscribe(self._on_event)

    def start(self) -> None:
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False
        )
        for name in self.checks:
            for instance in self.registry.instances(name):
                self._watch(instance)

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def configure(self, checks: Mapping[str, HealthCheckConfig]) -> None:
        """New checks after a reload: restart the probes of the services concerned."""
        changed = {n for n in set(checks) | set(self.checks) if checks.get(n) != self.checks.get(n)}
        self.checks = dict(checks)
        for key in [k for k in self._tasks if k[0] in changed]:
            self._tasks.pop(key).cancel()
            with contextlib.suppress(UnknownInstance):
                self.registry.set_health(key[0], key[1], "healthy")
        if self._session is not None:
            for name in changed & set(checks):
                for instance in self.registry.instances(name):
                    self._watch(instance)

    def _on_event(self, event: str, service: str, instance: Instance) -> None:
        if self._session is None or service not in self.checks:
            return
        key = (service, instance.id)
        if event in ("deregistered", "evicted"):
            task = self._tasks.pop(key, None)
            if task is not None:
                task.cancel()
        elif event in ("registered", "mirrored") and key not in self._tasks:
            self._watch(instance)

    def _watch(self, instance: Instance) -> None:
        key = (instance.service, instance.id)
        if key not in self._tasks:
            self._tasks[key] = asyncio.get_running_loop().create_task(self._run(instance))

    async def _run(self, instance: Instance) -> None:
        check = self.checks[instance.service]
        verdicts = Verdicts(check.healthy, check.unhealthy)
        await asyncio.sleep(random.uniform(0, check.interval))  # spread over the interval
        while True:
            assert self._session is not None
            failure = await probe(instance, check, self._session)
            change = verdicts.record(failure is None)
            if change is not None:
                health = "failing" if change else "healthy"
                log.warning(
                    "%s/%s is %s%s",
                    instance.service,
                    instance.id,
                    health,
                    f": {failure}" if failure else "",
                )
                try:
                    self.registry.set_health(instance.service, instance.id, health, failure or "")
                except UnknownInstance:
                    return
            await asyncio.sleep(check.interval)
