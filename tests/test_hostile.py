"""Hostile input, over raw sockets: what reaches the upstream, what the client receives.

Each test plays an attacker against the proxy listener (or a malicious upstream
against the gateway) with an upstream that records every byte it is sent, and
asserts both sides: nothing unrouted or unchecked reaches the upstream, nothing
the upstream should not say reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from tests.conftest import RawServer

ROUTES = """
proxy:
  timeout: 2s
routes:
  - prefix: /strip
    service: web
    strip_prefix: true
  - prefix: /
    service: web
"""

Script = Callable[[bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Recorder(RawServer):
    """An upstream that keeps every byte each connection sends it and answers each
    request head by ``script`` (by default a 200 whose body is the request line)."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or _echo_line
        self.received: list[bytearray] = []  # per connection, everything read
        self.heads: list[bytes] = []  # request heads, in order
        self.closed = asyncio.Event()  # a connection ended (by the gateway)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received = bytearray()
        self.received.append(received)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                received += head
                self.heads.append(head)
                await self.script(head, reader, writer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                received += exc.partial
        finally:
            self.closed.set()

    @property
    def everything(self) -> bytes:
        return b"".join(self.received)


async def _echo_line(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    length = _content_length(head)
    if length:
        await reader.readexactly(length)
    line = head.split(b"\r\n")[0]
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(line), line))


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


@pytest.fixture
async def recorder() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    started: list[Recorder] = []

    async def start(script: Script | None = None) -> Recorder:
        upstream = Recorder(script)
        upstream.port = await upstream.start()  # type: ignore[attr-defined]
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


