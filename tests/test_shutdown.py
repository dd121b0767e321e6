"""Graceful shutdown: stop accepting, let requests in flight finish."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

ROUTES = """
routes:
  - prefix: /
    service: web
"""


async def test_request_in_flight_finishes_and_new_connections_are_refused(
    gateway_factory, upstreams
):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    await gw.register("web", up)
    port = gw.gateway.proxy_port

    async def slow_request() -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/slow?delay=0.5") as response,
        ):
            return response.status, await response.text()

    in_flight = asyncio.create_task(slow_request())
    await up.arrived.wait()
    stopping = asyncio.create_task(gw.gateway.stop())
    with pytest.raises(OSError):  # the listener closes first thing
        for _ in range(100):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.01)
    assert await in_flight == (200, "slow")
    await stopping
