"""The proxy listener's HTTP server: aiohttp's, with SPEC's JSON answers to bad requests."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.errors import error_response

log = logging.getLogger("gateway.server")

MAX_HEADERS_TOTAL = 64 * 1024


def classify(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """(status, code, message) for an error aiohttp met before or around a handler."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        if isinstance(line, (bytes, bytearray)) and (line[:1] == b"/" or b"://" in line):
            return 414, "uri_too_long", "request line over the 8 KiB limit"
        return 431, "headers_too_large", "a header over the 8 KiB limit"
    if isinstance(exc, HttpProcessingError) and 400 <= status < 500:
        reason = (exc.message or "").strip().splitlines()[0:1]
        text = reason[0].rstrip(":").split(": b'")[0] if reason else "malformed request"
        return status, "bad_request", f"malformed request: {text}"
    if 400 <= status < 500:
        return status, "bad_request", "malformed request"
    return status, "internal_error", "the gateway failed to handle this request"


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        status, code, text = classify(status, exc)
        if status >= 500:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            log.debug("refused a request from %s: %s", request.remote, text)
        response = error_response(status, code, text)
        response.force_close()
        return response


class ProxyServer(web.Server):
    """web.Server whose connections answer malformed requests with JSON errors."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)
