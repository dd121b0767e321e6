"""Assembles the gateway from a Config and runs its two listeners."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from gateway import data_plane_build, stale_extensions
from gateway.config.describe import ignored_settings, plural
from gateway.config.model import Config, ConfigError, HealthCheckConfig
from gateway.control.admin import build_admin_app
from gateway.control.auth import open_admin_refusal, tokens_from
from gateway.control.changelog import log_changes
from gateway.control.health import HealthChecker
from gateway.control.metrics import GatewayMetrics
from gateway.control.reload import FileWatcher, load_off_loop
from gateway.control.tls import reload_into, server_context, upstream_context
from gateway.control.workers import Workers
from gateway.dataplane.affinity import affinities_of
from gateway.dataplane.context import ProxyContext
from gateway.dataplane.listener import Listener
from gateway.dataplane.outliers import Outliers, outlier_configs
from gateway.dataplane.routing import RouteTable
from registry.backends.base import RegistryBackend
from registry.backends.etcd import EtcdBackend, parse_endpoints
from registry.backends.feed import RegistryFeed
from registry.backends.memory import MemoryBackend
from registry.core.policy import AddressPolicy
from registry.core.store import Registry

log = logging.getLogger("gateway")

SHUTDOWN_GRACE = 30.0


class StartupError(Exception):
    """A reason not to start, said in one line."""


def _checks(config: Config) -> dict[str, HealthCheckConfig]:
    """The active health checks the config asks for, by service."""
    return {name: s.health_check for name, s in config.services.items() if s.health_check}


def _backend(config: Config, registry: Registry) -> RegistryBackend:
    """The registry backend routes.yaml names. Made before anything subscribes to the
    registry: the memory backend loads the snapshot (restored, not new, registrations)."""
    backend = config.registry.backend
    if backend.startswith("etcd://"):
        for warning in ignored_settings(config):
            log.warning("%s", warning.removeprefix("warning: "))
        return EtcdBackend(registry, parse_endpoints(backend))
    return MemoryBackend(registry, config.registry.snapshot)


class Gateway:
    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        listen: tuple[str, int] | None = None,
        admin_listen: tuple[str, int] | None = None,
        shutdown_grace: float = SHUTDOWN_GRACE,
        workers: int = 1,
        log_level: str = "info",
        access_log: str | None = None,
    ) -> None:
        self.config = config
        self.workers = workers
        self.log_level = log_level
        self.access_log = access_log  # --access-log: over proxy.access_log, reloads too
        self._listen_flags = (listen, admin_listen)  # --listen, --admin-listen: over the file
        self.listen = listen or config.listen
        self.admin_listen = admin_listen or config.admin.listen
        self.shutdown_grace = shutdown_grace
        self.tokens, warnings = tokens_from(config.admin, os.environ)
        for warning in warnings:
            log.warning("%s", warning)
        refusal = open_admin_refusal(
            config.admin, self.admin_listen, self.tokens, str(config.path or "routes.yaml")
        )
        if refusal is not None:
            raise StartupError(refusal)
        self.registry = Registry(
            clock, default_ttl=config.registry.default_ttl, max_ttl=config.registry.max_ttl
        )
        self._apply_services(config, previous=None)
        self.backend = _backend(config, self.registry)
        log_changes(self.registry)  # after the snapshot's restore: those are not changes
        self.health = HealthChecker(self.registry, _checks(config))
        self.metrics = GatewayMetrics(self.registry)
        self.metrics.config_loaded()
        self.readiness: dict[str, str] = {}
        self._admin: web.AppRunner | None = None
        self._listener: Listener | None = None
        self._reloading = asyncio.Lock()
        self._workers: Workers | None = None
        self.proxy: ProxyContext | None = None
        self.proxy_port = 0
        self.admin_port = 0
        # The listeners' TLS contexts: made once, their files reloaded into them.
        self.tls = server_context(config.tls) if config.tls is not None else None
        self.admin_tls = server_context(config.admin.tls) if config.admin.tls else None

    async def start(self) -> None:
        self.proxy = ProxyContext(
            RouteTable(self.config.routes),
            self.registry,
            self.metrics.stats,
            Outliers(self.registry, outlier_configs(self.config)),
        )
        self.proxy.affinities = affinities_of(self.config)
        self.proxy.pool.ssl = upstream_context(self.config.proxy)
        self.proxy.configure(self.config.proxy, self.access_log)
        self.proxy.stats.set_limits(self.config.services)
        admin_app = build_admin_app(
            self.proxy, self.backend, self.metrics, self.tokens, self.readiness
        )
        try:
            self._listener = Listener(self.proxy, self.config.proxy)
            host, port = self.listen
            try:
                self.proxy_port = await self._listener.start(
                    host, port, reuse_port=self.workers > 1, tls=self.tls
                )
            except OSError as exc:
                self._listener = None
                raise StartupError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            policy = self.registry.policy = self.proxy.pool.policy = self._address_policy()
            self._admin = web.AppRunner(
                admin_app, handle_signals=False, access_log=None, shutdown_timeout=1.0
            )
            await self._admin.setup()
            host, port = self.admin_listen
            try:
                await web.TCPSite(
                    self._admin, host, port, backlog=1024, ssl_context=self.admin_tls
                ).start()
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from None
            self.admin_port = int(self._admin.addresses[0][1])
            policy.own.append((self.admin_listen[0], self.admin_port))
            await self.backend.start()
            self.health.start()
            if self.workers > 1:
                self._workers = Workers(RegistryFeed(self.registry, self.metrics.set_remote))
                await self._workers.start(
                    self.workers,
                    self.config,
                    (self.listen[0], self.proxy_port),
                    self.log_level,
                    self.access_log,
                )
        except BaseException:
            await self.stop()
            raise

    def _address_policy(self) -> AddressPolicy:
        proxy = (self.listen[0], self.proxy_port)
        return self.config.registry.address_policy(proxy, self.admin_listen)

    def _apply_services(self, config: Config, previous: Config | None) -> None:
        """Make the config's services known, their static instances registered and their
        balancing set, with panic thresholds and self-preservation; static instances of
        services the previous config had and this one drops go."""
        for name in dict.fromkeys(route.service for route in config.routes):
            self.registry.declare(name)
        for name, service in config.services.items():
            self.registry.declare(name)
            self.registry.set_static(name, service.instances)
        if previous is not None:
            for name in set(previous.services) - set(config.services):
                self.registry.set_static(name, ())
        self.registry.set_balancing(config.balancings())
        self.registry.set_panic_thresholds(config.panic_thresholds())
        self.registry.self_preservation = config.registry.self_preservation

    async def reload(self) -> bool:
        """Load the config file again; a valid one replaces the routing table atomically.

        Returns whether it was applied. The file is parsed in a thread; reloads asked
        for at once run one after the other. Addresses to listen on are not changed by
        a reload (that needs a restart).
        """
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> bool:
        path = self.config.path
        if path is None:
            return False
        try:
            config, table = await load_off_loop(path)
        except ConfigError as error:
            for line in error.errors:
                log.error("reload refused, the old config keeps serving: %s", line)
            self.metrics.config_reloads.labels("failure").inc()
            return False
        wanted = (
            self._listen_flags[0] or config.listen,
            self._listen_flags[1] or config.admin.listen,
        )
        if wanted != (self.listen, self.admin_listen):  # the running ones, not the last file's
            log.warning("reload: listen addresses changed in %s; that needs a restart", path)
        if config.registry.backend != self.config.registry.backend:
            log.warning("reload: registry.backend changed in %s; that needs a restart", path)
        self._reload_tls(config)
        self._apply_services(config, previous=self.config)
        self.config = config
        self.health.configure(_checks(config))
        if self.proxy is not None:
            self.proxy.pool.ssl = upstream_context(config.proxy)  # for new connections
            self.proxy.configure(config.proxy, self.access_log)
            self.proxy.table = table
            self.proxy.outliers.configs = outlier_configs(config)
            self.proxy.affinities = affinities_of(config)
            self.proxy.stats.set_limits(config.services)
        if self._listener is not None:
            self._listener.settings = config.proxy
        if self._workers is not None:
            self._workers.reload()
        self.metrics.config_reloads.labels("success").inc()
        self.metrics.config_loaded()
        log.info("reloaded %s: %s", path, plural(len(config.routes), "route"))
        return True

    def _reload_tls(self, config: Config) -> None:
        """Certificate files read again, into the running listeners' contexts: connections
        stay, new handshakes get the new certificate. Turning TLS on or off needs a restart."""
        for name, context, tls in (
            ("tls", self.tls, config.tls),
            ("admin.tls", self.admin_tls, config.admin.tls),
        ):
            if (context is None) != (tls is None):
                log.warning("reload: %s added or removed; that needs a restart", name)
            elif context is not None and tls is not None:
                try:
                    reload_into(context, tls)
                except (OSError, ssl.SSLError) as exc:
                    log.error("reload: %s: the certificate stays as it was: %s", name, exc)

    async def _shutdown(self, listener: Listener | None) -> None:
        if listener is not None:
            await listener.shutdown(self.shutdown_grace)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace), close."""
        listener, self._listener = self._listener, None
        workers, self._workers = self._workers, None
        if workers is not None:
            await asyncio.gather(workers.stop(self.shutdown_grace), self._shutdown(listener))
        else:
            await self._shutdown(listener)  # in this task: nothing may slip in between
        await self.health.stop()
        if self.proxy is not None:
            self.proxy.set_access_log("off")  # what is buffered is written
        await self.backend.stop()  # the last changes reach the snapshot
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.cleanup()


