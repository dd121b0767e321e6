"""gateway run --workers 2: one registry shared by the processes on one port."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp

from tests.conftest import fresh_get, settle, start_gateway_process, stop_gateway_process


async def _total(session: aiohttp.ClientSession, admin: str, code: str) -> float:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    found = re.search(rf'gateway_requests_total{{code="{code}"[^}}]*}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def test_workers_share_the_registry_and_report_their_traffic(tmp_path, upstreams):
    (tmp_path / "routes.yaml").write_text("routes:\n  - prefix: /\n    service: web\n")
    gateway = await start_gateway_process(tmp_path, "--workers", "2")
    process, proxy, admin = gateway.process, gateway.proxy_url, gateway.admin_url
    try:
        up = await upstreams("web")
        async with aiohttp.ClientSession() as session:
            url = f"{admin}/registry/services/web/instances"
            async with session.post(url, json={"host": "127.0.0.1", "port": up.port}) as r:
                assert r.status == 201
            before = (await settle(f"{proxy}/x", 200)).count(200)
            statuses = [await fresh_get(f"{proxy}/x") for _ in range(40)]
            assert statuses == [200] * 40
            # Every process's requests show up in the primary's /metrics (workers report
            # once a second).
            for _ in range(50):
                if await _total(session, admin, "200") >= before + 40:
                    break
                await asyncio.sleep(0.1)
            assert await _total(session, admin, "200") == before + 40
            async with session.delete(f"{url}/127.0.0.1:{up.port}") as r:
                assert r.status == 204
            await settle(f"{proxy}/x", 503)
            assert [await fresh_get(f"{proxy}/x") for _ in range(20)] == [503] * 20
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        await stop_gateway_process(gateway)
