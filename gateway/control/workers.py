"""``gateway run --workers N``: the primary and N-1 worker processes share the proxy port.

The kernel spreads client connections over the processes (SO_REUSEPORT). The
primary keeps the one registry and the admin listener; each worker proxies from
a mirror of the registry that the primary streams to it (registry.backends.feed), and
sends its request statistics back for /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import time

from gateway.config.model import Config, ConfigError
from gateway.control.reload import FileWatcher, load_off_loop
from gateway.control.tls import reload_into, server_context, upstream_context
from gateway.dataplane.affinity import affinities_of
from gateway.dataplane.context import ProxyContext
from gateway.dataplane.listener import Listener
from gateway.dataplane.outliers import Outliers, outlier_configs
from gateway.dataplane.routing import RouteTable
from gateway.dataplane.stats import RequestStats
from registry.backends.feed import RegistryFeed, follow, stats_line
from registry.core.store import Registry

log = logging.getLogger("gateway.workers")

STATS_INTERVAL = 1.0


class Workers:
    """In the primary: starts the workers, feeds them, stops them."""

    def __init__(self, feed: RegistryFeed) -> None:
        self.feed = feed
        self.processes: list[asyncio.subprocess.Process] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(
        self,
        count: int,
        config: Config,
        listen: tuple[str, int],
        log_level: str,
        access_log: str | None = None,
    ) -> None:
        for worker in range(1, count):
            ours, theirs = socket.socketpair()
            command = [
                sys.executable,
                "-m",
                "gateway",
                "_worker",
                "--config",
                str(config.path),
                "--listen",
                f"{listen[0]}:{listen[1]}",
                "--feed-fd",
                str(theirs.fileno()),
                "--log-level",
                log_level,
                *(["--access-log", access_log] if access_log else []),
            ]
            process = await asyncio.create_subprocess_exec(*command, pass_fds=(theirs.fileno(),))
            theirs.close()
            self.processes.append(process)
            reader, writer = await asyncio.open_connection(sock=ours)
            self._tasks.append(asyncio.create_task(self.feed.serve(worker, reader, writer)))

    def reload(self) -> None:
        """The primary applied a new config: each worker loads it too (SIGHUP)."""
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGHUP)

    async def stop(self, grace: float) -> None:
        """SIGTERM each worker: it stops accepting and finishes its requests."""
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                async with asyncio.timeout(grace + 5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
        for task in self._tasks:
            task.cancel()
        self.processes.clear()


async def run_worker(
    config: Config, listen: tuple[str, int], feed_fd: int, access_log: str | None = None
) -> None:
    """A worker process: a data plane on the shared port, routing from the mirror."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # until the data plane is up
    registry = Registry(
        time.time, default_ttl=config.registry.default_ttl, max_ttl=config.registry.max_ttl
    )
    registry.set_balancing(config.balancings())
    registry.set_panic_thresholds(config.panic_thresholds())
    registry.self_preservation = config.registry.self_preservation
    stats = RequestStats(registry)
    proxy = ProxyContext(
        RouteTable(config.routes), registry, stats, Outliers(registry, outlier_configs(config))
    )
    proxy.affinities = affinities_of(config)
    reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=feed_fd))
    ready = asyncio.Event()
    following = asyncio.create_task(follow(registry, reader, ready))
    async with asyncio.timeout(30):
        await asyncio.wait(
            [following, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED
        )
    if not ready.is_set():
        log.error("worker: no registry from the primary; exiting")
        return
    proxy.pool.ssl = upstream_context(config.proxy)
    proxy.configure(config.proxy, access_log)
    stats.set_limits(config.services)
    proxy.pool.policy = config.registry.address_policy(listen, config.admin.listen)
    tls = server_context(config.tls) if config.tls is not None else None
    listener = Listener(proxy, config.proxy)
    await listener.start(listen[0], listen[1], reuse_port=True, tls=tls)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    following.add_done_callback(lambda _: stopping.set())  # the primary is gone

    async def reload() -> None:  # the primary checked the file before it signalled
        assert config.path is not None
        try:
            fresh, table = await load_off_loop(config.path)
        except ConfigError:
            return
        proxy.table = table
        proxy.outliers.configs = outlier_configs(fresh)
        proxy.affinities = affinities_of(fresh)
        registry.set_balancing(fresh.balancings())
        registry.set_panic_thresholds(fresh.panic_thresholds())
        registry.self_preservation = fresh.registry.self_preservation
        stats.set_limits(fresh.services)
        listener.settings = fresh.proxy
        proxy.pool.ssl = upstream_context(fresh.proxy)
        proxy.configure(fresh.proxy, access_log)
        if tls is not None and fresh.tls is not None:
            with contextlib.suppress(OSError, ssl.SSLError):  # the primary logs it
                reload_into(tls, fresh.tls)

    watcher = None
    if config.path is not None:
        watcher = FileWatcher(config.path, reload, poll=None)  # only on the primary's word
        watcher.start()
        loop.add_signal_handler(signal.SIGHUP, watcher.ask)
    while not stopping.is_set():
        if not writer.is_closing():
            writer.write(stats_line(stats.snapshot()))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STATS_INTERVAL):
                await stopping.wait()
    await listener.shutdown(30.0)
    proxy.set_access_log("off")  # what is buffered is written
    if not writer.is_closing():
        writer.write(stats_line(stats.snapshot()))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    writer.close()
    following.cancel()
    if watcher is not None:
        await watcher.stop()
