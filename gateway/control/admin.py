"""The admin listener: registry API, /metrics, /healthz, /readyz, /routes, /openapi.json."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.control.auth import READS, Token, audit_line, check, identify
from gateway.control.changelog import ACTOR, actor
from gateway.control.metrics import GatewayMetrics
from gateway.control.openapi import document
from gateway.control.status import HEADERS as STATUS_HEADERS
from gateway.control.status import MAX_FILTER, render
from gateway.dataplane.context import ProxyContext
from gateway.dataplane.routing import BadPath, RouteSpec, host_name, normalize_path
from gateway.dataplane.wire import error_body
from registry import api as registry_api
from registry.backends.base import RegistryBackend
from registry.core.errors import ApiError, UnknownService

PROXY = web.AppKey("proxy", ProxyContext)
METRICS = web.AppKey("metrics", GatewayMetrics)
TOKENS = web.AppKey("tokens", list)

audit = logging.getLogger("gateway.audit")
READINESS = web.AppKey("readiness", dict)  # {"reason": str} when degraded
ROUTE_JSON = web.AppKey("route_json", dict)  # the table last listed, its routes encoded

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error of the admin listener is SPEC's JSON error shape."""
    try:
        return await handler(request)
    except ApiError as error:  # the registry's, the routing's: every refusal
        return error_response(error.status, error.code, error.message, error.headers)
    except web.HTTPMethodNotAllowed as exc:
        allow = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405, "method_not_allowed", f"{request.method} not allowed here", {"Allow": allow}
        )
    except web.HTTPNotFound:
        return error_response(404, "not_found", f"nothing at {request.path}")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, "payload_too_large", "body too large")


@web.middleware
async def bearer_token(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With tokens configured, every /registry call needs one that may make it; every
    call that changes something (heartbeats aside) leaves a line in the audit log."""
    if not (request.path == "/registry" or request.path.startswith("/registry/")):
        return await handler(request)
    tokens = request.app[TOKENS]
    service = request.match_info.get("service")
    name = None
    acting = None
    try:
        if tokens:
            token = identify(tokens, request.headers.get("Authorization", ""))
            name = token.name
            check(token, request.method, service)
        acting = ACTOR.set(actor(request.remote, name))
        response = await handler(request)
    except ApiError as error:
        _audit(request, name, service, error.status)
        raise
    finally:
        if acting is not None:
            ACTOR.reset(acting)
    _audit(request, name, service, response.status)
    return response


def _audit(request: web.Request, token: str | None, service: str | None, status: int) -> None:
    if request.method in READS or (request.path.endswith("/heartbeat") and status == 200):
        return
    instance = request.match_info.get("id") or request.get(registry_api.INSTANCE_ID)
    audit.info(
        "%s",
        audit_line(token, request.remote, request.method, request.path, service, instance, status),
    )


async def status_page(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    service = request.query.get("service")
    if service is not None:
        try:
            proxy.registry.service_index(service)  # known?
        except UnknownService as exc:
            raise ApiError(404, "unknown_service", str(exc)) from None
    page = request.query.get("page", "1")
    if not (page.isascii() and page.isdigit() and 0 < int(page) <= 1_000_000):
        raise ApiError(400, "invalid_page", "page must be an integer from 1")
    text = request.query.get("filter", "").strip()
    if len(text) > MAX_FILTER:
        raise ApiError(400, "invalid_filter", f"filter must be at most {MAX_FILTER} characters")
    secured = bool(request.app[TOKENS])
    page_html = render(proxy.table, proxy.registry, service, int(page), secured, text)
    return web.Response(text=page_html, content_type="text/html", headers=STATUS_HEADERS)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=registry_api.dumps)


async def readyz(request: web.Request) -> web.Response:
    reason = request.app[READINESS].get("reason") or request.app[registry_api.BACKEND].problem()
    if reason:
        return web.json_response(
            {"status": "degraded", "reason": reason}, status=503, dumps=registry_api.dumps
        )
    return web.json_response({"status": "ready"}, dumps=registry_api.dumps)


async def openapi(request: web.Request) -> web.Response:
    secured = bool(request.app[TOKENS])
    max_ttl = request.app[registry_api.BACKEND].store.max_ttl
    return web.json_response(document(secured, max_ttl), dumps=registry_api.dumps)


async def metrics(request: web.Request) -> web.Response:
    # Evict ended leases first, so a scrape never shows an instance gone from
    # gateway_registry_instances without its eviction counted.
    request.app[registry_api.BACKEND].store.expire()
    # The values are copied here, on the loop (they change under it); the families are
    # built and the text written in a thread.
    body = await asyncio.to_thread(request.app[METRICS].exposition())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def routes(request: web.Request) -> web.Response:
    proxy = request.app[PROXY]
    registry = proxy.registry
    if "path" in request.query:
        try:
            path = normalize_path(request.query["path"].split("?", 1)[0])
        except BadPath as exc:
            raise ApiError(400, "bad_path", str(exc)) from None
        match = proxy.table.match(host_name(request.query.get("host")), path)
        if match is None:
            raise ApiError(404, "no_route", f"no route for {path}")
        route = match.route
        return web.json_response(
            {
                "match": {
                    "host": route.host,
                    "prefix": route.prefix,
                    "service": route.service,
                    "upstream_path": match.upstream_path,
                }
            },
            dumps=registry_api.dumps,
        )
    table = proxy.table
    cached = request.app[ROUTE_JSON]
    if cached.get("table") is not table:  # a new table (a reload): encoded in a thread
        cached["fragments"] = await asyncio.to_thread(_route_fragments, table.routes)
        cached["table"] = table
    counts: dict[str, str] = {}  # only the counts change between two listings
    listed = []
    for head, service in cached["fragments"]:
        tail = counts.get(service)
        if tail is None:
            instances, healthy = registry.counts(service)
            panic = "true" if registry.in_panic(service) else "false"
            tail = counts[service] = f'{instances}, "healthy": {healthy}, "panic": {panic}}}'
        listed.append(head + tail)
    body = '{"routes": [' + ", ".join(listed) + "]}\n"
    return web.Response(text=body, content_type="application/json")


def _route_fragments(routes: Sequence[RouteSpec]) -> list[tuple[str, str]]:
    """Each route's JSON object up to its counts, with its service: encoded once a table
    (a listing of 10,000 routes took 45 ms on the loop, each time)."""
    return [
        (json.dumps(_route_head(route))[:-1] + ', "instances": ', route.service) for route in routes
    ]


def _route_head(route: RouteSpec) -> dict[str, object]:
    """What /routes lists of a route besides its counts (a canary split only if it has one)."""
    head: dict[str, object] = {
        "host": route.host,
        "prefix": route.prefix,
        "service": route.service,
        "strip_prefix": route.strip_prefix,
    }
    if route.split:
        head["split"] = [
            {"metadata": dict(subset.metadata), "weight": subset.weight} for subset in route.split
        ]
        head["split_header"] = route.split_header
    return head


def build_admin_app(
    proxy: ProxyContext,
    backend: RegistryBackend,
    gateway_metrics: GatewayMetrics,
    tokens: list[Token],
    readiness: dict[str, str],
) -> web.Application:
    app = web.Application(
        middlewares=[json_errors, bearer_token],
        client_max_size=registry_api.MAX_BODY,
    )
    app[PROXY] = proxy
    app[METRICS] = gateway_metrics
    app[registry_api.BACKEND] = backend
    app[READINESS] = readiness
    app[ROUTE_JSON] = {}
    app[TOKENS] = tokens
    app.router.add_get("/", status_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/openapi.json", openapi)
    registry_api.add_routes(app)
    return app
