"""The proxy against real upstreams on port 0 (SPEC section 5)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections import Counter

import pytest

from tests.conftest import start_raw_server, stop_raw_server

ROUTES = """
proxy:
  timeout: 1s
  connect_timeout: 500ms
routes:
  - prefix: /api/users
    service: users
    strip_prefix: true
  - prefix: /api
    service: api
  - prefix: /plain
    service: plain
    preserve_host: false
"""


async def test_round_robin_is_exact(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    ups = [await upstreams(f"u{i}") for i in range(3)]
    for up in ups:
        await gw.register("api", up)
    seen = Counter()
    for _ in range(30):
        async with gw.session.get(gw.proxy_url + "/api/x") as response:
            assert response.status == 200
            seen[response.headers["X-Upstream"]] += 1
    assert seen == {"u0": 10, "u1": 10, "u2": 10}


async def test_weights_share_traffic(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    heavy, light = await upstreams("heavy"), await upstreams("light")
    await gw.register("api", heavy, weight=3)
    await gw.register("api", light, weight=1)
    seen = Counter()
    for _ in range(40):
        async with gw.session.get(gw.proxy_url + "/api/x") as response:
            seen[response.headers["X-Upstream"]] += 1
    assert seen == {"heavy": 30, "light": 10}


@pytest.mark.parametrize(
    ("path", "service", "upstream_path"),
    [
        ("/api/users", "users", "/"),
        ("/api/users/", "users", "/"),
        ("/api/users/7?x=1", "users", "/7?x=1"),
        ("/api/usersX", "api", "/api/usersX"),
        ("/api/users/../things", "api", "/api/things"),
        ("/api/%2e%2e/api/users/3", "users", "/3"),
    ],
)
async def test_prefix_boundaries_and_strip_prefix(
    gateway_factory, upstreams, path, service, upstream_path
):
    gw = await gateway_factory(ROUTES)
    users, api = await upstreams("users"), await upstreams("api")
    await gw.register("users", users)
    await gw.register("api", api)
    async with gw.session.get(gw.proxy_url + path) as response:
        assert response.status == 200
        data = await response.json()
    assert data["upstream"] == service
    assert data["path"] == upstream_path
    headers = dict(data["headers"])
    if service == "users":
        assert headers["X-Forwarded-Prefix"] == "/api/users"
    else:
        assert "X-Forwarded-Prefix" not in headers


async def test_errors_are_json(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    async with gw.session.get(gw.proxy_url + "/nothing") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "no_route"
    async with gw.session.get(gw.proxy_url + "/api/x") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert (await response.json())["error"]["code"] == "no_healthy_instance"
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(b"GET /../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    writer.close()
    await writer.wait_closed()


async def test_connect_failure_retries_then_502(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    dead = await upstreams("dead")
    await gw.register("api", dead)
    await dead.stop()
    async with gw.session.get(gw.proxy_url + "/api/x") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    alive = await upstreams("alive")
    await gw.register("api", alive)
    for _ in range(4):
        async with gw.session.post(gw.proxy_url + "/api/x", data=b"once") as response:
            assert response.status == 200
            assert response.headers["X-Upstream"] == "alive"
    # Every POST reached the live instance exactly once.
    assert [r["body"] for r in alive.requests] == [b"once"] * 4


async def test_timeout_is_504_and_not_retried(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    a, b = await upstreams("a"), await upstreams("b")
    await gw.register("api", a)
    await gw.register("api", b)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with gw.session.get(gw.proxy_url + "/api/slow?delay=3") as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    assert loop.time() - started < 2.5
    assert len(a.requests) + len(b.requests) == 1


async def test_hop_by_hop_and_forwarded_headers(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    headers = {
        "Connection": "keep-alive, X-Forwarded-For, X-Secret",
        "X-Secret": "s",
        "X-Forwarded-For": "10.0.0.1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "X-Request-ID": "abc-123",
        "Host": "example.com:8443",
    }
    async with gw.session.get(gw.proxy_url + "/api/h", headers=headers) as response:
        data = await response.json()
        assert response.headers["X-Request-ID"] == "abc-123"
    received = {k.lower(): v for k, v in data["headers"]}
    assert "x-secret" not in received
    assert "keep-alive" not in received
    assert "te" not in received
    assert received["x-forwarded-for"] == "127.0.0.1"
    assert received["x-forwarded-proto"] == "http"
    assert received["x-forwarded-host"] == "example.com:8443"
    assert received["host"] == "example.com:8443"
    assert received["x-request-id"] == "abc-123"


async def test_preserve_host_false_sends_instance_address(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("plain")
    await gw.register("plain", up)
    async with gw.session.get(gw.proxy_url + "/plain/", headers={"Host": "a.test"}) as response:
        data = await response.json()
    received = {k.lower(): v for k, v in data["headers"]}
    assert received["host"] == f"127.0.0.1:{up.port}"
    assert received["x-forwarded-host"] == "a.test"


async def test_request_id_generated_when_insane(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    async with gw.session.get(gw.proxy_url + "/api/", headers={"X-Request-ID": "a b"}) as response:
        data = await response.json()
        returned = response.headers["X-Request-ID"]
    assert returned != "a b" and 0 < len(returned) <= 200
    assert dict(data["headers"])["X-Request-ID"] == returned


async def test_5mib_post_arrives_byte_exact(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    payload = os.urandom(5 * 1024 * 1024)
    async with gw.session.post(gw.proxy_url + "/api/upload", data=io.BytesIO(payload)) as response:
        data = await response.json()
    assert data == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "length": len(payload),
        "upstream": "api",
    }


async def test_chunked_upload_streams(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    digest = hashlib.sha256()

    async def body():
        for i in range(64):
            piece = bytes([i]) * 65536
            digest.update(piece)
            yield piece

    async with gw.session.post(gw.proxy_url + "/api/upload", data=body()) as response:
        data = await response.json()
    assert data["length"] == 64 * 65536
    assert data["sha256"] == digest.hexdigest()


@pytest.mark.parametrize("chunked", [False, True])
async def test_download_streams(gateway_factory, upstreams, chunked):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    size = 20 * 1024 * 1024 + 17
    url = gw.proxy_url + f"/api/download?size={size}" + ("&chunked=1" if chunked else "")
    received = 0
    async with gw.session.get(url) as response:
        assert response.status == 200
        if not chunked:
            assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_any():
            received += len(chunk)
    assert received == size


async def test_head_and_204_and_set_cookie(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    async with gw.session.head(gw.proxy_url + "/api/download?size=1000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"
        assert await response.read() == b""
    async with gw.session.get(gw.proxy_url + "/api/status/204") as response:
        assert response.status == 204
        assert response.headers.getall("Set-Cookie") == ["a=1"]
    async with gw.session.get(gw.proxy_url + "/api/status/302") as response:
        assert response.status == 302  # passed on, not followed


async def test_lease_expiry_stops_traffic(gateway_factory, upstreams):
    from tests.fakes import FakeClock

    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    a, b = await upstreams("a"), await upstreams("b")
    await gw.register("api", a, ttl="1s")
    await gw.register("api", b, ttl="10s")
    clock.advance(1.0)  # a's lease ends exactly now
    for _ in range(4):
        async with gw.session.get(gw.proxy_url + "/api/x") as response:
            assert response.headers["X-Upstream"] == "b"
    async with gw.session.get(gw.admin_url + "/registry/services/api") as response:
        ids = [i["port"] for i in (await response.json())["instances"]]
    assert ids == [b.port]


async def test_draining_instance_gets_no_new_requests(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    a, b = await upstreams("a"), await upstreams("b")
    await gw.register("api", a)
    await gw.register("api", b)
    url = f"{gw.admin_url}/registry/services/api/instances/127.0.0.1:{a.port}"
    async with gw.session.patch(url, json={"state": "draining"}) as response:
        assert response.status == 200
        assert (await response.json())["state"] == "draining"
    for _ in range(4):
        async with gw.session.get(gw.proxy_url + "/api/x") as response:
            assert response.headers["X-Upstream"] == "b"


async def test_gzip_body_passes_untouched(gateway_factory, upstreams):
    import gzip

    from aiohttp import web

    gw = await gateway_factory(ROUTES)
    compressed = gzip.compress(b"hello " * 1000)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=compressed, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/api/z", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        async with gw.session.post(
            gw.admin_url + "/registry/services/api/instances",
            json={"host": "127.0.0.1", "port": port},
        ):
            pass
        async with gw.session.get(gw.proxy_url + "/api/z") as response:
            assert response.headers["Content-Encoding"] == "gzip"
            assert await response.read() == compressed
    finally:
        await runner.cleanup()


async def test_max_body_refuses_large_bodies_with_or_without_length(gateway_factory, upstreams):
    gw = await gateway_factory(
        "routes:\n  - prefix: /small\n    service: api\n    max_body: 1KiB\n"
    )
    up = await upstreams("api")
    await gw.register("api", up)

    async def chunked():
        for _ in range(4):
            yield b"x" * 1000

    for body in (b"x" * 2000, chunked()):
        async with gw.session.post(gw.proxy_url + "/small/upload", data=body) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "payload_too_large"
    assert up.requests == []  # nothing complete reached the upstream
    async with gw.session.post(gw.proxy_url + "/small/upload", data=b"x" * 1024) as response:
        assert response.status == 200
        assert (await response.json())["length"] == 1024


async def test_expect_100_continue_is_answered(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("api")
    await gw.register("api", up)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(
        b"POST /api/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    final = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    assert final.startswith(b"HTTP/1.1 200")
    assert b'"length": 5' in final
    sent = {k.lower() for k, _ in up.requests[0]["headers"]}
    assert b"expect" not in sent


async def test_client_disconnect_closes_the_upstream_connection(gateway_factory):
    gw = await gateway_factory(ROUTES)
    got_request, upstream_closed = asyncio.Event(), asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_request.set()
        if await reader.read() == b"":  # the gateway closed its side
            upstream_closed.set()
        writer.close()

    server = await start_raw_server(hang)
    try:
        port = server.sockets[0].getsockname()[1]
        url = f"{gw.admin_url}/registry/services/api/instances"
        async with gw.session.post(url, json={"host": "127.0.0.1", "port": port}) as response:
            assert response.status == 201
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
        writer.write(b"GET /api/wait HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(got_request.wait(), 5)
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(upstream_closed.wait(), 5)
        async with gw.session.get(gw.admin_url + "/registry/services/api") as response:
            [instance] = (await response.json())["instances"]
        assert instance["in_flight"] == 0
        async with gw.session.get(gw.admin_url + "/metrics") as response:
            metrics = await response.text()
        assert (
            'gateway_requests_total{code="499",method="GET",route="/api",service="api"} 1.0'
            in metrics
        )
        assert 'gateway_requests_in_flight{service="api"} 0.0' in metrics
    finally:
        await stop_raw_server(server)


async def test_truncated_upstream_body_aborts_the_client_connection(gateway_factory):
    gw = await gateway_factory(ROUTES)

    async def truncate(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
        await writer.drain()
        writer.close()

    server = await start_raw_server(truncate)
    try:
        port = server.sockets[0].getsockname()[1]
        url = f"{gw.admin_url}/registry/services/api/instances"
        async with gw.session.post(url, json={"host": "127.0.0.1", "port": port}) as response:
            assert response.status == 201
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
        writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), 5)  # ends: the gateway closed
        writer.close()
        await writer.wait_closed()
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"Content-Length: 100" in head
        assert len(body) < 100  # short, and the connection closed: the client can tell
    finally:
        await stop_raw_server(server)
