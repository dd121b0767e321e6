"""The one error type of the gateway's answers: an HTTP status, a stable code, a message.

Everything the registry API or the proxy refuses is an ApiError or a subclass, raised
where the rule lives (pure code: no aiohttp here). The admin listener's middleware
turns one into SPEC's JSON error shape; the data plane writes it as raw bytes
(gateway.dataplane.wire.error_bytes).
"""

from __future__ import annotations


class ApiError(Exception):
    """``status`` and ``code`` are SPEC's; ``headers`` go with the answer (Retry-After...)."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class InvalidField(ApiError):
    """A registration field fails validation; the code is ``invalid_<field>``."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(400, f"invalid_{field_name}", message)
        self.field = field_name


class UnknownService(ApiError):
    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(404, "unknown_service", message, headers)


class UnknownInstance(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(404, "unknown_instance", message)
