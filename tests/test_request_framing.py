"""Malformed requests on the proxy listener: refused with JSON, never forwarded."""

from __future__ import annotations

import asyncio
import json

import pytest

ROUTES = """
routes:
  - prefix: /
    service: web
"""


async def _exchange(port: int, raw: bytes) -> tuple[int, dict[str, object], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        data = await asyncio.wait_for(reader.read(), 5)  # the gateway closes the connection
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body.startswith(b"{") else {}, head


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 4000) for i in range(20))
            + b"\r\n",
            431,
            "headers_too_large",
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            400,
            "bad_request",
        ),
        (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n", 400, "bad_request"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_request"),
        (
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "bad_request",
        ),
        (b"GET /../x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400, "bad_path"),
        (
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            405,
            "method_not_allowed",
        ),
    ],
    ids=[
        "long-uri",
        "long-header",
        "headers-total",
        "two-hosts",
        "no-host",
        "cl-and-te",
        "two-cl",
        "bare-lf",
        "obs-fold",
        "space-before-colon",
        "bad-chunk-size",
        "dot-dot",
        "connect",
    ],
)
async def test_malformed_request_is_refused(gateway_factory, upstreams, raw, status, code):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    await gw.register("web", up)
    got_status, body, head = await _exchange(gw.gateway.proxy_port, raw)
    assert got_status == status
    assert body["error"]["code"] == code
    assert b"a" * 64 not in head  # the input is not echoed (a hex id may hold "aaaa")
    assert up.requests == []


async def test_absolute_form_is_routed_by_path_to_registered_instances(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    up = await upstreams("web")
    await gw.register("web", up)
    raw = (
        b"GET http://evil.example/x?y=1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    )
    status, body, _ = await _exchange(gw.gateway.proxy_port, raw)
    assert status == 200
    assert body["path"] == "/x?y=1"
    assert len(up.requests) == 1
