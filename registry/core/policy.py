"""Which addresses a registration may point the gateway at, and how many it may hold.

A registration makes the gateway open connections to the address it names, so an
address the gateway must never reach is refused when it is registered:

- link-local (169.254.0.0/16, fe80::/10): cloud metadata services live there;
- multicast, unspecified (0.0.0.0, ::), broadcast;
- the gateway's own listeners (its proxy or admin port on a local address): a request
  loop, each request proxied to the gateway again;
- loopback, unless the admin listener is on loopback itself (whoever can register can
  reach loopback anyway) or ``registry.allow_loopback`` says so.

Host names are checked as written (``localhost`` counts as loopback); what a name
resolves to is not looked up here. Pure: the caller says which listeners are its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from registry.core.errors import ApiError, InvalidField

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RegistryFull(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "registry_full", message, {"Retry-After": "5"})


class TooManyInstances(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(429, "too_many_instances", message)


def ip_address_of(host: str) -> Address | None:
    """The IP address ``host`` is written as ([IPv6] brackets allowed), or None (a name)."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (a listener's host, as configured)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    address = ip_address_of(host)
    return address is not None and address.is_loopback


def _local(address: Address) -> bool:
    return address.is_loopback or address.is_unspecified


class AddressPolicy:
    def __init__(
        self,
        *,
        allow_loopback: bool,
        own: Iterable[tuple[str, int]] = (),
        max_instances: int = 10_000,
        max_per_service: int = 1_000,
    ) -> None:
        """``own``: the gateway's listeners, (host, port) as bound (0.0.0.0 and :: for
        every interface)."""
        self.allow_loopback = allow_loopback
        self.own = list(own)
        self.max_instances = max_instances
        self.max_per_service = max_per_service

    def check(self, host: str, port: int) -> None:
        """InvalidField (invalid_host) when the gateway must not connect to host:port."""
        address = ip_address_of(host)
        loopback = is_loopback(host)
        if address is not None:
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            reason = _forbidden(address)
            if reason:
                raise InvalidField(
                    "host", f"host {host} is {reason}: the gateway does not go there"
                )
        for own_host, own_port in self.own:
            if port == own_port and self._same_host(host, address, own_host, loopback):
                raise InvalidField(
                    "host",
                    f"{host}:{port} is this gateway's own listener: requests would loop back",
                )
        if loopback and not self.allow_loopback:
            raise InvalidField(
                "host",
                f"host {host} is loopback, refused while the admin listener is not on loopback "
                "(set registry.allow_loopback: true to allow it)",
            )

    def refuses(self, address: str, port: int) -> str:
        """Why the gateway must not connect to ``address`` (an IP a host name resolved
        to) on ``port``, or "" when it may."""
        try:
            self.check(address, port)
        except InvalidField as refused:
            return refused.message.split(": ", 1)[0].removeprefix(f"host {address} ")
        return ""

    def check_room(self, service_count: int, total: int) -> None:
        """Before a new instance: TooManyInstances or RegistryFull when a cap is reached."""
        if service_count >= self.max_per_service:
            raise TooManyInstances(
                f"the service has {service_count} instances, the most allowed "
                "(registry.max_instances_per_service)"
            )
        if total >= self.max_instances:
            raise RegistryFull(
                f"the registry holds {total} instances, the most allowed (registry.max_instances)"
            )

    @staticmethod
    def _same_host(host: str, address: Address | None, own_host: str, loopback: bool) -> bool:
        own = ip_address_of(own_host)
        if own is None:
            return host.lower() == own_host.lower()
        if own.is_unspecified:  # listening everywhere: any local address reaches it
            return loopback or (address is not None and _local(address))
        return address == own or (loopback and own.is_loopback)


# Cloud metadata services outside link-local: AWS's IPv6 endpoint, Alibaba Cloud's.
_METADATA: frozenset[Address] = frozenset(
    {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}
)


def _forbidden(address: Address) -> str:
    if address.is_unspecified:
        return "unspecified"
    if address in _METADATA:
        return "a cloud metadata service"
    if address.is_link_local:
        return "link-local (cloud metadata lives there)"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv4Address) and address == ipaddress.IPv4Address(
        "255.255.255.255"
    ):
        return "broadcast"
    return ""
