"""/metrics on the admin listener (SPEC section 6)."""

from __future__ import annotations

import asyncio
import random
import shutil
import string
import subprocess
import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_gateway_process, stop_gateway_process
from tests.fakes import FakeClock

ROUTES = """
routes:
  - prefix: /api
    service: api
  - prefix: /empty
    service: empty
"""

# SPEC section 6: name -> (type, labels)
SPEC_METRICS = {
    "gateway_requests_total": ("counter", {"route", "service", "method", "code"}),
    "gateway_request_duration_seconds": ("histogram", {"route", "service"}),
    "gateway_requests_in_flight": ("gauge", {"service"}),
    "gateway_upstream_errors_total": ("counter", {"service", "reason"}),
    "gateway_retries_total": ("counter", {"service"}),
    "gateway_registry_instances": ("gauge", {"service", "state"}),
    "gateway_registry_registrations_total": ("counter", {"service"}),
    "gateway_registry_deregistrations_total": ("counter", {"service"}),
    "gateway_registry_evictions_total": ("counter", {"service"}),
    "gateway_registry_heartbeats_total": ("counter", {"service"}),
    "gateway_config_reloads_total": ("counter", {"result"}),
}
LABEL_VALUES = {
    "gateway_upstream_errors_total": ("reason", {"connect", "timeout", "reset", "protocol"}),
    "gateway_registry_instances": ("state", {"up", "draining", "ejected", "failing"}),
    "gateway_config_reloads_total": ("result", {"success", "failure"}),
}


async def _scrape(gw):
    async with gw.session.get(gw.admin_url + "/metrics") as response:
        assert response.status == 200
        return await response.text(), response.headers["Content-Type"]


