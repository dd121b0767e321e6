"""Registrations survive a restart; active health checks take failing instances out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.app import Gateway
from gateway.config import load_config
from gateway.health import Verdicts


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
