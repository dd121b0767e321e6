"""The data plane without sockets: ClientConnection, Exchange and UpstreamConnection
driven through FakeTransports (uvicorn's way of testing its protocols).

Each test feeds bytes as a client or an upstream would and asserts the bytes that
come out, the phases the objects are in and what is counted; nothing listens, no
time passes but the listener's clock, which a test sets.
"""

from __future__ import annotations

import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from gateway.config.loader import parse_config
from gateway.dataplane import exchange as ex
from gateway.dataplane import listener as li
from gateway.dataplane import pool as po
from gateway.dataplane.context import ProxyContext
from gateway.dataplane.listener import ClientConnection, Listener
from gateway.dataplane.pool import UpstreamConnection
from gateway.dataplane.routing import RouteTable
from gateway.dataplane.stats import RequestStats
from gateway.dataplane.wire import (
    AS_SENT,
    BODYLESS,
    CHUNKED,
    TO_CLOSE,
    response_framing,
)
from registry.core.store import Registry
from tests.fakes import FakeTransport

CONFIG = """
routes:
  - prefix: /
    service: web
proxy:
  idle_timeout: 30s
  header_timeout: 10s
services:
  web:
    instances: ["127.0.0.1:18001"]
"""
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


class Plane:
    """One proxy context, its listener (never started) and upstream connections in the
    pool, each on a FakeTransport."""

    def __init__(self, upstreams: int = 2) -> None:
        config = parse_config(CONFIG)
        self.registry = Registry(time.time)
        self.registry.set_static("web", config.services["web"].instances)
        self.stats = RequestStats(self.registry)
        self.proxy = ProxyContext(RouteTable(config.routes), self.registry, self.stats)
        self.listener = Listener(self.proxy, config.proxy)
        self.settings = config.proxy
        (self.instance,) = self.registry.instances("web")
        self.upstreams: list[tuple[UpstreamConnection, FakeTransport]] = []
        for _ in range(upstreams):
            self.add_upstream()

    def add_upstream(self) -> tuple[UpstreamConnection, FakeTransport]:
        connection = UpstreamConnection(self.proxy.pool, self.instance.pool_key)
        transport = FakeTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        self.proxy.pool.put(connection)
        self.upstreams.append((connection, transport))
        return connection, transport

    def client(self) -> tuple[ClientConnection, FakeTransport]:
        connection = ClientConnection(self.listener)
        transport = FakeTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        return connection, transport

    def busy(self) -> tuple[UpstreamConnection, FakeTransport]:
        """The one upstream connection with bytes written to it and not yet taken
        (FakeTransport.written)."""
        sent = [(c, t) for c, t in self.upstreams if t.out]
        assert len(sent) == 1, f"{len(sent)} upstream connections were written to"
        return sent[0]

    def idle(self) -> int:
        return len(self.proxy.pool._idle.get(self.instance.pool_key, []))

    def counted(self) -> dict[tuple[str, int], int]:
        return self.stats.route("/", "web").counts


@pytest.fixture
async def plane() -> Iterator[Plane]:
    yield Plane()


def _exchange(client: ClientConnection) -> Any:
    exchange = client.active
    assert exchange is not None
    return exchange


# -- the framing decision -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("head_request", "status", "length", "chunked", "http11", "framing"),
    [
        (True, 200, b"5", False, True, BODYLESS),  # HEAD: the head is the answer
        (False, 204, None, False, True, BODYLESS),
        (False, 304, b"5", False, True, BODYLESS),
        (False, 200, b"5", False, True, AS_SENT),
        (False, 200, b"5", False, False, AS_SENT),  # a length suits HTTP/1.0 too
        (False, 200, None, True, True, CHUNKED),  # re-chunked by the gateway
        (False, 200, b"5", True, True, CHUNKED),  # chunked wins over a length
        (False, 200, None, False, True, CHUNKED),  # read to the close, chunked on
        (False, 200, None, True, False, TO_CLOSE),  # HTTP/1.0 reads to the close
        (False, 200, None, False, False, TO_CLOSE),
    ],
)
def test_response_framing(
    head_request: bool, status: int, length: bytes | None, chunked: bool, http11: bool, framing: int
) -> None:
    assert response_framing(head_request, status, length, chunked, http11) == framing


# -- one request, keep-alive ---------------------------------------------------------------


