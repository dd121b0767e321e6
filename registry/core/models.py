"""Registry data: instances and the validation rules of SPEC section 4. Pure."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from registry.core.balancer import PeakEwma
from registry.core.errors import InvalidField
from registry.core.units import parse_duration

SERVICE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
INSTANCE_ID_RE = re.compile(r"[A-Za-z0-9._:\[\]-]{1,128}")
_HOSTNAME_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_NUMERIC_LABEL_RE = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")
_HOST_RULE = (
    "host must be a dotted-quad IPv4 address, an IPv6 address without zone, or a DNS name"
    " whose last label is not a number; no scheme or port; not 0.0.0.0 or ::"
)
MAX_METADATA_KEYS = 64
STATES = ("up", "draining")
# What an instance counts as in listings and gateway_registry_instances: health wins over state.
INSTANCE_STATES = ("up", "draining", "ejected", "failing")
SCHEMES = ("http", "https")


@dataclass
class Instance:
    service: str
    id: str
    host: str
    port: int
    scheme: str = "http"
    weight: int = 1
    state: str = "up"
    health: str = "healthy"
    metadata: dict[str, str] = field(default_factory=dict)
    registered_at: float = 0.0
    last_heartbeat: float = 0.0
    ttl: float | None = None  # None: a static instance from routes.yaml, never expires
    expires_at: float | None = None
    in_flight: int = 0
    remote_in_flight: int = 0  # requests other processes (workers) have on it
    deregister_when_idle: bool = False
    # Why health is not "healthy" (a check's failure, an ejection's cause), and when an
    # ejection ends (registry clock): for people reading the status page, never saved.
    health_reason: str = ""
    health_until: float | None = None
    latency: PeakEwma | None = None  # peak_ewma's cost of it (made at its first such pick)

    def __post_init__(self) -> None:
        self.readdress()

    def readdress(self) -> None:
        """Derive what the data plane uses per request; call after host, port or scheme change."""
        self.pool_key = (self.scheme, self.host, self.port)
        self.host_header = format_address(self.host, self.port).encode()

    @property
    def static(self) -> bool:
        return self.ttl is None

    @property
    def address(self) -> str:
        """host:port as used in a Host header or URL authority."""
        return format_address(self.host, self.port)

    @property
    def idle(self) -> bool:
        return self.in_flight + self.remote_in_flight == 0

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def routable(self, now: float) -> bool:
        return self.state == "up" and self.health == "healthy" and self.live(now)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "host": self.host,
            "port": self.port,
            "scheme": self.scheme,
            "weight": self.weight,
            "state": self.state,
            "health": self.health,
            "in_flight": self.in_flight + self.remote_in_flight,
            "metadata": dict(self.metadata),
            "registered_at": rfc3339(self.registered_at),
            "last_heartbeat": rfc3339(self.last_heartbeat),
            "expires_at": rfc3339(self.expires_at) if self.expires_at is not None else None,
            "health_reason": (self.health_reason or None) if self.health != "healthy" else None,
            "health_until": (
                rfc3339(self.health_until)
                if self.health_until is not None and self.health == "ejected"
                else None
            ),
        }


def instance_state(instance: Instance) -> str:
    """One of INSTANCE_STATES: "up" only when up and healthy (routable while its lease lasts)."""
    return instance.health if instance.health != "healthy" else instance.state


# An instance's registration, as a snapshot saves it and a worker's mirror takes it:
# every field but the service (the key) and the counts of requests in flight.
REGISTRATION_FIELDS = tuple(
    f.name
    for f in fields(Instance)
    if f.name
    not in ("service", "in_flight", "remote_in_flight", "latency", "health_reason", "health_until")
)


def rfc3339(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def validate_service_name(value: object) -> str:
    if not isinstance(value, str) or not SERVICE_NAME_RE.fullmatch(value):
        raise InvalidField(
            "service",
            "service name must match [a-z0-9][a-z0-9._-]{0,62}",
        )
    return value


def validate_host(value: object) -> str:
    """An instance's host, normalised: IPv4 dotted quad, compressed IPv6, or a lower-case name."""
    if not isinstance(value, str) or not value:
        raise InvalidField("host", _HOST_RULE)
    address = _ip_address(value)
    return address if address is not None else _dns_name(value)


def _ip_address(value: str) -> str | None:
    """The normalised form of a host written as an IP address; None if it is not one."""
    # routes.yaml writes an IPv6 instance as [::1]:9000; the brackets are not the host's.
    bracketed = value.startswith("[") and value.endswith("]")
    try:
        address = ipaddress.ip_address(value[1:-1] if bracketed else value)
    except ValueError:
        if bracketed:
            raise InvalidField("host", _HOST_RULE) from None
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise InvalidField("host", _HOST_RULE)
        # ::ffff:a.b.c.d reaches a.b.c.d: check and store it as that IPv4 address.
        address = address.ipv4_mapped or address
    elif bracketed:
        raise InvalidField("host", _HOST_RULE)
    if address.is_unspecified:
        raise InvalidField("host", _HOST_RULE)
    return str(address)


def _dns_name(value: str) -> str:
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if len(name) > 253 or not all(_HOSTNAME_LABEL_RE.fullmatch(label) for label in labels):
        raise InvalidField("host", _HOST_RULE)
    # A resolver reads a name ending in a number (127.1, 0x7f.1, 2130706433) as an IPv4 address.
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        raise InvalidField("host", _HOST_RULE)
    return name.lower()


def validate_port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise InvalidField("port", "port must be an integer in 1..65535")
    return value


def validate_weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
        raise InvalidField("weight", "weight must be an integer in 1..100")
    return value


def validate_ttl(value: object, max_ttl: float) -> float:
    message = f"ttl must be a duration between 1s and {max_ttl:g}s (e.g. 30s)"
    try:
        ttl = parse_duration(value)
    except ValueError:
        raise InvalidField("ttl", message) from None
    if not 1.0 <= ttl <= max_ttl:
        raise InvalidField("ttl", message)
    return ttl


def validate_metadata(value: object) -> dict[str, str]:
    message = f"metadata must be an object of string to string, at most {MAX_METADATA_KEYS} keys"
    if not isinstance(value, dict) or len(value) > MAX_METADATA_KEYS:
        raise InvalidField("metadata", message)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidField("metadata", message)
    return dict(value)


def validate_id(value: object) -> str:
    if not isinstance(value, str) or not INSTANCE_ID_RE.fullmatch(value):
        raise InvalidField("id", "id must match [A-Za-z0-9._:[]-]{1,128}")
    return value


def validate_scheme(value: object) -> str:
    if value not in SCHEMES:
        raise InvalidField("scheme", "scheme must be http or https")
    return str(value)


def validate_state(value: object) -> str:
    if value not in STATES:
        raise InvalidField("state", "state must be up or draining")
    return str(value)
