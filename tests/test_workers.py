"""gateway run --workers 2: one registry shared by the processes on one port."""

from __future__ import annotations

import asyncio
import re
import signal

import aiohttp

from tests.conftest import start_gateway_process, stop_gateway_process


async def _total(session: aiohttp.ClientSession, admin: str, code: str) -> float:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    found = re.search(rf'gateway_requests_total{{code="{code}"[^}}]*}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def _fresh_get(url: str) -> int:
    """A GET on a new connection, so the kernel spreads them over the processes."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as r:
        return r.status


async def _settle(url: str, status: int) -> list[int]:
    """Until 10 answers in a row are ``status``: the workers' mirrors have caught up."""
    seen: list[int] = []
    for _ in range(200):
        seen.append(await _fresh_get(url))
        if seen[-10:] == [status] * 10:
            return seen
    raise AssertionError(f"never {status} ten times in a row")


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
            before = (await _settle(f"{proxy}/x", 200)).count(200)
            statuses = [await _fresh_get(f"{proxy}/x") for _ in range(40)]
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
            await _settle(f"{proxy}/x", 503)
            assert [await _fresh_get(f"{proxy}/x") for _ in range(20)] == [503] * 20
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        await stop_gateway_process(gateway)
