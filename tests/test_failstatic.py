"""Fail static (issue 12 item 5): the panic threshold (services.NAME.panic_threshold,
Envoy's healthy_panic_threshold) and registry self-preservation
(registry.self_preservation, Eureka's), on the registry with a fake clock, and once
through a real gateway for /routes and /metrics."""

from __future__ import annotations

import json
import logging
from collections import Counter

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.loader import load_config, parse_config
from gateway.config.model import ConfigError
from gateway.control.metrics import GatewayMetrics
from registry.backends.snapshot import load_snapshot
from registry.core.errors import UnknownInstance
from registry.core.models import REGISTRATION_FIELDS
from registry.core.store import PANIC_THRESHOLD, SELF_PRESERVATION, Registry
from tests.conftest import RunningGateway
from tests.fakes import FakeClock
from tests.test_metrics import _scrape, _value

A, B, C, D = (f"10.0.0.1:{port}" for port in (1, 2, 3, 4))


def _registry(ttl: float = 30.0, count: int = 4) -> tuple[Registry, FakeClock]:
    """Both rules on at 50%, the Envoy and Eureka figures (the defaults are off)."""
    clock = FakeClock()
    registry = Registry(clock)
    registry.set_panic_thresholds({"api": 0.5})
    registry.self_preservation = 0.5
    for port in range(1, count + 1):
        registry.register("api", {"host": "10.0.0.1", "port": port, "ttl": ttl})
    return registry, clock


def _picks(registry: Registry, n: int = 40, exclude: tuple[str, ...] = ()) -> Counter[str | None]:
    got: Counter[str | None] = Counter()
    for _ in range(n):
        instance = registry.pick("api", exclude)
        got[instance.id if instance is not None else None] += 1
    return got


# -- panic threshold ------------------------------------------------------------------


def test_one_healthy_of_four_is_panic_and_picks_go_over_every_up_instance() -> None:
    registry, _ = _registry()
    registry.set_health("api", B, "failing")
    registry.set_health("api", C, "ejected")
    assert not registry.in_panic("api")  # 2 healthy of 4
    registry.set_health("api", D, "failing")
    assert registry.in_panic("api")  # 1 of 4: under 50%
    assert _picks(registry) == {A: 10, B: 10, C: 10, D: 10}  # plain round-robin
    registry.update("api", D, {"state": "draining"})  # never picked, panic or not
    assert registry.in_panic("api")  # 1 healthy of 3 up
    assert set(_picks(registry, 30)) == {A, B, C}
    assert set(_picks(registry, 30, exclude=(A, B))) == {C}  # a retry's exclusions hold
    registry.set_health("api", B, "healthy")
    assert not registry.in_panic("api")  # 2 of 3
    assert set(_picks(registry, 30)) == {A, B}


def test_two_healthy_of_four_is_not_panic() -> None:
    registry, _ = _registry()
    registry.set_health("api", C, "failing")
    registry.set_health("api", D, "ejected")
    assert not registry.in_panic("api")  # 2 < 0.5 * 4 is false: the boundary
    assert _picks(registry) == {A: 20, B: 20}


def test_every_instance_unhealthy_is_panic_and_none_up_is_no_instance() -> None:
    registry, _ = _registry(count=2)
    for instance_id in (A, B):
        registry.set_health("api", instance_id, "failing")
    assert registry.in_panic("api")
    assert set(_picks(registry, 4)) == {A, B}
    for instance_id in (A, B):
        registry.update("api", instance_id, {"state": "draining"})
    assert not registry.in_panic("api")
    assert registry.pick("api") is None


def test_threshold_zero_disables_panic_and_a_new_threshold_applies_at_once() -> None:
    registry, _ = _registry()
    for instance_id in (B, C, D):
        registry.set_health("api", instance_id, "failing")
    registry.set_panic_thresholds({"api": 0.0})  # panic_threshold: 0%
    assert not registry.in_panic("api")
    assert _picks(registry, 5) == {A: 5}
    registry.set_health("api", A, "failing")
    assert registry.pick("api") is None  # no healthy instance: 503 as without panic
    registry.set_health("api", A, "healthy")
    registry.set_panic_thresholds({"api": 0.8})  # a reload: 1 of 4 and 2 of 4 both panic
    registry.set_health("api", B, "healthy")
    assert registry.in_panic("api")
    registry.set_panic_thresholds({})  # no longer configured: the default again (off)
    assert not registry.in_panic("api")
    assert PANIC_THRESHOLD == 0.0


def test_panic_picks_check_leases_like_every_pick() -> None:
    registry, clock = _registry(count=4)
    registry.self_preservation = 0.0
    registry.register("api", {"host": "10.0.0.1", "port": 1, "ttl": 60})  # A outlives the rest
    for instance_id in (A, B, C):
        registry.set_health("api", instance_id, "failing")
    clock.advance(30)  # B, C and D's leases end now; no sweep ran
    assert registry.in_panic("api")
    assert _picks(registry, 4) == {A: 4}  # the ended ones went at their pick
    assert [i.id for i in registry.instances("api")] == [A]


