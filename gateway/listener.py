"""The proxy listener: one asyncio Protocol per client connection, parsed by llhttp.

A ClientConnection only records what the parser reports and hands it to the
Exchange of that request; it owns the connection's life: deadlines for the
request head and for idle keep-alive, pipelined requests answered in order,
flow control, and closing. The Listener owns the socket, the set of
connections, a ticker for deadlines, and graceful shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import Any, Final, cast

import httptools

from gateway.config import ProxySettings
from gateway.errors import error_bytes
from gateway.exchange import Exchange
from gateway.headers import HeaderError, RequestHead, new_request_id
from gateway.proxy import Proxy

log = logging.getLogger("gateway.listener")

MAX_URL: Final = 8 * 1024
TICK: Final = 0.1  # seconds between deadline checks


class ClientConnection:  # an asyncio.Protocol by its methods (a mypyc native class)
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.proxy = listener.proxy
        self.transport: asyncio.Transport | None = None
        self.peer_ip = b""
        self.parser = httptools.HttpRequestParser(self)
        self.head: RequestHead | None = None
        self.url = b""
        self.parsing: Exchange | None = None  # the request being read
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.deadline: float | None = None
        self.idle = False
        self.closing = False  # close after the current answer (shutdown)
        self.tunnel: Exchange | None = None  # after a 101: the client's bytes go there
        self._paused: set[str] = set()
        self._error: HeaderError | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b""
        listener = self.listener
        if listener.closing:  # accepted just as the listener closed
            transport.close()
            return
        if len(listener.connections) >= listener.settings.max_connections:
            self.transport.write(
                error_bytes(
                    503,
                    "overloaded",
                    "too many client connections",
                    new_request_id(),
                    b"Retry-After: 1\r\n",
                    close=True,
                )
            )
            transport.close()
            return
        listener.connections.add(self)
        self.deadline = listener.now + listener.settings.header_timeout

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.client_tunnel_data(data)
            return
        if self.idle:
            self.idle = False
            self.deadline = self.listener.now + self.listener.settings.header_timeout
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.active
            if exchange is not None and exchange.upgrade is not None and not exchange.done:
                # What follows the upgrade request is the new protocol's: pass it on.
                self.tunnel = exchange
                rest = data[upgrade.args[0] :]
                if rest:
                    exchange.client_tunnel_data(rest)
            else:  # nothing after an upgrade request can be read as HTTP/1.1
                self._stop_reading()
        except httptools.HttpParserError as exc:
            error, self._error = self._error, None
            if error is None and isinstance(exc, httptools.HttpParserCallbackError):
                log.error(
                    "error handling a request from %s",
                    self.peer_ip.decode(),
                    exc_info=exc.__context__,
                )
                error = HeaderError(500, "internal_error", "the gateway failed on this request")
            elif error is None:
                error = HeaderError(400, "bad_request", f"malformed request: {_reason(exc)}")
            self._refuse(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.forget(self)
        for exchange in {self.parsing, self.active, *self.queue} - {None}:
            exchange.client_lost()  # type: ignore[union-attr]
        self.queue.clear()
        self.parsing = self.active = None

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        if self.active is not None:
            self.active.client_writable(False)

    def resume_writing(self) -> None:
        if self.active is not None:
            self.active.client_writable(True)

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        if self.head is None:  # a new request begins
            self.head = RequestHead()
            self.url = url
        else:  # the target came in pieces
            self.url += url
        if len(self.url) > MAX_URL:
            self._error = HeaderError(414, "uri_too_long", "request line over the 8 KiB limit")
            raise self._error

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.head is not None
        try:
            self.head.add(name, value)
        except HeaderError as error:
            self._error = error
            raise

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        # llhttp keeps an HTTP/1.0 connection alive only for "Connection: keep-alive":
        # without that token, keep-alive means HTTP/1.1, and asking the parser (which
        # formats a string) is needed only in the other cases.
        http11 = (keep_alive and not head.keep_alive) or parser.get_http_version() == "1.1"
        exchange = Exchange(
            self.proxy,
            self,
            head,
            parser.get_method(),
            self.url,
            http11,
            keep_alive and not self.closing,
        )
        self.head = None
        self.deadline = None
        self.parsing = exchange
        if self.active is None:
            self.active = exchange
            exchange.start(exchange.started)
        else:
            self.queue.append(exchange)
            self.pause("pipeline")

    def on_body(self, body: bytes) -> None:
        if self.parsing is not None:
            self.parsing.client_body(body)

    def on_message_complete(self) -> None:
        exchange, self.parsing = self.parsing, None
        if exchange is not None:
            exchange.client_done()

    # -- used by the exchange ----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause(self, reason: str) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """An answer is complete: next pipelined request, idle keep-alive, or close."""
        if exchange is not self.active:
            return
        self.active = None
        if not keep_alive or self.closing:
            self.queue.clear()
            if self.transport is not None:
                self.transport.close()
            return
        if self.queue:
            following = self.active = self.queue.popleft()
            if not self.queue:
                self.resume("pipeline")
            following.start(self.proxy.loop.time())
        elif self.parsing is None:
            self.idle = True
            self.deadline = self.listener.now + self.listener.settings.idle_timeout

    # -- deadlines and shutdown ------------------------------------------------------------------

    def check_deadline(self, now: float) -> None:
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        if not self.idle and self.head is not None and self.active is None:
            self.write(
                error_bytes(
                    408,
                    "request_timeout",
                    "request head not received in time",
                    new_request_id(),
                    close=True,
                )
            )
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Close now if idle, else after the answer in progress."""
        self.closing = True
        if self.active is None and self.parsing is None and self.transport is not None:
            self.transport.close()

    # -- internals ----------------------------------------------------------------------------

    def _refuse(self, error: HeaderError) -> None:
        """A malformed request: answer it (after any answer in progress) and close."""
        broken = self.parsing
        self._stop_reading()
        if broken is not None and broken is self.active:
            # Its head went upstream already: the upstream gets a cut-off request,
            # never a complete one, and the client gets the error.
            broken.client_malformed(error.status, error.code, error.message)
        elif self.active is None:
            self.write(
                error_bytes(error.status, error.code, error.message, new_request_id(), close=True)
            )
            if self.transport is not None:
                self.transport.close()
        # else: the answer in progress finishes, then the connection closes

    def _stop_reading(self) -> None:
        self.closing = True
        self.queue.clear()
        self.parsing = None
        self.pause("stopped")


