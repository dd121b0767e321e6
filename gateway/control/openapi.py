"""The admin listener's OpenAPI 3.1 description, served at GET /openapi.json.

Built per request from what this gateway does: the registry operations name the bearer
token only when one is configured, and ``ttl``'s range is this registry's ``max_ttl``.
Field rules come from registry.core.models, so the document and the checks cannot
drift apart; tests/test_openapi.py has schemathesis hold the server to it.
"""

from __future__ import annotations

from typing import Any

from gateway import version
from registry.core.models import (
    INSTANCE_ID_RE,
    MAX_METADATA_KEYS,
    SCHEMES,
    SERVICE_NAME_RE,
    STATES,
)

JSON = "application/json"
_DURATION = r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?\s*$"  # registry.core.units' rule, in ASCII
_HEALTHS = ("healthy", "ejected", "failing")
_RFC3339 = {"type": "string", "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}, **extra}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}


_ERROR_TEXT = {
    400: "bad input: `error.code` names the field (`invalid_port`, ...) or `invalid_json`",
    401: "token missing or wrong",
    403: "the token may not make this call",
    404: "`unknown_service`, `unknown_instance` or `not_found`",
    413: "body over 64 KiB",
    415: "body is not application/json",
    429: "the service has registry.max_instances_per_service instances: `too_many_instances`",
    503: "`registry_unavailable` (its store, etcd, is unreachable) or `registry_full`",
}


def _schemas(max_ttl: float) -> dict[str, Any]:
    string_map = {
        "type": "object",
        "maxProperties": MAX_METADATA_KEYS,
        "additionalProperties": {"type": "string"},
    }
    instance_fields: dict[str, Any] = {
        "id": {"type": "string"},
        "host": {"type": "string"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "scheme": {"enum": list(SCHEMES)},
        "weight": {"type": "integer", "minimum": 1, "maximum": 100},
        "state": {"enum": list(STATES)},
        "health": {"enum": list(_HEALTHS)},
        "in_flight": {"type": "integer", "minimum": 0},
        "metadata": string_map,
        "registered_at": _RFC3339,
        "last_heartbeat": _RFC3339,
        "expires_at": {"type": ["string", "null"], "format": "date-time"},
        "health_reason": {
            "type": ["string", "null"],
            "description": "why health is not healthy: a check's failure, what ejected it",
        },
        "health_until": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "when an ejection ends",
        },
    }
    lease = {
        "ttl": {"type": "number", "description": "seconds"},
        "heartbeat_interval": {"type": "number", "description": "seconds: ttl / 3"},
    }
    count = {"type": "integer", "minimum": 0}
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": {
                    "type": "object",
                    "required": ["code", "message"],
                    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
                }
            },
        },
        "Instance": {
            "type": "object",
            "required": list(instance_fields),
            "properties": instance_fields,
        },
        "Registration": {
            "type": "object",
            "required": [*instance_fields, *lease],
            "properties": {**instance_fields, **lease},
        },
        "RegisterBody": {
            "type": "object",
            "required": ["host", "port"],
            "example": {
                "host": "127.0.0.1",
                "port": 9000,
                "ttl": "30s",
                "metadata": {"version": "1.4"},
            },  # fmt: skip
            "properties": {
                "host": {
                    "type": "string",
                    "minLength": 1,
                    "description": "an IPv4 or IPv6 address or a DNS name; no scheme or port;"
                    " not 0.0.0.0 or ::",
                },
                "port": instance_fields["port"],
                "id": {
                    "type": "string",
                    "pattern": f"^{INSTANCE_ID_RE.pattern}$",
                    "description": "default host:port",
                },
                "ttl": {
                    "description": f"a duration (500ms, 30s, 2m, 1h) or seconds, 1s..{max_ttl:g}s",
                    "anyOf": [
                        {"type": "string", "pattern": _DURATION},
                        {"type": "number", "minimum": 1, "maximum": max_ttl},
                    ],
                },
                "weight": instance_fields["weight"],
                "scheme": instance_fields["scheme"],
                "metadata": string_map,
            },
        },
        "UpdateBody": {
            "type": "object",
            "example": {"state": "draining"},
            "properties": {
                "state": instance_fields["state"],
                "weight": instance_fields["weight"],
                "metadata": string_map,
                "deregister_when_idle": {
                    "type": "boolean",
                    "description": "with state draining: removed once in_flight is 0",
                },
            },
        },
        "ServiceList": {
            "type": "object",
            "required": ["services"],
            "properties": {
                "services": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "instances", "healthy"],
                        "properties": {
                            "name": {"type": "string"},
                            "instances": count,
                            "healthy": count,
                        },
                    },
                }
            },
        },
        "Service": {
            "type": "object",
            "required": ["name", "instances"],
            "properties": {
                "name": {"type": "string"},
                "instances": {"type": "array", "items": _ref("Instance")},
            },
        },
        "Routes": {
            "type": "object",
            "required": ["routes"],
            "properties": {
                "routes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "host",
                            "prefix",
                            "service",
                            "strip_prefix",
                            "instances",
                            "healthy",
                        ],  # fmt: skip
                        "properties": {
                            "host": {"type": ["string", "null"]},
                            "prefix": {"type": "string"},
                            "service": {"type": "string"},
                            "strip_prefix": {"type": "boolean"},
                            "instances": count,
                            "healthy": count,
                        },
                    },
                }
            },
        },
        "RouteMatch": {
            "type": "object",
            "required": ["match"],
            "properties": {
                "match": {
                    "type": "object",
                    "required": ["host", "prefix", "service", "upstream_path"],
                    "properties": {
                        "host": {"type": ["string", "null"]},
                        "prefix": {"type": "string"},
                        "service": {"type": "string"},
                        "upstream_path": {"type": "string"},
                    },
                }
            },
        },
        "Status": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"type": "string"}, "reason": {"type": "string"}},
        },
    }


