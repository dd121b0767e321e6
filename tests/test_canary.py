"""Canary split by instance metadata: the registry's pick_matching, the split's choice of
subset, the config, and a real gateway (issue 12 item 3)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.describe import describe_routes
from gateway.config.loader import load_config, parse_config
from gateway.config.model import ConfigError, SplitConfig
from gateway.dataplane.split import Split
from registry.core.balancer import LEAST_REQUEST, ROUND_ROBIN, Balancing
from registry.core.store import Registry, selector
from tests.conftest import RunningGateway, Upstream
from tests.fakes import FakeClock

V1 = selector({"version": "1"})
V2 = selector({"version": "2"})


def add(
    registry: Registry, port: int, weight: int = 1, ttl: str | None = None, **metadata: str
) -> str:
    body: dict[str, Any] = {
        "host": "10.0.0.5",
        "port": port,
        "weight": weight,
        "metadata": metadata,
    }
    if ttl is not None:
        body["ttl"] = ttl
    return registry.register("users", body)[0].id


def picks(registry: Registry, wanted: Any, n: int, **kw: Any) -> list[str | None]:
    out: list[str | None] = []
    for _ in range(n):
        instance = registry.pick_matching("users", wanted, **kw)
        out.append(instance.id if instance is not None else None)
    return out


# -- Registry.pick_matching -------------------------------------------------------------


def test_pick_matching_rotates_over_the_matching_instances(registry: Registry) -> None:
    a = add(registry, 9001, version="1")
    b = add(registry, 9002, version="2", zone="x")
    c = add(registry, 9003, version="2")
    assert picks(registry, V2, 4) == [b, c, b, c]
    assert picks(registry, V1, 2) == [a, a]
    assert picks(registry, selector({"version": "2", "zone": "x"}), 2) == [b, b]
    assert picks(registry, selector({"version": "3"}), 1) == [None]
    assert picks(registry, (), 3) == [a, b, c]  # the empty selector matches all
    assert registry.pick_matching("nobody", V1) is None


def test_pick_matching_follows_weights_and_exclude(registry: Registry) -> None:
    a = add(registry, 9001, weight=3, version="2")
    b = add(registry, 9002, weight=1, version="2")
    add(registry, 9003, weight=5, version="1")
    assert Counter(picks(registry, V2, 8)) == {a: 6, b: 2}
    assert picks(registry, V2, 2, exclude={a}) == [b, b]
    assert picks(registry, V2, 1, exclude={a, b}) == [None]


def test_pick_matching_uses_the_services_balancer_within_the_subset(
    registry: Registry,
) -> None:
    registry.set_balancing({"users": Balancing(LEAST_REQUEST)})
    busy = registry.get("users", add(registry, 9001, version="2"))
    idle = add(registry, 9002, version="2")
    add(registry, 9003, version="1")  # idle too, but not of the subset
    for _ in range(5):
        registry.request_started(busy)
    assert picks(registry, V2, 20) == [idle] * 20  # two choices of two: the less loaded
    registry.set_balancing({})  # back to round-robin: the subset's rotation again
    assert Counter(picks(registry, V2, 4)) == {busy.id: 2, idle: 2}


def test_pick_matching_ramps_a_new_subset_member_by_slow_start(
    registry: Registry, clock: FakeClock
) -> None:
    registry.set_balancing({"users": Balancing(ROUND_ROBIN, slow_start=30.0)})
    warm = add(registry, 9001, ttl="1h", version="2")  # outlasts the clock's moves
    clock.advance(60.0)
    new = add(registry, 9002, ttl="1h", version="2")
    at_start = Counter(picks(registry, V2, 110))
    assert at_start[new] == 10 and at_start[warm] == 100  # weight 0.1 against 1
    clock.advance(30.0)
    warmed = Counter(picks(registry, V2, 100))
    assert warmed == {warm: 50, new: 50}


def test_pick_matching_skips_unroutable_and_expired(registry: Registry, clock: FakeClock) -> None:
    a = add(registry, 9001, version="2")
    b = add(registry, 9002, version="2")
    registry.update("users", a, {"state": "draining"})
    assert picks(registry, V2, 2) == [b, b]
    registry.set_health("users", b, "ejected")
    assert picks(registry, V2, 1) == [None]
    registry.update("users", a, {"state": "up"})
    assert picks(registry, V2, 1) == [a]
    clock.advance(31)  # both leases end: the pick sees it, no sweep needed
    assert picks(registry, V2, 1) == [None]
    assert not registry.has("users", a)


def test_a_metadata_patch_alone_moves_an_instance_at_once(registry: Registry) -> None:
    a = add(registry, 9001, version="1")
    b = add(registry, 9002, version="2")
    assert picks(registry, V2, 2) == [b, b]  # cached now
    registry.update("users", a, {"metadata": {"version": "2"}})  # state and weight unchanged
    assert sorted(picks(registry, V2, 2)) == sorted([a, b])
    assert picks(registry, V1, 1) == [None]
    registry.register("users", {"host": "10.0.0.5", "port": 9002, "metadata": {"version": "1"}})
    assert picks(registry, V1, 2) == [b, b]  # a re-registration with new metadata too
    assert picks(registry, V2, 2) == [a, a]


def test_pick_matching_follows_mirrored_changes(registry: Registry) -> None:
    a = add(registry, 9001, version="1")
    assert picks(registry, V2, 1) == [None]
    registry.mirror("users", {"id": a, "metadata": {"version": "2"}})
    assert picks(registry, V2, 1) == [a]


def test_pick_matching_needs_no_pass_while_nothing_changes(registry: Registry) -> None:
    for port in range(9001, 9101):
        add(registry, port, version="2" if port % 10 == 0 else "1")
    picks(registry, V2, 1)
    cached = registry._matching[("users", V2)]
    assert len(cached.members) == 10
    picks(registry, V2, 50)
    assert registry._matching[("users", V2)] is cached  # the same list, no rebuild
    registry.renew("users", "10.0.0.5:9001")  # a heartbeat is no change
    picks(registry, V2, 1)
    assert registry._matching[("users", V2)] is cached


# -- Split: the choice of subset -------------------------------------------------------


def split_of(*weights: int, header: str = "X-Canary") -> Split:
    return Split([SplitConfig((("version", str(i)),), w) for i, w in enumerate(weights)], header)


def chosen(split: Split, n: int, override: bytes | None = None) -> Counter[int | None]:
    return Counter(
        subset.index if (subset := split.choose(override)) is not None else None for _ in range(n)
    )


def test_weights_are_exact_in_every_cycle() -> None:
    split = split_of(10, 90)
    assert chosen(split, 100) == {0: 10, 1: 90}
    assert chosen(split, 100) == {0: 10, 1: 90}
    assert chosen(split_of(10, 90), 10) == {0: 1, 1: 9}  # spread out, not ten in a row


@pytest.mark.parametrize("value", [b"always", b"ALWAYS", b"Always"])
def test_always_is_the_canary_even_at_weight_0(value: bytes) -> None:
    assert chosen(split_of(0, 50, 50), 10, value) == {0: 10}


def test_never_is_the_others_by_their_weights() -> None:
    assert chosen(split_of(50, 30, 10), 40, b"never") == {1: 30, 2: 10}
    assert chosen(split_of(50, 0, 0), 4, b"never") == {1: 2, 2: 2}  # all 0: alike
    assert chosen(split_of(100), 2, b"never") == {None: 2}  # no other: any instance


@pytest.mark.parametrize("value", [None, b"", b"yes", b"1", b"sometimes"])
def test_any_other_value_goes_by_weights(value: bytes | None) -> None:
    assert chosen(split_of(1, 3), 8, value) == {0: 2, 1: 6}


def test_split_header_is_matched_in_lower_case() -> None:
    assert split_of(1, 1, header="X-Beta-User").header == b"x-beta-user"


# -- the config ------------------------------------------------------------------------

ROUTE = "routes:\n  - prefix: /\n    service: web\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.errors


def test_split_config_is_read_in_order_with_sorted_metadata() -> None:
    config = parse_config(
        ROUTE
        + '    split:\n      - {metadata: {version: "2", zone: a}, weight: 10}\n'
        + '      - {metadata: {version: "1"}, weight: 90}\n'
        + "    split_header: X-Beta\n"
    )
    route = config.routes[0]
    assert route.split == (
        SplitConfig((("version", "2"), ("zone", "a")), 10, 5),
        SplitConfig((("version", "1"),), 90, 6),
    )
    assert route.split_header == "X-Beta"
    assert route.split[0].label == "version=2,zone=a"
    assert parse_config(ROUTE).routes[0].split == ()
    assert parse_config(ROUTE).routes[0].split_header == "X-Canary"


@pytest.mark.parametrize(
    ("tail", "error"),
    [
        (
            "    split: [{metadata: {version: 2}, weight: 10}]\n",
            "routes.yaml:4: routes[0].split[0].metadata.version: expected a string (quote"
            ' numbers: "2"), got 2',
        ),
        (
            "    split: [{metadata: {}, weight: 10}]\n",
            "routes.yaml:4: routes[0].split[0].metadata: name at least one key, like"
            ' {version: "2"}',
        ),
        (
            '    split: [{metadata: {v: "1"}, weight: 101}]\n',
            "routes.yaml:4: routes[0].split[0].weight: must be an integer in 0..100, got 101",
        ),
        (
            '    split: [{metadata: {v: "1"}, weight: -1}]\n',
            "routes.yaml:4: routes[0].split[0].weight: must be an integer in 0..100, got -1",
        ),
        (
            '    split: [{metadata: {v: "1"}, weight: 1.5}]\n',
            "routes.yaml:4: routes[0].split[0].weight: expected an integer 0..100, got 1.5",
        ),
        (
            '    split:\n      - {metadata: {v: "1"}}\n',
            "routes.yaml:5: routes[0].split[0]: missing key 'weight'",
        ),
        (
            "    split:\n      - {weight: 1}\n",
            "routes.yaml:5: routes[0].split[0]: missing key 'metadata'",
        ),
        (
            '    split:\n      - {metadata: {v: "1"}, weight: 1, version: "2"}\n',
            "routes.yaml:5: routes[0].split[0]: unknown key 'version' (known keys: metadata,"
            " weight)",
        ),
        (
            '    split:\n      - {metadata: {v: "1"}, weight: 0}\n'
            '      - {metadata: {v: "2"}, weight: 0}\n',
            "routes.yaml:5: routes[0].split: every weight is 0: give at least one subset a"
            " weight above 0",
        ),
        (
            '    split:\n      - {metadata: {v: "1", w: "2"}, weight: 1}\n'
            '      - {metadata: {w: "2", v: "1"}, weight: 2}\n',
            "routes.yaml:6: routes[0].split[1].metadata: duplicate subset (first on line 5)",
        ),
        (
            "    split: []\n",
            "routes.yaml:4: routes[0].split: list at least one subset, like {metadata: {version:"
            ' "2"}, weight: 10}',
        ),
        (
            '    split: {metadata: {v: "1"}, weight: 1}\n',
            "routes.yaml:4: routes[0].split: expected a list, got a mapping",
        ),
        (
            "    split_header: X-Beta\n",
            "routes.yaml:4: routes[0].split_header: is for split (set split: too)",
        ),
        (
            '    split: [{metadata: {v: "1"}, weight: 1}]\n    split_header: "X Beta"\n',
            "routes.yaml:5: routes[0].split_header: not a header name: 'X Beta'",
        ),
    ],
)
def test_split_config_errors_name_the_line(tail: str, error: str) -> None:
    assert errors_of(ROUTE + tail) == [error]


# -- a real gateway --------------------------------------------------------------------

Factory = Callable[..., Awaitable[RunningGateway]]
Starter = Callable[[str], Awaitable[Upstream]]
SPLIT = """
routes:
  - prefix: /
    service: web
    split:
      - {metadata: {version: "2"}, weight: %d}
      - {metadata: {version: "1"}, weight: %d}
