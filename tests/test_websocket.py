"""WebSocket upgrades are proxied both ways (SPEC section 5)."""

from __future__ import annotations

import aiohttp
from aiohttp import web

ROUTES = "routes:\n  - prefix: /\n    service: chat\n"


async def _echo_server(seen: list[str]) -> web.AppRunner:
    async def ws(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=426, text="websocket only")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        seen.append(request.headers.get("X-Forwarded-For", ""))
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                if message.data == "bye":
                    await socket.close()
                else:
                    await socket.send_str("echo " + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data[::-1])
        return socket

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


async def test_websocket_messages_pass_both_ways(gateway_factory):
    gw = await gateway_factory(ROUTES)
    seen: list[str] = []
    runner = await _echo_server(seen)
    try:
        url = f"{gw.admin_url}/registry/services/chat/instances"
        body = {"host": "127.0.0.1", "port": runner.addresses[0][1]}
        async with gw.session.post(url, json=body) as response:
            assert response.status == 201
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(gw.proxy_url + "/ws") as socket:
                await socket.send_str("hello")
                assert (await socket.receive_str()) == "echo hello"
                payload = bytes(range(256)) * 300  # 75 KiB
                await socket.send_bytes(payload)
                assert (await socket.receive_bytes()) == payload[::-1]
                await socket.send_str("bye")  # the upstream closes
                closing = await socket.receive()
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            # The client closes first this time.
            async with session.ws_connect(gw.proxy_url + "/ws") as socket:
                await socket.send_str("again")
                assert (await socket.receive_str()) == "echo again"
        assert seen == ["127.0.0.1", "127.0.0.1"]
        async with gw.session.get(gw.admin_url + "/metrics") as response:
            text = await response.text()
        assert (
            'gateway_requests_total{code="101",method="GET",route="/",service="chat"} 2.0' in text
        )
        # A plain request on the same route still works, and a refused upgrade is a
        # normal answer.
        async with gw.session.get(gw.proxy_url + "/ws") as response:
            assert response.status == 426
    finally:
        await runner.cleanup()
