"""One proxied request: route, pick, send, stream back, retry (SPEC section 5).

An Exchange is driven by callbacks, never by a task of its own: the client
connection reports the request (head, body chunks, end), the upstream
connection reports the response, the listener's ticker reports timeouts. Each
callback moves the exchange along and returns; the only coroutine is the one
that opens a new upstream connection.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from gateway.errors import error_bytes
from gateway.headers import HeaderError, RequestHead, ResponseHead
from gateway.metrics import RouteStats, ServiceStats
from gateway.pool import UpstreamConnection
from gateway.routing import BadPath, host_name, normalize_path

if TYPE_CHECKING:
    from gateway.config import RouteConfig
    from gateway.listener import ClientConnection
    from gateway.proxy import Proxy
    from registry.models import Instance

log = logging.getLogger("gateway.proxy")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
CLIENT_CLOSED = 499  # the client went away; nginx logs this as 499
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUFFER_LIMIT = 256 * 1024  # request body held before an upstream takes it
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b""))
        if len(_STATUS_LINES) < 1024:
            _STATUS_LINES[key] = line
    return line


class Exchange:
    __slots__ = (
        "proxy",
        "client",
        "head",
        "method",
        "method_label",
        "url",
        "http11",
        "keep_alive",
        "started",
        "request_id",
        "route",
        "target",
        "stats",
        "service",
        "instance",
        "tried",
        "upstream",
        "buffer",
        "buffered",
        "request_done",
        "request_sent",
        "has_body",
        "response_started",
        "response_done",
        "status",
        "deadline",
        "client_chunked",
        "eof_body",
        "no_body",
        "done",
        "upstream_keep_alive",
        "connecting",
        "last_reason",
        "authority",
    )

    def __init__(
        self,
        proxy: Proxy,
        client: ClientConnection,
        head: RequestHead,
        method: bytes,
        url: bytes,
        http11: bool,
        keep_alive: bool,
        started: float,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.head = head
        self.method = method
        self.method_label = proxy.method_label(method)
        self.url = url
        self.http11 = http11
        self.keep_alive = keep_alive
        self.started = started
        self.request_id = head.request_id_or_new()
        self.route: RouteConfig | None = None
        self.target = b""
        self.stats: RouteStats = proxy.metrics.unmatched
        self.service: ServiceStats | None = None
        self.instance: Instance | None = None
        self.tried: list[str] = []
        self.upstream: UpstreamConnection | None = None
        self.buffer: list[bytes] | None = []  # body read before an upstream took the request
        self.buffered = 0
        self.request_done = False  # the client's request message is complete
        self.request_sent = False  # ...and all of it went to the upstream
        self.has_body = head.chunked or (head.content_length not in (None, b"0"))
        self.response_started = False
        self.response_done = False
        self.status = 0
        self.deadline = 0.0
        self.client_chunked = False
        self.eof_body = False
        self.no_body = method == b"HEAD"
        self.done = False
        self.upstream_keep_alive = False
        self.connecting = False
        self.last_reason = "connect"
        self.authority: bytes | None = None  # of an absolute-form target

    # -- from the client connection ------------------------------------------------

    def start(self) -> None:
        """The request head is in: route it and send it to an instance."""
        try:
            route, target = self._resolve()
        except HeaderError as error:
            self.fail(error.status, error.code, error.message)
            return
        self.route = route
        self.target = target
        self.stats = self.proxy.metrics.route(route.prefix, route.service)
        self.service = self.stats.service
        self.service.in_flight += 1
        self._attempt()

    def client_body(self, data: bytes) -> None:
        if self.done or (self.buffer is None and self.upstream is None):
            return  # answered already (an error): the rest of the body is dropped
        route = self.route
        if route is not None and route.max_body is not None:
            self.buffered += len(data)
            if self.buffered > route.max_body and not self.response_started:
                self._too_large(route)
                return
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self.buffer is not None:
            self.buffer.append(data)
            if sum(map(len, self.buffer)) > _BUFFER_LIMIT:
                self.client.pause("buffer")
        elif self.upstream is not None:
            self.upstream.write(data)

    def client_done(self) -> None:
        self.request_done = True
        if self.head.chunked:
            if self.buffer is not None:
                self.buffer.append(b"0\r\n\r\n")
            elif self.upstream is not None:
                self.upstream.write(b"0\r\n\r\n")
        if self.buffer is None:
            self.request_sent = True
        if self.response_done:
            self._finish()

    def client_lost(self) -> None:
        """The client disconnected: cancel the upstream request."""
        if self.done:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self._complete(CLIENT_CLOSED if not self.response_done else self.status)

    def client_malformed(self, status: int, code: str, message: str) -> None:
        """The rest of the request broke the framing rules: cut the upstream off."""
        if self.done:
            return
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self._end_attempt()
        if self.response_started:
            self.client.abort()
            self._complete(self.status)
        else:
            self.fail(status, code, message)

    def client_writable(self, writable: bool) -> None:
        """Backpressure from the client socket onto the upstream read."""
        if self.upstream is not None:
            if writable:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()

    # -- routing and attempts ----------------------------------------------------------

    def _resolve(self) -> tuple[RouteConfig, bytes]:
        method, url, head = self.method, self.url, self.head
        if method == b"CONNECT":
            raise HeaderError(405, "method_not_allowed", "CONNECT is not supported")
        if url[:1] == b"/":
            raw_path, _, query = url.partition(b"?")
            host = head.host
        else:
            try:
                parsed = httptools.parse_url(url)  # absolute-form: route by its path
            except httptools.HttpParserInvalidURLError:
                raise HeaderError(400, "bad_path", "request target is not a path") from None
            if parsed.host is None:
                raise HeaderError(400, "bad_path", "request target is not a path")
            raw_path, query = parsed.path or b"/", parsed.query or b""
            host = self.authority = parsed.host + (b":%d" % parsed.port if parsed.port else b"")
        if self.http11 and head.host is None:
            raise HeaderError(400, "bad_request", "malformed request: no Host header")
        try:
            path = normalize_path(raw_path.decode("latin-1"))
        except BadPath as exc:
            raise HeaderError(400, "bad_path", str(exc)) from None
        match = self.proxy.table.match(host_name(host.decode("latin-1") if host else None), path)
        if match is None:
            raise HeaderError(404, "no_route", f"no route for {path}")
        route: RouteConfig = match.route  # type: ignore[assignment]
        length = head.content_length
        if route.max_body is not None and length is not None and int(length) > route.max_body:
            raise HeaderError(
                413, "payload_too_large", f"body over {route.max_body} bytes for this route"
            )
        target = match.upstream_path.encode("latin-1")
        if query:
            target += b"?" + query
        return route, target

    def _attempt(self) -> None:
        route = self.route
        assert route is not None and self.service is not None
        instance = self.proxy.registry.pick(route.service, self.tried)
        if instance is None:
            if not self.tried:
                self.fail(
                    503,
                    "no_healthy_instance",
                    f"no healthy instance of service {route.service!r}",
                    b"Retry-After: 1\r\n",
                )
            else:
                self._give_up(self.last_reason)
            return
        if self.tried:
            self.service.retries += 1
        self.tried.append(instance.id)
        self.instance = instance
        self.proxy.registry.request_started(instance)
        key = (instance.scheme, instance.host, instance.port)
        connection = self.proxy.pool.acquire(key)
        if connection is not None:
            self._send(connection)
        else:
            self.connecting = True
            asyncio.get_running_loop().create_task(self._connect(instance, route))

    async def _connect(self, instance: Instance, route: RouteConfig) -> None:
        try:
            connection = await self.proxy.pool.connect(instance, route.connect_timeout)
        except (OSError, TimeoutError) as exc:
            self.connecting = False
            if not self.done:
                self._attempt_failed(f"connect failed: {exc or 'timed out'}", "connect")
            return
        self.connecting = False
        if self.done or self.instance is not instance:
            connection.release(True)  # a fresh connection nobody needs now: keep it
            return
        self._send(connection)

    def _send(self, connection: UpstreamConnection) -> None:
        route, instance = self.route, self.instance
        assert route is not None and instance is not None
        self.upstream = connection
        head = self.head.upstream_head(
            self.method,
            self.target,
            client_ip=self.client.peer_ip,
            request_id=self.request_id,
            host_override=self._upstream_host(route, instance),
            forwarded_prefix=route.prefix.encode() if route.strip_prefix else None,
        )
        connection.start(self, head, self.no_body)
        if self.head.expect_continue and not self.request_done and self.http11:
            self.client.write(_CONTINUE)
        buffer, self.buffer = self.buffer, None
        if buffer:
            connection.write(b"".join(buffer))
            self.client.resume("buffer")
        self.request_sent = self.request_done
        self.deadline = self.proxy.loop.time() + route.timeout
        self.proxy.waiting.add(self)

    def _upstream_host(self, route: RouteConfig, instance: Instance) -> bytes | None:
        """Host for the upstream; None keeps the client's."""
        if not route.preserve_host:
            return instance.address.encode()
        if self.authority is not None:
            return self.authority  # an absolute-form target's authority is the Host
        return None if self.head.host is not None else instance.address.encode()

    def _attempt_failed(self, error: str, reason: str) -> None:
        """An attempt failed before any of the response went to the client."""
        assert self.service is not None and self.route is not None
        self.service.errors[reason] += 1
        instance = self.instance
        log.warning(
            "%s %s -> %s/%s: %s: %s",
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            self.route.service,
            instance.id if instance else "-",
            reason,
            error,
        )
        self._end_attempt()
        self.last_reason = reason
        # A failed connect sent nothing: the body read so far is still in the buffer.
        # Otherwise the upstream may have seen the request: only a bodiless idempotent
        # one goes again, and never after a timeout.
        again = reason == "connect" or (
            reason != "timeout" and self.method in IDEMPOTENT and not self.has_body
        )
        if again and len(self.tried) <= self.route.retries:
            if self.buffer is None:
                self.buffer = []
            self._attempt()
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        assert self.route is not None
        service = self.route.service
        if reason == "connect":
            self.fail(
                502, "upstream_unavailable", f"could not connect to any instance of {service!r}"
            )
        elif reason == "timeout":
            self.fail(504, "upstream_timeout", f"{service!r} sent no response head in time")
        else:
            self.fail(
                502,
                "upstream_protocol_error",
                f"the connection to {service!r} broke before a full response head",
            )

    def _end_attempt(self) -> None:
        self.proxy.waiting.discard(self)
        instance, self.instance = self.instance, None
        if instance is not None:
            self.proxy.registry.request_finished(instance)

    def _too_large(self, route: RouteConfig) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self._end_attempt()
        self.fail(413, "payload_too_large", f"body over {route.max_body} bytes for this route")

    # -- from the upstream connection ------------------------------------------------------

    def on_response_head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], keep_alive: bool
    ) -> None:
        self.proxy.waiting.discard(self)
        response = ResponseHead()
        try:
            for name, value in headers:
                response.add(name, value)
        except HeaderError:
            self.on_upstream_lost("response headers over the limit", "protocol")
            return
        self.status = status
        self.upstream_keep_alive = keep_alive and not response.close
        no_body = self.no_body or status in (204, 304)
        if no_body:
            framing = b""
            if response.content_length is not None:
                framing = b"Content-Length: " + response.content_length + b"\r\n"
        elif response.content_length is not None and not response.chunked:
            framing = b"Content-Length: " + response.content_length + b"\r\n"
        elif self.http11:
            self.client_chunked = True
            framing = b"Transfer-Encoding: chunked\r\n"
        else:
            framing = b""
            self.keep_alive = False  # an HTTP/1.0 client reads to the close
        self.eof_body = not no_body and response.content_length is None and not response.chunked
        if self.client.closing:
            self.keep_alive = False
        if not self.keep_alive:
            framing += b"Connection: close\r\n"
        elif not self.http11:
            framing += b"Connection: keep-alive\r\n"
        self.response_started = True
        self.client.write(
            response.client_head(status_line(status, reason), self.request_id, framing)
        )

    def on_response_body(self, data: bytes) -> None:
        if self.client_chunked:
            self.client.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.client.write(data)

    def on_response_complete(self) -> None:
        if self.client_chunked:
            self.client.write(b"0\r\n\r\n")
        self.response_done = True
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.release(self.upstream_keep_alive and self.request_sent)
        self._end_attempt()
        if not self.request_done:
            # The upstream answered before the client finished sending: close after
            # this answer, the rest of the request body is not worth reading.
            self.keep_alive = False
        self._finish()

    def on_upstream_lost(self, error: str, reason: str) -> None:
        self.upstream = None
        if self.done:
            return
        if self.response_started:
            if self.eof_body and reason == "reset" and error == "connection closed":
                self.on_response_complete()  # the body was delimited by the close
                return
            # Headers went out already: abort, so the client sees a truncated body,
            # never a short one finished cleanly.
            assert self.service is not None
            self.service.errors[reason] += 1
            log.warning("upstream %s failed mid-body: %s", self.tried[-1], error)
            self._end_attempt()
            self.client.abort()
            self._complete(self.status)
            return
        self._attempt_failed(error, reason)

    def on_upstream_writable(self, writable: bool) -> None:
        """Backpressure from the upstream socket onto the client read."""
        if writable:
            self.client.resume("upstream")
        else:
            self.client.pause("upstream")

    def timed_out(self) -> None:
        """No response head within the route's timeout (called by the listener's ticker)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self._attempt_failed("no response head in time", "timeout")

    # -- the end ---------------------------------------------------------------------------

    def fail(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        """Answer with a gateway error (nothing of a response went out yet)."""
        if self.done:
            return
        self.status = status
        self.buffer = None
        if not self.request_done or status in (400, 405, 413, 431):
            self.keep_alive = False  # the rest of the request is not worth reading
        self.client.write(
            error_bytes(
                status,
                code,
                message,
                self.request_id,
                extra,
                close=not self.keep_alive or self.client.closing,
            )
        )
        self.response_done = True
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self._complete(self.status)
        self.client.exchange_done(self, self.keep_alive)

    def _complete(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self._end_attempt()
        if self.service is not None:
            self.service.in_flight -= 1
        self.stats.observe(self.method_label, status, self.proxy.loop.time() - self.started)
