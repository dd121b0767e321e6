"""Concurrency limits per service (issue 12 item 4): ``max_requests`` in flight to one
instance, ``max_pending`` in flight to the service; beyond them 503 overloaded at once."""

from __future__ import annotations

import asyncio
import socket
import time

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.loader import load_config, parse_config
from gateway.config.model import ConfigError
from gateway.control.metrics import GatewayMetrics
from registry.core.store import Registry
from tests.conftest import RunningGateway
from tests.test_metrics import _scrape, _series, _value

SLOW = 2.0  # seconds an upstream holds a /slow request; refusals must come well before


def _config(limits: str) -> str:
    return f"routes:\n  - prefix: /\n    service: web\nservices:\n  web: {{{limits}}}\n"


async def _overloaded(gw, limit):
    text, _ = await _scrape(gw)
    return _value(text, "gateway_overloaded_total", service="web", limit=limit)


async def _in_flight(gw):
    """(gateway_requests_in_flight of web, in_flight of each of its listed instances)."""
    text, _ = await _scrape(gw)
    gauge = _value(text, "gateway_requests_in_flight", service="web")
    async with gw.session.get(gw.admin_url + "/registry/services/web") as response:
        listed = [i["in_flight"] for i in (await response.json())["instances"]]
    return gauge, listed


async def _until_idle(gw):
    """Polls (with a deadline) until nothing of web is in flight any more."""
    deadline = time.monotonic() + 5
    while (state := await _in_flight(gw))[0] != 0 or any(state[1]):
        assert time.monotonic() < deadline, f"still in flight: {state}"
        await asyncio.sleep(0.02)


async def _arrivals(ups, count):
    """Polls until the upstreams together received ``count`` requests."""
    deadline = time.monotonic() + 5
    while sum(len(up.requests) for up in ups) < count:
        assert time.monotonic() < deadline, [len(up.requests) for up in ups]
        await asyncio.sleep(0.01)


async def _refused(gw):
    """A request that must be refused: 503 overloaded with Retry-After: 1, at once."""
    started = time.monotonic()
    async with gw.session.get(gw.proxy_url + "/x") as response:
        body = await response.json()
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    assert time.monotonic() - started < SLOW / 4  # answered, not queued behind the slow ones
    assert body["error"]["code"] == "overloaded"
    return body["error"]["message"]


def _slow(gw):
    async def get():
        async with gw.session.get(f"{gw.proxy_url}/slow?delay={SLOW}") as response:
            return response.status, await response.text()

    return asyncio.ensure_future(get())


async def test_max_requests_skips_a_full_instance_and_refuses_when_all_are_full(
    gateway_factory, upstreams
):
    gw = await gateway_factory(_config("max_requests: 1"))
    a, b = await upstreams("a"), await upstreams("b")
    await gw.register("web", a)
    await gw.register("web", b)
    # Both series exist at 0 before anything is refused.
    assert await _overloaded(gw, "max_requests") == 0
    assert await _overloaded(gw, "max_pending") == 0

    first = _slow(gw)
    await _arrivals([a, b], 1)
    holder = a if a.requests else b
    # A quick request takes the other instance: the rotation's next turn is the full one.
    async with gw.session.get(gw.proxy_url + "/x") as response:
        assert response.status == 200
        assert response.headers["X-Upstream"] != holder.name
    second = _slow(gw)
    await _arrivals([a, b], 3)
    # Round-robin would have sent it to the holder; max_requests: 1 sent it elsewhere.
    assert [r["path"] for r in holder.requests] == [f"/slow?delay={SLOW}"]
    assert await _in_flight(gw) == (2, [1, 1])

    message = await _refused(gw)
    assert message == (
        "every instance of 'web' has 1 requests in flight, its max_requests; retry later"
    )
    assert await _overloaded(gw, "max_requests") == 1
    assert len(a.requests) + len(b.requests) == 3  # the refused one reached no upstream

    assert await first == (200, "slow")
    assert await second == (200, "slow")
    await _until_idle(gw)
    for _ in range(4):
        async with gw.session.get(gw.proxy_url + "/x") as response:
            assert response.status == 200
    assert await _overloaded(gw, "max_requests") == 1
    assert await _overloaded(gw, "max_pending") == 0
    text, _ = await _scrape(gw)
    assert _value(text, "gateway_requests_total", route="/", service="web", method="GET",
                  code="503") == 1  # fmt: skip


