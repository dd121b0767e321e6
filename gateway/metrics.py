"""Prometheus metrics of SPEC section 6.

Labelled children are looked up once per (route, service) and cached in a
RouteMetrics object, so a proxied request costs no label resolution beyond one
small dict lookup for its (method, code) counter.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.models import Instance
from registry.store import Registry

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})
INSTANCE_STATES = ("up", "draining", "ejected", "failing")
UPSTREAM_ERROR_REASONS = ("connect", "timeout", "reset", "protocol")
# The *_created series double the output and nobody reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def instance_state(instance: Instance) -> str:
    """The state label of gateway_registry_instances: health wins over up/draining."""
    return instance.health if instance.health != "healthy" else instance.state


class _RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(
            "gateway_registry_instances",
            "Registered instances by service and state",
            labels=["service", "state"],
        )
        for name in self._registry.service_names():
            counts = dict.fromkeys(INSTANCE_STATES, 0)
            for instance in self._registry.instances(name):
                counts[instance_state(instance)] += 1
            for state, count in counts.items():
                family.add_metric([name, state], count)
        yield family


class RouteMetrics:
    """The children of one (route, service) pair; what the request path touches."""

    __slots__ = (
        "_requests",
        "_codes",
        "duration",
        "in_flight",
        "retries",
        "route",
        "service",
        "_errors",
    )

    def __init__(self, metrics: GatewayMetrics, route: str, service: str) -> None:
        self.route = route
        self.service = service
        self._requests = metrics.requests
        self._codes: dict[tuple[str, int], Counter] = {}
        self.duration = metrics.duration.labels(route, service)
        self.in_flight = metrics.in_flight.labels(service)
        self.retries = metrics.retries.labels(service)
        self._errors = {
            r: metrics.upstream_errors.labels(service, r) for r in UPSTREAM_ERROR_REASONS
        }

    @classmethod
    def unmatched(cls, metrics: GatewayMetrics) -> RouteMetrics:
        """For requests that match no route: only requests_total and the duration."""
        self = cls.__new__(cls)
        self.route = self.service = "none"
        self._requests = metrics.requests
        self._codes = {}
        self.duration = metrics.duration.labels("none", "none")
        return self

    def observe(self, method: str, status: int, seconds: float) -> None:
        key = (method, status)
        child = self._codes.get(key)
        if child is None:
            label = method if method in METHODS else "OTHER"
            child = self._codes[key] = self._requests.labels(
                self.route, self.service, label, str(status)
            )
        child.inc()
        self.duration.observe(seconds)

    def upstream_error(self, reason: str) -> None:
        self._errors[reason].inc()


class GatewayMetrics:
    def __init__(self, registry: Registry) -> None:
        self.collector_registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests_total",
            "Proxied requests by route, service, method and status code",
            ["route", "service", "method", "code"],
            registry=r,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from request received to response complete",
            ["route", "service"],
            buckets=_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being proxied", ["service"], registry=r
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Failed upstream attempts by reason",
            ["service", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_retries_total", "Retried upstream attempts", ["service"], registry=r
        )
        self.registrations = Counter(
            "gateway_registry_registrations_total",
            "Registrations, re-registrations included",
            ["service"],
            registry=r,
        )
        self.deregistrations = Counter(
            "gateway_registry_deregistrations_total", "Deregistrations", ["service"], registry=r
        )
        self.evictions = Counter(
            "gateway_registry_evictions_total",
            "Instances removed at lease expiry",
            ["service"],
            registry=r,
        )
        self.heartbeats = Counter(
            "gateway_registry_heartbeats_total", "Lease renewals", ["service"], registry=r
        )
        self.config_reloads = Counter(
            "gateway_config_reloads_total", "Config reloads by result", ["result"], registry=r
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        r.register(_RegistryCollector(registry))
        registry.subscribe(self._on_registry_event)
        self._routes: dict[tuple[str, str], RouteMetrics] = {}

    def route(self, route: str, service: str) -> RouteMetrics:
        key = (route, service)
        found = self._routes.get(key)
        if found is None:
            found = self._routes[key] = RouteMetrics(self, route, service)
        return found

    def _on_registry_event(self, event: str, service: str, instance: Instance) -> None:
        counter = {
            "registered": self.registrations,
            "deregistered": self.deregistrations,
            "evicted": self.evictions,
            "heartbeat": self.heartbeats,
        }.get(event)
        if counter is not None:
            counter.labels(service).inc()
