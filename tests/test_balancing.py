"""Load-aware balancers and slow start (services.NAME.balancer, .slow_start), on the
registry's pick with a fake clock: a simulation of requests that take each instance's
own time, so in-flight counts and latencies are what real traffic would make them."""

from __future__ import annotations

import asyncio
import heapq
import random
from collections import Counter

import pytest
from aiohttp import web

from gateway.config.loader import parse_config
from gateway.config.model import ConfigError
from registry.core.balancer import (
    LEAST_REQUEST,
    PEAK_EWMA,
    ROUND_ROBIN,
    SLOW_START_FLOOR,
    Balancing,
    PeakEwma,
    ramp,
    two_choices,
)
from registry.core.models import Instance
from registry.core.store import Registry
from tests.fakes import FakeClock

FAST, SLOW = 0.001, 0.050  # seconds a request takes on a fast and on the slow instance


def _registry(balancing: Balancing, ports: tuple[int, ...] = (1, 2, 3)) -> Registry:
    clock = FakeClock()
    registry = Registry(clock, default_ttl=3600)
    registry.rng = random.Random(7)
    registry.set_balancing({"api": balancing})
    for port in ports:
        registry.register("api", {"host": "10.0.0.1", "port": port})
    return registry


def _simulate(registry: Registry, requests: int, every: float, slow: str) -> Counter[str]:
    """``requests`` arriving ``every`` seconds; each takes SLOW on ``slow``, FAST elsewhere
    (its latency is observed as the data plane does, at the response head)."""
    clock = registry.clock
    assert isinstance(clock, FakeClock)
    ending: list[tuple[float, int, Instance, float]] = []  # (end, n, instance, started)
    got: Counter[str] = Counter()

    def finish(until: float) -> None:
        while ending and ending[0][0] <= until:
            end, _, done, started = heapq.heappop(ending)
            clock.now = max(clock.now, end)
            if done.latency is not None:
                done.latency.observe(clock.now - started, clock.now)
            registry.request_finished(done)

    for n in range(requests):
        finish(clock.now)
        instance = registry.pick("api")
        assert instance is not None
        got[instance.id] += 1
        registry.request_started(instance)
        took = SLOW if instance.id == slow else FAST
        heapq.heappush(ending, (clock.now + took, n, instance, clock.now))
        clock.advance(every)
    finish(float("inf"))  # nothing left in flight
    return got


@pytest.mark.parametrize("kind", [LEAST_REQUEST, PEAK_EWMA])
def test_a_slow_instance_gets_fewer_requests_than_round_robin_gives_it(kind):
    slow = "10.0.0.1:2"
    by_round_robin = _simulate(_registry(Balancing(ROUND_ROBIN)), 3000, 0.002, slow)
    by_load = _simulate(_registry(Balancing(kind)), 3000, 0.002, slow)
    assert by_round_robin[slow] == 1000  # round-robin is blind: a third
    assert by_load[slow] < 500, by_load  # half of that at most
    assert sum(by_load.values()) == 3000


def test_least_request_weighs_in_flight_by_weight():
    """weight/(active+1): with nothing in flight, the heavier instance wins each draw."""
    registry = _registry(Balancing(LEAST_REQUEST), ports=(1,))
    registry.register("api", {"host": "10.0.0.1", "port": 2, "weight": 3})
    assert {registry.pick("api").id for _ in range(20)} == {"10.0.0.1:2"}  # type: ignore[union-attr]
    heavy = registry.get("api", "10.0.0.1:2")
    heavy.in_flight = 3  # 3/(3+1) < 1/(0+1): now the light one
    assert registry.pick("api").id == "10.0.0.1:1"  # type: ignore[union-attr]


def test_peak_ewma_counts_a_peak_at_once_and_forgets_it_over_time():
    ewma = PeakEwma()
    ewma.observe(0.010, now=0.0)
    ewma.observe(0.200, now=0.1)  # a peak: taken whole
    assert ewma.cost == pytest.approx(0.200)
    assert ewma.load(0, now=0.1) == pytest.approx(0.200)
    assert ewma.load(0, now=30.1) < 0.200 * 0.05 + 1e-9  # three decay times later: ~5%
    assert ewma.load(2, now=30.1) == pytest.approx(3 * ewma.cost)
    fresh = PeakEwma()
    assert fresh.load(0, now=0.0) == 0.0  # no latency seen, nothing out: cheapest
    assert fresh.load(1, now=0.0) > 1000  # requests out and no answer yet: a penalty


def test_a_once_slow_instance_is_tried_again_after_its_cost_decays():
    registry = _registry(Balancing(PEAK_EWMA))
    now = registry.clock()
    slow = registry.get("api", "10.0.0.1:2")
    slow.latency = PeakEwma()
    slow.latency.observe(5.0, now)  # one terrible answer
    for other in ("10.0.0.1:1", "10.0.0.1:3"):
        latency = registry.get("api", other).latency = PeakEwma()
        latency.observe(0.001, now)
    assert "10.0.0.1:2" not in {registry.pick("api").id for _ in range(50)}  # type: ignore[union-attr]
    now = registry.clock.advance(200.0)  # type: ignore[attr-defined]
    for other in ("10.0.0.1:1", "10.0.0.1:3"):  # the others keep answering fast
        registry.get("api", other).latency.observe(0.001, now)  # type: ignore[union-attr]
    assert "10.0.0.1:2" in {registry.pick("api").id for _ in range(50)}  # type: ignore[union-attr]


