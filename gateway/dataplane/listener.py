"""The proxy listener: one asyncio Protocol per client connection, parsed by llhttp.

A ClientConnection only records what the parser reports and hands it to the
Exchange of that request; it owns the connection's life: deadlines for the
request head and for idle keep-alive, pipelined requests answered in order,
flow control, and closing. The Listener owns the socket, the set of
connections, a ticker for deadlines, and graceful shutdown.

What a connection is reading (``ClientConnection.phase``):

=======  ===============================================  =============================
phase    what is going on                                 goes to
=======  ===============================================  =============================
NEW      connected, or bytes after IDLE: no request has   HEAD (llhttp: a message
         begun (header_timeout runs)                      begins); STOPPED
HEAD     a request head has begun, not complete           BODY; STOPPED (malformed,
                                                          too large, 408)
BODY     head complete (an Exchange exists, ``parsing``)  READ; STOPPED (bad framing,
         and its body is coming (body_timeout)            408); TUNNEL (a handshake)
READ     the last request is complete; its answer, and    HEAD; IDLE (every answer
         those before it, may still be going out          given, keep-alive)
IDLE     keep-alive: waiting for a request                NEW (a byte comes in)
         (idle_timeout)
STOPPED  nothing more is read (malformed, stalled,        (closes after the answers
         CONNECT); earlier requests are still answered    due, then the refusal)
TUNNEL   WebSocket: the client's bytes go to the          (closes with the tunnel)
         exchange as they come
=======  ===============================================  =============================

Answers go out in request order: ``active`` is the exchange being answered,
``queue`` the pipelined ones after it. ``closing`` (shutdown) closes the connection
after the answer in progress, whatever the phase.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from typing import Any, Final, cast

import httptools

from gateway.config.model import ProxySettings
from gateway.dataplane.context import ProxyContext
from gateway.dataplane.exchange import (
    DONE,
    PAUSE_PIPELINE,
    PAUSE_STOPPED,
    Exchange,
)
from gateway.dataplane.wire import MAX_TOTAL, HeaderError, RequestHead, error_bytes, new_request_id

# What a closed connection keeps instead of its own parser, whose callbacks are bound
# methods of the connection (a cycle the collector would have to find): calls nothing.
_DETACHED: Final = httptools.HttpRequestParser(None)

log = logging.getLogger("gateway.listener")

MAX_URL: Final = 8 * 1024
# Bytes llhttp may hold for a client without reporting anything (a header line or a
# trailer still coming): a whole head's worth. Counted per read, so at most one read more.
MAX_HELD: Final = MAX_URL + MAX_TOTAL + 8 * 1024
TICK: Final = 0.1  # seconds between deadline checks

NEW: Final = 0
HEAD: Final = 1
BODY: Final = 2
READ: Final = 3
IDLE: Final = 4
STOPPED: Final = 5
TUNNEL: Final = 6


class ClientConnection:  # an asyncio.Protocol by its methods (a mypyc native class)
    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.proxy = listener.proxy
        self.transport: asyncio.Transport | None = None
        self.peer_ip = b""
        self.proto = listener.proto  # what X-Forwarded-Proto says
        self.trusted = False  # a proxy in front, whose forwarding headers go on
        # It holds bound methods of this connection (a cycle): connection_lost swaps it.
        self.parser = httptools.HttpRequestParser(self)
        self.head: RequestHead | None = None
        self.url = b""
        self.parsing: Exchange | None = None  # the request being read
        self.active: Exchange | None = None  # the request being answered
        self.queue: deque[Exchange] = deque()  # pipelined requests waiting their turn
        self.deadline: float | None = None  # for the request head, or the idle keep-alive
        self.phase = NEW
        self.progress = False  # the parser reported a head, body bytes or an end in this read
        self.held = 0  # bytes read since llhttp last reported progress (see MAX_HELD)
        self.last_read = 0.0  # listener time of the last read, for the body timeout
        self.backlog = 0  # bytes waiting in the transport for the client at the last check
        self.send_progress = 0.0  # when the client last took some of them
        self.closing = False  # close after the current answer (shutdown)
        self.refusal: bytes | None = None  # the error answer due after the queued answers
        self.upgrading: Exchange | None = None  # a WebSocket handshake llhttp stops after
        self.tunnel: Exchange | None = None  # after the handshake: the client's bytes go there
        self._paused = 0  # why reading is paused: PAUSE_* bits
        self._error: HeaderError | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b""
        self.trusted = bool(peer) and self.listener.settings.trusts(peer[0])
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
        self.proxy.stats.connections += 1
        self.deadline = listener.now + listener.settings.header_timeout

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == TUNNEL:
            if self.tunnel is not None:
                self.tunnel.client_tunnel_data(data)
            return
        if phase == STOPPED:
            return
        listener = self.listener
        self.last_read = listener.now
        if phase == IDLE:
            self.phase = NEW
            self.deadline = listener.now + listener.settings.header_timeout
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        self.progress = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
            return
        except httptools.HttpParserError as exc:
            error, self._error = self._error, None
            if error is not None:
                # Raised in a callback: its traceback holds this frame, which holds it.
                error.__traceback__ = None
            elif isinstance(exc, httptools.HttpParserCallbackError):
                log.error(
                    "error handling a request from %s",
                    self.peer_ip.decode(),
                    exc_info=exc.__context__,
                )
                error = HeaderError(500, "internal_error", "the gateway failed on this request")
            else:
                error = HeaderError(400, "bad_request", f"malformed request: {_reason(exc)}")
            self._refuse(error)
            return
        if self.progress:
            self.held = 0
            return
        # Nothing reported: llhttp holds these bytes (a header line or trailer going on).
        self.held += len(data)
        if self.held > MAX_HELD:
            self._refuse(HeaderError(431, "headers_too_large", "headers over the 64 KiB limit"))

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after a request head that asked to switch protocols."""
        exchange, self.upgrading = self.upgrading, None
        transport = self.transport
        if exchange is None or exchange.method == b"CONNECT":
            self._stop_reading()  # nothing after it is read: the connection closes
        elif transport is None or transport.is_closing():
            pass
        elif exchange.upgrade is None:
            # An Upgrade the gateway does not tunnel (h2c and the like, without a body):
            # the request is plain HTTP/1.1, and so is what follows it.
            self.parser = httptools.HttpRequestParser(self)
            if rest:
                self._feed(rest)
        elif exchange.phase != DONE:
            # A WebSocket handshake: what follows is the new protocol's, held by the
            # exchange until the upstream agrees with a 101.
            self.phase = TUNNEL
            self.tunnel = exchange
            if rest:
                exchange.client_tunnel_data(rest)
        # else: the gateway answered the handshake itself, and that answer closes

    def connection_lost(self, exc: Exception | None) -> None:
        """The one teardown: every reference that could lead back here is dropped (the
        parser's callbacks, the transport, the exchanges), so that reference counting
        alone frees the connection, without waiting for the cycle collector."""
        self.listener.forget(self)
        for exchange in {self.parsing, self.active, self.upgrading, self.tunnel, *self.queue}:
            if exchange is not None:
                exchange.client_lost()
        self.queue.clear()
        self.parsing = self.active = self.upgrading = self.tunnel = None
        self.parser = _DETACHED
        self.transport = None
        self.head = None
        self._error = None

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:  # the transport holds over 64 KiB for the client
        if self.active is not None:
            self.active.client_writable(False)

    def resume_writing(self) -> None:
        if self.active is not None:
            self.active.client_writable(True)

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.phase = HEAD

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
        head = self.head
        if head is None:
            return  # a trailer of a chunked body: dropped (its size counts in MAX_HELD)
        try:
            head.add(name, value)
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
        upgrade = head.upgrade_to is not None and parser.should_upgrade()
        if upgrade:
            self._upgrade_head(head, parser)
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
        self.phase = BODY
        self.progress = True
        self.deadline = None
        self.parsing = exchange
        if upgrade:
            self.upgrading = exchange
        if self.active is None:
            self.active = exchange
            exchange.start(exchange.started)
        else:
            self.queue.append(exchange)
            self.pause(PAUSE_PIPELINE)

    def _upgrade_head(self, head: RequestHead, parser: httptools.HttpRequestParser) -> None:
        """llhttp will stop after this head and take what follows for another protocol.
        Only a WebSocket handshake (GET, no body) is tunnelled; any other Upgrade is
        answered as plain HTTP/1.1, which a body would make ambiguous: refused."""
        if not head.has_body:
            return
        if head.websocket and parser.get_method() == b"GET":
            message = "malformed request: a WebSocket handshake with a body"
        else:
            message = "malformed request: a body on an Upgrade request (not tunnelled)"
        self._error = HeaderError(400, "bad_request", message)
        raise self._error

    def on_body(self, body: bytes) -> None:
        self.progress = True
        if self.parsing is not None:
            self.parsing.client_body(body)

    def on_message_complete(self) -> None:
        self.progress = True
        self.phase = READ
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

    def pause(self, reason: int) -> None:
        """Stop reading for ``reason`` (a PAUSE_* bit) until resume(reason)."""
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def resume(self, reason: int) -> None:
        if self._paused & reason:
            self._paused &= ~reason
            if not self._paused and self.transport is not None and not self.transport.is_closing():
                self.last_read = self.listener.now  # the body timeout starts again
                self.transport.resume_reading()

    def exchange_done(self, exchange: Exchange, keep_alive: bool) -> None:
        """An answer is complete: next pipelined request, idle keep-alive, or close."""
        if exchange is not self.active:
            return
        self.active = None
        phase = self.phase
        if not keep_alive or self.closing:
            self.queue.clear()
            self._close()
        elif self.queue:
            following = self.active = self.queue.popleft()
            if not self.queue and phase != STOPPED:
                self.resume(PAUSE_PIPELINE)
            following.start(self.proxy.loop.time())
        elif self.refusal is not None:  # every request before the malformed one is answered
            self.write(self.refusal)
            self._close()
        elif phase == STOPPED:
            self._close()  # nothing more will be read
        elif phase == HEAD:  # the next request's head is on its way
            self.deadline = self.listener.now + self.listener.settings.header_timeout
        elif phase in (READ, NEW):
            self.phase = IDLE
            self.deadline = self.listener.now + self.listener.settings.idle_timeout

    # -- deadlines and shutdown ------------------------------------------------------------------

    def check_deadlines(self, now: float) -> None:
        """Once a second: the send, body, head and idle timeouts of this connection."""
        transport = self.transport
        if transport is None:
            return
        settings = self.listener.settings
        backlog = transport.get_write_buffer_size()
        if backlog == 0 or backlog < self.backlog:
            self.send_progress = now  # the client took some of its answer
        self.backlog = backlog
        if backlog and now - self.send_progress >= settings.send_timeout:
            log.info("closing a connection from %s: it read nothing for %.0fs",
                     self.peer_ip.decode(), settings.send_timeout)  # fmt: skip
            transport.abort()  # close() would wait for the client to read
            return
        parsing = self.parsing
        if parsing is not None and parsing is self.active and not self._paused:
            if now - self.last_read >= settings.body_timeout:
                self._refuse(
                    HeaderError(408, "request_timeout", "request body not received in time")
                )
            return
        if self.deadline is None or now < self.deadline:
            return
        self.deadline = None
        if self.phase == HEAD and self.active is None:
            self._refuse(HeaderError(408, "request_timeout", "request head not received in time"))
        else:
            self._close()

    def shutdown(self) -> None:
        """Close now if idle, else after the answer in progress."""
        self.closing = True
        if self.active is None and self.parsing is None and self.transport is not None:
            self.transport.close()

    # -- internals ----------------------------------------------------------------------------

    def _refuse(self, error: HeaderError) -> None:
        """A malformed (or stalled) request: nothing more is read; the complete requests
        before it are answered in order, then it gets the error and the connection closes."""
        self.phase = STOPPED
        self.pause(PAUSE_STOPPED)
        broken, self.parsing = self.parsing, None
        if broken is not None and broken is self.active:
            # Its head went upstream already: the upstream gets a cut-off request,
            # never a complete one, and the client gets the error.
            broken.client_failed(error.status, error.code, error.message)
            return
        if broken is not None:
            self.queue.remove(broken)  # answered by the error, in its turn
        answer = error_bytes(error.status, error.code, error.message, new_request_id(), close=True)
        if self.active is None:
            self.write(answer)
            self._close()
        else:
            self.refusal = answer

    def _close(self) -> None:
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                self.send_progress = self.listener.now  # the send timeout still applies
            transport.close()

    def _stop_reading(self) -> None:
        self.closing = True
        self.phase = STOPPED
        self.queue.clear()
        self.parsing = None
        self.pause(PAUSE_STOPPED)


