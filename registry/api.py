"""The registry HTTP API (SPEC section 4): HTTP to a RegistryBackend and back.

Writes go through the backend; reads come from its local copy (``backend.store``).
Refusals are ApiErrors (InvalidField, UnknownService, ...), raised where the rule
lives; the admin listener's middleware answers them as JSON."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from registry.backends.base import RegistryBackend
from registry.core.errors import ApiError, UnknownService
from registry.core.models import Instance, validate_service_name
from registry.core.units import parse_duration

BACKEND = web.AppKey("registry_backend", RegistryBackend)
INSTANCE_ID = web.RequestKey("registry_instance_id", str)  # a registration's id, for the audit

MAX_BODY = 64 * 1024
MAX_WAIT = 300.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dumps(data: Any) -> str:
    """JSON as the admin listener answers it: one line, ending with a newline (curl's
    output then ends before the prompt)."""
    return json.dumps(data) + "\n"


def _json(data: Any, status: int = 200, index: int | None = None) -> web.Response:
    headers = {"X-Registry-Index": str(index)} if index is not None else None
    return web.json_response(data, status=status, headers=headers, dumps=dumps)


async def _read_body(request: web.Request) -> Mapping[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "body must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "payload_too_large", f"body over {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "payload_too_large", f"body over {MAX_BODY} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "body is not valid JSON") from None
    except RecursionError:  # the decoder recurses once per level of [ or {
        raise ApiError(400, "invalid_json", "body is nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "body must be a JSON object")
    return body


def _service_name(request: web.Request) -> str:
    return validate_service_name(request.match_info["service"])


def _registration(instance: Instance, default_ttl: float) -> dict[str, Any]:
    data = instance.to_dict()
    # A static instance has no lease; a sidecar still needs a sane heartbeat pace.
    ttl = instance.ttl if instance.ttl is not None else default_ttl
    data["ttl"] = ttl
    data["heartbeat_interval"] = ttl / 3
    return data


async def register(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    name = _service_name(request)
    body = await _read_body(request)
    instance, created = await backend.register(name, body)
    request[INSTANCE_ID] = instance.id
    return _json(_registration(instance, backend.store.default_ttl), status=201 if created else 200)


async def heartbeat(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    instance = await backend.renew(_service_name(request), request.match_info["id"])
    return _json(_registration(instance, backend.store.default_ttl))


async def update(request: web.Request) -> web.Response:
    name = _service_name(request)
    body = await _read_body(request)
    instance = await request.app[BACKEND].update(name, request.match_info["id"], body)
    return _json(instance.to_dict())


async def deregister(request: web.Request) -> web.Response:
    await request.app[BACKEND].deregister(_service_name(request), request.match_info["id"])
    return web.Response(status=204)


async def list_services(request: web.Request) -> web.Response:
    registry = request.app[BACKEND].store
    services = []
    for name in registry.service_names():
        instances, healthy = registry.counts(name)
        services.append({"name": name, "instances": instances, "healthy": healthy})
    return _json({"services": services}, index=registry.index)


async def get_service(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    registry = backend.store
    name = request.match_info["service"]
    try:
        registry.service_index(name)  # raises for a service never seen
    except UnknownService:
        raise UnknownService(
            f"no service {name!r}", {"X-Registry-Index": str(registry.index)}
        ) from None
    wait = _query_wait(request.query.get("wait", "5m"))  # refused even without an index
    if "index" in request.query:
        index = _query_index(request.query["index"])
        if registry.poll_waits(name, index):
            await backend.wait_for_change(name, index, wait)
    instances = registry.instances(name)
    return _json(
        {"name": name, "instances": [i.to_dict() for i in instances]},
        index=registry.service_index(name),
    )


def _query_index(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "invalid_index", "index must be an integer") from None


def _query_wait(value: str) -> float:
    try:
        return min(parse_duration(value), MAX_WAIT)
    except ValueError as exc:
        raise ApiError(400, "invalid_wait", str(exc)) from None


def add_routes(app: web.Application) -> None:
    base = "/registry/services"
    instance = base + "/{service}/instances/{id}"
    app.router.add_get(base, list_services)
    app.router.add_get(base + "/{service}", get_service)
    app.router.add_post(base + "/{service}/instances", register)
    app.router.add_put(instance + "/heartbeat", heartbeat)
    app.router.add_patch(instance, update)
    app.router.add_delete(instance, deregister)
