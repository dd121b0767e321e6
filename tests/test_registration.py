"""registry.client.registration against a real gateway: register, heartbeat, come back
after the registry lost the instance, drain and deregister on exit."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from registry.client.registration import Registration, register_app
from tests.conftest import RunningGateway
from tests.test_metrics import _scrape, _value

GatewayFactory = Callable[..., Awaitable[RunningGateway]]
ROUTES = "routes:\n  - prefix: /\n    service: web\n"


async def listed(gw: RunningGateway) -> tuple[int, list[dict[str, Any]]]:
    async with gw.session.get(f"{gw.admin_url}/registry/services/web") as response:
        return int(response.headers["X-Registry-Index"]), (await response.json())["instances"]


async def changed(gw: RunningGateway, index: int) -> list[dict[str, Any]]:
    url = f"{gw.admin_url}/registry/services/web?index={index}&wait=10s"
    async with gw.session.get(url) as response:
        return list((await response.json())["instances"])


async def test_registers_heartbeats_comes_back_and_leaves(
    gateway_factory: GatewayFactory, upstreams: Any
) -> None:
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    async with Registration(gw.admin_url, "web", port=up.port, ttl="1s") as registration:
        index, instances = await listed(gw)
        assert [i["id"] for i in instances] == [f"127.0.0.1:{up.port}"]
        assert registration.interval == 1 / 3
        async with asyncio.timeout(10):
            while registration.heartbeats < 4:  # over a second: the lease was renewed
                await asyncio.sleep(0.05)
        assert [i["id"] for i in (await listed(gw))[1]] == [f"127.0.0.1:{up.port}"]
        async with gw.session.delete(
            f"{gw.admin_url}/registry/services/web/instances/127.0.0.1:{up.port}"
        ) as response:
            assert response.status == 204
        index, _ = await listed(gw)
        assert await changed(gw, index) != []  # the next heartbeat's 404: registered again
        assert registration.registrations == 2
        async with gw.session.get(gw.proxy_url + "/x") as response:
            assert response.status == 200
    assert (await listed(gw))[1] == []  # deregistered on exit


async def test_an_admin_away_at_start_is_waited_for_in_the_background(
    gateway_factory: GatewayFactory, upstreams: Any
) -> None:
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    async with Registration("http://127.0.0.1:1", "web", port=up.port) as registration:
        assert registration.instance_id is None  # entered anyway
    async with Registration(gw.admin_url, "web", port=up.port, token="t") as registration:
        assert registration.instance_id is not None  # no token needed on this gateway


async def test_register_app_for_an_aiohttp_service(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory(ROUTES)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="service")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    with socket.socket() as probe:  # a service knows its port before it starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    registration = register_app(app, gw.admin_url, "web", port=port)
    server = TestServer(app, host="127.0.0.1", port=port)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        await server.start_server()  # startup, then the listener: then registered
        async with asyncio.timeout(10):
            await registration.registered.wait()
        assert signal.getsignal(signal.SIGTERM) != before[0]  # leaves first on SIGTERM
        async with gw.session.get(gw.proxy_url + "/") as response:
            assert (response.status, await response.text()) == (200, "service")
    finally:
        await server.close()  # shutdown: deregistered
    assert (await listed(gw))[1] == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


async def test_registration_waits_for_the_port_to_accept_connections(
    gateway_factory: GatewayFactory, upstreams: Any, caplog: Any
) -> None:
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    port = up.port
    await up.stop()  # nothing listens there now
    registration = Registration(gw.admin_url, "web", port=port)
    registration.enter_when_listening(patience=5)
    await asyncio.sleep(0.1)  # refusals meanwhile: not registered
    assert (await listed(gw))[1] == [] and not registration.registered.is_set()
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
    async with asyncio.timeout(10):
        await registration.registered.wait()  # at its next look
    assert [i["port"] for i in (await listed(gw))[1]] == [port]
    server.close()
    await server.wait_closed()
    await registration.leave()

    patient = Registration(gw.admin_url, "web", port=port)  # a port never listening
    patient.enter_when_listening(patience=0.05)
    async with asyncio.timeout(10):
        await patient.registered.wait()  # registered anyway
    await patient.leave()
    assert f"127.0.0.1:{port} refuses connections after 0.05s" in caplog.text


async def upstream_errors(gw: RunningGateway) -> float:
    """gateway_upstream_errors_total of service web, every reason (SPEC section 6)."""
    text, _ = await _scrape(gw)
    name = "gateway_upstream_errors_total"
    reasons = ("connect", "timeout", "reset", "protocol")
    return sum(_value(text, name, service="web", reason=reason) or 0 for reason in reasons)


class Load:
    """POSTs through the gateway back to back (not retried once sent: a request cut or
    refused on the way shows), recording status and error code."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.outcomes: list[tuple[int, str]] = []
        self.grew = asyncio.Condition()
        self.done = False

    async def run(self) -> None:
        while not self.done:
            async with self.gw.session.post(self.gw.proxy_url + "/w", data=b"order") as response:
                body = await response.text()
                code = "" if response.status == 200 else json.loads(body)["error"]["code"]
            async with self.grew:
                self.outcomes.append((response.status, code))
                self.grew.notify_all()

    async def reaches(self, count: int) -> None:
        async with self.grew:
            await self.grew.wait_for(lambda: len(self.outcomes) >= count)


@pytest.mark.parametrize("handle_signals", [True, False], ids=["leaves-first", "old-way"])
async def test_a_lone_instance_stopped_under_load_fails_no_request(
    gateway_factory: GatewayFactory, handle_signals: bool
) -> None:
    gw = await gateway_factory(ROUTES)
    flags = [] if handle_signals else ["--no-signals"]
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.leaving_service", gw.admin_url, *flags,
        cwd=Path(__file__).parent.parent, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    load = Load(gw)
    clients: list[asyncio.Task[None]] = []
    try:
        async with asyncio.timeout(20):
            assert service.stderr is not None
            first = await service.stderr.readline()  # its startup registered it
            assert b"registered" in first, first
            clients = [asyncio.create_task(load.run()) for _ in range(8)]
            await load.reaches(200)
            service.send_signal(signal.SIGTERM)  # with 8 requests in flight on it
            _, rest = await service.communicate()
            log = (first + rest).decode()
            await load.reaches(len(load.outcomes) + 50)  # and after it is gone
    finally:
        load.done = True
        await asyncio.gather(*clients)
        if service.returncode is None:
            service.kill()
            await service.wait()
    outcomes = load.outcomes
    statuses = collections.Counter(status for status, _ in outcomes)
    assert service.returncode == 0
    if not handle_signals:  # the listener closed while the gateway still routed to it
        assert statuses[502] > 0 and await upstream_errors(gw) > 0
        return
    assert set(statuses) == {200, 503}, (statuses, log)  # no 502, no 504
    assert await upstream_errors(gw) == 0  # nothing was refused or cut
    assert {code for status, code in outcomes if status == 503} == {"no_healthy_instance"}
    assert statuses[200] > 200  # requests in flight at the signal were answered (208 seen)
    assert (await listed(gw))[1] == []
    instance = "web/" + first.decode().split()[1].split("/")[1]
    assert log.splitlines()[-2:] == [
        f"registry.client: {instance} draining: no new requests",
        f"registry.client: {instance} deregistered",
    ]
