"""The request path: route, pick an instance, forward, stream back (SPEC section 5)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from gateway.errors import GatewayError, to_response
from gateway.headers import downstream_response_headers, request_id_of, upstream_request_headers
from gateway.metrics import GatewayMetrics, RouteMetrics
from gateway.routing import BadPath, RouteTable, host_name, normalize_path
from gateway.server import MAX_HEADERS_TOTAL
from gateway.upstream import UpstreamClient, UpstreamError, mapped_errors
from registry.models import Instance
from registry.store import Registry

if TYPE_CHECKING:
    from gateway.config import RouteConfig

log = logging.getLogger("gateway.proxy")

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CLIENT_CLOSED = 499
_CLOSE_AFTER = frozenset({400, 405, 413, 431})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _headers_size(request: web.BaseRequest) -> int:
    return sum(len(name) + len(value) + 4 for name, value in request.raw_headers)


class _RequestBody:
    """The client's body, streamed upstream once; answers Expect: 100-continue on first read.

    A body over the route's ``max_body`` stops the upload; aiohttp reports that as a broken
    connection, so ``too_large`` tells the proxy what really happened.
    """

    def __init__(self, request: web.BaseRequest, limit: int | None) -> None:
        self._request = request
        self._limit = limit
        self.too_large = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        request = self._request
        if request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(_CONTINUE)
        seen = 0
        while chunk := await request.content.readany():
            seen += len(chunk)
            if self._limit is not None and seen > self._limit:
                self.too_large = True
                raise ConnectionAbortedError("request body over max_body")
            yield chunk


class Proxy:
    def __init__(
        self,
        table: RouteTable,
        registry: Registry,
        metrics: GatewayMetrics,
        client: UpstreamClient,
    ) -> None:
        self.table = table
        self.registry = registry
        self.metrics = metrics
        self.client = client
        self._unmatched = RouteMetrics.unmatched(metrics)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        started = loop.time()
        request_id = request_id_of(request.headers.items())
        route_metrics = self._unmatched
        status = 500
        try:
            route, upstream_path = self._route(request)
            route_metrics = self.metrics.route(route.prefix, route.service)
            route_metrics.in_flight.inc()
            try:
                response = await self._forward(
                    request, route, upstream_path, request_id, route_metrics
                )
            finally:
                route_metrics.in_flight.dec()
            status = response.status
            return response
        except GatewayError as error:
            status = error.status
            response = to_response(error)
            response.headers["X-Request-ID"] = request_id
            if error.status in _CLOSE_AFTER:
                response.force_close()  # the rest of the request is not worth reading
            return response
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away; nginx logs this as 499
            raise
        finally:
            route_metrics.observe(request.method, status, loop.time() - started)

    def _route(self, request: web.BaseRequest) -> tuple[RouteConfig, str]:
        if _headers_size(request) > MAX_HEADERS_TOTAL:
            raise GatewayError(431, "headers_too_large", "headers over the 64 KiB limit")
        if request.method == "CONNECT":
            raise GatewayError(
                405,
                "method_not_allowed",
                "CONNECT is not supported",
                {"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"},
            )
        raw_path = request.raw_path.split("?", 1)[0]
        if not raw_path.startswith("/"):  # absolute-form: route by the target's path
            raw_path = request.rel_url.raw_path
        try:
            path = normalize_path(raw_path)
        except BadPath as exc:
            raise GatewayError(400, "bad_path", str(exc)) from None
        # request.host is the Host header, or the authority of an absolute-form target
        host = request.host
        match = self.table.match(host_name(host), path)
        if match is None:
            raise GatewayError(404, "no_route", f"no route for {path}")
        route: RouteConfig = match.route  # type: ignore[assignment]
        if route.max_body is not None and (request.content_length or 0) > route.max_body:
            raise GatewayError(
                413, "payload_too_large", f"body over {route.max_body} bytes for this route"
            )
        return route, match.upstream_path

    async def _forward(
        self,
        request: web.BaseRequest,
        route: RouteConfig,
        upstream_path: str,
        request_id: str,
        route_metrics: RouteMetrics,
    ) -> web.StreamResponse:
        query = request.rel_url.raw_query_string
        target = upstream_path + ("?" + query if query else "")
        has_body = request.body_exists
        tried: list[str] = []
        last_error: UpstreamError | None = None
        for attempt in range(route.retries + 1):
            instance = self.registry.pick(route.service, tried)
            if instance is None:
                break
            if attempt:
                route_metrics.retries.inc()
            tried.append(instance.id)
            self.registry.request_started(instance)
            body = _RequestBody(request, route.max_body) if has_body else None
            try:
                headers = upstream_request_headers(
                    request.headers.items(),
                    client_ip=request.remote or "",
                    proto="http",
                    request_id=request_id,
                    host_override=None if route.preserve_host else instance.address,
                    forwarded_prefix=route.prefix if route.strip_prefix else None,
                )
                upstream = await self.client.send(
                    instance,
                    request.method,
                    target,
                    headers,
                    body.__aiter__() if body is not None else None,
                    connect_timeout=route.connect_timeout,
                    timeout=route.timeout,
                )
                return await self._respond(request, upstream, request_id, instance)
            except UpstreamError as error:
                if body is not None and body.too_large:
                    raise GatewayError(
                        413, "payload_too_large", f"body over {route.max_body} bytes for this route"
                    ) from None
                route_metrics.upstream_error(error.reason)
                last_error = error
                log.warning(
                    "%s %s -> %s/%s: %s: %s",
                    request.method,
                    target,
                    route.service,
                    instance.id,
                    error.reason,
                    error,
                )
                if not self._may_retry(error, request.method, has_body):
                    break
            finally:
                self.registry.request_finished(instance)
        raise self._failure(last_error, route.service)

    @staticmethod
    def _may_retry(error: UpstreamError, method: str, has_body: bool) -> bool:
        if not error.reached_upstream:
            return True
        if error.reason == "timeout":
            return False
        # The request reached the upstream: only a bodiless idempotent one may go again.
        return method in IDEMPOTENT and not has_body

    @staticmethod
    def _failure(error: UpstreamError | None, service: str) -> GatewayError:
        if error is None:
            return GatewayError(
                503,
                "no_healthy_instance",
                f"no healthy instance of service {service!r}",
                {"Retry-After": "1"},
            )
        if error.reason == "connect":
            return GatewayError(
                502, "upstream_unavailable", f"could not connect to any instance of {service!r}"
            )
        if error.reason == "timeout":
            return GatewayError(
                504, "upstream_timeout", f"{service!r} sent no response head in time"
            )
        return GatewayError(
            502,
            "upstream_protocol_error",
            f"the connection to {service!r} broke before a full response head",
        )

    async def _respond(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        instance: Instance,
    ) -> web.StreamResponse:
        """Stream the upstream response back; the response head is already in."""
        clean = False
        try:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
            for name, value in downstream_response_headers(raw, request_id):
                response.headers.add(name, value)
            await response.prepare(request)
            while True:
                try:
                    with mapped_errors():
                        chunk = await upstream.content.readany()
                except UpstreamError as error:
                    # Headers went out already: abort so the client sees a truncated
                    # body, never a short one finished cleanly.
                    log.warning(
                        "upstream %s/%s failed mid-body: %s", instance.service, instance.id, error
                    )
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            clean = True
            return response
        finally:
            if clean:
                upstream.release()
            else:
                upstream.close()