def test_live_up_is_kept_as_instances_come_and_go() -> None:
    registry, _ = _registry()
    registry.set_health("api", A, "failing")
    registry.deregister("api", B)
    registry.update("api", C, {"state": "draining"})
    registry.register("api", {"host": "10.0.0.1", "port": 5})
    service = registry._services["api"]
    assert sorted(i.id for i in service.live_up) == [A, D, "10.0.0.1:5"]
    assert {i.id: p for p, i in enumerate(service.live_up)} == service.up_positions


def test_panic_threshold_in_routes_yaml() -> None:
    config = parse_config(
        "services:\n  a: {panic_threshold: 30%}\n  b: {panic_threshold: 0%}\n  c: {}\n"
    )
    assert config.panic_thresholds() == {"a": 0.3, "b": 0.0, "c": PANIC_THRESHOLD}
    with pytest.raises(ConfigError) as caught:
        parse_config("services:\n  a: {panic_threshold: 150%}\n")
    assert caught.value.errors == [
        "routes.yaml:2: services.a.panic_threshold: use a percentage like 50% or a fraction"
        " 0..1, got '150%'"
    ]


# -- self-preservation --------------------------------------------------------------


def test_three_of_four_leases_ending_in_one_sweep_are_kept(caplog) -> None:
    registry, clock = _registry(ttl=30)
    metrics = GatewayMetrics(registry)
    clock.advance(10)
    registry.renew("api", A)  # A's lease ends at +40, the others' at +30
    clock.advance(25)  # +35: B, C and D ended, all in the sweep to come
    with caplog.at_level(logging.WARNING, logger="registry"):
        assert registry.expire() == []
    assert [r.getMessage() for r in caplog.records] == [
        "self-preservation: the leases of 3 of the 4 leased instances of api ended in one"
        " sweep, more than 50%; kept them for another ttl instead of evicting them"
        " (registry.self_preservation)"
    ]
    assert metrics.preserved.labels("api")._value.get() == 3
    assert metrics.evictions.labels("api")._value.get() == 0
    assert registry.counts("api") == (4, 4)
    assert set(_picks(registry, 8)) == {A, B, C, D}  # still routable
    kept = registry.get("api", B)
    assert kept.expires_at == clock.now + 30  # another ttl from the sweep
    assert kept.last_heartbeat == clock.now - 35  # not a heartbeat: the listing shows it

    clock.advance(10)
    registry.renew("api", B)  # B comes back: its heartbeat renews as usual
    assert registry.get("api", B).expires_at == clock.now + 30
    registry.deregister("api", C)  # an explicit DELETE always deregisters
    assert not registry.has("api", C)
    clock.advance(25)  # A (ended at +40, unswept) and D (kept till +65): 2 of 3, kept again
    registry.expire()
    assert metrics.preserved.labels("api")._value.get() == 5
    assert registry.counts("api") == (3, 3)


def test_one_of_four_ending_is_evicted_as_usual(caplog) -> None:
    registry, clock = _registry(ttl=30)
    metrics = GatewayMetrics(registry)
    clock.advance(20)
    for instance_id in (A, B, C):
        registry.renew("api", instance_id)
    clock.advance(15)
    with caplog.at_level(logging.WARNING, logger="registry"):
        assert [i.id for i in registry.expire()] == [D]
    assert caplog.records == []
    assert metrics.evictions.labels("api")._value.get() == 1
    assert metrics.preserved.labels("api")._value.get() == 0


def test_half_is_not_more_than_half_and_a_lone_lease_is_never_kept() -> None:
    registry, clock = _registry(ttl=30)
    clock.advance(20)
    registry.renew("api", A)
    registry.renew("api", B)
    clock.advance(15)
    assert {i.id for i in registry.expire()} == {C, D}  # 2 of 4 is not more than 50%
    lone, clock = _registry(ttl=30, count=1)
    clock.advance(30)
    assert [i.id for i in lone.expire()] == [A]  # fewer than PRESERVE_MIN leased


def test_static_instances_are_not_counted_as_leased() -> None:
    registry, clock = _registry(ttl=30, count=2)
    registry.set_static("api", [("10.0.0.9", port) for port in range(1, 5)])
    clock.advance(30)
    assert registry.expire() == []  # 2 of 2 leased (the 4 static ones never end): kept
    assert registry.counts("api") == (6, 6)


def test_disabled_self_preservation_evicts() -> None:
    registry, clock = _registry(ttl=30)
    registry.self_preservation = 0.0  # registry.self_preservation: off
    clock.advance(30)
    assert len(registry.expire()) == 4
    assert registry.counts("api") == (0, 0)


