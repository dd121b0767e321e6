"""Passive health: instances that keep failing real traffic are ejected for a while.

Consecutive connect failures or timeouts (and 5xx answers, when a service's
``outlier.consecutive_5xx`` says so) eject an instance for ``base_ejection``,
doubling each time it is ejected again, never more than ``max_ejected`` of a
service's instances at once (rounded down: a lone instance is never ejected).
A success resets the count. The verdict goes to the registry (health
``ejected``), so the pick, the listing and the metrics see it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from gateway.config.model import Config, OutlierConfig
from registry.core.errors import UnknownInstance, UnknownService
from registry.core.models import Instance
from registry.core.store import Registry

log = logging.getLogger("gateway.outliers")

DEFAULT = OutlierConfig()
MAX_EJECTION = 3600.0


def outlier_configs(config: Config) -> dict[str, OutlierConfig]:
    """The passive health settings of each configured service (others use the defaults)."""
    return {name: service.outlier for name, service in config.services.items()}


class Outliers:
    def __init__(
        self,
        registry: Registry,
        configs: Mapping[str, OutlierConfig],
        later: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        self.registry = registry
        self.configs = dict(configs)
        self._failures: dict[tuple[str, str], int] = {}
        self._ejections: dict[tuple[str, str], int] = {}  # how often; sets the back-off
        self._later = later

    def succeeded(self, instance: Instance) -> None:
        """A good answer (the hot path: one dict lookup when nothing failed)."""
        if self._failures:
            self._failures.pop((instance.service, instance.id), None)

    def failed(self, instance: Instance, server_error: bool = False) -> None:
        """A connect failure or timeout (or a 5xx answer when ``server_error``)."""
        config = self.configs.get(instance.service, DEFAULT)
        threshold = config.consecutive_5xx if server_error else config.consecutive_failures
        if threshold is None:
            return
        key = (instance.service, instance.id)
        count = self._failures.get(key, 0) + 1
        self._failures[key] = count
        if count >= threshold and instance.health == "healthy":
            what = "5xx answers" if server_error else "connect failures or timeouts"
            self._eject(instance, config, f"{threshold} {what} in a row")

    def _eject(self, instance: Instance, config: OutlierConfig, reason: str) -> None:
        try:
            states = self.registry.state_counts(instance.service)
        except UnknownService:
            return
        if states["ejected"] + 1 > int(sum(states.values()) * config.max_ejected):
            return  # never more than max_ejected of the service (a lone one: never)
        key = (instance.service, instance.id)
        times = self._ejections.get(key, 0) + 1
        self._ejections[key] = times
        self._failures.pop(key, None)
        duration = min(config.base_ejection * 2 ** (times - 1), MAX_EJECTION)
        log.warning("%s/%s ejected for %gs after consecutive failures", *key, duration)
        if times > 1:
            reason += f", ejected {times} times"
        until = self.registry.clock() + duration
        try:
            self.registry.set_health(instance.service, instance.id, "ejected", reason, until)
        except UnknownInstance:
            return
        later = self._later or asyncio.get_running_loop().call_later
        later(duration, lambda: self._return(instance))

    def _return(self, instance: Instance) -> None:
        try:
            if instance.health == "ejected":
                self.registry.set_health(instance.service, instance.id, "healthy")
                log.info("%s/%s back from ejection", instance.service, instance.id)
        except UnknownInstance:
            pass
