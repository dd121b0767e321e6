"""Rate limits per route (issue 10 item 5): token buckets on a fake clock, the memory
bound, and the 429 through a running gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.config.describe import describe_routes
from gateway.config.loader import parse_config
from gateway.config.model import ConfigError, RateLimitConfig
from gateway.dataplane.ratelimit import TokenBuckets
from tests.conftest import RunningGateway


def test_a_burst_then_the_average() -> None:
    buckets = TokenBuckets(average=2.0, burst=3)
    now = 100.0
    assert [buckets.take(b"a", now) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert buckets.take(b"a", now) == pytest.approx(0.5)  # a token every half second
    assert buckets.take(b"b", now) == 0.0  # another client has its own bucket
    assert buckets.take(b"a", now + 0.5) == 0.0
    assert buckets.take(b"a", now + 0.5) == pytest.approx(0.5)
    assert [buckets.take(b"a", now + 60) for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # full again


def test_memory_is_bounded_by_the_most_recent_clients() -> None:
    buckets = TokenBuckets(average=1.0, burst=1, max_keys=1_000)
    for client in range(100_000):
        buckets.take(b"%d" % client, 0.0)
    assert len(buckets) == 1_000
    assert buckets.take(b"99999", 0.0) > 0  # the most recent are kept (still empty)
    assert buckets.take(b"0", 0.0) == 0.0  # the oldest were forgotten: a full bucket again


def test_rate_limit_config() -> None:
    route = parse_config(
        "routes:\n  - prefix: /\n    service: web\n"
        "    rate_limit: {average: 100, burst: 50, by: header, header: X-Api-Key}\n"
    ).routes[0]
    assert route.rate_limit == RateLimitConfig(100.0, 50, "X-Api-Key")
    config = parse_config(
        "routes:\n  - prefix: /\n    service: web\n    rate_limit: {average: 5}\n"
    )
    assert describe_routes(config) == ["*  /  -> web  rate_limit=5/s,burst=5"]
    with pytest.raises(ConfigError) as refused:
        parse_config(
            "routes:\n  - prefix: /\n    service: web\n"
            "    rate_limit: {average: 0, by: everyone}\n"
            "  - prefix: /b\n    service: web\n    rate_limit: {average: 5, by: header}\n"
        )
    assert refused.value.errors == [
        "routes.yaml:4: routes[0].rate_limit.average: must be above 0, got 0",
        "routes.yaml:4: routes[0].rate_limit.by: must be client_ip or header, got 'everyone'",
        "routes.yaml:7: routes[1].rate_limit.by: by: header needs header: <name>, the header "
        "whose value tells clients apart",
    ]


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.mark.parametrize("by_header", [False, True])
async def test_over_the_limit_is_429_rate_limited_with_retry_after(
    gateway_factory: GatewayFactory, upstreams: Any, by_header: bool
) -> None:
    limit = "{average: 0.1, burst: 2" + (", by: header, header: X-Api-Key}" if by_header else "}")
    gw = await gateway_factory(f"""
routes:
  - prefix: /limited
    service: web
    rate_limit: {limit}
  - prefix: /
    service: web
""")
    up = await upstreams("web")
    await gw.register("web", up)

    async def get(path: str, key: str = "k1") -> tuple[int, dict[str, Any], str | None]:
        async with gw.session.get(gw.proxy_url + path, headers={"X-Api-Key": key}) as r:
            return r.status, await r.json(), r.headers.get("Retry-After")

    assert [(await get("/limited"))[0] for _ in range(2)] == [200, 200]
    status, body, retry = await get("/limited")
    assert (status, body["error"]["code"], retry) == (429, "rate_limited", "10")
    assert (await get("/other"))[0] == 200  # other routes are not limited
    status, _, _ = await get("/limited", key="k2")
    assert status == (200 if by_header else 429)  # another key is another client
    assert len(up.requests) == 3 + (1 if by_header else 0)  # the 429s never went upstream
    async with gw.session.get(f"{gw.admin_url}/metrics") as response:
        text = await response.text()
    assert 'gateway_requests_total{code="429",method="GET",route="/limited",service="web"}' in text
