"""Gateway errors and their JSON form; the one place errors become responses."""

from __future__ import annotations

import json
from http import HTTPStatus

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


def error_bytes(
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    extra: bytes = b"",
    close: bool = False,
) -> bytes:
    """A whole JSON error response, as the data plane writes it."""
    body = error_body(code, message)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
            b"X-Request-ID: ",
            request_id,
            b"\r\n",
            extra,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        ]
    )