def _reason(exc: Exception) -> str:
    """llhttp's reason without the offending bytes (they are not echoed back)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed request"
    return text.split(": b'")[0].rstrip(":")[:120]


class Listener:
    def __init__(self, proxy: Proxy, settings: ProxySettings) -> None:
        self.proxy = proxy
        self.settings = settings
        self.connections: set[ClientConnection] = set()
        self.server: Any = None  # uvloop's: its sockets are a list, not the typeshed tuple
        self._ticker: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._drained: asyncio.Event | None = None
        self.closing = False
        # The time at the last tick: precise enough for connection deadlines (checked
        # once a second), and cheaper than asking the loop on every request.
        self.now = proxy.loop.time()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        loop = self.proxy.loop
        self.server = await loop.create_server(
            lambda: cast(Any, ClientConnection(self)),  # a Protocol by duck typing
            host,
            port,
            backlog=4096,
            reuse_port=reuse_port,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
        )
        self._ticker = loop.call_later(TICK, self._tick)
        return int(self.server.sockets[0].getsockname()[1])

    def forget(self, connection: ClientConnection) -> None:
        self.connections.discard(connection)
        if self._drained is not None and not self.connections:
            self._drained.set()

    def _tick(self) -> None:
        self.now = now = self.proxy.loop.time()
        self.proxy.expire_waiting(now)
        for service in self.proxy.metrics.services.values():
            service.sample()
        self._ticks += 1
        if self._ticks % 10 == 0:  # once a second is precise enough for these
            for connection in list(self.connections):
                connection.check_deadline(now)
            self.proxy.pool.sweep(now)
        self._ticker = self.proxy.loop.call_later(TICK, self._tick)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let answers in progress finish (up to ``grace``); close the rest."""
        self.closing = True
        if self.server is not None:
            self.server.close()
        self._drained = asyncio.Event()
        for connection in list(self.connections):
            connection.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(grace):
                    await self._drained.wait()
            except TimeoutError:
                log.warning(
                    "%d connections still busy after %.0fs; closing them",
                    len(self.connections),
                    grace,
                )
        for connection in list(self.connections):
            connection.abort()
        if self._ticker is not None:
            self._ticker.cancel()
        self.proxy.pool.close()
        if self.server is not None:
            await self.server.wait_closed()