async def serve(gateway: Gateway) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await gateway.start()
    watcher = None
    if gateway.config.path is not None:
        watcher = FileWatcher(gateway.config.path, gateway.reload)
        watcher.start()

    def on_sighup() -> None:
        if watcher is not None:
            watcher.ask()

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    log.info(
        "proxy listening on %s:%d, admin on %s:%d, %s, %s data plane",
        gateway.listen[0],
        gateway.proxy_port,
        gateway.admin_listen[0],
        gateway.admin_port,
        plural(len(gateway.config.routes), "route"),
        data_plane_build(),
    )
    stale = stale_extensions()
    if stale:
        log.warning(
            "%s changed after the compiled build and the old compiled code runs; "
            "rebuild with `pip install -e .` (or delete the .so files)",
            ", ".join(stale),
        )
    if gateway.tls is not None:
        log.info(
            "proxy listener speaks TLS (%s)", gateway.config.tls.cert if gateway.config.tls else ""
        )
    gc.collect()
    gc.freeze()  # start-up objects never need scanning again; shorter GC pauses
    # Each request allocates a handful of objects that die young; collecting the young
    # generation every 700 allocations (the default) is wasted work and tail latency.
    # Measured: a young collection of 20,000 objects takes 0.12 ms, a full one at 10,000
    # registered instances ~8 ms. Connections and reloads leave no cycles behind
    # (tests/test_refcycles.py), so rare full collections no longer let memory pile up.
    gc.set_threshold(20_000, 20, 20)
    await stopping.wait()
    if watcher is not None:
        await watcher.stop()
    log.info("shutting down: waiting up to %.0fs for requests in flight", gateway.shutdown_grace)
    await gateway.stop()
    log.info("stopped")


def tune_malloc() -> None:
    """Keep glibc from handing freed memory back to the kernel on every read.

    By default glibc trims the heap once 128 KiB at its top are free and serves larger
    blocks with mmap above a threshold that moves: the 256 KiB buffers a proxy reads
    big bodies into then cost brk or mmap calls and fresh zeroed pages on every read.
    Measured on 1 MiB responses: 78% of the gateway's CPU in the kernel and ~700 req/s,
    or ~1,450 req/s with these settings, at the same peak RSS (~46 MiB). No-op off glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD: keep up to 32 MiB of freed heap
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks under 1 MiB come from the heap


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (about 30% faster here), else asyncio."""
    tune_malloc()
    # The loop shares the GIL with threads that parse a reload, write the snapshot and
    # format /metrics; by default it waits 5 ms and more for its turn. With 1 ms, the
    # loop's gaps during a 10,000-route reload: one over 10 ms instead of seven.
    sys.setswitchinterval(0.001)
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def run(gateway: Gateway) -> None:
    run_loop(serve(gateway))
