"""Gateway errors and their JSON form; the one place errors become responses."""

from __future__ import annotations

import json

from aiohttp import web


class GatewayError(Exception):
    """An error with a status and a stable code, answered as SPEC's JSON error shape."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=error_body(code, message),
        content_type="application/json",
        headers=headers,
    )


def to_response(error: GatewayError) -> web.Response:
    return error_response(error.status, error.code, error.message, error.headers)
