"""One proxied request: route, pick, send, stream back, retry (SPEC section 5).

An Exchange is driven by callbacks, never by a task of its own: the client
connection reports the request (head, body chunks, end), the upstream
connection reports the response, the listener's ticker reports timeouts. Each
callback moves the exchange along and returns; the only coroutine is the one
that opens a new upstream connection.

This is the hot path: state that most requests never change lives in class
attributes (an instance only stores what differs), and the common case does
no more calls than it must.

The phases of an exchange (``phase``):

==========  ============================================  ===============================
phase       what is going on                              goes to
==========  ============================================  ===============================
QUEUED      head read; answers to earlier pipelined       ATTEMPT (start); DONE (refused)
            requests of the connection come first
ATTEMPT     routed: picking an instance, connecting,      RESPONDING (response head);
            sending, waiting for the response head;       TUNNEL (a 101); DONE (an error
            a failed attempt may go again (a retry)       answer, the client gone)
RESPONDING  the response head is in: the body streams     DONE (complete, or cut off)
            to the client
TUNNEL      after a 101: bytes both ways as they come     DONE (either side closes)
DONE        answered or abandoned; counted once (_end)    -
==========  ============================================  ===============================

The client's side moves on its own: ``request_done`` when its message is complete,
``request_sent`` when all of it went to the upstream. Every way out goes through
``_end``: the upstream connection is closed if still held, the attempt and the
request are counted, and the client connection is told how it ended (ANSWERED: it
goes on with the next request or closes; ABORTED: cut, so a partial answer never
looks complete; GONE: it is gone already).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from time import perf_counter
from typing import TYPE_CHECKING, Final

from gateway.dataplane.affinity import request_key
from gateway.dataplane.pool import UpstreamConnection
from gateway.dataplane.stats import (
    CONNECT,
    MAX_PENDING,
    MAX_REQUESTS,
    PROTOCOL,
    RESET,
    TIMEOUT,
    RouteStats,
    ServiceStats,
)
from gateway.dataplane.wire import (
    BODYLESS,
    CHUNKED,
    TO_CLOSE,
    HeaderError,
    RequestHead,
    ResponseHead,
    error_bytes,
    no_fragment,
    response_framing,
)

if TYPE_CHECKING:
    from gateway.config.model import RateLimitConfig, RouteConfig
    from gateway.dataplane.context import ProxyContext
    from gateway.dataplane.listener import ClientConnection
    from gateway.dataplane.split import Subset
    from registry.core.models import Instance

log = logging.getLogger("gateway.proxy")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
CLIENT_CLOSED: Final = 499  # the client went away; nginx logs this as 499
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUFFER_LIMIT: Final = 256 * 1024  # request body (or tunnel bytes) held for the upstream
_CLOSE_AFTER: Final = frozenset({400, 405, 413, 414, 431})

QUEUED: Final = 0
ATTEMPT: Final = 1
RESPONDING: Final = 2
TUNNEL: Final = 3
DONE: Final = 4

# Why the client connection's reading is paused (bits: ClientConnection.pause/resume).
PAUSE_PIPELINE: Final = 1  # pipelined requests wait: nothing more is read meanwhile
PAUSE_BUFFER: Final = 2  # the body (or tunnel bytes) held for the upstream is full
PAUSE_UPSTREAM: Final = 4  # the upstream socket takes no more for now
PAUSE_STOPPED: Final = 8  # nothing more is read at all

# How an exchange ended, for the client connection (_end).
ANSWERED: Final = 0
ABORTED: Final = 1
GONE: Final = 2


class Exchange:
    # Defaults that most requests keep (class attributes: nothing to store).
    route: RouteConfig | None = None
    target = b""
    service: ServiceStats | None = None
    instance: Instance | None = None
    tried: list[str] | None = None
    subset: Subset | None = None  # of the route's canary split, chosen once per request
    upstream: UpstreamConnection | None = None
    buffer: list[bytes] | None = None  # body read before an upstream took the request
    buffered = 0  # body bytes seen, for max_body
    phase = QUEUED
    request_done = False  # the client's request message is complete
    request_sent = False  # ...and all of it went to the upstream
    pending: bytes | None = None  # response head not yet written (joins the first body bytes)
    status = 0
    deadline = 0.0
    client_chunked = False
    eof_body = False  # the response body ends when the upstream closes
    upstream_keep_alive = False
    last_reason = CONNECT
    authority: bytes | None = None  # of an absolute-form target
    upgrade: bytes | None = None  # "websocket": this is a handshake the gateway tunnels
    early: list[bytes] | None = None  # the client's bytes after the handshake, before the 101
    unchecked = False  # sent on a pooled connection not checked for a close by the upstream
    bytes_in = 0  # request body bytes read from the client
    bytes_out = 0  # response body bytes written to the client
    error = ""  # the reason of the last failed attempt (a stats constant), for the log

    def __init__(
        self,
        proxy: ProxyContext,
        client: ClientConnection,
        head: RequestHead,
        method: bytes,
        url: bytes,
        http11: bool,
        keep_alive: bool,
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.head = head
        self.method = method
        self.url = url
        self.http11 = http11
        self.keep_alive = keep_alive
        self.started = proxy.loop.time()  # for deadlines (the loop's clock, ms under uvloop)
        self.timer = perf_counter()  # for durations: what the metrics and the log report
        self.request_id = head.request_id_or_new()
        self.stats: RouteStats = proxy.stats.unmatched
        self.has_body = head.has_body
        self.no_body = method == b"HEAD"
        if head.upgrade_to is not None and head.websocket and method == b"GET":
            self.upgrade = head.upgrade_to
            self.keep_alive = False  # a tunnel or not, nothing more is read as HTTP/1.1

    # -- from the client connection ------------------------------------------------

    def start(self, now: float) -> None:
        """The request head is in (and its turn has come): route it, send it to an instance."""
        method, url, head = self.method, self.url, self.head
        self.phase = ATTEMPT
        try:
            if method == b"CONNECT":
                raise HeaderError(405, "method_not_allowed", "CONNECT is not supported")
            if head.host is None and self.http11:
                raise HeaderError(400, "bad_request", "malformed request: no Host header")
            if url.startswith(b"/"):
                raw_path, _, query = url.partition(b"?")
                if query:
                    no_fragment(query)  # the path is checked by resolve
                host = head.host
            else:
                raw_path, query, host = self.proxy.absolute_form(url)
                self.authority = host
            route, target, stats, split = self.proxy.resolve(host, raw_path)
            length = head.content_length
            if length is not None and route.max_body is not None and int(length) > route.max_body:
                raise HeaderError(
                    413, "payload_too_large", f"body over {route.max_body} bytes for this route"
                )
        except HeaderError as error:
            self.fail(error.status, error.code, error.message)
            return
        if route.rate_limit is not None and self._rate_limited(route, route.rate_limit, stats):
            return
        self.target = target + b"?" + query if query else target
        self.route = route
        self.stats = stats
        service = stats.service
        if service.max_pending and service.in_flight >= service.max_pending:
            # Refused before it counts as in flight (self.service stays None for _end).
            self._overloaded(
                service,
                MAX_PENDING,
                f"service {route.service!r} has {service.max_pending} requests in flight,"
                " its max_pending",
            )
            return
        self.service = service
        service.in_flight += 1
        service.requests += 1
        if split is not None:
            self.subset = split.choose(head.value_of(split.header))
        self._attempt(now)

    def _rate_limited(self, route: RouteConfig, limit: RateLimitConfig, stats: RouteStats) -> bool:
        """Over the route's rate_limit: 429 with Retry-After, counted on the route."""
        client = self.client.peer_ip
        if limit.header is not None:
            client = self.head.value_of(limit.header.lower().encode()) or b"ip " + client
        wait = self.proxy.rate_wait(route, limit, client, self.started)
        if wait <= 0.0:
            return False
        self.route, self.stats = route, stats
        self.fail(
            429,
            "rate_limited",
            f"over {limit.average:g} requests a second for this route; retry later",
            b"Retry-After: %d\r\n" % max(1, math.ceil(wait)),
        )
        return True

    def client_body(self, data: bytes) -> None:
        if self.phase == DONE:
            return  # answered already (an error): the rest of the body is dropped
        route = self.route
        if route is not None and route.max_body is not None:
            self.buffered += len(data)
            if self.buffered > route.max_body and self.phase < RESPONDING:
                self._too_large(route)
                return
        self.bytes_in += len(data)
        if self.head.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._to_upstream(data)

    def _to_upstream(self, data: bytes) -> None:
        """Straight to the upstream, or held until one takes the request."""
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
        else:
            self.buffer = self._hold(self.buffer, data)

    def _hold(self, held: list[bytes] | None, data: bytes) -> list[bytes]:
        """``held`` (bytes kept for the upstream) with ``data`` added; past _BUFFER_LIMIT
        the client's reading pauses until ``_release_held``."""
        if held is None:
            held = []
        held.append(data)
        if sum(map(len, held)) > _BUFFER_LIMIT:
            self.client.pause(PAUSE_BUFFER)
        return held

    def _release_held(self, held: list[bytes], upstream: UpstreamConnection) -> None:
        upstream.write(b"".join(held))
        self.client.resume(PAUSE_BUFFER)

    def client_done(self) -> None:
        self.request_done = True
        upstream = self.upstream
        if self.head.chunked:
            if upstream is not None:
                upstream.write(b"0\r\n\r\n")
            elif self.phase != DONE:
                if self.buffer is None:
                    self.buffer = []
                self.buffer.append(b"0\r\n\r\n")
        if upstream is not None:
            self.request_sent = True
            if self.phase == ATTEMPT:
                # A body took its time: the response timeout starts now. Without one,
                # this follows the head at once.
                self._expect_head(self.proxy.loop.time() if self.has_body else self.started)

    def client_lost(self) -> None:
        """The client disconnected: cancel the upstream request."""
        self._end(self.status if self.phase == TUNNEL else CLIENT_CLOSED, GONE)

    def client_failed(self, status: int, code: str, message: str) -> None:
        """The rest of the request broke the framing rules or did not come in time: the
        client's fault, not the instance's. The upstream is cut off, the client answered."""
        if self.phase >= RESPONDING:
            self._end(self.status, ABORTED)
        else:
            self.fail(status, code, message)

    def client_writable(self, writable: bool) -> None:
        """Backpressure from the client socket onto the upstream read."""
        if self.upstream is not None:
            if writable:
                self.upstream.resume_reading()
            else:
                self.upstream.pause_reading()

    # -- attempts ----------------------------------------------------------------------

    def _attempt(self, now: float) -> None:
        route, service = self.route, self.service
        assert route is not None and service is not None
        proxy = self.proxy
        tried = self.tried
        subset = self.subset
        key = None
        if subset is None and proxy.affinities:  # a route's split goes first
            affinity = proxy.affinities.get(route.service)
            if affinity is not None:
                key = request_key(self.head, affinity[0], affinity[1])
        if subset is not None:
            instance = self._pick_in(subset, route.service, tried or ())
        elif key is None:
            instance = proxy.registry.pick(route.service, tried or ())
        else:
            instance = proxy.registry.pick_by_key(route.service, key, tried or ())
        limit = service.max_requests
        if limit and instance is not None and instance.in_flight >= limit:
            instance = self._pick_below(route.service, instance, limit)
            if instance is None:
                if tried is None:
                    self._overloaded(
                        service,
                        MAX_REQUESTS,
                        f"every instance of {route.service!r} has {limit} requests in flight,"
                        " its max_requests",
                    )
                else:  # the retry has nowhere to go: the failure it would retry is the answer
                    self._give_up(self.last_reason)
                return
        if instance is None:
            if tried is None:
                self.fail(
                    503,
                    "no_healthy_instance",
                    f"no healthy instance of service {route.service!r}",
                    b"Retry-After: 1\r\n",
                )
            else:
                self._give_up(self.last_reason)
            return
        if tried is None:
            self.tried = [instance.id]
        else:
            service.retries += 1
            tried.append(instance.id)
        self.instance = instance
        proxy.registry.request_started(instance)
        # A request that can go again unseen skips the check for a dead pooled
        # connection (a syscall): if it was dead, _resend sends it once more.
        self._dispatch(instance, route, self.has_body or self.method not in IDEMPOTENT, now)

    def _pick_below(self, name: str, full: Instance, limit: int) -> Instance | None:
        """The next instance of ``name`` with fewer than ``limit`` requests in flight
        (``full`` has that many), skipping full ones and those tried; None if all are full."""
        skip = set(self.tried or ())
        instance: Instance | None = full
        subset = self.subset
        while instance is not None and instance.in_flight >= limit:
            skip.add(instance.id)
            if subset is None:
                instance = self.proxy.registry.pick(name, skip)
            else:
                instance = self._pick_in(subset, name, skip)
        return instance

    def _pick_in(self, subset: Subset, name: str, exclude: Collection[str]) -> Instance | None:
        """An instance of the request's canary subset not in ``exclude`` (retries stay in
        it), else, when it has none left, any instance of the service (the fallback)."""
        registry = self.proxy.registry
        instance = registry.pick_matching(name, subset.selector, exclude)
        return instance if instance is not None else registry.pick(name, exclude)

    def _overloaded(self, service: ServiceStats, limit: str, message: str) -> None:
        """503 overloaded at once, never queued: ``service`` is at its ``limit``."""
        service.overloaded[limit] += 1
        self.fail(503, "overloaded", message + "; retry later", b"Retry-After: 1\r\n")

    def _resend(self) -> None:
        """The unchecked pooled connection was dead: the same request, same instance, on a
        checked or new connection. Not a retry: the upstream never saw the request."""
        instance, route = self.instance, self.route
        assert instance is not None and route is not None
        self._dispatch(instance, route, True, self.proxy.loop.time())

    def _dispatch(self, instance: Instance, route: RouteConfig, check: bool, now: float) -> None:
        """Send on a pooled connection to ``instance`` (checked for a close by the upstream
        first when ``check``), else on a new one."""
        connection = None
        if self.upgrade is None:  # an upgrade gets a connection of its own
            connection = self.proxy.pool.acquire(instance.pool_key, check)
        self.unchecked = connection is not None and not check
        if connection is not None:
            self._send(connection, now)
        else:
            self.proxy.loop.create_task(self._connect(instance, route))

    async def _connect(self, instance: Instance, route: RouteConfig) -> None:
        try:
            connection = await self.proxy.pool.connect(instance, route.connect_timeout)
        except (OSError, TimeoutError) as exc:
            if self.phase != DONE:
                self._attempt_failed(f"connect failed: {exc or 'timed out'}", CONNECT)
            return
        if self.phase == DONE or self.instance is not instance:
            connection.release(True)  # a fresh connection nobody needs now: keep it
            return
        self._send(connection, self.proxy.loop.time())

    def _send(self, connection: UpstreamConnection, now: float) -> None:
        route, instance, head = self.route, self.instance, self.head
        assert route is not None and instance is not None
        self.upstream = connection
        if route.preserve_host and self.authority is None and head.host is not None:
            host = None  # the client's Host goes through
        elif route.preserve_host and self.authority is not None:
            host = self.authority  # an absolute-form target's authority is the Host
        else:
            host = instance.host_header
        connection.start(
            self,
            head.upstream_head(
                self.method,
                self.target,
                client_ip=self.client.peer_ip,
                request_id=self.request_id,
                host_override=host,
                forwarded_prefix=route.prefix_bytes if route.strip_prefix else None,
                upgrade=self.upgrade,
                proto=self.client.proto,
                trusted=self.client.trusted,
            ),
            self.no_body,
        )
        if head.expect_continue and not self.request_done and self.http11:
            self.client.write(_CONTINUE)
        buffer = self.buffer
        if buffer is not None:
            self.buffer = None
            self._release_held(buffer, connection)
        self.request_sent = self.request_done
        if self.request_sent:
            self._expect_head(now)

    def _expect_head(self, now: float) -> None:
        """The whole request is with the upstream: its response head is due in the timeout."""
        assert self.route is not None
        self.deadline = now + self.route.timeout
        self.proxy.waiting.add(self)

    def _attempt_failed(self, error: str, reason: str) -> None:
        """An attempt failed before any of the response went to the client."""
        assert self.service is not None and self.route is not None
        self.service.errors[reason] += 1
        instance = self.instance
        if instance is not None and reason in (CONNECT, TIMEOUT):
            self.proxy.outliers.failed(instance)
        log.warning(
            "%s %s -> %s/%s: %s: %s (request %s)",
            self.method.decode("latin-1"),
            self.target.decode("latin-1"),
            self.route.service,
            instance.id if instance else "-",
            reason,
            error,
            self.request_id.decode("latin-1"),
        )
        self._end_attempt()
        self.last_reason = self.error = reason
        # A failed connect sent nothing: the body read so far is still in the buffer.
        # Otherwise the upstream may have seen the request: only a bodiless idempotent
        # one goes again, and never after a timeout.
        again = reason == CONNECT or (
            reason != TIMEOUT and self.method in IDEMPOTENT and not self.has_body
        )
        if again and len(self.tried or ()) <= self.route.retries and self.service.may_retry():
            self._attempt(self.proxy.loop.time())
        else:
            self._give_up(reason)

    def _give_up(self, reason: str) -> None:
        assert self.route is not None
        service = self.route.service
        if reason == CONNECT:
            self.fail(
                502, "upstream_unavailable", f"could not connect to any instance of {service!r}"
            )
        elif reason == TIMEOUT:
            self.fail(504, "upstream_timeout", f"{service!r} sent no response head in time")
        else:
            self.fail(
                502,
                "upstream_protocol_error",
                f"the connection to {service!r} broke before a full response head",
            )

    def _drop_upstream(self) -> None:
        """Close the upstream connection: whatever it was doing is abandoned."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()

    def _end_attempt(self) -> None:
        instance = self.instance
        if instance is not None:
            self.instance = None
            self.proxy.waiting.discard(self)
            self.proxy.registry.request_finished(instance)

    def _too_large(self, route: RouteConfig) -> None:
        """The body passed the route's max_body: 413 (the upstream, if any, is cut off)."""
        self.fail(413, "payload_too_large", f"body over {route.max_body} bytes for this route")

    # -- from the upstream connection ------------------------------------------------------

    def on_response_head(self, status: int, raw: bytes, keep_alive: bool) -> None:
        self.proxy.waiting.discard(self)
        try:
            response = ResponseHead.of(raw)
        except HeaderError as error:
            self._broken_answer(error.message)
            return
        if (status == 101 or self.upgrade is not None) and self._switch(status, response):
            return
        self.status = status
        instance = self.instance
        if instance is not None:
            latency = instance.latency  # peak_ewma's: time to the response head
            if latency is not None:
                latency.observe(perf_counter() - self.timer, self.proxy.registry.clock())
            if status >= 500:
                self.proxy.outliers.failed(instance, server_error=True)
            else:
                self.proxy.outliers.succeeded(instance)
        self.upstream_keep_alive = keep_alive and not response.close and self.upgrade is None
        length = response.content_length
        framing = response_framing(self.no_body, status, length, response.chunked, self.http11)
        lines = b""  # Content-Length, if any, is among the kept lines
        if framing == CHUNKED:
            self.client_chunked = True
            lines = b"Transfer-Encoding: chunked\r\n"
        elif framing == TO_CLOSE:
            self.keep_alive = False  # an HTTP/1.0 client reads to the close
        self.eof_body = framing != BODYLESS and length is None and not response.chunked
        lines += self._connection_header()
        self.phase = RESPONDING
        # Held back one step: it goes out with the first body bytes, in one write.
        self.pending = response.client_head(self.request_id, lines)

    def _switch(self, status: int, response: ResponseHead) -> bool:
        """A 101 to an upgrade request: from now on a tunnel. True when it took over."""
        upgrade = self.upgrade
        if status != 101:
            # The handshake is refused: the client's bytes held since are dropped (and the
            # upstream connection is not reused: see on_response_head).
            self.early = None
            return False
        if upgrade is None:
            self._broken_answer("101 Switching Protocols to a request that asked none")
            return True
        if self.instance is not None:
            self.proxy.outliers.succeeded(self.instance)
        self.status = 101
        self.phase = TUNNEL
        self.keep_alive = False
        self.client.write(
            response.client_head(
                self.request_id, b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
            )
        )
        early, self.early = self.early, None
        if early is not None and self.upstream is not None:
            self._release_held(early, self.upstream)
        return True

    def on_tunnel_data(self, data: bytes) -> None:
        """Bytes of the switched protocol from the upstream."""
        self.client.write(data)

    def client_tunnel_data(self, data: bytes) -> None:
        """Bytes of the switched protocol from the client (they may come with the request):
        held until the upstream's 101, so nothing unrouted reaches it as HTTP."""
        upstream = self.upstream
        if self.phase == TUNNEL:
            if upstream is not None:
                upstream.write(data)
        elif self.phase != DONE:
            self.early = self._hold(self.early, data)

    def on_response_body(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.client_chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        pending = self.pending
        if pending is not None:
            self.pending = None
            data = pending + data
        self.client.write(data)

    def on_response_complete(self) -> None:
        if self.phase == TUNNEL:
            return  # llhttp ends the 101 message; the tunnel goes on
        pending = self.pending
        if pending is not None:
            self.pending = None
            self.client.write(pending + b"0\r\n\r\n" if self.client_chunked else pending)
        elif self.client_chunked:
            self.client.write(b"0\r\n\r\n")
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.release(self.upstream_keep_alive and self.request_sent)
        if not self.request_done:
            # The upstream answered before the client finished sending: close after
            # this answer, the rest of the request body is not worth reading.
            self.keep_alive = False
        self._end(self.status, ANSWERED)

    def on_upstream_closed(self) -> None:
        """The upstream closed the connection cleanly (EOF)."""
        if self.eof_body and self.phase == RESPONDING:
            self.upstream = None
            self.on_response_complete()  # the body was delimited by the close
        else:
            self.on_upstream_lost("connection closed", RESET)

    def on_upstream_lost(self, error: str, reason: str) -> None:
        self.upstream = None
        phase = self.phase
        if phase == DONE:
            return
        if phase == TUNNEL:  # the upstream ended the tunnel: so does the client connection
            self._end(self.status, ANSWERED)
            return
        if phase == RESPONDING and self.pending is not None:
            # The head is still held back: the client has seen nothing of this answer, so
            # it is a failed attempt like any other (502 or a retry), not a cut answer.
            self.pending = None
            self.phase = ATTEMPT
            self.client_chunked = self.eof_body = self.upstream_keep_alive = False
            self.status = 0
            self._attempt_failed(error, reason)
            return
        if phase == RESPONDING:
            # Headers went out already: abort, so the client sees a truncated body,
            # never a short one finished cleanly.
            assert self.service is not None
            self.service.errors[reason] += 1
            self.error = reason
            log.warning(
                "%s/%s failed mid-body: %s (request %s)",
                self.service.name,
                (self.tried or ["-"])[-1],
                error,
                self.request_id.decode("latin-1"),
            )
            if self.pending is not None:
                self.client.write(self.pending)
                self.pending = None
            self._end(self.status, ABORTED)
            return
        if self.unchecked and reason == RESET:
            self._resend()  # a pooled connection the upstream had closed
            return
        self._attempt_failed(error, reason)

    def _broken_answer(self, error: str) -> None:
        """The upstream's answer cannot be passed on: its connection is closed, so nothing
        more from it reaches the client; the attempt failed (502 or a retry)."""
        self._drop_upstream()
        self.on_upstream_lost(error, PROTOCOL)

    def on_upstream_writable(self, writable: bool) -> None:
        """Backpressure from the upstream socket onto the client read."""
        if writable:
            self.client.resume(PAUSE_UPSTREAM)
        else:
            self.client.pause(PAUSE_UPSTREAM)

    def timed_out(self) -> None:
        """No response head within the route's timeout (called by the listener's ticker)."""
        self._drop_upstream()
        self._attempt_failed("no response head in time", TIMEOUT)

    # -- the end ---------------------------------------------------------------------------

    def fail(self, status: int, code: str, message: str, extra: bytes = b"") -> None:
        """Answer with a gateway error (nothing of a response went out yet)."""
        if self.phase == DONE:
            return
        self.status = status
        self.buffer = None
        if (self.has_body and not self.request_done) or status in _CLOSE_AFTER:
            self.keep_alive = False  # the rest of the request is not worth reading
        extra += self._connection_header()
        answer = error_bytes(status, code, message, self.request_id, extra)
        self.bytes_out += len(answer) - answer.index(b"\r\n\r\n") - 4  # its JSON body
        self.client.write(answer)
        self._end(status, ANSWERED)

    def _connection_header(self) -> bytes:
        """The answer's Connection line: close (also when the gateway is shutting down), or
        keep-alive said aloud to HTTP/1.0, which assumes a close otherwise."""
        if self.client.closing:
            self.keep_alive = False
        if not self.keep_alive:
            return b"Connection: close\r\n"
        return b"" if self.http11 else b"Connection: keep-alive\r\n"

    def _log(self, status: int, seconds: float) -> None:
        route, tried = self.route, self.tried
        assert self.proxy.access_log is not None
        self.proxy.access_log.record(
            request_id=self.request_id,
            trace_id=self.head.trace_id,
            client=self.client.peer_ip,
            method=self.method,
            target=self.url,
            route=route.prefix if route is not None else "",
            service=route.service if route is not None else "",
            instance=tried[-1] if tried else "",
            status=status,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            seconds=seconds,
            attempts=len(tried) if tried else 0,
            error=self.error,
        )

    def _end(self, status: int, how: int) -> None:
        """The one way out: whatever is still held is let go, the request is counted,
        the client connection hears ``how`` it ended (ANSWERED, ABORTED or GONE)."""
        if self.phase == DONE:
            return
        self.phase = DONE
        self.buffer = self.early = None
        self._drop_upstream()
        self._end_attempt()
        if self.service is not None:
            self.service.in_flight -= 1
        seconds = perf_counter() - self.timer
        method = self.proxy.method_label(self.method)
        stats = self.stats
        stats.observe(method, status, seconds, self.bytes_in, self.bytes_out)
        if self.tried and self.proxy.stats.instance_limit:
            instance = self.proxy.stats.instance(stats.service, self.tried[-1])
            instance.observe(method, status, seconds, self.bytes_in, self.bytes_out)
        if self.proxy.access_log is not None:
            self._log(status, seconds)
        if how == ANSWERED:
            self.client.exchange_done(self, self.keep_alive)
        elif how == ABORTED:
            self.client.abort()
