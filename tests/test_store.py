"""The registry's state: leases, drain, change index, events (SPEC sections 4, 5, 8)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from registry.core.errors import InvalidField, UnknownInstance, UnknownService
from registry.core.models import REGISTRATION_FIELDS
from registry.core.store import Registry
from tests.fakes import FakeClock

Event = tuple[str, str, str]


@pytest.fixture
def events(registry: Registry) -> list[Event]:
    seen: list[Event] = []
    registry.subscribe(lambda event, service, instance: seen.append((event, service, instance.id)))
    return seen


def picked_ids(registry: Registry, service: str, n: int, **kw: Any) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(n):
        instance = registry.pick(service, **kw)
        out.append(instance.id if instance is not None else None)
    return out


def body(host: str = "10.0.0.5", port: int = 9000, **extra: Any) -> dict[str, Any]:
    return {"host": host, "port": port, **extra}


# -- register ---------------------------------------------------------------------


def test_register_new_instance(registry: Registry, clock: FakeClock) -> None:
    instance, created = registry.register("users", body(metadata={"version": "1.4"}))
    assert created is True
    assert (instance.id, instance.host, instance.port) == ("10.0.0.5:9000", "10.0.0.5", 9000)
    assert (instance.scheme, instance.weight, instance.state) == ("http", 1, "up")
    assert instance.health == "healthy"
    assert instance.in_flight == 0
    assert instance.metadata == {"version": "1.4"}
    assert instance.registered_at == clock.now
    assert instance.last_heartbeat == clock.now
    assert registry.instances("users") == [instance]
    assert registry.get("users", "10.0.0.5:9000") is instance


def test_reregister_same_address_updates_in_place(registry: Registry, clock: FakeClock) -> None:
    first, _ = registry.register("users", body(weight=1))
    registry.request_started(first)
    clock.advance(10)
    second, created = registry.register(
        "users", body(weight=3, scheme="https", metadata={"v": "2"}, ttl="60s")
    )
    assert created is False
    assert second is first  # requests in flight hold this object
    assert (second.weight, second.scheme, second.metadata) == (3, "https", {"v": "2"})
    assert second.in_flight == 1
    assert second.expires_at == clock.now + 60
    assert registry.instances("users") == [first]


def test_reregister_with_an_id_moves_the_address_the_data_plane_uses(
    registry: Registry,
) -> None:
    first, _ = registry.register("users", body(id="users-1"))
    assert (first.pool_key, first.host_header) == (("http", "10.0.0.5", 9000), b"10.0.0.5:9000")
    registry.register("users", body(id="users-1", host="::1", port=9100, scheme="https"))
    assert (first.pool_key, first.host_header) == (("https", "::1", 9100), b"[::1]:9100")
    registry.mirror("users", {**{f: getattr(first, f) for f in REGISTRATION_FIELDS}, "port": 9200})
    assert (first.pool_key, first.host_header) == (("https", "::1", 9200), b"[::1]:9200")


def test_reregister_revives_a_draining_instance(registry: Registry) -> None:
    registry.register("users", body())
    registry.update("users", "10.0.0.5:9000", {"state": "draining"})
    instance, created = registry.register("users", body())
    assert created is False
    assert instance.state == "up"
    assert registry.pick("users") is instance


@pytest.mark.parametrize(
    ("host", "port", "expected_id"),
    [
        ("10.0.0.5", 9000, "10.0.0.5:9000"),
        ("::1", 9000, "[::1]:9000"),
        ("2001:db8::7", 443, "[2001:db8::7]:443"),
        ("users.internal", 80, "users.internal:80"),
    ],
)
def test_default_id_is_host_port(
    registry: Registry, host: str, port: int, expected_id: str
) -> None:
    instance, _ = registry.register("users", body(host, port))
    assert instance.id == expected_id
    assert registry.get("users", expected_id) is instance


def test_chosen_id_survives_a_move_to_another_address(registry: Registry) -> None:
    first, created = registry.register("users", body(id="users-1"))
    assert created is True
    assert first.id == "users-1"
    moved, created = registry.register("users", body("10.0.0.6", 9001, id="users-1"))
    assert created is False
    assert moved is first
    assert (moved.host, moved.port) == ("10.0.0.6", 9001)
    assert [i.id for i in registry.instances("users")] == ["users-1"]


def test_two_ports_on_one_host_are_two_instances(registry: Registry) -> None:
    registry.register("users", body(port=9000))
    registry.register("users", body(port=9001))
    assert sorted(i.id for i in registry.instances("users")) == ["10.0.0.5:9000", "10.0.0.5:9001"]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({}, "invalid_host"),
        ({"port": 9000}, "invalid_host"),
        ({"host": "10.0.0.5"}, "invalid_port"),
        (body(port="9000"), "invalid_port"),  # type: ignore[arg-type]
        (body(port=9000.0), "invalid_port"),  # type: ignore[arg-type]
        (body(port=True), "invalid_port"),  # type: ignore[arg-type]
        (body(port=0), "invalid_port"),
        (body(port=65536), "invalid_port"),
        (body(host="0.0.0.0"), "invalid_host"),
        (body(host="::"), "invalid_host"),
        (body(host="http://x"), "invalid_host"),
        (body(host=""), "invalid_host"),
        (body(ttl="0s"), "invalid_ttl"),
        (body(ttl="500ms"), "invalid_ttl"),
        (body(ttl="2h"), "invalid_ttl"),
        (body(ttl="soon"), "invalid_ttl"),
        (body(ttl=None), "invalid_ttl"),
        (body(weight=0), "invalid_weight"),
        (body(weight=101), "invalid_weight"),
        (body(scheme="ftp"), "invalid_scheme"),
        (body(metadata={"v": 1}), "invalid_metadata"),
        (body(id="has space"), "invalid_id"),
        (body(id=""), "invalid_id"),
    ],
)
def test_register_refuses_bad_fields(
    registry: Registry, events: list[Event], payload: dict[str, Any], code: str
) -> None:
    with pytest.raises(InvalidField) as info:
        registry.register("users", payload)
    assert info.value.code == code
    assert registry.index == 0
    assert events == []
    with pytest.raises(UnknownService):
        registry.instances("users")


@pytest.mark.parametrize("name", ["Users", "", "-users", "a" * 64, "us/ers"])
def test_register_refuses_bad_service_names(registry: Registry, name: str) -> None:
    with pytest.raises(InvalidField) as info:
        registry.register(name, body())
    assert info.value.code == "invalid_service"
    assert registry.service_names() == []


# -- leases ------------------------------------------------------------------------


def test_default_ttl_applies_when_none_is_given(clock: FakeClock) -> None:
    registry = Registry(clock, default_ttl=10.0, max_ttl=60.0)
    instance, _ = registry.register("users", body())
    assert instance.ttl == 10.0
    assert instance.expires_at == clock.now + 10.0


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("1s", 1.0), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), (10, 10.0), (2.5, 2.5)],
)
def test_explicit_ttl_sets_the_lease(
    registry: Registry, clock: FakeClock, ttl: object, seconds: float
) -> None:
    instance, _ = registry.register("users", body(ttl=ttl))
    assert instance.ttl == seconds
    assert instance.expires_at == clock.now + seconds


def test_ttl_above_the_configured_max_is_refused(clock: FakeClock) -> None:
    registry = Registry(clock, default_ttl=10.0, max_ttl=60.0)
    assert registry.register("users", body(ttl="60s"))[0].ttl == 60.0
    with pytest.raises(InvalidField) as info:
        registry.register("users", body(ttl="61s"))
    assert info.value.code == "invalid_ttl"


def test_renew_extends_the_lease(registry: Registry, clock: FakeClock) -> None:
    instance, _ = registry.register("users", body(ttl="30s"))
    clock.advance(20)
    renewed = registry.renew("users", instance.id)
    assert renewed is instance
    assert instance.last_heartbeat == clock.now
    assert instance.expires_at == clock.now + 30
    clock.advance(20)  # 40 s after registering: alive only thanks to the heartbeat
    assert registry.pick("users") is instance
    assert registry.instances("users") == [instance]
    clock.advance(10)  # 30 s after the heartbeat
    assert registry.pick("users") is None


@pytest.mark.parametrize("elapsed", [0.0, 0.5, 0.999])
def test_lease_still_routable_before_expiry(
    registry: Registry, clock: FakeClock, events: list[Event], elapsed: float
) -> None:
    instance, _ = registry.register("users", body(ttl="1s"))
    clock.advance(elapsed)
    assert registry.pick("users") is instance
    assert registry.get("users", instance.id) is instance
    assert registry.instances("users") == [instance]
    assert "evicted" not in [event for event, _, _ in events]


@pytest.mark.parametrize("elapsed", [1.0, 1.5, 3600.0])
def test_lease_ends_at_its_expiry_without_a_sweep(
    registry: Registry, clock: FakeClock, events: list[Event], elapsed: float
) -> None:
    instance, _ = registry.register("users", body(ttl="1s"))
    clock.advance(elapsed)
    # no expire() call: traffic stops at that moment, not at the next sweep
    assert registry.pick("users") is None
    assert registry.instances("users") == []
    assert ("evicted", "users", instance.id) in events
    with pytest.raises(UnknownInstance):
        registry.get("users", instance.id)


def test_get_of_an_expired_lease_is_unknown_and_evicts(
    registry: Registry, clock: FakeClock, events: list[Event]
) -> None:
    instance, _ = registry.register("users", body(ttl="1s"))
    clock.advance(1.0)
    with pytest.raises(UnknownInstance):
        registry.get("users", instance.id)
    assert events[-1] == ("evicted", "users", instance.id)


def test_heartbeat_after_expiry_is_unknown_so_the_client_registers_again(
    registry: Registry, clock: FakeClock
) -> None:
    instance, _ = registry.register("users", body(ttl="5s"))
    clock.advance(5)
    with pytest.raises(UnknownInstance):
        registry.renew("users", instance.id)
    again, created = registry.register("users", body(ttl="5s"))
    assert created is True
    assert registry.pick("users") is again


def test_reregister_after_expiry_is_new(
    registry: Registry, clock: FakeClock, events: list[Event]
) -> None:
    instance, _ = registry.register("users", body(ttl="1s"))
    clock.advance(2)
    again, created = registry.register("users", body(ttl="1s"))
    assert created is True
    assert again.registered_at == clock.now
    assert [e for e, _, _ in events] == ["registered", "evicted", "registered"]


def test_expire_removes_every_ended_lease(
    registry: Registry, clock: FakeClock, events: list[Event]
) -> None:
    short, _ = registry.register("users", body(port=9000, ttl="5s"))
    registry.register("users", body(port=9001, ttl="60s"))
    other, _ = registry.register("orders", body(port=9002, ttl="5s"))
    clock.advance(5)
    gone = registry.expire()
    assert {i.id for i in gone} == {short.id, other.id}
    assert [i.id for i in registry.instances("users")] == ["10.0.0.5:9001"]
    assert registry.instances("orders") == []
    assert Counter(e for e, _, _ in events)["evicted"] == 2
    assert registry.expire() == []


def test_next_expiry_is_the_earliest_lease_end(registry: Registry, clock: FakeClock) -> None:
    start = clock.now
    assert registry.next_expiry() is None
    registry.register("users", body(port=9000, ttl="30s"))
    assert registry.next_expiry() == start + 30
    short, _ = registry.register("orders", body(port=9001, ttl="10s"))
    assert registry.next_expiry() == start + 10
    registry.deregister("orders", short.id)
    clock.advance(10)  # the timer wakes for a lease already gone: nothing to do, then the next
    assert registry.expire() == []
    assert registry.next_expiry() == start + 30


def test_a_renewed_lease_is_found_renewed_when_its_old_end_comes(
    registry: Registry, clock: FakeClock
) -> None:
    instance, _ = registry.register("users", body(ttl="10s"))
    clock.advance(4)
    registry.renew("users", instance.id)  # a heartbeat moves nothing in the heap
    clock.advance(6)
    assert registry.expire() == []
    assert registry.next_expiry() == clock.now + 4
    clock.advance(4)
    assert registry.expire() == [instance]


def test_a_shorter_lease_on_reregistration_ends_on_time(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register("users", body(ttl="60s"))
    instance, _ = registry.register("users", body(ttl="5s"))
    assert registry.next_expiry() == clock.now + 5
    clock.advance(5)
    assert registry.expire() == [instance]


def test_counts_follow_every_change_without_a_listing(registry: Registry, clock: FakeClock) -> None:
    for port in range(1, 1001):
        registry.register(f"s{port % 10}", body(port=port, ttl="60s"))
    registry.register("s1", body(port=5000, ttl="5s"))
    registry.update("s1", "10.0.0.5:1", {"state": "draining"})
    registry.set_health("s1", "10.0.0.5:11", "failing")
    registry.set_health("s1", "10.0.0.5:21", "ejected")
    registry.deregister("s1", "10.0.0.5:31")
    assert registry.counts("s1") == (100, 97)
    clock.advance(5)
    assert registry.counts("s1") == (99, 96)  # the ended lease is gone from both
    assert registry.state_counts("s1") == {"up": 96, "draining": 1, "ejected": 1, "failing": 1}
    registry.set_health("s1", "10.0.0.5:11", "healthy")
    assert registry.state_counts("s1")["up"] == 97
    assert len({registry.pick("s1").id for _ in range(97)}) == 97  # type: ignore[union-attr]


# -- deregister --------------------------------------------------------------------


def test_deregister(registry: Registry, events: list[Event]) -> None:
    instance, _ = registry.register("users", body())
    assert registry.deregister("users", instance.id) is instance
    assert registry.instances("users") == []
    assert registry.pick("users") is None
    assert events[-1] == ("deregistered", "users", instance.id)
    with pytest.raises(UnknownInstance):
        registry.deregister("users", instance.id)
    with pytest.raises(UnknownInstance):
        registry.get("users", instance.id)


# -- drain -------------------------------------------------------------------------


def test_draining_instance_gets_no_new_requests_but_in_flight_finish(registry: Registry) -> None:
    a, _ = registry.register("users", body(port=9000))
    b, _ = registry.register("users", body(port=9001))
    registry.request_started(a)
    registry.update("users", a.id, {"state": "draining"})
    assert picked_ids(registry, "users", 10) == [b.id] * 10
    assert a.in_flight == 1
    assert a.state == "draining"
    registry.request_finished(a)
    assert a.in_flight == 0
    # without deregister_when_idle it stays listed, draining
    assert registry.get("users", a.id).state == "draining"
    registry.update("users", a.id, {"state": "up"})
    assert Counter(picked_ids(registry, "users", 10)) == {a.id: 5, b.id: 5}


def test_only_draining_instances_means_no_pick(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.update("users", a.id, {"state": "draining"})
    assert registry.pick("users") is None


def test_drain_when_idle_removes_after_the_last_request(
    registry: Registry, events: list[Event]
) -> None:
    a, _ = registry.register("users", body())
    registry.request_started(a)
    registry.request_started(a)
    registry.update("users", a.id, {"state": "draining", "deregister_when_idle": True})
    assert registry.get("users", a.id) is a
    registry.request_finished(a)
    assert registry.get("users", a.id) is a
    registry.request_finished(a)
    with pytest.raises(UnknownInstance):
        registry.get("users", a.id)
    assert registry.instances("users") == []
    assert events[-1] == ("deregistered", "users", a.id)


def test_drain_when_idle_removes_at_once_if_idle(registry: Registry, events: list[Event]) -> None:
    a, _ = registry.register("users", body())
    registry.update("users", a.id, {"state": "draining", "deregister_when_idle": True})
    with pytest.raises(UnknownInstance):
        registry.get("users", a.id)
    assert registry.instances("users") == []
    assert ("deregistered", "users", a.id) in events


def test_deregister_when_idle_needs_draining(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.update("users", a.id, {"state": "up", "deregister_when_idle": True})
    assert registry.get("users", a.id) is a
    assert registry.pick("users") is a


def test_request_finished_after_deregister_is_harmless(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.request_started(a)
    registry.deregister("users", a.id)
    registry.request_finished(a)
    assert a.in_flight == 0
    assert registry.instances("users") == []


# -- update ------------------------------------------------------------------------


def test_update_weight_and_metadata(registry: Registry, events: list[Event]) -> None:
    a, _ = registry.register("users", body(port=9000))
    b, _ = registry.register("users", body(port=9001))
    updated = registry.update("users", a.id, {"weight": 3, "metadata": {"v": "2"}})
    assert updated is a
    assert (a.weight, a.metadata, a.state) == (3, {"v": "2"}, "up")
    assert events[-1] == ("updated", "users", a.id)
    assert Counter(picked_ids(registry, "users", 40)) == {a.id: 30, b.id: 10}


@pytest.mark.parametrize(
    ("patch", "code"),
    [
        ({"state": "down"}, "invalid_state"),
        ({"state": None}, "invalid_state"),
        ({"weight": 0}, "invalid_weight"),
        ({"state": "draining", "weight": 101}, "invalid_weight"),
        ({"state": "draining", "metadata": {"v": 2}}, "invalid_metadata"),
    ],
)
def test_update_refuses_bad_fields_and_changes_nothing(
    registry: Registry, patch: dict[str, Any], code: str
) -> None:
    a, _ = registry.register("users", body(metadata={"v": "1"}))
    index = registry.index
    with pytest.raises(InvalidField) as info:
        registry.update("users", a.id, patch)
    assert info.value.code == code
    assert (a.state, a.weight, a.metadata) == ("up", 1, {"v": "1"})
    assert registry.index == index


# -- unknown names -------------------------------------------------------------------


def test_unknown_service_and_instance(registry: Registry) -> None:
    registry.register("users", body())
    with pytest.raises(UnknownService) as service_error:
        registry.instances("nope")
    assert service_error.value.code == "unknown_service"
    with pytest.raises(UnknownService):
        registry.service_index("nope")
    for call in (
        lambda: registry.get("users", "10.9.9.9:1"),
        lambda: registry.get("nope", "10.0.0.5:9000"),
        lambda: registry.renew("users", "missing"),
        lambda: registry.renew("nope", "missing"),
        lambda: registry.update("users", "missing", {"state": "draining"}),
        lambda: registry.update("nope", "missing", {"state": "draining"}),
        lambda: registry.deregister("users", "missing"),
        lambda: registry.deregister("nope", "missing"),
    ):
        with pytest.raises(UnknownInstance) as instance_error:
            call()
        assert instance_error.value.code == "unknown_instance"
    assert registry.pick("nope") is None


def test_declare_makes_a_service_known_with_no_instances(registry: Registry) -> None:
    registry.declare("web")
    assert registry.instances("web") == []
    assert "web" in registry.service_names()
    assert registry.service_index("web") == 0
    assert registry.pick("web") is None


def test_a_service_that_had_an_instance_stays_known(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.deregister("users", a.id)
    assert registry.instances("users") == []
    assert registry.service_names() == ["users"]


def test_service_names_are_sorted(registry: Registry) -> None:
    registry.register("users", body())
    registry.declare("api")
    registry.register("orders", body())
    assert registry.service_names() == ["api", "orders", "users"]


# -- static instances ------------------------------------------------------------------


def test_static_instances_never_expire(registry: Registry, clock: FakeClock) -> None:
    registry.set_static("web", [("127.0.0.1", 9001), ("::1", 9002)])
    ids = sorted(i.id for i in registry.instances("web"))
    assert ids == ["127.0.0.1:9001", "[::1]:9002"]
    clock.advance(10 * 365 * 24 * 3600)
    assert registry.expire() == []
    assert sorted(i.id for i in registry.instances("web")) == ids
    assert registry.pick("web") is not None
    assert registry.next_expiry() is None


def test_static_instance_heartbeat_keeps_it_static(registry: Registry, clock: FakeClock) -> None:
    registry.set_static("web", [("127.0.0.1", 9001)])
    instance = registry.renew("web", "127.0.0.1:9001")
    assert instance.expires_at is None
    clock.advance(10_000)
    assert registry.pick("web") is instance


@pytest.mark.parametrize("order", ["static-first", "registered-first"])
def test_a_static_address_outlives_a_lease_on_the_same_address(
    registry: Registry, clock: FakeClock, order: str
) -> None:
    # routes.yaml: "static instances: never expire"; a sidecar registering the same
    # host:port with a short lease must not make the configured instance vanish.
    if order == "static-first":
        registry.set_static("web", [("127.0.0.1", 9001)])
        registry.register("web", body("127.0.0.1", 9001, ttl="1s"))
    else:
        registry.register("web", body("127.0.0.1", 9001, ttl="1s"))
        registry.set_static("web", [("127.0.0.1", 9001)])
    clock.advance(2)
    assert [i.id for i in registry.instances("web")] == ["127.0.0.1:9001"]
    assert registry.pick("web") is not None


def test_set_static_replaces_the_previous_list(registry: Registry, events: list[Event]) -> None:
    registry.set_static("web", [("127.0.0.1", 9001), ("127.0.0.1", 9002)])
    kept = registry.get("web", "127.0.0.1:9002")
    dynamic, _ = registry.register("web", body("10.0.0.9", 9000))
    events.clear()
    registry.set_static("web", [("127.0.0.1", 9002), ("127.0.0.1", 9003)])
    ids = sorted(i.id for i in registry.instances("web"))
    assert ids == ["10.0.0.9:9000", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert registry.get("web", "127.0.0.1:9002") is kept
    assert registry.get("web", dynamic.id) is dynamic
    assert sorted(events) == [
        ("deregistered", "web", "127.0.0.1:9001"),
        ("registered", "web", "127.0.0.1:9003"),
    ]


# -- change index ---------------------------------------------------------------------


def test_index_counts_every_change_and_services_keep_their_last(
    registry: Registry, clock: FakeClock
) -> None:
    assert registry.index == 0
    registry.declare("web")
    assert registry.index == 0
    assert registry.service_index("web") == 0  # never changed

    users, _ = registry.register("users", body(port=9000))
    assert (registry.index, registry.service_index("users")) == (1, 1)

    orders, _ = registry.register("orders", body(port=9001, ttl="5s"))
    assert (registry.index, registry.service_index("orders")) == (2, 2)
    assert registry.service_index("users") == 1

    registry.renew("users", users.id)  # heartbeats are not changes
    clock.advance(1)
    registry.renew("users", users.id)
    assert registry.index == 2
    assert registry.service_index("users") == 1

    registry.register("users", body(port=9000))  # re-registering is a change
    assert (registry.index, registry.service_index("users")) == (3, 3)

    registry.update("users", users.id, {"weight": 2})
    assert (registry.index, registry.service_index("users")) == (4, 4)

    clock.advance(5)  # orders' lease ends
    registry.expire()
    assert (registry.index, registry.service_index("orders")) == (5, 5)
    assert registry.service_index("users") == 4

    registry.deregister("users", users.id)
    assert (registry.index, registry.service_index("users")) == (6, 6)

    registry.set_static("web", [("127.0.0.1", 9001)])
    assert (registry.index, registry.service_index("web")) == (7, 7)
    assert registry.service_index("users") == 6
    assert registry.service_index("orders") == 5


@pytest.mark.parametrize(
    ("index", "waits"),
    [
        (0, False),  # no index yet: the current list
        (1, False),  # below users' index (2): it changed since
        (2, True),  # users' own index: wait for its next change
        (3, True),  # above users' index, not above the registry's (3): nothing new for users
        (4, False),  # ahead of the registry (from before a restart): the current list
        (10**9, False),
    ],
)
def test_long_poll_waits_only_for_an_index_the_registry_has_reached(
    registry: Registry, index: int, waits: bool
) -> None:
    registry.register("orders", body(port=9001))
    registry.register("users", body(port=9000))
    registry.register("orders", body(port=9002))
    assert (registry.service_index("users"), registry.index) == (2, 3)
    assert registry.poll_waits("users", index) is waits


def test_drain_and_remove_raise_the_index(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.request_started(a)
    registry.update("users", a.id, {"state": "draining", "deregister_when_idle": True})
    before = registry.service_index("users")
    registry.request_finished(a)
    assert registry.service_index("users") > before
    assert registry.index == registry.service_index("users")


def test_failed_calls_do_not_raise_the_index(registry: Registry) -> None:
    registry.register("users", body())
    index = registry.index
    with pytest.raises(UnknownInstance):
        registry.deregister("users", "missing")
    with pytest.raises(InvalidField):
        registry.register("users", body(port=0))
    assert registry.index == index


# -- events ------------------------------------------------------------------------


def test_events_reach_every_subscriber(registry: Registry, clock: FakeClock) -> None:
    first: list[Event] = []
    second: list[Event] = []
    registry.subscribe(lambda e, s, i: first.append((e, s, i.id)))
    registry.subscribe(lambda e, s, i: second.append((e, s, i.id)))
    a, _ = registry.register("users", body(port=9000))
    registry.renew("users", a.id)
    registry.register("users", body(port=9000))
    registry.update("users", a.id, {"state": "draining"})
    registry.deregister("users", a.id)
    b, _ = registry.register("users", body(port=9001, ttl="1s"))
    clock.advance(1)
    registry.expire()
    expected = [
        ("registered", "users", a.id),
        ("heartbeat", "users", a.id),
        ("registered", "users", a.id),
        ("updated", "users", a.id),
        ("deregistered", "users", a.id),
        ("registered", "users", b.id),
        ("evicted", "users", b.id),
    ]
    assert first == expected
    assert second == expected


# -- the request path -------------------------------------------------------------------


def test_pick_rotates_over_instances(registry: Registry) -> None:
    instances = [registry.register("users", body(port=p))[0] for p in (9000, 9001, 9002)]
    picked = picked_ids(registry, "users", 30)
    assert Counter(picked) == {instance.id: 10 for instance in instances}


def test_pick_follows_weights_and_exclude(registry: Registry) -> None:
    a, _ = registry.register("users", body(port=9000, weight=5))
    b, _ = registry.register("users", body(port=9001))
    c, _ = registry.register("users", body(port=9002))
    assert picked_ids(registry, "users", 7) == [a.id, a.id, a.id, b.id, c.id, a.id, a.id]
    assert set(picked_ids(registry, "users", 5, exclude={a.id, b.id})) == {c.id}
    assert registry.pick("users", exclude={a.id, b.id, c.id}) is None


def test_unhealthy_instances_are_not_picked(registry: Registry) -> None:
    a, _ = registry.register("users", body(port=9000))
    b, _ = registry.register("users", body(port=9001))
    registry.set_health("users", a.id, "ejected")
    assert set(picked_ids(registry, "users", 6)) == {b.id}
    registry.set_health("users", b.id, "failing")
    assert registry.pick("users") is not None  # no healthy one: panic (tests/test_failstatic.py)
    registry.set_panic_thresholds({"users": 0.0})
    assert registry.pick("users") is None
    registry.set_health("users", a.id, "healthy")
    assert set(picked_ids(registry, "users", 3)) == {a.id}


def test_in_flight_counts(registry: Registry) -> None:
    a, _ = registry.register("users", body())
    registry.request_started(a)
    registry.request_started(a)
    registry.request_finished(a)
    assert a.in_flight == 1
    assert registry.get("users", a.id).to_dict()["in_flight"] == 1


def test_drain_waits_for_requests_in_other_processes(registry: Registry) -> None:
    a, _ = registry.register("users", body(port=9000))
    registry.set_remote_in_flight({("users", a.id): 2})  # a worker has two on it
    assert a.to_dict()["in_flight"] == 2
    registry.update("users", a.id, {"state": "draining", "deregister_when_idle": True})
    assert registry.instances("users") == [a]  # still busy elsewhere
    registry.set_remote_in_flight({})  # the worker reports it idle
    assert registry.instances("users") == []