async def _gateway(gateway_factory, *upstreams: Recorder, routes: str = ROUTES):
    gw = await gateway_factory(routes)
    for upstream in upstreams:
        url = f"{gw.admin_url}/registry/services/web/instances"
        body = {"host": "127.0.0.1", "port": upstream.port}  # type: ignore[attr-defined]
        async with gw.session.post(url, json=body) as response:
            assert response.status == 201
    return gw


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes]:
    """One response framed by Content-Length: (status, head, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    body = await asyncio.wait_for(reader.readexactly(_content_length(head)), 5)
    return int(head.split(b" ")[1]), head, body


async def _read_to_close(reader: asyncio.StreamReader, timeout: float = 5) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


def _code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Awaitable[_Client]]]:
    clients: list[_Client] = []

    async def open_(gw) -> _Client:
        client = _Client(*await asyncio.open_connection("127.0.0.1", gw.gateway.proxy_port))
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.close()


# -- 1. Upgrade smuggling -------------------------------------------------------------------

HANDSHAKE = (
    b"GET /seq/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SMUGGLED = b"GET /seq/slow HTTP/1.1\r\nHost: internal\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n"


async def test_bytes_after_a_refused_handshake_never_reach_the_upstream(
    gateway_factory, recorder, connect
):
    upstream = await recorder()  # answers every request with 200: the handshake is refused
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(HANDSHAKE + SMUGGLED)
    status, head, body = await _read_answer(client.reader)
    assert status == 200 and body == b"GET /seq/ws HTTP/1.1"
    assert b"connection: close" in head.lower()
    assert await _read_to_close(client.reader) == b""  # nothing more, then closed
    await asyncio.wait_for(upstream.closed.wait(), 5)  # that upstream connection: not pooled
    assert b"/seq/slow" not in upstream.everything
    assert len(upstream.heads) == 1
    # A later client gets its own answer, on a new upstream connection.
    later = await connect(gw)
    later.writer.write(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await _read_answer(later.reader))[2] == b"GET /later HTTP/1.1"
    assert len(upstream.received) == 2
    assert b"/seq/slow" not in upstream.everything


async def _switch(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    await writer.drain()
    data = await reader.read(1000)  # then echo one read of the "new protocol" and stop
    writer.write(b"echo:" + data)
    await writer.drain()
    raise ConnectionError  # ends the handler: the tunnel closes


async def test_bytes_after_a_handshake_go_through_once_the_upstream_switches(
    gateway_factory, recorder, connect
):
    upstream = await recorder(_switch)
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(HANDSHAKE + b"early-frame")
    head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert await _read_to_close(client.reader) == b"echo:early-frame"


async def test_h2c_upgrade_is_answered_as_http11_and_not_tunnelled(
    gateway_factory, recorder, connect
):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(
        b"GET /h2c HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (await _read_answer(client.reader))[2] == b"GET /h2c HTTP/1.1"
    assert (await _read_answer(client.reader))[2] == b"GET /next HTTP/1.1"  # still HTTP/1.1
    first = upstream.heads[0].lower()
    assert b"upgrade" not in first and b"http2-settings" not in first
    assert len(upstream.heads) == 2


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 38\r\n\r\n",
        b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n26\r\n",
    ],
    ids=["websocket-post", "h2c-chunked"],
)
async def test_an_upgrade_request_with_a_body_is_refused(
    gateway_factory, recorder, connect, request_head
):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(request_head + SMUGGLED)
    status, _, body = await _read_answer(client.reader)
    assert (status, _code(body)) == (400, "bad_request")
    assert await _read_to_close(client.reader) == b""
    assert upstream.heads == []


# -- 2. Header bytes held without limit, head timeout mid-line ------------------------------


async def _flood(client: _Client, start: bytes) -> bytes:
    """``start``, then up to 800 KiB more of it in 4 KiB writes (the gateway stops at ~80
    KiB); what the gateway answered before closing, or b"" if the close reset it away."""
    client.writer.write(start)
    try:
        for _ in range(200):
            client.writer.write(b"a" * 4096)
            await client.writer.drain()
            await asyncio.sleep(0)
        return await _read_to_close(client.reader)
    except ConnectionError:
        return b""


@pytest.mark.parametrize(
    ("start", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-A: ", b"431"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Name-Without-End", b"431"),
        (b"GET /", b"414"),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1;ext=", b"431"),
    ],
    ids=["value", "name", "target", "chunk-extension"],
)
async def test_an_endless_header_line_is_cut_at_the_limit(
    gateway_factory, recorder, connect, start, code
):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    answer = await _flood(client, start)
    if answer:
        assert answer.startswith(b"HTTP/1.1 " + code + b" ")
    if b"chunked" in start:  # its head went on at once; the cut-off body never ends
        await asyncio.wait_for(upstream.closed.wait(), 5)
        assert b"0\r\n\r\n" not in upstream.everything
    else:
        assert upstream.heads == []
    assert not gw.gateway._listener.connections  # type: ignore[union-attr]


async def test_endless_trailers_are_cut_at_the_limit(gateway_factory, recorder, connect):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    answer = await _flood(
        client,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-T: ",
    )
    if answer:
        assert b" 431 " in answer.split(b"\r\n")[0] or b" 502 " in answer.split(b"\r\n")[0]
    assert not gw.gateway._listener.connections  # type: ignore[union-attr]


async def test_head_timeout_fires_in_the_middle_of_a_header_line(
    gateway_factory, recorder, connect
):
    upstream = await recorder()
    routes = "proxy:\n  header_timeout: 500ms\n" + ROUTES.replace("proxy:\n", "", 1)
    gw = await _gateway(gateway_factory, upstream, routes=routes)
    client = await connect(gw)
    started = time.monotonic()
    client.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a")
    answer = await _read_to_close(client.reader, timeout=5)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"request_timeout"' in answer
    assert time.monotonic() - started < 2.0  # 500 ms, checked once a second
    assert upstream.heads == []


# -- 3./4. A malicious upstream: nothing after a broken answer reaches the client ------------

FORGED = b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\nContent-Length: 6\r\n\r\nforged"


async def _huge_head(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    if b"/fine" in head:
        return await _echo_line(head, reader, writer)
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n")
    await _then_forge(reader, writer)


FORGED_SENT: list[bytes] = []  # what the malicious upstream below managed to send


async def _then_forge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """After the broken answer: a forged one, unless the gateway closes the connection first."""
    await writer.drain()
    try:
        if await asyncio.wait_for(reader.read(1), 1) == b"":
            return  # closed by the gateway: nothing more can reach the client
    except TimeoutError:
        pass
    writer.write(FORGED)
    FORGED_SENT.append(FORGED)


async def _unasked_101(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    if b"/fine" in head:
        return await _echo_line(head, reader, writer)
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    await _then_forge(reader, writer)


@pytest.mark.parametrize("script", [_huge_head, _unasked_101], ids=["head-over-64k", "101"])
async def test_after_a_broken_answer_nothing_more_from_the_upstream_reaches_the_client(
    gateway_factory, recorder, connect, script
):
    FORGED_SENT.clear()
    upstream = await recorder(script)
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await _read_answer(client.reader)
    assert (status, _code(body)) == (502, "upstream_protocol_error")
    await asyncio.wait_for(upstream.closed.wait(), 5)  # the gateway closed it
    # The same client connection goes on, and sees only its own next answer.
    client.writer.write(b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n")
    status, head, body = await _read_answer(client.reader)
    assert (status, body) == (200, b"GET /fine HTTP/1.1")
    assert b"attacker" not in head
    assert FORGED_SENT == []


async def _endless_head(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(10_000):  # ~1.3 MB of header lines, never the blank line
        writer.write(b"X-Endless: " + b"e" * 120 + b"\r\n")
        await writer.drain()


async def test_an_endless_response_head_is_cut_at_the_limit_not_the_timeout(
    gateway_factory, recorder, connect
):
    upstream = await recorder(_endless_head)
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    started = time.monotonic()
    client.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await _read_answer(client.reader)
    assert (status, _code(body)) == (502, "upstream_protocol_error")
    assert time.monotonic() - started < 1.5  # the route's timeout is 2 s
    await asyncio.wait_for(upstream.closed.wait(), 5)


async def _dribbled_head(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100):
        writer.write(b"X-Slow: s\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_a_dribbled_response_head_times_out_on_time(gateway_factory, recorder, connect):
    upstream = await recorder(_dribbled_head)
    routes = ROUTES.replace("timeout: 2s", "timeout: 500ms")
    gw = await _gateway(gateway_factory, upstream, routes=routes)
    client = await connect(gw)
    started = time.monotonic()
    client.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await _read_answer(client.reader)
    elapsed = time.monotonic() - started
    assert (status, _code(body)) == (504, "upstream_timeout")
    assert 0.45 < elapsed < 0.8  # the ticker checks every 100 ms


# -- 5. A slow client body is the client's fault --------------------------------------------

SLOW_ROUTES = """
proxy:
  timeout: 300ms
  body_timeout: 500ms
