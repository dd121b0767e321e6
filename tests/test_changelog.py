"""Registry changes in the log (logger gateway.registry), with who made them, and log
lines stamped in UTC."""

from __future__ import annotations

import logging
import re
import socket

from tests.conftest import start_gateway_process, stop_gateway_process
from tests.fakes import FakeClock

ROUTES = "routes:\n  - prefix: /\n    service: web\n"


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gateway.registry"]


async def test_each_change_is_one_line_saying_what_and_who(gateway_factory, caplog):
    caplog.set_level(logging.INFO, logger="gateway.registry")
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    base = f"{gw.admin_url}/registry/services/web/instances"
    body = {"host": "127.0.0.1", "port": 9001, "ttl": "30s", "weight": 2}
    async with gw.session.post(base, json=body) as response:
        assert response.status == 201
    async with gw.session.put(f"{base}/127.0.0.1:9001/heartbeat") as response:
        assert response.status == 200  # a heartbeat changes nothing: no line
    async with gw.session.patch(f"{base}/127.0.0.1:9001", json={"weight": 5}) as response:
        assert response.status == 200
    drain = {"state": "draining", "deregister_when_idle": True}
    async with gw.session.patch(f"{base}/127.0.0.1:9001", json=drain) as response:
        assert response.status == 200  # idle already: removed at once
    body = {"host": "127.0.0.1", "port": 9002, "ttl": "10s"}
    async with gw.session.post(base, json=body) as response:
        assert response.status == 201
    async with gw.session.delete(f"{base}/127.0.0.1:9002") as response:
        assert response.status == 204
    async with gw.session.post(base, json=body) as response:
        assert response.status == 201
    clock.advance(11)
    async with gw.session.get(f"{gw.admin_url}/registry/services") as response:
        assert response.status == 200  # sees the lease gone
    assert _lines(caplog) == [
        "registered web/127.0.0.1:9001 at 127.0.0.1:9001 (ttl 30s, weight 2) by 127.0.0.1",
        "updated web/127.0.0.1:9001: up, weight 5 by 127.0.0.1",
        "updated web/127.0.0.1:9001: draining, weight 5, removed once idle by 127.0.0.1",
        "deregistered web/127.0.0.1:9001 by 127.0.0.1",
        "registered web/127.0.0.1:9002 at 127.0.0.1:9002 (ttl 10s, weight 1) by 127.0.0.1",
        "deregistered web/127.0.0.1:9002 by 127.0.0.1",
        "registered web/127.0.0.1:9002 at 127.0.0.1:9002 (ttl 10s, weight 1) by 127.0.0.1",
        "evicted web/127.0.0.1:9002: no heartbeat within its 10s lease",
    ]


async def test_the_line_names_the_token(gateway_factory, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="gateway.registry")
    monkeypatch.setenv("CHANGELOG_TOKEN", "s3cret")
    gw = await gateway_factory(ROUTES + "admin:\n  token_env: CHANGELOG_TOKEN\n")
    async with gw.session.post(
        f"{gw.admin_url}/registry/services/web/instances",
        json={"host": "127.0.0.1", "port": 9001, "scheme": "https"},
        headers={"Authorization": "Bearer s3cret"},
    ) as response:
        assert response.status == 201
    (line,) = _lines(caplog)
    assert line == (
        "registered web/127.0.0.1:9001 at https://127.0.0.1:9001 (ttl 30s, weight 1)"
        " by 127.0.0.1 (token admin)"
    )
    assert "s3cret" not in caplog.text


async def test_log_lines_are_stamped_in_utc(tmp_path):
    (tmp_path / "routes.yaml").write_text(ROUTES)
    gateway = await start_gateway_process(tmp_path)
    try:
        stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
        assert re.match(rf"{stamp} INFO gateway: proxy listening on ", gateway.ready_line)
    finally:
        await stop_gateway_process(gateway)


async def test_an_upstream_warning_names_service_instance_and_request(gateway_factory, caplog):
    with socket.socket() as probe:  # a port nothing listens on: the connect is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gw = await gateway_factory(ROUTES)
    async with gw.session.post(
        f"{gw.admin_url}/registry/services/web/instances", json={"host": "127.0.0.1", "port": port}
    ) as response:
        assert response.status == 201
    async with gw.session.get(gw.proxy_url + "/x", headers={"X-Request-ID": "abc-123"}) as r:
        assert r.status == 502
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"GET /x -> web/127.0.0.1:{port}: connect:" in w and w.endswith("(request abc-123)")
        for w in warnings
    ), warnings