def _path_parameter(name: str, schema: dict[str, Any], example: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "example": example}


def _query_parameter(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "schema": schema, "description": description}


def _paths(secured: bool) -> dict[str, Any]:
    service = _path_parameter(
        "service", {"type": "string", "pattern": f"^{SERVICE_NAME_RE.pattern}$"}, "api"
    )
    instance = [service, _path_parameter("id", {"type": "string"}, "127.0.0.1:9000")]
    index_header = {
        "X-Registry-Index": {
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
            "description": "the registry's change counter (for a service: at its last change)",
        }
    }
    auth = _errors(401, 403) if secured else {}
    security: dict[str, Any] = {"security": [{"bearer": []}]} if secured else {}
    writes = {**auth, **_errors(503)}

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {JSON: {"schema": _ref(name)}}}

    def registry(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"tags": ["registry"], "summary": summary, **security, **extra,
                "responses": responses}  # fmt: skip

    def plain(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return {"tags": ["gateway"], "summary": summary, **extra, "responses": responses}

    return {
        "/registry/services": {
            "get": registry(
                "services with their instance counts",
                {
                    "200": _json_body(_ref("ServiceList"), "every service", headers=index_header),
                    **auth,
                },
            )  # fmt: skip
        },
        "/registry/services/{service}": {
            "parameters": [service],
            "get": registry(
                "one service's instances; with index, a long poll",
                {
                    "200": _json_body(_ref("Service"), "its instances", headers=index_header),
                    **_errors(400, 404),
                    **auth,
                },
                parameters=[
                    _query_parameter(
                        "index",
                        {"type": "integer"},
                        "answer once the service's index is above this",
                    ),
                    _query_parameter(
                        "wait", {"type": "string", "pattern": _DURATION}, "at most (default 5m)"
                    ),
                ],
            ),
        },
        "/registry/services/{service}/instances": {
            "parameters": [service],
            "post": registry(
                "register, or register again (same id)",
                {
                    "200": _json_body(_ref("Registration"), "registered again"),
                    "201": _json_body(_ref("Registration"), "registered"),
                    **_errors(400, 413, 415, 429),
                    **writes,
                },
                requestBody=body("RegisterBody"),
            ),
        },
        "/registry/services/{service}/instances/{id}/heartbeat": {
            "parameters": instance,
            "put": registry(
                "renew the lease",
                {
                    "200": _json_body(_ref("Registration"), "renewed"),
                    **_errors(400, 404),
                    **writes,
                },
            ),
        },
        "/registry/services/{service}/instances/{id}": {
            "parameters": instance,
            "patch": registry(
                "change state, weight or metadata",
                {
                    "200": _json_body(_ref("Instance"), "changed"),
                    **_errors(400, 404, 413, 415),
                    **writes,
                },
                requestBody=body("UpdateBody"),
            ),
            "delete": registry(
                "deregister",
                {"204": {"description": "deregistered"}, **_errors(400, 404), **writes},
            ),
        },
        "/routes": {
            "get": plain(
                "the route table with instance counts; with path (and host), the route it takes",
                {
                    "200": _json_body(
                        {"anyOf": [_ref("Routes"), _ref("RouteMatch")]}, "routes, or the match"
                    ),
                    **_errors(400),
                    "404": {"$ref": "#/components/responses/E404"},
                },
                parameters=[
                    _query_parameter("path", {"type": "string"}, "a request path to match"),
                    _query_parameter("host", {"type": "string"}, "its Host header"),
                ],
            )
        },
        "/healthz": {"get": plain("the process is up", {"200": _json_body(_ref("Status"), "ok")})},
        "/readyz": {
            "get": plain(
                "ready to route",
                {
                    "200": _json_body(_ref("Status"), "ready"),
                    "503": _json_body(_ref("Status"), "degraded, with the reason"),
                },
            )
        },
        "/metrics": {
            "get": plain(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )  # fmt: skip
        },
        "/": {
            "get": plain(
                "the status page",
                {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    },
                    **_errors(400, 404),
                },
                parameters=[
                    _query_parameter("service", {"type": "string"}, "one service's instances"),
                    _query_parameter(
                        "page", {"type": "integer", "minimum": 1, "maximum": 1_000_000}, "page"
                    ),
                ],
            )
        },
        "/openapi.json": {
            "get": plain("this document", {"200": _json_body({"type": "object"}, "OpenAPI 3.1")})
        },
    }


def document(secured: bool, max_ttl: float) -> dict[str, Any]:
    """The OpenAPI document of an admin listener; ``secured``: tokens are configured."""
    error = _ref("Error")
    responses = {f"E{status}": _json_body(error, text) for status, text in _ERROR_TEXT.items()}
    responses["E401"]["headers"] = {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
    }
    responses["E503"]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    components: dict[str, Any] = {"schemas": _schemas(max_ttl), "responses": responses}
    if secured:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gateway admin API",
            "version": version(),
            "description": "The registry API (SPEC section 4), routes, health and metrics.",
        },
        "paths": _paths(secured),
        "components": components,
    }
