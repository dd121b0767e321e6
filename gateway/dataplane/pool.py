"""Upstream connections: one asyncio Protocol each, parsed by llhttp, pooled per instance.

A connection serves one exchange at a time. The exchange that owns it gets the
parsed response through the ``on_response_*`` methods; the connection never
decides anything about retries or the client. Idle connections wait in the pool
(last in, first out) and are closed after ``keepalive`` seconds.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

import httptools

from gateway.dataplane.stats import PROTOCOL, RESET
from gateway.dataplane.wire import MAX_TOTAL
from registry.core.policy import ip_address_of

# What a closed connection keeps instead of its own parser, whose callbacks are bound
# methods of the connection (a cycle the collector would have to find): calls nothing.
_DETACHED: Final = httptools.HttpResponseParser(None)

if TYPE_CHECKING:
    from registry.core.models import Instance
    from registry.core.policy import AddressPolicy

Key = tuple[str, str, int]  # scheme, host, port
MAX_IDLE_PER_INSTANCE: Final = 512
# A connection idle longer than this is checked before reuse: upstreams close idle
# keep-alive connections, and a request sent just then would fail (a 502 for a POST).
CHECK_AFTER: Final = 0.0005
# An incomplete response head may hold this much (the status line and 64 KiB of headers,
# counted as llhttp sees them): beyond it the upstream is broken, not slow.
MAX_HEAD: Final = MAX_TOTAL + 8 * 1024


# The states of an UpstreamConnection (see its docstring).
CONNECTING: Final = 0
IDLE: Final = 1
BUSY: Final = 2
TUNNEL: Final = 3
CLOSED: Final = 4


class Owner(Protocol):
    """What an upstream connection reports to (gateway.dataplane.exchange.Exchange)."""

    def on_response_head(self, status: int, raw: bytes, keep_alive: bool) -> None: ...
    def on_response_body(self, data: bytes) -> None: ...
    def on_response_complete(self) -> None: ...
    def on_upstream_closed(self) -> None: ...
    def on_upstream_lost(self, error: str, reason: str) -> None: ...
    def on_upstream_writable(self, writable: bool) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...


class UpstreamConnection:  # an asyncio.Protocol by its methods (a mypyc native class)
    """One connection to an instance. Its states:

    ==========  =========================================  ==============================
    state       what it is                                 goes to
    ==========  =========================================  ==============================
    CONNECTING  opened by ConnectionPool.connect           IDLE (connection_made)
    IDLE        no owner: in the pool, or just opened;     BUSY (start); CLOSED (any byte
                nothing may arrive                         or EOF, sweep, pool full)
    BUSY        an exchange's request went out; its        IDLE (release, reusable);
                response is parsed and reported to it      TUNNEL (a 101); CLOSED
    TUNNEL      after a 101: raw bytes both ways           CLOSED
    CLOSED      aborted, or lost: nothing more is written  (end; connection_lost drops
                or read                                    every reference)
    ==========  =========================================  ==============================

    The owner hears of the end once: on_upstream_closed for a clean close by the
    upstream (EOF), on_upstream_lost(error, reason) for anything else.
    """

    __slots__ = (
        "pool",
        "key",
        "service",
        "transport",
        "owner",
        "idle_since",
        "state",
        "_parser",
        "_head",
        "_no_body",
        "_skip_body",
        "_feeding",
        "_release",
        "_paused",
        "_fd",
    )

    def __init__(self, pool: ConnectionPool, key: Key, service: str = "") -> None:
        self.pool = pool
        self.key = key
        self.service = service  # the one it was opened for (the one its numbers count in)
        self.transport: asyncio.Transport | None = None
        self.owner: Owner | None = None
        self.idle_since = 0.0
        self.state = CONNECTING
        # Its own parser holds bound methods of this connection (a cycle): made by
        # connection_made, swapped back by connection_lost (a failed connect calls neither).
        self._parser = _DETACHED
        self._head: bytes | None = None  # raw bytes received while the head is incomplete
        self._no_body = False  # the request was HEAD: the response has no body
        self._skip_body = False  # head of a bodiless response seen; anything more is an error
        self._feeding = False
        self._release: bool | None = None  # set while feeding: release after the feed
        self._paused = False
        self._fd = -1  # the socket's, for alive()

    # -- used by the exchange ----------------------------------------------------

    def start(self, owner: Owner, head: bytes, no_body: bool) -> None:
        """Take a request: its head goes out now, its body through ``write``."""
        self.owner = owner
        self.state = BUSY
        self._no_body = no_body
        self._skip_body = False
        self._head = b""
        assert self.transport is not None
        self.transport.write(head)

    def write(self, data: bytes) -> None:
        if self.state != CLOSED and self.transport is not None:
            self.transport.write(data)

    def release(self, reusable: bool) -> None:
        """The exchange is done with this connection: back to the pool, or closed."""
        self.owner = None
        if self._feeding:
            self._release = reusable
            return
        if reusable and (self.state == BUSY or self.state == IDLE):
            self.state = IDLE
            self.pool.put(self)
        else:
            self.close()

    def alive(self) -> bool:
        """Whether the upstream has not closed this idle connection (one non-blocking read).

        An idle connection has nothing to read: end of stream or any byte means it is
        done. uvloop owns the socket; reading it here is safe because it is closed
        at once in both of those cases.
        """
        if self._fd < 0:
            return self.state != CLOSED
        try:
            os.read(self._fd, 1)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def close(self) -> None:
        self.owner = None
        if self.state != CLOSED:
            self.state = CLOSED
            if self.transport is not None:
                self.transport.abort()

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None and self.state != CLOSED:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and self.state != CLOSED:
            self._paused = False
            self.transport.resume_reading()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._parser = httptools.HttpResponseParser(self)
        opened = self.pool.opened
        opened[self.service] = opened.get(self.service, 0) + 1
        self.state = IDLE
        sock = transport.get_extra_info("socket")
        # alive() peeks at the socket: only where the bytes on it are the HTTP ones.
        tls = transport.get_extra_info("sslcontext") is not None
        self._fd = sock.fileno() if sock is not None and not tls else -1

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            self.close()  # an idle connection has nothing to say: it is broken
            return
        if self.state == TUNNEL:
            owner.on_tunnel_data(data)
            return
        head = self._head
        if head is not None:
            head = self._head = head + data if head else data
            if len(head) > MAX_HEAD and head.find(b"\r\n\r\n") < 0:
                self._broken("response headers over 64 KiB")
                return
        self._feeding = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # 101 Switching Protocols: from here on the bytes are the new protocol's.
            self.state = TUNNEL
            rest = data[upgrade.args[0] :]
            if rest and self.owner is not None:
                self.owner.on_tunnel_data(rest)
            return
        except httptools.HttpParserError as exc:
            self._broken(f"malformed response: {exc}")
            return
        finally:
            self._feeding = False
        if self._release is not None:
            reusable, self._release = self._release, None
            if self._skip_body:
                self._parser = httptools.HttpResponseParser(self)  # it still waits for a body
            self.release(reusable)

    def _broken(self, error: str) -> None:
        """The upstream's answer is malformed: closed, nothing more from it is read."""
        owner = self.owner
        self.close()
        if owner is not None:
            owner.on_upstream_lost(error, PROTOCOL)

    def connection_lost(self, exc: Exception | None) -> None:
        """The one teardown: the parser (its callbacks lead back here), the transport and
        the owner are dropped, so that reference counting alone frees the connection."""
        self.state = CLOSED
        pool = self.pool
        pool.discard(self)
        if self.transport is not None:  # it was made: it was counted (a 0 stays, a gauge)
            pool.opened[self.service] -= 1
        self._parser = _DETACHED
        self.transport = None
        self._head = None
        owner, self.owner = self.owner, None
        if owner is None:
            pass
        elif exc is None:
            owner.on_upstream_closed()
        else:
            owner.on_upstream_lost(str(exc), RESET)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_writable(False)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.on_upstream_writable(True)

    # -- llhttp callbacks -----------------------------------------------------------

    def on_headers_complete(self) -> None:
        raw = self._head or b""
        end = raw.find(b"\r\n\r\n")
        parser = self._parser
        status = parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): wait for the final one.
            self._head = raw[end + 4 :]
            return
        self._head = None
        owner = self.owner
        if owner is None:
            return
        if self._no_body:
            self._skip_body = True
        owner.on_response_head(status, raw[: end + 2], parser.should_keep_alive())
        if self._skip_body and self.owner is owner:
            owner.on_response_complete()

    def on_body(self, body: bytes) -> None:
        if self._skip_body:
            raise httptools.HttpParserError("body after the head of a bodiless response")
        if self.owner is not None:
            self.owner.on_response_body(body)

    def on_message_complete(self) -> None:
        if self._skip_body or self._head is not None:
            return  # handled at the head, or the end of an interim answer (still reading heads)
        if self.owner is not None:
            self.owner.on_response_complete()