async def test_a_get_goes_through_and_the_connections_are_kept(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET /a?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n")
    exchange = _exchange(client)
    assert exchange.phase == ex.ATTEMPT
    upstream, upstream_out = plane.busy()
    assert upstream.state == po.BUSY
    sent = upstream_out.written()
    assert sent.startswith(b"GET /a?x=1 HTTP/1.1\r\n")
    assert b"\r\nHost: example.com\r\n" in sent  # preserve_host is the default
    assert b"\r\nX-Forwarded-For: 127.0.0.1\r\n" in sent
    upstream.data_received(OK)
    answer = out.written()
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nhello")
    assert b"\r\nX-Request-ID: " in answer
    assert exchange.phase == ex.DONE
    assert upstream.state == po.IDLE and plane.idle() == 2  # back in the pool
    assert client.phase == li.IDLE and client.active is None
    assert client.deadline == plane.listener.now + plane.settings.idle_timeout
    assert plane.counted() == {("GET", 200): 1}
    assert plane.stats.service("web").in_flight == 0
    assert not out.closed


async def test_keep_alive_serves_the_next_request_on_the_same_connection(plane: Plane) -> None:
    client, out = plane.client()
    for path in (b"/one", b"/two"):
        client.data_received(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n\r\n")
        upstream, upstream_out = plane.busy()
        assert upstream_out.written().startswith(b"GET " + path + b" ")
        upstream.data_received(OK)
        assert out.written().endswith(b"hello")
    assert plane.counted() == {("GET", 200): 2}
    assert not out.closed and client.phase == li.IDLE


async def test_connection_close_from_the_client_closes_after_the_answer(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    plane.busy()[0].data_received(OK)
    assert b"\r\nConnection: close\r\n" in out.written()
    assert out.closed and not out.aborted  # close(): what was written still goes out


# -- framing to the client ----------------------------------------------------------------


async def test_a_body_read_to_the_close_is_chunked_to_http11(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, _ = plane.busy()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhel")
    upstream.data_received(b"lo")
    assert _exchange(client).phase == ex.RESPONDING
    upstream.connection_lost(None)  # the upstream's clean close ends the body
    answer = out.written()
    assert b"\r\nTransfer-Encoding: chunked\r\n" in answer
    assert answer.endswith(b"\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
    assert plane.counted() == {("GET", 200): 1}
    assert not out.aborted
    assert plane.stats.service("web").errors["reset"] == 0


async def test_a_chunked_body_to_http10_is_read_to_the_close(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n")
    upstream, _ = plane.busy()
    upstream.data_received(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    answer = out.written()
    assert b"Transfer-Encoding" not in answer
    assert b"\r\nConnection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\nhello")
    assert out.closed
    assert upstream.state == po.IDLE  # the upstream's own framing was complete


async def test_a_reset_mid_body_aborts_the_client(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, _ = plane.busy()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    upstream.connection_lost(ConnectionResetError("reset by peer"))
    assert out.written().endswith(b"hello")  # what came, and no more
    assert out.aborted  # a cut the client sees, never a short body that looks whole
    assert plane.stats.service("web").errors["reset"] == 1
    assert plane.counted() == {("GET", 200): 1}
    assert plane.stats.service("web").in_flight == 0


async def test_a_clean_close_before_the_head_on_a_reused_connection_goes_again(
    plane: Plane,
) -> None:
    """The upstream closed a pooled connection just as the request went out: not the
    instance's failure, and not a retry: the same request on another connection."""
    client, out = plane.client()
    client.data_received(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
    first, first_out = plane.busy()
    assert first_out.written().startswith(b"GET /x ")
    first.connection_lost(None)
    assert first.state == po.CLOSED
    second, second_out = plane.busy()
    assert second is not first and second_out.written().startswith(b"GET /x ")
    second.data_received(OK)
    assert out.written().endswith(b"hello")
    assert plane.stats.service("web").retries == 0
    assert plane.stats.service("web").errors == dict.fromkeys(
        ("connect", "timeout", "reset", "protocol"), 0
    )


# -- pipelining ---------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    first = _exchange(client)
    (queued,) = client.queue
    assert queued.phase == ex.QUEUED
    assert not out.reading  # nothing more is read while a request waits its turn
    upstream, upstream_out = plane.busy()
    assert upstream_out.written().startswith(b"GET /1 ")
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert first.phase == ex.DONE and client.active is queued and queued.phase == ex.ATTEMPT
    assert out.reading
    upstream, upstream_out = plane.busy()
    assert upstream_out.written().startswith(b"GET /2 ")
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
    answers = out.written()
    assert answers.index(b"\r\n\r\n1") < answers.index(b"\r\n\r\n2")
    assert plane.counted() == {("GET", 200): 2}


async def test_a_malformed_request_after_good_ones_is_refused_in_its_turn(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHo st: x\r\n\r\n")
    assert client.phase == li.STOPPED and not out.reading
    upstream, _ = plane.busy()
    assert out.written() == b""  # the refusal waits for the answer before it
    upstream.data_received(OK)
    answers = out.written()
    assert answers.index(b"hello") < answers.index(b"HTTP/1.1 400 Bad Request\r\n")
    assert out.closed


# -- backpressure -------------------------------------------------------------------------


async def test_a_slow_client_pauses_the_upstream_read(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, upstream_out = plane.busy()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    client.pause_writing()  # the client's socket buffer is full
    assert not upstream_out.reading
    client.resume_writing()
    assert upstream_out.reading
    upstream.data_received(b"world")
    assert out.written().endswith(b"helloworld")


async def test_a_slow_upstream_pauses_the_client_read(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello")
    upstream, upstream_out = plane.busy()
    upstream.pause_writing()
    assert not out.reading
    upstream.resume_writing()
    assert out.reading
    client.data_received(b"world")
    assert upstream_out.written().endswith(b"\r\n\r\nhelloworld")


async def test_a_body_held_before_an_upstream_takes_it_pauses_the_client_past_the_limit() -> None:
    """No idle upstream connection: the body waits in the exchange while one opens; past
    256 KiB the client's reading pauses, and resumes when the connection takes it."""
    plane = Plane(upstreams=0)
    loop = plane.proxy.loop
    connecting: list[Coroutine[Any, Any, None]] = []
    # The exchange opens a connection in a task: caught here, it never runs (no socket);
    # the test hands the exchange a connection as that task would.
    loop.create_task = connecting.append  # type: ignore[method-assign,assignment]
    try:
        client, out = plane.client()
        client.data_received(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 300000\r\n\r\n")
        client.data_received(b"x" * 200_000)
        assert out.reading
        client.data_received(b"x" * 100_000)
        assert not out.reading
    finally:
        del loop.create_task  # type: ignore[method-assign]
    (opening,) = connecting
    opening.close()
    upstream, upstream_out = plane.add_upstream()
    plane.proxy.pool.acquire(plane.instance.pool_key, False)  # as a new one: not pooled
    _exchange(client)._send(upstream, loop.time())
    assert out.reading
    assert upstream_out.written().endswith(b"\r\n\r\n" + b"x" * 300_000)
    upstream.data_received(OK)
    assert out.written().endswith(b"hello")


# -- teardown -----------------------------------------------------------------------------


async def test_the_client_going_away_mid_response_ends_everything(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    exchange = _exchange(client)
    upstream, upstream_out = plane.busy()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel")
    client.connection_lost(None)
    assert exchange.phase == ex.DONE
    assert upstream.state == po.CLOSED and upstream_out.aborted  # half a response: not reused
    assert plane.idle() == 1
    assert plane.counted() == {("GET", 499): 1}  # counted once, as the client's close
    assert plane.stats.service("web").in_flight == 0
    assert plane.instance.in_flight == 0
    # Nothing leads back to the connection: reference counting alone frees it.
    assert client.transport is None and client.active is None and not client.queue
    assert client not in plane.listener.connections
    upstream.connection_lost(None)  # the abort's own callback: nothing more happens
    assert plane.counted() == {("GET", 499): 1}


async def test_the_client_going_away_while_queued_counts_each_request_once(plane: Plane) -> None:
    client, _ = plane.client()
    client.data_received(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
    client.connection_lost(None)
    assert plane.counted() == {("GET", 499): 1}
    # The queued one was never routed: it counts as no route's.
    assert plane.stats.unmatched.counts == {("GET", 499): 1}
    assert plane.stats.service("web").in_flight == 0


async def test_an_upstream_timeout_answers_504_and_frees_the_attempt(plane: Plane) -> None:
    client, out = plane.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    upstream, upstream_out = plane.busy()
    exchange = _exchange(client)
    plane.proxy.expire_waiting(exchange.deadline)
    answer = out.written()
    assert answer.startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert b'"code": "upstream_timeout"' in answer
    assert upstream.state == po.CLOSED and upstream_out.aborted
    assert exchange.phase == ex.DONE and not plane.proxy.waiting
    assert plane.stats.service("web").errors["timeout"] == 1
    assert plane.instance.in_flight == 0
    assert client.phase == li.IDLE  # a gateway error keeps the connection