def test_two_choices_never_returns_an_excluded_peer_and_covers_the_rest():
    peers = [Instance("api", str(i), "10.0.0.1", i + 1) for i in range(10)]
    rng = random.Random(1)
    for exclude in ({"0"}, {"0", "1", "2", "3", "4", "5"}, {str(i) for i in range(9)}):
        seen = {
            two_choices(peers, exclude, lambda a, b: a.port < b.port, rng).id  # type: ignore[union-attr]
            for _ in range(200)
        }
        assert seen and not seen & exclude
    assert two_choices(peers, {p.id for p in peers}, lambda a, b: True, rng) is None


def test_ramp_is_linear_from_the_floor_to_the_whole_weight():
    assert ramp(since=0.0, now=0.0, window=30.0) == SLOW_START_FLOOR
    assert ramp(since=0.0, now=15.0, window=30.0) == pytest.approx(0.5)
    assert ramp(since=0.0, now=30.0, window=30.0) == 1.0
    assert ramp(since=0.0, now=0.0, window=0.0) == 1.0  # no slow start


def _share(registry: Registry, instance_id: str, picks: int = 1000) -> float:
    """Its share of ``picks`` requests of FAST each, about five in flight at a time."""
    return _simulate(registry, picks, FAST / 5, slow="")[instance_id] / picks


@pytest.mark.parametrize("kind", [ROUND_ROBIN, LEAST_REQUEST])
def test_slow_start_ramps_a_new_instance_up_over_the_window(kind):
    registry = _registry(Balancing(kind, slow_start=30.0), ports=(1,))
    registry.clock.advance(60.0)  # type: ignore[attr-defined]  # the first is long warm
    registry.register("api", {"host": "10.0.0.1", "port": 2})
    new = "10.0.0.1:2"
    at_start = _share(registry, new)
    registry.clock.advance(15.0)  # type: ignore[attr-defined]
    halfway = _share(registry, new)
    registry.clock.advance(15.0)  # type: ignore[attr-defined]
    warm = _share(registry, new)
    assert at_start < 0.15  # 0.1 / 1.1 = 9% by weight
    assert 0.25 < halfway < 0.42  # 0.5 / 1.5 = 33%
    assert warm == pytest.approx(0.5, abs=0.06)


def test_slow_start_applies_again_to_an_instance_back_from_draining():
    registry = _registry(Balancing(ROUND_ROBIN, slow_start=30.0), ports=(1, 2))
    registry.clock.advance(60.0)  # type: ignore[attr-defined]
    assert _share(registry, "10.0.0.1:2") == pytest.approx(0.5)
    registry.update("api", "10.0.0.1:2", {"state": "draining"})
    registry.update("api", "10.0.0.1:2", {"state": "up"})
    assert _share(registry, "10.0.0.1:2") < 0.15
    registry.update("api", "10.0.0.1:1", {"weight": 2})  # a weight change is no return
    registry.clock.advance(30.0)  # type: ignore[attr-defined]
    assert _share(registry, "10.0.0.1:2", 999) == pytest.approx(1 / 3, abs=0.01)


def test_default_balancing_keeps_the_plain_rotation():
    registry = _registry(Balancing())
    assert [registry.pick("api").id for _ in range(6)] == [  # type: ignore[union-attr]
        "10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3", "10.0.0.1:1", "10.0.0.1:2", "10.0.0.1:3"
    ]  # fmt: skip
    assert registry.get("api", "10.0.0.1:1").latency is None  # no balancer state made


def test_the_config_sets_each_services_balancing():
    config = parse_config(
        "services:\n  api: {balancer: peak_ewma, slow_start: 30s}\n  web: {balancer: round_robin}\n"
    )
    assert config.balancings() == {
        "api": Balancing(PEAK_EWMA, 30.0),
        "web": Balancing(),
    }


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("balancer: random", "routes.yaml:3: services.api.balancer: must be one of round_robin, "
         "least_request, peak_ewma, got 'random'"),
        ("balancer: 3", "routes.yaml:3: services.api.balancer: expected a string, got 3"),
        ("slow_start: soon", "routes.yaml:3: services.api.slow_start: invalid duration 'soon': "
         "use e.g. 500ms, 30s, 2m, 1h"),
        ("slow_start: -5s", "routes.yaml:3: services.api.slow_start: invalid duration '-5s': "
         "use e.g. 500ms, 30s, 2m, 1h"),
    ],
)  # fmt: skip
def test_a_bad_balancing_setting_is_refused_with_its_line(setting, error):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"services:\n  api:\n    {setting}\n")
    assert caught.value.errors == [error]


async def _slow_upstream(delay: float) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(text="slow", headers={"X-Upstream": "slow"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.mark.parametrize(
    ("balancer", "most"), [("round_robin", 30), ("least_request", 20), ("peak_ewma", 20)]
)
async def test_through_the_gateway_a_slow_instance_gets_fewer(
    gateway_factory, upstreams, balancer, most
):
    gw = await gateway_factory(
        f"routes:\n  - prefix: /\n    service: api\nservices:\n  api: {{balancer: {balancer}}}\n"
    )
    runner, port = await _slow_upstream(0.05)
    try:
        for name in ("a", "b"):
            await gw.register("api", await upstreams(name))
        body = {"host": "127.0.0.1", "port": port}
        async with gw.session.post(f"{gw.admin_url}/registry/services/api/instances", json=body):
            pass
        gate = asyncio.Semaphore(9)

        async def one() -> str:
            async with gate, gw.session.get(gw.proxy_url + "/x") as response:
                assert response.status == 200
                return response.headers["X-Upstream"]

        got = Counter(await asyncio.gather(*(one() for _ in range(90))))
    finally:
        await runner.cleanup()
    if balancer == "round_robin":
        assert got["slow"] == most  # blind to load: a third
    else:
        assert got["slow"] < most, got
