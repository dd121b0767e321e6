"""registry.client.registration against a real gateway: register, heartbeat, come back
after the registry lost the instance, drain and deregister on exit."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from registry.client.registration import Registration, register_app
from tests.conftest import RunningGateway

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
    register_app(app, gw.admin_url, "web", port=port)
    server = TestServer(app, host="127.0.0.1", port=port)
    try:
        await server.start_server()  # startup: registered
        async with gw.session.get(gw.proxy_url + "/") as response:
            assert (response.status, await response.text()) == (200, "service")
    finally:
        await server.close()  # shutdown: drained and deregistered
    assert (await listed(gw))[1] == []
