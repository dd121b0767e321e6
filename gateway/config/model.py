"""The configuration's model: frozen dataclasses, no YAML (the data plane reads these)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from registry.core.balancer import Balancing
from registry.core.errors import InvalidField
from registry.core.models import validate_host
from registry.core.policy import AddressPolicy, is_loopback
from registry.core.store import PANIC_THRESHOLD, SELF_PRESERVATION


class ConfigError(Exception):
    """Every mistake found in a config file, each as ``file:line: message``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str | None = None  # HTTP check path; None for a TCP check
    tcp: bool = False
    interval: float = 5.0
    timeout: float = 1.0
    healthy: int = 2
    unhealthy: int = 3
    expected_status: tuple[int, int] = (200, 399)


@dataclass(frozen=True)
class AffinityConfig:
    """Session affinity: requests with the same value of this cookie or header go to the
    same instance (consistent hashing). Exactly one of the two is set."""

    cookie: str | None = None
    header: str | None = None


@dataclass(frozen=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejected: float = 0.5
    consecutive_5xx: int | None = None  # None: 5xx answers do not count as failures


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    instances: tuple[tuple[str, int], ...] = ()
    health_check: HealthCheckConfig | None = None
    outlier: OutlierConfig = OutlierConfig()
    balancing: Balancing = Balancing()  # balancer and slow_start
    # Concurrency limits of this process (None: unlimited); beyond them, 503 overloaded.
    max_requests: int | None = None  # requests in flight to any one instance
    max_pending: int | None = None  # requests in flight to the service as a whole
    affinity: AffinityConfig | None = None  # session affinity: a request key, hashed
    # Fail static: below this share of healthy instances, route over all up ones (0: off).
    panic_threshold: float = PANIC_THRESHOLD


@dataclass(frozen=True)
class ProxySettings:
    connect_timeout: float = 2.0
    timeout: float = 30.0
    retries: int = 2
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0  # between two reads of a client's request body
    send_timeout: float = 60.0  # a client that accepts no bytes of its answer for this long
    max_connections: int = 10000
    instance_metrics: int = 0  # instances with series of their own (others: "other"); 0: off
    upstream_ca: Path | None = None  # CA file for https instances; None: the system's
    upstream_tls_verify: bool = True  # false: https instances are not verified at all
    access_log: str = "off"  # or "json", "common": a line per request on stdout
    # Peers whose X-Forwarded-* and Forwarded go on (with this hop added); CIDRs.
    trusted_proxies: tuple[str, ...] = ()

    @cached_property
    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in self.trusted_proxies)

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (an IP address) is one of trusted_proxies."""
        if not self.trusted_proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted_networks)


@dataclass(frozen=True)
class RateLimitConfig:
    """Per client of a route: ``average`` requests a second, bursts of ``burst``."""

    average: float
    burst: int
    header: str | None = None  # the client is this header's value; None: its address


@dataclass(frozen=True)
class SplitConfig:
    """One subset of a route's split: the instances whose metadata has all of
    ``metadata`` (sorted (key, value) pairs, a registry Selector), and its weight."""

    metadata: tuple[tuple[str, str], ...]
    weight: int  # 0..100, relative to the route's other subsets
    line: int = 0

    @property
    def label(self) -> str:
        """The subset as configured, ``version=2,zone=a``: its name in logs and metrics."""
        return ",".join(f"{key}={value}" for key, value in self.metadata)


@dataclass(frozen=True)
class RouteConfig:
    prefix: str
    service: str
    strip_prefix: bool = False
    host: str | None = None  # lower-cased, no port; None matches any host
    preserve_host: bool = True
    timeout: float = 30.0  # effective values: the route's override, else the proxy setting
    connect_timeout: float = 2.0
    retries: int = 2
    max_body: int | None = None
    rate_limit: RateLimitConfig | None = None
    # Canary split by instance metadata: the first subset is the canary (split_header:
    # always / never); empty: every instance of the service, as without a split.
    split: tuple[SplitConfig, ...] = ()
    split_header: str = "X-Canary"
    line: int = 0

    @cached_property
    def prefix_bytes(self) -> bytes:
        return self.prefix.encode()


@dataclass(frozen=True)
class TlsConfig:
    """A certificate chain and its key (PEM files), for a listener that terminates TLS."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TokenConfig:
    """A scoped admin token: its secret comes from the variable ``token_env`` names."""

    name: str
    token_env: str
    services: tuple[str, ...] = ("*",)  # globs of the services it may change
    role: str = "write"  # or "read": GET only


@dataclass(frozen=True)
class AdminConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8081)
    token_env: str | None = None  # one token with every right (named "admin")
    tls: TlsConfig | None = None
    tokens: tuple[TokenConfig, ...] = ()


@dataclass(frozen=True)
class RegistryConfig:
    default_ttl: float = 30.0
    max_ttl: float = 3600.0
    snapshot: Path | None = None
    backend: str = "memory"
    allow_loopback: bool = False  # loopback registrations with the admin off loopback
    max_instances: int = 10_000
    max_instances_per_service: int = 1_000
    # Fail static: more than this share of a service's leases ending in one sweep are kept.
    self_preservation: float = SELF_PRESERVATION

    def address_policy(self, proxy: tuple[str, int], admin: tuple[str, int]) -> AddressPolicy:
        """What registrations may name (and what names may resolve to): never the
        gateway's own listeners (``proxy``, ``admin`` as bound); loopback only when the
        admin listener is on loopback too, or allow_loopback says so."""
        return AddressPolicy(
            allow_loopback=self.allow_loopback or is_loopback(admin[0]),
            own=[proxy, admin],
            max_instances=self.max_instances,
            max_per_service=self.max_instances_per_service,
        )


@dataclass(frozen=True)
class Config:
    path: Path | None
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    tls: TlsConfig | None = None  # the proxy listener terminates TLS
    admin: AdminConfig = AdminConfig()
    registry: RegistryConfig = RegistryConfig()
    proxy: ProxySettings = ProxySettings()
    routes: tuple[RouteConfig, ...] = ()
    services: Mapping[str, ServiceConfig] = field(default_factory=dict)

    def balancings(self) -> dict[str, Balancing]:
        """Each configured service's Balancing, for Registry.set_balancing."""
        return {name: service.balancing for name, service in self.services.items()}

    def panic_thresholds(self) -> dict[str, float]:
        """Each configured service's panic threshold, for Registry.set_panic_thresholds."""
        return {name: service.panic_threshold for name, service in self.services.items()}


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (all interfaces); port 0 picks a free one."""
    usage = f"invalid listen address {value!r}: use HOST:PORT, [IPv6]:PORT or :PORT"
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise ValueError(usage)
    port = parse_port(port_text, 0, f"invalid listen address {value!r}")
    if not host:
        return "0.0.0.0", port
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        address = None
    if address is not None and bracketed == (address.version == 6):
        return str(address), port
    if bracketed or ":" in host:
        raise ValueError(usage)
    try:
        return validate_host(host), port
    except InvalidField:
        raise ValueError(usage) from None


def parse_port(text: str, minimum: int, context: str) -> int:
    if not (text.isascii() and text.isdigit()) or not minimum <= int(text) <= 65535:
        raise ValueError(f"{context}: port must be an integer in {minimum}..65535")
    return int(text)