def _reason(exc: Exception) -> str:
    """llhttp's reason without the offending bytes (they are not echoed back)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else "malformed request"
    return text.split(": b'")[0].rstrip(":")[:120]


class Listener:
    def __init__(self, proxy: ProxyContext, settings: ProxySettings) -> None:
        self.proxy = proxy
        self.settings = settings
        self.connections: set[ClientConnection] = set()
        self.proto = b"http"  # b"https" once start() is given a TLS context
        self.server: Any = None  # uvloop's: its sockets are a list, not the typeshed tuple
        self._ticker: asyncio.TimerHandle | None = None
        self._ticks = 0
        self._drained: asyncio.Event | None = None
        self.closing = False
        # The time at the last tick: precise enough for connection deadlines (checked
        # once a second), and cheaper than asking the loop on every request.
        self.now = proxy.loop.time()

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, tls: ssl.SSLContext | None = None
    ) -> int:
        """Listen; with ``tls``, clients speak TLS (the context can be reloaded in place)."""
        loop = self.proxy.loop
        self.proto = b"https" if tls is not None else b"http"
        self.server = await loop.create_server(
            lambda: cast(Any, ClientConnection(self)),  # a Protocol by duck typing
            host,
            port,
            backlog=4096,
            reuse_port=reuse_port,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
            ssl=tls,
            ssl_handshake_timeout=self.settings.header_timeout if tls is not None else None,
        )
        self._ticker = loop.call_later(TICK, self._tick)
        return int(self.server.sockets[0].getsockname()[1])

    def forget(self, connection: ClientConnection) -> None:
        if connection in self.connections:
            self.connections.discard(connection)
            self.proxy.stats.connections -= 1
        if self._drained is not None and not self.connections:
            self._drained.set()

    def _tick(self) -> None:
        self.now = now = self.proxy.loop.time()
        self.proxy.expire_waiting(now)
        for service in self.proxy.stats.services.values():
            service.sample()
        self._ticks += 1
        if self._ticks % 10 == 0:  # once a second is precise enough for these
            if self.proxy.access_log is not None:
                self.proxy.access_log.flush()
            for connection in list(self.connections):
                connection.check_deadlines(now)
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
