"""What every exchange of the data plane shares: the routing table (and a cache of
its answers), the registry, metrics, the upstream pool, and the exchanges waiting
for a response head."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final

import httptools

from gateway.dataplane.accesslog import AccessLog
from gateway.dataplane.affinity import Affinities
from gateway.dataplane.outliers import Outliers
from gateway.dataplane.pool import ConnectionPool
from gateway.dataplane.ratelimit import TokenBuckets
from gateway.dataplane.routing import BadPath, RouteTable, host_name, normalize_path
from gateway.dataplane.stats import RequestStats, RouteStats, method_label
from gateway.dataplane.wire import HeaderError, no_fragment
from registry.core.store import Registry

if TYPE_CHECKING:
    from gateway.config.model import ProxySettings, RateLimitConfig, RouteConfig
    from gateway.dataplane.exchange import Exchange
    from gateway.dataplane.split import Split

    # What resolve answers: the route, the path to send upstream, its stats, its split.
    Resolved = tuple[RouteConfig, bytes, RouteStats, Split | None]

ROUTE_CACHE_SIZE: Final = 4096


class ProxyContext:
    def __init__(
        self,
        table: RouteTable,
        registry: Registry,
        stats: RequestStats,
        outliers: Outliers | None = None,
    ) -> None:
        self.registry = registry
        self.outliers = outliers or Outliers(registry, {})
        self.stats = stats
        self.pool = ConnectionPool()
        stats.upstream_connections = self.pool.connection_counts
        self.waiting: set[Exchange] = set()  # sent upstream, no response head yet
        self.access_log: AccessLog | None = None
        self.affinities: Affinities = {}  # services with session affinity, by their key
        self.loop = asyncio.get_running_loop()
        self._method_labels: dict[bytes, str] = {}
        self._routes: dict[tuple[bytes | None, bytes], Resolved] = {}
        # Per route with a rate_limit: its clients' buckets (kept across reloads while the
        # route and its limit stay the same).
        self._limits: dict[tuple[str | None, str, RateLimitConfig], TokenBuckets] = {}
        self.table = table

    @property
    def table(self) -> RouteTable:
        return self._table

    @table.setter
    def table(self, table: RouteTable) -> None:
        """Swap the whole table (reload); requests in flight keep the route they have."""
        self._table = table
        self._routes = {}

    def resolve(self, host: bytes | None, raw_path: bytes) -> Resolved:
        """The route for a Host and raw path, the path to send upstream, the route's stats
        and its canary split (None without one).

        Answers are cached per (Host, path): most traffic repeats a few paths.
        """
        key = (host, raw_path)
        found = self._routes.get(key)
        if found is not None:
            return found
        no_fragment(raw_path)
        try:
            path = normalize_path(raw_path.decode("latin-1"))
        except BadPath as exc:
            raise HeaderError(400, "bad_path", str(exc)) from None
        match = self._table.match(host_name(host.decode("latin-1") if host else None), path)
        if match is None:
            raise HeaderError(404, "no_route", f"no route for {path}")
        route: RouteConfig = match.route  # type: ignore[assignment]
        stats = self.stats.route(route.prefix, route.service)
        found = (route, match.upstream_path.encode("latin-1"), stats, self._table.split(route))
        if len(self._routes) >= ROUTE_CACHE_SIZE:
            self._routes.clear()
        self._routes[key] = found
        return found

    def rate_wait(
        self, route: RouteConfig, limit: RateLimitConfig, client: bytes, now: float
    ) -> float:
        """0.0 if ``client`` may send this request on ``route`` now, else seconds to wait."""
        key = (route.host, route.prefix, limit)
        buckets = self._limits.get(key)
        if buckets is None:
            buckets = self._limits[key] = TokenBuckets(limit.average, limit.burst)
        return buckets.take(client, now)

    def configure(self, settings: ProxySettings, access_log: str | None) -> None:
        """The settings of the proxy section the context applies (at start and reload):
        the access log (``access_log``, the command line's, wins) and instance metrics."""
        self.set_access_log(access_log or settings.access_log)
        self.stats.instance_limit = settings.instance_metrics

    def set_access_log(self, form: str) -> None:
        """Start, stop or change the access log ("off", "json", "common")."""
        current = self.access_log
        if current is not None and (form == "off" or current.json != (form == "json")):
            self.access_log = None
            current.close()  # what is buffered is written
            current = None
        if current is None and form != "off":
            self.access_log = AccessLog(form)

    @staticmethod
    def absolute_form(url: bytes) -> tuple[bytes, bytes, bytes]:
        """(path, query, authority) of an absolute-form target like http://host/path?q."""
        no_fragment(url)
        try:
            # Any: its port is None when absent, whatever httptools' stub says
            parsed: Any = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise HeaderError(400, "bad_path", "request target is not a path") from None
        if parsed.host is None:
            raise HeaderError(400, "bad_path", "request target is not a path")
        authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        return parsed.path or b"/", parsed.query or b"", authority

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