services:
  web:
    outlier: {consecutive_failures: 2}
routes:
  - prefix: /
    service: web
"""


async def _read_body(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    body = await reader.readexactly(_content_length(head))
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))


async def test_stalled_bodies_get_408_and_never_eject_the_instance(
    gateway_factory, recorder, connect
):
    one, two = await recorder(_read_body), await recorder(_read_body)
    gw = await _gateway(gateway_factory, one, two, routes=SLOW_ROUTES)
    clients = [await connect(gw) for _ in range(6)]
    for client in clients:
        client.writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\na")
    for client in clients:
        answer = await _read_to_close(client.reader, timeout=5)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b'"request_timeout"' in answer
    async with gw.session.get(gw.admin_url + "/registry/services/web") as response:
        instances = (await response.json())["instances"]
    assert [i["health"] for i in instances] == ["healthy", "healthy"]
    async with gw.session.get(gw.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert 'gateway_upstream_errors_total{reason="timeout",service="web"} 0.0' in metrics


async def test_a_slow_upload_is_not_cut_at_the_response_timeout(gateway_factory, recorder, connect):
    upstream = await recorder(_read_body)
    gw = await _gateway(gateway_factory, upstream, routes=SLOW_ROUTES)
    client = await connect(gw)
    client.writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
    for piece in b"abcde":  # 5 pieces, 200 ms apart: 1 s in all, over the 300 ms timeout
        await asyncio.sleep(0.2)
        client.writer.write(bytes([piece]))
    status, _, body = await _read_answer(client.reader)
    assert (status, body) == (200, b"abcde")


# -- 6. A client that never reads ------------------------------------------------------------


async def _big_answer(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    size = 64 * 1024 * 1024
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"x" * 65536
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()


async def test_a_client_that_reads_nothing_is_closed_at_the_send_timeout(
    gateway_factory, recorder, connect
):
    upstream = await recorder(_big_answer)
    routes = "proxy:\n  send_timeout: 500ms\n" + ROUTES.replace("proxy:\n", "", 1)
    gw = await _gateway(gateway_factory, upstream, routes=routes)
    client = await connect(gw)
    client.writer.transport.set_write_buffer_limits(0)
    client.writer.transport.pause_reading()  # the client reads nothing
    client.writer.write(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    started = time.monotonic()
    await asyncio.wait_for(upstream.closed.wait(), 5)  # upstream connection released
    assert time.monotonic() - started < 3.5
    listener = gw.gateway._listener  # type: ignore[union-attr]
    for _ in range(100):
        if not listener.connections:
            break
        await asyncio.sleep(0.02)
    assert not listener.connections


# -- 7. Trailers -----------------------------------------------------------------------------


async def _read_chunked(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    if b"chunked" not in head:
        return await _echo_line(head, reader, writer)
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            break
        body += (await reader.readexactly(size + 2))[:-2]
    trailer = await reader.readuntil(b"\r\n")  # the gateway drops trailers: the blank line
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
    assert trailer == b"\r\n"


async def test_a_chunked_request_with_trailers_is_answered(gateway_factory, recorder, connect):
    upstream = await recorder(_read_chunked)
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Trailer: a\r\nX-Other: b\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    status, _, body = await _read_answer(client.reader)
    assert (status, body) == (200, b"hello")
    status, _, body = await _read_answer(client.reader)
    assert (status, body) == (200, b"GET /next HTTP/1.1")
    assert b"X-Trailer" not in upstream.everything


# -- 8. An upstream naming its framing in Connection ------------------------------------------


async def _names_length(head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: Content-Length, X-Drop\r\nX-Drop: 1\r\n"
                 b"Content-Length: 5\r\n\r\nhello")  # fmt: skip


async def test_connection_cannot_strip_the_response_framing(gateway_factory, recorder, connect):
    upstream = await recorder(_names_length)
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    for _ in range(2):  # both answers framed, on one kept-alive connection
        client.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, head, body = await _read_answer(client.reader)
        assert (status, body) == (200, b"hello")
        assert b"content-length: 5" in head.lower()
        assert b"x-drop" not in head.lower()


# -- 9./10. Pipelining with a malformed or partial request ---------------------------------


async def test_valid_pipelined_requests_before_a_malformed_one_are_all_answered(
    gateway_factory, recorder, connect
):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\nGET /4 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (await _read_answer(client.reader))[2] == b"GET /1 HTTP/1.1"
    assert (await _read_answer(client.reader))[2] == b"GET /2 HTTP/1.1"
    status, head, body = await _read_answer(client.reader)
    assert (status, _code(body)) == (400, "bad_request")
    assert b"connection: close" in head.lower()
    assert await _read_to_close(client.reader) == b""
    assert [h.split(b"\r\n")[0] for h in upstream.heads] == [
        b"GET /1 HTTP/1.1",
        b"GET /2 HTTP/1.1",
    ]


async def test_a_partial_pipelined_head_gets_408_at_the_head_timeout(
    gateway_factory, recorder, connect
):
    upstream = await recorder()
    routes = "proxy:\n  header_timeout: 500ms\n  idle_timeout: 30s\n" + ROUTES.replace(
        "proxy:\n", "", 1
    )
    gw = await _gateway(gateway_factory, upstream, routes=routes)
    client = await connect(gw)
    started = time.monotonic()
    client.writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTT")
    assert (await _read_answer(client.reader))[2] == b"GET /1 HTTP/1.1"
    answer = await _read_to_close(client.reader)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started < 2.5
    assert len(upstream.heads) == 1


# -- 14. Headers a client may not forge -----------------------------------------------------

SPOOFED = (
    b"X-Forwarded-Prefix: /admin\r\nX-Forwarded-Port: 443\r\nX-Real-IP: 10.9.9.9\r\n"
    b"Forwarded: for=10.9.9.9;proto=https\r\nTrue-Client-IP: 10.9.9.9\r\n"
    b"X-Client-IP: 10.9.9.9\r\nX-Forwarded-Server: evil\r\nX-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Host: evil\r\nX_Forwarded_For: 10.9.9.9\r\nX_Real_IP: 10.9.9.9\r\n"
    b"Transfer_Encoding: evil\r\nX-Forwarded_Host: evil\r\nX-Custom_Name: kept\r\n"
)


@pytest.mark.parametrize(
    ("path", "prefix"), [(b"/plain", None), (b"/strip/x", b"/strip")], ids=["no-strip", "strip"]
)
async def test_spoofed_forwarding_headers_are_removed_or_replaced(
    gateway_factory, recorder, connect, path, prefix
):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n%b\r\n" % (path, SPOOFED))
    assert (await _read_answer(client.reader))[0] == 200
    head = upstream.heads[0].decode()
    headers = [line.split(":", 1) for line in head.split("\r\n")[1:] if line]
    got = {name.lower(): value.strip() for name, value in headers}
    # The gateway's own ids are random digits: they may hold "443" by chance.
    claims = "\r\n".join(
        line
        for line in head.split("\r\n")
        if not line.lower().startswith(("traceparent:", "x-request-id:"))
    )
    assert "10.9.9.9" not in claims and "evil" not in claims and "443" not in claims
    assert got["x-real-ip"] == "127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["x-forwarded-host"] == "x"
    assert got.get("x-forwarded-prefix") == (prefix.decode() if prefix else None)
    assert got["forwarded"] == "for=127.0.0.1;proto=http;host=x"  # this hop only
    for name in ("true-client-ip", "x-client-ip", "x-forwarded-port"):
        assert name not in got
    assert got["x-custom_name"] == "kept"  # underscores alone are no reason to drop a header


@pytest.mark.parametrize(
    "target",
    [b"/public#/../admin", b"/public?a=1#x", b"http://x/public#frag"],
    ids=["path", "query", "absolute-form"],
)
async def test_a_fragment_in_the_target_is_refused(gateway_factory, recorder, connect, target):
    upstream = await recorder()
    gw = await _gateway(gateway_factory, upstream)
    client = await connect(gw)
    client.writer.write(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % target)
    status, _, body = await _read_answer(client.reader)
    assert (status, _code(body)) == (400, "bad_request")
    assert upstream.heads == []