def test_a_pick_between_sweeps_applies_the_rule() -> None:
    """The pick-time lease check does not evict what a sweep would keep."""
    registry, clock = _registry(ttl=30)
    clock.advance(30)  # every lease ended; no sweep yet
    assert set(_picks(registry, 8)) == {A, B, C, D}  # the pick ran the sweep: all kept
    assert registry.counts("api") == (4, 4)
    registry.self_preservation = 0.0
    clock.advance(30)
    assert registry.pick("api") is None  # off: evicted at the pick as before
    assert registry.counts("api") == (0, 0)


def test_a_heartbeat_between_sweeps_applies_the_rule() -> None:
    registry, clock = _registry(ttl=30)
    clock.advance(31)
    renewed = registry.renew("api", A)  # lease ended, no sweep: the rule keeps all four
    assert renewed.expires_at == clock.now + 30
    assert registry.counts("api") == (4, 4)
    registry.self_preservation = 0.0
    clock.advance(31)
    with pytest.raises(UnknownInstance):  # off: 404, so the client registers again
        registry.renew("api", A)


def test_self_preservation_in_routes_yaml() -> None:
    def share(text: str) -> float:
        return parse_config(f"registry: {{self_preservation: {text}}}\n").registry.self_preservation

    assert parse_config("").registry.self_preservation == SELF_PRESERVATION == 0.0
    assert (share("85%"), share("0%"), share("off"), share("'off'"), share("0.2")) == (
        0.85,
        0.0,
        0.0,
        0.0,
        0.2,
    )
    with pytest.raises(ConfigError) as caught:
        parse_config("registry: {self_preservation: on}\n")
    assert caught.value.errors == [
        "routes.yaml:1: registry.self_preservation: use a percentage like 50% or off, got true"
    ]


# -- through a gateway ---------------------------------------------------------------


async def _routes(gw: RunningGateway) -> list[dict[str, object]]:
    async with gw.session.get(gw.admin_url + "/routes") as response:
        assert response.status == 200
        routes: list[dict[str, object]] = (await response.json())["routes"]
        return routes


def _config(extra: str = "") -> str:
    return f"routes:\n  - prefix: /\n    service: web\nservices:\n  web: {{{extra}}}\n"


async def test_panic_is_in_routes_and_metrics_and_follows_a_reload(tmp_path, upstreams):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(_config("panic_threshold: 50%"))
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await gateway.start()
    gw = RunningGateway(gateway, aiohttp.ClientSession())
    try:
        ups = [await upstreams(name) for name in "abcd"]
        ids = [str((await gw.register("web", up))["id"]) for up in ups]
        [route] = await _routes(gw)
        assert (route["instances"], route["healthy"], route["panic"]) == (4, 4, False)
        text, _ = await _scrape(gw)
        assert _value(text, "gateway_service_panic", service="web") == 0

        for instance_id in ids[1:]:  # as if the health checker lost its network
            gateway.registry.set_health("web", instance_id, "failing")
        [route] = await _routes(gw)
        assert (route["instances"], route["healthy"], route["panic"]) == (4, 1, True)
        text, _ = await _scrape(gw)
        assert _value(text, "gateway_service_panic", service="web") == 1
        for _ in range(8):
            async with gw.session.get(gw.proxy_url + "/x") as response:
                assert response.status == 200
        assert [len(up.requests) for up in ups] == [2, 2, 2, 2]

        config_file.write_text(_config("panic_threshold: 0%"))
        assert await gateway.reload() is True
        [route] = await _routes(gw)
        assert route["panic"] is False
        text, _ = await _scrape(gw)
        assert _value(text, "gateway_service_panic", service="web") == 0
        for _ in range(4):
            async with gw.session.get(gw.proxy_url + "/x") as response:
                assert response.status == 200
        assert [len(up.requests) for up in ups] == [6, 2, 2, 2]  # the healthy one only
    finally:
        await gw.session.close()
        await gateway.stop()


def test_a_kept_lease_survives_a_snapshot(tmp_path) -> None:
    """A kept lease ends a ttl after the sweep, later than last_heartbeat + ttl: the
    snapshot file holds it as it is (saved_at bounds it) and loads it back."""
    registry, clock = _registry(ttl=30, count=2)
    clock.advance(30)
    registry.expire()  # both kept till +60, last heartbeat at +0
    entries = [{f: getattr(i, f) for f in REGISTRATION_FIELDS} for i in registry.instances("api")]
    path = tmp_path / "registry-state.json"
    document = {"version": 1, "saved_at": clock.now, "services": {"api": entries}}
    path.write_text(json.dumps(document))
    restored = Registry(FakeClock(clock.now + 1))
    assert load_snapshot(restored, path) == 2
    assert [i.expires_at for i in restored.instances("api")] == [clock.now + 30] * 2
