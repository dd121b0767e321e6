"""The request numbers the data plane moves: plain integers, no lock, no label lookup.

One RouteStats per configured route and one ServiceStats per service; the control
plane (gateway.control.metrics) turns them into Prometheus metric families when
scraped, and workers send copies of them to the primary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final

from registry.core.store import Registry

if TYPE_CHECKING:
    from gateway.config.model import ServiceConfig

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
# Why an upstream attempt failed: the values of gateway_upstream_errors_total's reason.
CONNECT: Final = "connect"  # no connection could be opened in connect_timeout
TIMEOUT: Final = "timeout"  # no response head in the route's timeout
RESET: Final = "reset"  # the connection broke (or closed) before the response's end
PROTOCOL: Final = "protocol"  # the upstream's answer breaks HTTP/1.1 or cannot be passed on
UPSTREAM_ERROR_REASONS: Final = (CONNECT, TIMEOUT, RESET, PROTOCOL)
# Which concurrency limit refused a request: the values of gateway_overloaded_total's limit.
MAX_REQUESTS: Final = "max_requests"  # every routable instance had that many in flight
MAX_PENDING: Final = "max_pending"  # the service had that many in flight
LIMITS: Final = (MAX_REQUESTS, MAX_PENDING)
# Request durations, from a quarter of a millisecond (a local upstream answers in well
# under one) to a minute.
BUCKETS: Final[tuple[float, ...]] = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_BOUNDS: Final = len(BUCKETS)


def method_label(method: str) -> str:
    """A bounded label: the standard methods, everything else OTHER."""
    return method if method in METHODS else "OTHER"


RETRY_RATIO: Final = 0.2  # retries allowed: 20% of the requests of the last second...
RETRY_FLOOR: Final = 10  # ...plus 10 a second
BUDGET_WINDOW: Final = 10  # samples of (requests, retries), one a tick: the last second


class ServiceStats:
    """Per-service numbers the request path moves, the retry budget they give, and the
    service's concurrency limits they are held to (this process's requests only)."""

    __slots__ = (
        "name",
        "in_flight",
        "retries",
        "errors",
        "requests",
        "max_requests",
        "max_pending",
        "overloaded",
        "_window",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.retries = 0
        self.requests = 0
        self.errors = dict.fromkeys(UPSTREAM_ERROR_REASONS, 0)
        self.max_requests = 0  # in flight to one instance at most; 0: unlimited
        self.max_pending = 0  # in flight to the service at most; 0: unlimited
        self.overloaded = dict.fromkeys(LIMITS, 0)  # requests refused, by limit
        self._window: deque[tuple[int, int]] = deque([(0, 0)], maxlen=BUDGET_WINDOW)

    def sample(self) -> None:
        """Called once a tick (0.1 s): the window the retry budget looks at moves on."""
        self._window.append((self.requests, self.retries))

    def may_retry(self) -> bool:
        """Retries stay under 20% of recent requests plus 10/s, so an outage is not
        multiplied by retries (they would fail too)."""
        requests, retries = self._window[0]
        recent_requests = self.requests - requests
        recent_retries = self.retries - retries
        return recent_retries < RETRY_RATIO * recent_requests + RETRY_FLOOR


class RouteStats:
    """Per-route request counts, latency histogram and body bytes (an instance's too,
    when instance metrics are on: ``route`` is then the instance's id)."""

    __slots__ = ("route", "service", "counts", "buckets", "sum", "count", "bytes_in", "bytes_out")

    def __init__(self, route: str, service: ServiceStats) -> None:
        self.route = route
        self.service = service
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.bytes_in = 0  # request body bytes read from clients
        self.bytes_out = 0  # response body bytes written to clients

    def observe(
        self, method: str, status: int, seconds: float, bytes_in: int, bytes_out: int
    ) -> None:
        key = (method, status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        bucket = 0  # the first bound >= seconds (a scan: most requests stop at the first)
        while bucket < _BOUNDS and BUCKETS[bucket] < seconds:
            bucket += 1
        self.buckets[bucket] += 1
        self.sum += seconds
        self.count += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def numbers(self) -> list[Any]:
        """Copied, as plain data: [route, service, counts, buckets, sum, count, in, out]."""
        return [
            self.route,
            self.service.name,
            [[m, c, n] for (m, c), n in self.counts.items()],
            list(self.buckets),
            self.sum,
            self.count,
            self.bytes_in,
            self.bytes_out,
        ]


OTHER_INSTANCES: Final = "other"  # the instance label of those beyond instance_limit


class RequestStats:
    """All of a process's request numbers: per service, per route, and the requests
    no route took."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.services: dict[str, ServiceStats] = {}
        self._routes: dict[tuple[str, str], RouteStats] = {}
        self.unmatched = RouteStats("none", ServiceStats("none"))
        self.connections = 0  # client connections open (the listener keeps it)
        # Upstream connections, [service, open, idle] each (the pool's, set by the context).
        self.upstream_connections: Callable[[], list[list[Any]]] = list
        # proxy.instance_metrics: instances with numbers of their own, at most; 0: none.
        self.instance_limit = 0
        self._instances: dict[tuple[str, str], RouteStats] = {}

    def service(self, name: str) -> ServiceStats:
        found = self.services.get(name)
        if found is None:
            found = self.services[name] = ServiceStats(name)
        return found

    def set_limits(self, services: Mapping[str, ServiceConfig]) -> None:
        """The configured services' max_requests and max_pending (at start and reload):
        they hold from the next pick on; a service the config limits no more is unlimited."""
        for name, config in services.items():
            if config.max_requests or config.max_pending:
                self.service(name)  # its gateway_overloaded_total series exist from now
        for name, stats in self.services.items():
            limited = services.get(name)
            stats.max_requests = (limited.max_requests or 0) if limited is not None else 0
            stats.max_pending = (limited.max_pending or 0) if limited is not None else 0

    def route(self, route: str, service: str) -> RouteStats:
        key = (route, service)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteStats(route, self.service(service))
        return found

    def instance(self, service: ServiceStats, instance_id: str) -> RouteStats:
        """An instance's numbers; past instance_limit instances, the service's "other"."""
        key = (service.name, instance_id)
        found = self._instances.get(key)
        if found is None:
            if len(self._instances) >= self.instance_limit:
                key = (service.name, OTHER_INSTANCES)
                found = self._instances.get(key)
            if found is None:
                found = self._instances[key] = RouteStats(key[1], service)
        return found

    def _forget_gone_instances(self) -> None:
        """Numbers of instances no longer registered are dropped (their series end), so
        churn does not fill the limit with the dead; all of them when metrics go off."""
        registry = self.registry
        for key in list(self._instances):
            name, instance_id = key
            if not self.instance_limit or not (
                instance_id == OTHER_INSTANCES or registry.has(name, instance_id)
            ):
                del self._instances[key]

    def all_routes(self) -> Iterator[RouteStats]:
        yield from self._routes.values()
        if self.unmatched.count:
            yield self.unmatched

    def snapshot(self) -> dict[str, Any]:
        """What a worker reports: its request numbers and its requests in flight."""
        return {
            **self.request_numbers(),
            "instances": [
                [name, i.id, i.in_flight]
                for name, stats in self.services.items()
                if stats.in_flight  # only services with requests in flight: idle ones cost nothing
                for i in self.registry.instances(name)
                if i.in_flight
            ],
        }

    def request_numbers(self) -> dict[str, Any]:
        """This process's request numbers, as plain data (JSON-able), copied."""
        self._forget_gone_instances()
        return {
            "routes": [r.numbers() for r in self.all_routes()],
            "per_instance": [i.numbers() for i in self._instances.values()],
            "services": [
                [s.name, s.in_flight, s.retries, dict(s.errors)] for s in self.services.values()
            ],
            "overloaded": [
                [s.name, dict(s.overloaded)]
                for s in self.services.values()
                if s.max_requests or s.max_pending or any(s.overloaded.values())
            ],
            "connections": self.connections,
            "upstream_connections": self.upstream_connections(),
        }
