"""Registrations survive a restart; active health checks take failing instances out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from gateway.config.loader import load_config
from gateway.control.health import Verdicts


async def test_registrations_survive_a_restart_with_their_absolute_expiry(tmp_path: Path):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(
        "registry:\n  snapshot: state/registry.json\nroutes:\n  - prefix: /\n    service: web\n"
    )
    first = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await first.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{first.admin_port}/registry/services/web/instances"
            body = {"host": "127.0.0.1", "port": 9, "ttl": "1h", "metadata": {"v": "2"}}
            async with session.post(url, json=body) as response:
                registered = await response.json()
    finally:
        await first.stop()  # flushes the snapshot
    assert (tmp_path / "state" / "registry.json").is_file()
    second = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await second.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{second.admin_port}/registry/services/web"
            async with session.get(url) as response:
                [instance] = (await response.json())["instances"]
    finally:
        await second.stop()
    assert instance["id"] == registered["id"]
    assert instance["expires_at"] == registered["expires_at"]
    assert instance["metadata"] == {"v": "2"}


def test_verdicts_need_runs_of_results():
    verdicts = Verdicts(healthy=2, unhealthy=3)
    assert [verdicts.record(ok) for ok in (False, False, True, False, False)] == [None] * 5
    assert verdicts.record(False) is True  # three failures in a row
    assert verdicts.record(True) is None  # one success is not enough
    assert verdicts.record(True) is False  # two are


async def test_failing_health_check_takes_an_instance_out_and_back(gateway_factory, upstreams):
    gw = await gateway_factory(
        "routes:\n  - prefix: /\n    service: web\nservices:\n  web:\n"
        "    health_check: {path: /health, interval: 50ms, timeout: 1s, healthy: 2, unhealthy: 2}\n"
    )
    sick = {"now": False}

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=503 if sick["now"] else 200)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="a")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/{tail:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    other = await upstreams("b")
    try:
        port = runner.addresses[0][1]
        url = f"{gw.admin_url}/registry/services/web/instances"
        async with gw.session.post(url, json={"host": "127.0.0.1", "port": port}):
            pass
        await gw.register("web", other)

        async def health_of(instance_port: int) -> str:
            async with gw.session.get(f"{gw.admin_url}/registry/services/web") as response:
                instances = (await response.json())["instances"]
            return next(i["health"] for i in instances if i["port"] == instance_port)

        async def until(expected: str) -> None:
            for _ in range(200):
                if await health_of(port) == expected:
                    return
                await asyncio.sleep(0.02)
            raise AssertionError(f"never {expected}")

        sick["now"] = True
        await until("failing")
        for _ in range(6):
            async with gw.session.get(gw.proxy_url + "/x") as response:
                assert response.headers.get("X-Upstream") == "b"  # never the failing one
        async with gw.session.get(gw.admin_url + "/metrics") as response:
            assert 'gateway_registry_instances{service="web",state="failing"} 1.0' in (
                await response.text()
            )
        sick["now"] = False
        await until("healthy")
    finally:
        await runner.cleanup()


class Later:
    """Collects call_later requests instead of running them."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def __call__(self, delay: float, callback: object) -> None:
        self.calls.append((delay, callback))


def _registry_with(count: int):
    from registry.core.store import Registry
    from tests.fakes import FakeClock

    registry = Registry(FakeClock())
    instances = [
        registry.register("web", {"host": "10.0.0.1", "port": 9000 + i})[0] for i in range(count)
    ]
    return registry, instances


def test_consecutive_failures_eject_with_doubling_back_off_and_a_cap():
    from gateway.config.model import OutlierConfig
    from gateway.dataplane.outliers import Outliers

    registry, (a, b, c, d) = _registry_with(4)
    later = Later()
    outliers = Outliers(registry, {"web": OutlierConfig(consecutive_failures=3)}, later)
    for _ in range(2):
        outliers.failed(a)
    outliers.succeeded(a)  # a success resets the count
    for _ in range(2):
        outliers.failed(a)
    assert a.health == "healthy"
    outliers.failed(a)
    assert a.health == "ejected" and later.calls[-1][0] == 30.0
    now = registry.clock()  # why and until when, for the status page
    assert (a.health_reason, a.health_until) == (
        "3 connect failures or timeouts in a row",
        now + 30,
    )
    for _ in range(3):
        outliers.failed(b)
    assert b.health == "ejected"
    for _ in range(3):
        outliers.failed(c)
    assert c.health == "healthy"  # at most half of the 4 at once
    later.calls[0][1]()  # a's ejection ends
    assert a.health == "healthy"
    for _ in range(3):
        outliers.failed(a)
    assert a.health == "ejected" and later.calls[-1][0] == 60.0  # doubled
    assert a.health_reason == "3 connect failures or timeouts in a row, ejected 2 times"
    assert registry.pick("web", ()).id in {c.id, d.id}


def test_a_lone_instance_is_never_ejected_and_5xx_count_only_when_configured():
    from gateway.config.model import OutlierConfig
    from gateway.dataplane.outliers import Outliers

    registry, (lone,) = _registry_with(1)
    outliers = Outliers(registry, {}, Later())
    for _ in range(10):
        outliers.failed(lone)
    assert lone.health == "healthy"
    registry, (a, b) = _registry_with(2)
    outliers = Outliers(registry, {}, Later())
    for _ in range(10):
        outliers.failed(a, server_error=True)
    assert a.health == "healthy"  # 5xx do not count by default
    outliers = Outliers(registry, {"web": OutlierConfig(consecutive_5xx=2)}, Later())
    outliers.failed(a, server_error=True)
    outliers.failed(a, server_error=True)
    assert a.health == "ejected"


async def test_a_dead_instance_is_ejected_and_no_request_fails(gateway_factory, upstreams):
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    alive, dead = await upstreams("alive"), await upstreams("dead")
    await gw.register("web", alive)
    await gw.register("web", dead)
    await dead.stop()  # killed without deregistering
    for _ in range(12):
        async with gw.session.get(gw.proxy_url + "/x") as response:
            assert response.status == 200  # the connect failure is retried elsewhere
    async with gw.session.get(f"{gw.admin_url}/registry/services/web") as response:
        health = {i["port"]: i["health"] for i in (await response.json())["instances"]}
    assert health == {alive.port: "healthy", dead.port: "ejected"}
    async with gw.session.get(gw.admin_url + "/metrics") as response:
        text = await response.text()
    assert 'gateway_registry_instances{service="web",state="ejected"} 1.0' in text


def test_retry_budget_allows_20_percent_plus_10_a_second():
    from gateway.dataplane.stats import ServiceStats

    stats = ServiceStats("web")
    for _ in range(10):  # a quiet second: the floor of 10 retries
        assert stats.may_retry()
        stats.retries += 1
    assert not stats.may_retry()
    stats.requests += 100  # 100 requests in the window: 20 more
    assert stats.may_retry()
    stats.retries += 20
    assert not stats.may_retry()
    for _ in range(10):  # a second later the window has moved on
        stats.sample()
    assert stats.may_retry()