class ConnectionPool:
    def __init__(self, keepalive: float = 4.0) -> None:
        self.keepalive = keepalive
        self._idle: dict[Key, list[UpstreamConnection]] = {}
        # service -> its connections open (made, not lost); 0 once it had some
        self.opened: dict[str, int] = {}
        self.ssl: ssl.SSLContext | None = None  # for https instances (control.tls makes it)
        # What resolved addresses may be connected to (registry.core.policy); None: any.
        self.policy: AddressPolicy | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def acquire(self, key: Key, check: bool) -> UpstreamConnection | None:
        """An idle connection to ``key``, or None. With ``check``, one idle longer than
        CHECK_AFTER is first checked for a close by the upstream: a request that cannot
        simply go again (a body, a non-idempotent method) must not be sent on a dead one.
        Without it the caller resends on a fresh connection if this one turns out dead."""
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.state == CLOSED:
                continue
            if check:
                loop = self._loop or asyncio.get_running_loop()
                if loop.time() - connection.idle_since > CHECK_AFTER and not connection.alive():
                    connection.close()  # the upstream closed it while it waited
                    continue
            return connection
        return None

    def put(self, connection: UpstreamConnection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= MAX_IDLE_PER_INSTANCE:
            connection.close()
            return
        loop = self._loop or asyncio.get_running_loop()
        connection.idle_since = loop.time()
        idle.append(connection)

    def discard(self, connection: UpstreamConnection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    async def connect(self, instance: Instance, timeout: float) -> UpstreamConnection:
        """A new connection to ``instance``; OSError or TimeoutError when it fails."""
        loop = self._loop = asyncio.get_running_loop()
        key = (instance.scheme, instance.host, instance.port)
        ssl_context = None
        if instance.scheme == "https":
            if self.ssl is None:
                self.ssl = ssl.create_default_context()
            ssl_context = self.ssl
        async with asyncio.timeout(timeout):
            host = instance.host
            if self.policy is not None and ip_address_of(host) is None:
                host = await self._resolve(loop, host, instance.port)
            _, protocol = await loop.create_connection(
                # a Protocol by duck typing
                lambda: cast(Any, UpstreamConnection(self, key, instance.service)),
                host,
                instance.port,
                ssl=ssl_context,
                server_hostname=instance.host if ssl_context is not None else None,
            )
        return cast(UpstreamConnection, protocol)

    async def _resolve(self, loop: asyncio.AbstractEventLoop, name: str, port: int) -> str:
        """A host name's first address the policy allows (what a registration may name is
        checked for what the name resolves to now, not only as written); OSError if none."""
        assert self.policy is not None
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        refused = ""
        for info in infos:
            address = str(info[4][0])
            reason = self.policy.refuses(address, port)
            if not reason:
                return address
            refused = refused or f"{name} resolves to {address}, {reason}"
        raise OSError(refused or f"{name} resolves to no address")

    def connection_counts(self) -> list[list[Any]]:
        """[service, open, idle] of each service that has had a connection."""
        idle: dict[str, int] = {}
        for connections in self._idle.values():
            for connection in connections:
                idle[connection.service] = idle.get(connection.service, 0) + 1
        return [[service, n, idle.get(service, 0)] for service, n in self.opened.items()]

    def sweep(self, now: float) -> None:
        """Close connections idle longer than ``keepalive``."""
        limit = now - self.keepalive
        for key, idle in list(self._idle.items()):
            while idle and idle[0].idle_since < limit:
                idle.pop(0).close()
            if not idle:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