"""


async def served(gw: RunningGateway, n: int, **headers: str) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(n):
        async with gw.session.get(f"{gw.proxy_url}/x", headers=headers) as response:
            assert response.status == 200
            seen[response.headers["X-Upstream"]] += 1
    return seen


async def canary_gateway(factory: Factory, upstreams: Starter, text: str) -> RunningGateway:
    """A gateway with instances canary-a, canary-b (version 2) and stable (version 1)."""
    gw = await factory(text)
    for name, version in (("canary-a", "2"), ("canary-b", "2"), ("stable", "1")):
        await gw.register("web", await upstreams(name), metadata={"version": version})
    return gw


async def test_weights_split_requests_exactly(gateway_factory: Factory, upstreams: Starter) -> None:
    gw = await canary_gateway(gateway_factory, upstreams, SPLIT % (10, 90))
    seen = await served(gw, 100)
    assert seen == {"canary-a": 5, "canary-b": 5, "stable": 90}


async def test_header_override(gateway_factory: Factory, upstreams: Starter) -> None:
    gw = await canary_gateway(gateway_factory, upstreams, SPLIT % (10, 90))
    assert await served(gw, 6, **{"X-Canary": "always"}) == {"canary-a": 3, "canary-b": 3}
    assert await served(gw, 6, **{"x-canary": "NEVER"}) == {"stable": 6}
    # any other value: by weights (the schedule went on where it was)
    assert sum((await served(gw, 100, **{"X-Canary": "maybe"})).values()) == 100


async def test_a_configured_split_header(gateway_factory: Factory, upstreams: Starter) -> None:
    text = SPLIT % (0, 100) + "    split_header: X-Beta-User\n"
    gw = await canary_gateway(gateway_factory, upstreams, text)
    assert await served(gw, 4) == {"stable": 4}  # weight 0: a dark launch
    assert await served(gw, 4, **{"X-Beta-User": "always"}) == {"canary-a": 2, "canary-b": 2}
    assert await served(gw, 4, **{"X-Canary": "always"}) == {"stable": 4}  # not this route's


async def test_an_empty_subset_falls_back_to_any_instance(
    gateway_factory: Factory, upstreams: Starter
) -> None:
    gw = await gateway_factory(SPLIT % (50, 50))
    await gw.register("web", await upstreams("stable"), metadata={"version": "1"})
    assert await served(gw, 10) == {"stable": 10}
    assert await served(gw, 3, **{"X-Canary": "always"}) == {"stable": 3}


async def test_a_retry_stays_in_the_subset_then_falls_back(
    gateway_factory: Factory, upstreams: Starter
) -> None:
    gw = await gateway_factory(SPLIT % (50, 50))
    dead = await upstreams("dead")
    await gw.register("web", dead, metadata={"version": "2"}, id="dead")
    await dead.stop()  # its connects fail: each is retried
    canary = await gw.register("web", await upstreams("canary"), metadata={"version": "2"})
    await gw.register("web", await upstreams("stable"), metadata={"version": "1"})
    # dead and canary take turns; dead's requests go again to canary, not to stable
    assert await served(gw, 4, **{"X-Canary": "always"}) == {"canary": 4}
    url = f"{gw.admin_url}/registry/services/web/instances/{canary['id']}"
    async with gw.session.delete(url) as response:
        assert response.status == 204
    # the subset has only dead left: after it, any instance of the service
    assert await served(gw, 4, **{"X-Canary": "always"}) == {"stable": 4}


async def test_a_metadata_patch_moves_an_instance_at_once(
    gateway_factory: Factory, upstreams: Starter
) -> None:
    gw = await canary_gateway(gateway_factory, upstreams, SPLIT % (10, 90))
    assert await served(gw, 2, **{"X-Canary": "never"}) == {"stable": 2}
    instance = await gw.register("web", await upstreams("promoted"), metadata={"version": "2"})
    url = f"{gw.admin_url}/registry/services/web/instances/{instance['id']}"
    async with gw.session.patch(url, json={"metadata": {"version": "1"}}) as response:
        assert response.status == 200
    assert await served(gw, 4, **{"X-Canary": "never"}) == {"stable": 2, "promoted": 2}
    assert await served(gw, 4, **{"X-Canary": "always"}) == {"canary-a": 2, "canary-b": 2}


async def test_a_reload_applies_new_weights_to_the_next_request(
    tmp_path: Path, upstreams: Starter
) -> None:
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(SPLIT % (0, 100))
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await gateway.start()
    session = aiohttp.ClientSession()
    gw = RunningGateway(gateway, session)
    try:
        for name, version in (("canary", "2"), ("stable", "1")):
            await gw.register("web", await upstreams(name), metadata={"version": version})
        assert await served(gw, 5) == {"stable": 5}
        config_file.write_text(SPLIT % (100, 0))
        assert await gateway.reload() is True
        assert await served(gw, 5) == {"canary": 5}
        config_file.write_text(SPLIT % (1, 1))
        assert await gateway.reload() is True
        assert await served(gw, 4) == {"canary": 2, "stable": 2}
        async with session.get(f"{gw.admin_url}/routes") as response:
            listed = (await response.json())["routes"][0]
        assert listed["split"] == [
            {"metadata": {"version": "2"}, "weight": 1},
            {"metadata": {"version": "1"}, "weight": 1},
        ]
        assert listed["split_header"] == "X-Canary"
    finally:
        await session.close()
        await gateway.stop()


async def test_a_route_without_split_ignores_metadata_and_header(
    gateway_factory: Factory, upstreams: Starter
) -> None:
    gw = await canary_gateway(gateway_factory, upstreams, ROUTE)
    seen = await served(gw, 6, **{"X-Canary": "always"})
    assert seen == {"canary-a": 2, "canary-b": 2, "stable": 2}
    async with gw.session.get(f"{gw.admin_url}/routes") as response:
        assert "split" not in (await response.json())["routes"][0]


def test_gateway_check_shows_the_split() -> None:
    text = SPLIT % (10, 90) + "    split_header: X-Beta\n"
    assert describe_routes(parse_config(text)) == [
        "*  /  -> web  split=version=2:10,version=1:90,header=X-Beta"
    ]