def _families(text):
    """{metric name as exposed: family}; counters are keyed with their _total suffix."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family
    return families


def _value(text, name, **labels):
    """The value of the one sample called ``name`` with exactly ``labels``, or None."""
    found = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(found) <= 1
    return found[0] if found else None


def _series(text):
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def _get(gw, path, method="GET"):
    async with gw.session.request(method, gw.proxy_url + path) as response:
        await response.read()
        return response.status


async def _admin(gw, method, path, **kwargs):
    async with gw.session.request(method, gw.admin_url + path, **kwargs) as response:
        await response.read()
        return response.status


async def _exercise(gw, upstreams, clock):
    """One proxied 200, 404 and 503, and every kind of registry event."""
    up = await upstreams("api")
    await gw.register("api", up)
    await gw.register("api", up)  # re-registration counts too
    assert await _get(gw, "/api/x") == 200
    assert await _get(gw, "/nothing/here") == 404
    assert await _get(gw, "/empty/x") == 503
    instance = f"/registry/services/api/instances/127.0.0.1:{up.port}"
    assert await _admin(gw, "PUT", instance + "/heartbeat") == 200
    body = {"host": "127.0.0.1", "port": 1}
    assert await _admin(gw, "POST", "/registry/services/gone/instances", json=body) == 201
    assert await _admin(gw, "DELETE", "/registry/services/gone/instances/127.0.0.1:1") == 204
    body = {"host": "127.0.0.1", "port": 2, "ttl": "1s"}
    assert await _admin(gw, "POST", "/registry/services/brief/instances", json=body) == 201
    clock.advance(1.0)
    assert await _admin(gw, "GET", "/registry/services") == 200  # sees the lease gone
    return up


async def test_content_type_is_prometheus_text(gateway_factory):
    gw = await gateway_factory(ROUTES)
    _, content_type = await _scrape(gw)
    media_type, _, params = content_type.partition(";")
    assert media_type.strip() == "text/plain"
    assert "version=" in params


async def test_every_spec_metric_with_exactly_its_labels(gateway_factory, upstreams):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _exercise(gw, upstreams, clock)
    text, _ = await _scrape(gw)
    families = _families(text)
    for name, (kind, labels) in SPEC_METRICS.items():
        assert name in families, f"{name} missing"
        family = families[name]
        assert family.type == kind, name
        assert family.samples, f"{name} has no series"
        for sample in family.samples:
            expected = labels | {"le"} if sample.name.endswith("_bucket") else labels
            assert set(sample.labels) == expected, (name, sample)
    for name, (label, allowed) in LABEL_VALUES.items():
        assert {s.labels[label] for s in families[name].samples} <= allowed, name


async def test_requests_are_labelled_by_route_not_path(gateway_factory, upstreams):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _exercise(gw, upstreams, clock)
    text, _ = await _scrape(gw)
    name = "gateway_requests_total"
    assert _value(text, name, route="/api", service="api", method="GET", code="200") == 1
    assert _value(text, name, route="none", service="none", method="GET", code="404") == 1
    assert _value(text, name, route="/empty", service="empty", method="GET", code="503") == 1
    routes = {
        sample.labels["route"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "route" in sample.labels
    }
    assert routes <= {"/api", "/empty", "none"}
    count = "gateway_request_duration_seconds_count"
    assert _value(text, count, route="/api", service="api") == 1
    assert _value(text, count, route="none", service="none") == 1
    assert _value(text, "gateway_requests_in_flight", service="api") == 0


async def test_registry_counters_move(gateway_factory, upstreams):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _exercise(gw, upstreams, clock)
    text, _ = await _scrape(gw)
    assert _value(text, "gateway_registry_registrations_total", service="api") == 2
    assert _value(text, "gateway_registry_heartbeats_total", service="api") == 1
    assert _value(text, "gateway_registry_deregistrations_total", service="gone") == 1
    assert _value(text, "gateway_registry_evictions_total", service="brief") == 1
    assert _value(text, "gateway_registry_evictions_total", service="api") in (None, 0)
    assert _value(text, "gateway_config_reloads_total", result="success") == 0
    assert _value(text, "gateway_config_reloads_total", result="failure") == 0


async def test_registry_instances_by_state(gateway_factory):
    gw = await gateway_factory(ROUTES)
    for port in (9000, 9001, 9002):
        body = {"host": "127.0.0.1", "port": port}
        assert await _admin(gw, "POST", "/registry/services/api/instances", json=body) == 201
    change = {"state": "draining"}
    path = "/registry/services/api/instances/127.0.0.1:9002"
    assert await _admin(gw, "PATCH", path, json=change) == 200
    text, _ = await _scrape(gw)
    name = "gateway_registry_instances"
    assert _value(text, name, service="api", state="up") == 2
    assert _value(text, name, service="api", state="draining") == 1
    assert _value(text, name, service="api", state="ejected") in (None, 0)
    assert _value(text, name, service="api", state="failing") in (None, 0)
    assert await _admin(gw, "DELETE", "/registry/services/api/instances/127.0.0.1:9000") == 204
    text, _ = await _scrape(gw)
    assert _value(text, name, service="api", state="up") == 1


async def test_first_scrape_after_a_lease_ends_counts_the_eviction(gateway_factory):
    """The lease ends at its expiry, not at the next sweep: one scrape tells one story."""
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    body = {"host": "127.0.0.1", "port": 9000, "ttl": "1s"}
    assert await _admin(gw, "POST", "/registry/services/api/instances", json=body) == 201
    clock.advance(1.0)
    text, _ = await _scrape(gw)
    assert _value(text, "gateway_registry_instances", service="api", state="up") == 0
    assert _value(text, "gateway_registry_evictions_total", service="api") == 1


async def test_unmatched_paths_add_no_series(gateway_factory, upstreams):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _exercise(gw, upstreams, clock)
    methods = ["GET", "POST", "PURGE", "PROPFIND", "MKCOL", "LINK"]
    for method in methods:  # the series a 404 can have: GET, POST and one OTHER
        assert await _get(gw, "/warm", method=method) == 404
    before, _ = await _scrape(gw)
    rng = random.Random(7)
    alphabet = string.ascii_letters + string.digits
    for _ in range(200):
        path = "/" + "/".join(
            "".join(rng.choices(alphabet, k=rng.randint(1, 12))) for _ in range(rng.randint(1, 4))
        )
        query = "?" + "".join(rng.choices(alphabet, k=8))
        assert await _get(gw, path + query, method=rng.choice(methods)) == 404
    after, _ = await _scrape(gw)
    assert _series(after) == _series(before)
    total = sum(
        _value(after, "gateway_requests_total", route="none", service="none", method=m, code="404")
        or 0
        for m in ("GET", "POST", "OTHER")
    )
    assert total == 200 + len(methods) + 1  # these, the warm-up, the one from _exercise


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
async def test_promtool_accepts_the_output(gateway_factory, upstreams):
    clock = FakeClock()
    limits = "services:\n  api: {max_requests: 10, max_pending: 100}\n"
    gw = await gateway_factory(ROUTES + "proxy:\n  instance_metrics: 5\n" + limits, clock=clock)
    await _exercise(gw, upstreams, clock)
    text, _ = await _scrape(gw)
    assert "gateway_instance_requests_total{" in text and "gateway_upstream_connections{" in text
    assert "gateway_overloaded_total{" in text
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_build_info_reload_time_and_client_connections(gateway_factory):
    before = time.time()
    gw = await gateway_factory(ROUTES)
    text, _ = await _scrape(gw)
    (build,) = [line for line in text.splitlines() if line.startswith("gateway_build_info{")]
    assert 'data_plane="' in build and 'python="3.' in build and build.endswith(" 1.0")
    loaded = _value(text, "gateway_config_last_reload_success_timestamp_seconds")
    assert before - 1 <= loaded <= time.time()
    assert _value(text, "gateway_client_connections") == 0
    opened = [await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port) for _ in range(3)]
    try:
        for reader, writer in opened:  # each connection answered once: surely accepted
            writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"\r\n\r\n")
        assert _value((await _scrape(gw))[0], "gateway_client_connections") == 3
    finally:
        for _, writer in opened:
            writer.close()
            await writer.wait_closed()
    async with asyncio.timeout(5):
        while _value((await _scrape(gw))[0], "gateway_client_connections") != 0:
            await asyncio.sleep(0.01)


async def test_the_grafana_dashboard_queries_only_metrics_the_gateway_exposes(gateway_factory):
    """gateway/control/grafana-dashboard.json: valid JSON, every metric it names exists."""
    import json
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "gateway" / "control" / "grafana-dashboard.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 12
    named = {name for expr in exprs for name in re.findall(r"\b(gateway_[a-z_]+)", expr)}
    gw = await gateway_factory(ROUTES)
    text, _ = await _scrape(gw)
    # A family shows in # TYPE even before it has a series; a histogram's samples end in
    # _bucket.
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    missing = {n for n in named if n.removesuffix("_bucket") not in families}
    assert not missing, missing


async def test_body_bytes_are_counted_per_route(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    await gw.register("api", await upstreams("api"))
    async with gw.session.post(gw.proxy_url + "/api/upload", data=b"u" * 1000) as response:
        assert (await response.json())["length"] == 1000
        answer = len(await response.read())
    async with gw.session.get(gw.proxy_url + "/api/download?size=70000") as response:
        assert len(await response.read()) == 70000
    assert await _get(gw, "/empty/x") == 503  # its JSON error is sent bytes too
    text, _ = await _scrape(gw)
    api = {"route": "/api", "service": "api"}
    assert _value(text, "gateway_request_bytes_total", **api) == 1000
    assert _value(text, "gateway_response_bytes_total", **api) == answer + 70000
    empty = {"route": "/empty", "service": "empty"}
    assert _value(text, "gateway_request_bytes_total", **empty) == 0
    assert _value(text, "gateway_response_bytes_total", **empty) > 0


async def test_upstream_connections_open_and_idle_per_service(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    await gw.register("api", await upstreams("api"))
    text, _ = await _scrape(gw)
    assert _value(text, "gateway_upstream_connections", service="api") is None  # none yet
    slow = asyncio.create_task(_get(gw, "/api/slow?delay=0.3"))
    async with asyncio.timeout(5):  # while it is answered: open, not idle
        while _value((await _scrape(gw))[0], "gateway_upstream_connections", service="api") != 1:
            await asyncio.sleep(0.01)
    text, _ = await _scrape(gw)
    assert _value(text, "gateway_upstream_connections_idle", service="api") == 0
    assert await slow == 200
    text, _ = await _scrape(gw)  # then kept alive in the pool
    assert _value(text, "gateway_upstream_connections", service="api") == 1
    assert _value(text, "gateway_upstream_connections_idle", service="api") == 1
    gw.gateway.proxy.pool.close()  # what the pool holds: idle, so all of them here
    async with asyncio.timeout(5):  # closed: 0, still listed (a gauge, not a gap)
        while _value((await _scrape(gw))[0], "gateway_upstream_connections", service="api") != 0:
            await asyncio.sleep(0.01)


async def test_instance_metrics_are_opt_in_and_bounded(gateway_factory, upstreams):
    off = await gateway_factory(ROUTES)
    await off.register("api", await upstreams("a"))
    assert await _get(off, "/api/x") == 200
    assert not any("gateway_instance_" in line for line in (await _scrape(off))[0].splitlines())

    gw = await gateway_factory(ROUTES + "proxy:\n  instance_metrics: 1\n")
    first, second = await upstreams("a"), await upstreams("b")
    await gw.register("api", first)
    assert await _get(gw, "/api/x") == 200  # the first instance seen gets the one place
    await gw.register("api", second)
    for _ in range(4):  # round-robin: two more each
        assert await _get(gw, "/api/status/201") == 201
    text, _ = await _scrape(gw)
    one, other = f"127.0.0.1:{first.port}", "other"
    requests = "gateway_instance_requests_total"
    assert _value(text, requests, service="api", instance=one, code="200") == 1
    assert _value(text, requests, service="api", instance=one, code="201") == 2
    assert _value(text, requests, service="api", instance=other, code="201") == 2
    count = "gateway_instance_request_duration_seconds_count"
    assert _value(text, count, service="api", instance=one) == 3
    # Deregistered: its series end (churn does not fill the limit with the dead).
    assert await _admin(gw, "DELETE", f"/registry/services/api/instances/{one}") == 204
    text, _ = await _scrape(gw)
    assert _value(text, requests, service="api", instance=one, code="200") is None
    assert _value(text, requests, service="api", instance=other, code="201") == 2


async def test_durations_are_measured_finely_under_uvloop(tmp_path, upstreams):
    """`gateway run` (uvloop, whose loop.time() has millisecond steps): the duration sum of
    requests to an upstream that takes 2 ms is within 20% of what the client measured, and
    requests the gateway answers at once land in the buckets under a millisecond."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    gateway = await start_gateway_process(tmp_path)
    try:
        up = await upstreams("api")
        async with aiohttp.ClientSession() as session:
            body = {"host": "127.0.0.1", "port": up.port}
            async with session.post(
                f"{gateway.admin_url}/registry/services/api/instances", json=body
            ) as response:
                assert response.status == 201
            seen = 0.0  # the client's measure of the same requests: the truth plus its own hop
            for _ in range(50):
                began = time.perf_counter()
                async with session.get(f"{gateway.proxy_url}/api/slow?delay=0.002") as response:
                    assert response.status == 200
                    await response.read()
                seen += time.perf_counter() - began
            async with session.get(f"{gateway.admin_url}/metrics") as response:
                slow = await response.text()
            for _ in range(200):
                async with session.get(f"{gateway.proxy_url}/empty/x") as response:
                    assert response.status == 503  # answered by the gateway itself: fast
            async with session.get(f"{gateway.admin_url}/metrics") as response:
                fast = await response.text()
    finally:
        await stop_gateway_process(gateway)
    api = {"route": "/api", "service": "api"}
    total = _value(slow, "gateway_request_duration_seconds_sum", **api)
    assert _value(slow, "gateway_request_duration_seconds_count", **api) == 50
    assert 50 * 0.002 <= total <= seen  # at least the upstream's 2 ms, at most the client's
    assert total >= 0.8 * seen, (total, seen)
    empty = {"route": "/empty", "service": "empty"}
    under_1ms = _value(fast, "gateway_request_duration_seconds_bucket", le="0.001", **empty)
    assert under_1ms >= 190  # not all lumped into one coarse step
    assert _value(fast, "gateway_request_duration_seconds_bucket", le="0.00025", **empty) > 0
