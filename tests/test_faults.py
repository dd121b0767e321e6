"""Fault injection: a misbehaving upstream, and exact outcomes for each way it misbehaves.

Each test asserts the status and error code the client gets, how many times the
upstream saw a POST (never twice), and that nothing is left behind: no pooled
connection to the broken upstream, no file descriptor, no task.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator

import pytest

from gateway.dataplane.pool import CLOSED
from tests.conftest import RawServer

ROUTES = """
proxy:
  timeout: 500ms
  connect_timeout: 300ms
routes:
  - prefix: /
    service: web
"""


class Faulty(RawServer):
    """A hand-written upstream that misbehaves as told and counts the requests it read."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seen: list[bytes] = []  # request lines

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.seen.append(head.split(b"\r\n")[0])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        if length:
            await reader.readexactly(length)
        if self.mode == "reset_mid_body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            await writer.drain()
            writer.transport.abort()  # RST
        elif self.mode == "half_body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
            await writer.drain()
            writer.close()
        elif self.mode == "slow_head":
            await asyncio.sleep(5)
        elif self.mode == "reset_before_head":
            writer.transport.abort()
        elif self.mode == "garbage":
            writer.write(b"HTTP/1.1 2OO OK\r\n\r\n")
            await writer.drain()
            writer.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def no_leaks() -> AsyncIterator[None]:
    """Set up before the gateway, torn down after it: nothing may outlive them."""
    gc.collect()
    before = _fds()
    yield
    await asyncio.sleep(0)
    gc.collect()
    assert _fds() <= before, "file descriptors left open"
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in pending if "gateway" in repr(t.get_coro())], pending


async def _setup(gateway_factory, mode: str):
    gw = await gateway_factory(ROUTES)
    faulty = Faulty(mode)
    port = await faulty.start()
    url = f"{gw.admin_url}/registry/services/web/instances"
    async with gw.session.post(url, json={"host": "127.0.0.1", "port": port}) as response:
        assert response.status == 201
    return gw, faulty, ("http", "127.0.0.1", port)


async def _raw(gw, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port)
    writer.write(request)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def _no_pooled(gw, key) -> bool:
    pool = gw.gateway.proxy.pool
    return all(c.state == CLOSED for c in pool._idle.get(key, []))


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("slow_head", 504, "upstream_timeout"),
        ("reset_before_head", 502, "upstream_protocol_error"),
        ("garbage", 502, "upstream_protocol_error"),
    ],
)
async def test_failure_before_the_head_is_a_json_error_and_a_post_goes_once(
    no_leaks, gateway_factory, mode, status, code
):
    gw, faulty, key = await _setup(gateway_factory, mode)
    try:
        async with gw.session.post(gw.proxy_url + "/p", data=b"once") as response:
            assert response.status == status
            assert (await response.json())["error"]["code"] == code
        assert len(faulty.seen) == 1  # the POST was not sent again
        assert _no_pooled(gw, key)
    finally:
        await faulty.stop()


@pytest.mark.parametrize("mode", ["reset_mid_body", "half_body"])
async def test_failure_after_the_head_aborts_the_client(no_leaks, gateway_factory, mode):
    gw, faulty, key = await _setup(gateway_factory, mode)
    try:
        data = await _raw(gw, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        declared = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert len(body) < declared  # short, and the connection was cut: never "complete"
        assert len(faulty.seen) == 1  # not retried: the head had gone out
        assert _no_pooled(gw, key)
    finally:
        await faulty.stop()


async def test_refused_connections_on_every_instance_are_502_unavailable(no_leaks, gateway_factory):
    gw, faulty, key = await _setup(gateway_factory, "refuse")
    await faulty.stop()  # nothing listens there any more
    async with gw.session.post(gw.proxy_url + "/p", data=b"x") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    assert faulty.seen == []
