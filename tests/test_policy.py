"""registry.core.policy: the addresses a registration may name, and the caps."""

from __future__ import annotations

import pytest

from registry.core.errors import InvalidField
from registry.core.policy import AddressPolicy, RegistryFull, TooManyInstances
from registry.core.store import Registry
from tests.fakes import FakeClock

OWN = [("0.0.0.0", 8080), ("127.0.0.1", 8081)]


@pytest.mark.parametrize(
    ("host", "port", "why"),
    [
        ("169.254.169.254", 80, "link-local"),  # the cloud metadata service
        ("169.254.0.1", 9000, "link-local"),
        ("fe80::1", 9000, "link-local"),
        ("::ffff:169.254.169.254", 80, "link-local"),  # the same, IPv4-mapped
        ("fd00:ec2::254", 80, "cloud metadata"),  # AWS's, over IPv6
        ("100.100.100.200", 80, "cloud metadata"),  # Alibaba Cloud's
        ("224.0.0.1", 9000, "multicast"),
        ("ff02::1", 9000, "multicast"),
        ("255.255.255.255", 9000, "broadcast"),
        ("127.0.0.1", 8080, "own listener"),  # the proxy port, listening everywhere
        ("localhost", 8080, "own listener"),
        ("[::1]", 8080, "own listener"),
        ("127.0.0.1", 8081, "own listener"),  # the admin port
    ],
)
def test_refused_addresses(host: str, port: int, why: str) -> None:
    policy = AddressPolicy(allow_loopback=True, own=OWN)
    with pytest.raises(InvalidField) as refused:
        policy.check(host, port)
    assert refused.value.code == "invalid_host" and refused.value.status == 400
    if why == "own listener":
        assert "this gateway's own listener" in refused.value.message
    else:
        assert why in refused.value.message


@pytest.mark.parametrize(
    ("host", "port"),
    [("10.0.0.5", 8080), ("127.0.0.1", 9000), ("api.internal", 8080), ("::1", 9000)],
)
def test_allowed_addresses(host: str, port: int) -> None:
    AddressPolicy(allow_loopback=True, own=OWN).check(host, port)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.1", "::1", "localhost"])
def test_loopback_only_when_allowed(host: str) -> None:
    with pytest.raises(InvalidField) as refused:
        AddressPolicy(allow_loopback=False).check(host, 9000)
    assert "registry.allow_loopback" in refused.value.message


def test_a_registry_with_a_policy_refuses_before_storing(clock: FakeClock) -> None:
    registry = Registry(clock)
    registry.policy = AddressPolicy(allow_loopback=False)
    with pytest.raises(InvalidField):
        registry.register("web", {"host": "169.254.169.254", "port": 80})
    assert registry.count == 0 and "web" not in registry.service_names()


def test_caps_per_service_and_in_total(clock: FakeClock) -> None:
    registry = Registry(clock)
    registry.policy = AddressPolicy(allow_loopback=True, max_instances=3, max_per_service=2)
    registry.register("a", {"host": "10.0.0.1", "port": 1})
    registry.register("a", {"host": "10.0.0.2", "port": 1})
    with pytest.raises(TooManyInstances) as full_service:
        registry.register("a", {"host": "10.0.0.3", "port": 1})
    assert (full_service.value.status, full_service.value.code) == (429, "too_many_instances")
    registry.register("a", {"host": "10.0.0.2", "port": 1, "weight": 5})  # re-registering: fine
    registry.register("b", {"host": "10.0.0.4", "port": 1})
    with pytest.raises(RegistryFull) as full:
        registry.register("c", {"host": "10.0.0.5", "port": 1})
    assert (full.value.status, full.value.code) == (503, "registry_full")
    assert full.value.headers == {"Retry-After": "5"}
    registry.deregister("b", "10.0.0.4:1")  # room again
    registry.register("c", {"host": "10.0.0.5", "port": 1})
    assert registry.count == 3