async def test_max_pending_refuses_beyond_the_services_requests_in_flight(
    gateway_factory, upstreams
):
    gw = await gateway_factory(_config("max_pending: 2"))
    a, b = await upstreams("a"), await upstreams("b")
    await gw.register("web", a)
    await gw.register("web", b)
    slow = [_slow(gw), _slow(gw)]
    await _arrivals([a, b], 2)

    for _ in range(3):
        message = await _refused(gw)
    assert message == "service 'web' has 2 requests in flight, its max_pending; retry later"
    assert await _overloaded(gw, "max_pending") == 3
    assert await _overloaded(gw, "max_requests") == 0
    assert await _in_flight(gw) == (2, [1, 1])  # the refused ones were never in flight

    assert [await s for s in slow] == [(200, "slow")] * 2
    await _until_idle(gw)
    slow = [_slow(gw), _slow(gw)]  # the limit holds again, from 0
    await _arrivals([a, b], 4)
    await _refused(gw)
    assert [await s for s in slow] == [(200, "slow")] * 2
    await _until_idle(gw)
    async with gw.session.get(gw.proxy_url + "/x") as response:
        assert response.status == 200
    assert await _overloaded(gw, "max_pending") == 4


def _closed_port() -> int:
    """A loopback port nobody listens on: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_retry_never_goes_to_a_full_instance(gateway_factory, upstreams):
    gw = await gateway_factory(_config("max_requests: 1"))
    a = await upstreams("a")
    await gw.register("web", a)
    first = _slow(gw)
    await _arrivals([a], 1)
    async with gw.session.post(
        gw.admin_url + "/registry/services/web/instances",
        json={"host": "127.0.0.1", "port": _closed_port()},
    ) as response:
        assert response.status == 201
    # The one free instance refuses the connection; the retry's only other is full, so
    # the connect failure is the answer (not a second request on the full instance).
    async with gw.session.get(gw.proxy_url + "/x") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    assert len(a.requests) == 1
    assert await _overloaded(gw, "max_requests") == 0  # tried and failed, not refused
    assert await first == (200, "slow")


async def test_limits_follow_a_reload(tmp_path, upstreams):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(_config("max_pending: 1"))
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await gateway.start()
    gw = RunningGateway(gateway, aiohttp.ClientSession())
    try:
        a = await upstreams("a")
        await gw.register("web", a)
        slow = _slow(gw)
        await _arrivals([a], 1)
        await _refused(gw)

        config_file.write_text(_config(""))  # no limit any more
        assert await gateway.reload() is True
        async with gw.session.get(gw.proxy_url + "/x") as response:
            assert response.status == 200
        assert await _overloaded(gw, "max_pending") == 1  # the counter stays

        config_file.write_text(_config("max_requests: 1"))  # a limit comes back
        assert await gateway.reload() is True
        await _refused(gw)
        assert await _overloaded(gw, "max_requests") == 1
        assert await slow == (200, "slow")
        await _until_idle(gw)
    finally:
        await gw.session.close()
        await gateway.stop()


def test_workers_refusals_are_summed_and_unlimited_services_have_no_series() -> None:
    metrics = GatewayMetrics(Registry(time.time))
    metrics.stats.set_limits(parse_config(_config("max_requests: 3")).services)
    metrics.stats.service("web").overloaded["max_requests"] += 2
    metrics.stats.service("other")  # a service without a limit
    worker = {"routes": [], "per_instance": [], "services": [], "instances": []}
    worker["overloaded"] = [["web", {"max_requests": 5, "max_pending": 1}]]
    metrics.set_remote(1, worker)
    text = metrics.exposition()().decode()
    assert {labels for name, labels in _series(text) if name == "gateway_overloaded_total"} == {
        (("limit", "max_requests"), ("service", "web")),
        (("limit", "max_pending"), ("service", "web")),
    }
    assert _value(text, "gateway_overloaded_total", service="web", limit="max_requests") == 7
    assert _value(text, "gateway_overloaded_total", service="web", limit="max_pending") == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be at least 1, got 0"),
        ("-1", "must be at least 1, got -1"),
        ('"x"', "expected an integer, got 'x'"),
        ("true", "expected an integer, got true"),
        ("2.5", "expected an integer, got 2.5"),
    ],
)
@pytest.mark.parametrize("key", ["max_requests", "max_pending"])
def test_limits_must_be_positive_integers(key: str, value: str, message: str) -> None:
    text = f"services:\n  web:\n    instances: [127.0.0.1:9000]\n    {key}: {value}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [f"routes.yaml:4: services.web.{key}: {message}"]


def test_limits_are_optional() -> None:
    services = parse_config(_config("max_requests: 10, max_pending: 100")).services
    assert (services["web"].max_requests, services["web"].max_pending) == (10, 100)
    bare = parse_config(_config("")).services["web"]
    assert (bare.max_requests, bare.max_pending) == (None, None)
