"""A small synchronous client of the registry API (SPEC sections 4 and 8).

Stdlib only, so a service can import ``AdminClient`` to register itself
(or run a ``registry.sidecar.Sidecar`` in a thread).
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

DEFAULT_TIMEOUT = 5.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 5.0


class AdminError(Exception):
    """The admin answered with an HTTP error (or with something that is not its JSON)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AdminUnreachable(Exception):
    """No answer from the admin: connection refused or reset, DNS failure, timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdminClient:
    """The registry API over urllib; one short request per call, ``timeout`` seconds each."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        # Like CONSUL_HTTP_ADDR, a bare host:port means http.
        url = base_url.strip() if "://" in base_url else "http://" + base_url.strip()
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid admin URL {base_url!r}: use e.g. http://127.0.0.1:8081")
        self.base_url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def register(self, service: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _object(self._call("POST", f"{_service_path(service)}/instances", body))

    def heartbeat(self, service: str, instance_id: str) -> dict[str, Any]:
        return _object(self._call("PUT", f"{_instance_path(service, instance_id)}/heartbeat"))

    def update(self, service: str, instance_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return _object(self._call("PATCH", _instance_path(service, instance_id), body))

    def deregister(self, service: str, instance_id: str) -> None:
        self._call("DELETE", _instance_path(service, instance_id))

    def services(self) -> list[dict[str, Any]]:
        services = _object(self._call("GET", "/registry/services")).get("services")
        if not isinstance(services, list):
            raise AdminError(200, "invalid_response", "the answer has no list of services")
        return [entry for entry in services if isinstance(entry, dict)]

    def service(self, name: str) -> dict[str, Any]:
        return _object(self._call("GET", _service_path(name)))

    def instance(self, service: str, instance_id: str) -> dict[str, Any] | None:
        """The instance as listed, or None once it (or its whole service) is gone."""
        try:
            instances = self.service(service).get("instances")
        except AdminError as exc:
            if exc.status == 404:
                return None
            raise
        if not isinstance(instances, list):
            return None
        return next(
            (i for i in instances if isinstance(i, dict) and i.get("id") == instance_id), None
        )

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(
            self.base_url + path, data=data, headers=headers, method=method
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            raise _error_from_answer(exc.code, _drain(exc), exc.reason) from None
        except urllib.error.URLError as exc:
            raise AdminUnreachable(self._reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise AdminUnreachable(self._reason(exc)) from None
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise AdminError(status, "invalid_response", "the answer is not JSON") from None

    def _reason(self, error: object) -> str:
        if isinstance(error, TimeoutError):
            return f"no answer within {self.timeout:g}s"
        text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        text = text or type(error).__name__
        return text[:1].lower() + text[1:]


def _service_path(service: str) -> str:
    return "/registry/services/" + urllib.parse.quote(service, safe="")


def _instance_path(service: str, instance_id: str) -> str:
    return f"{_service_path(service)}/instances/{urllib.parse.quote(instance_id, safe='')}"


def _object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict):
        raise AdminError(200, "invalid_response", "the answer is not a JSON object")
    return answer


def _drain(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException, AttributeError):
        return b""
    finally:
        error.close()


def _error_from_answer(status: int, raw: bytes, reason: str) -> AdminError:
    """The SPEC error shape, or the status phrase and the start of whatever came instead."""
    try:
        error = json.loads(raw).get("error")
        return AdminError(status, str(error["code"]), str(error["message"]))
    except (ValueError, RecursionError, AttributeError, TypeError, KeyError):
        pass
    try:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        code = "http_error"
    lines = raw.decode("utf-8", "replace").strip().splitlines()
    message = lines[0][:200] if lines else (reason or "no details")
    return AdminError(status, code, message)


def describe_failure(error: AdminError | AdminUnreachable, base_url: str) -> str:
    """One line for a user, without the ``gateway: `` prefix."""
    if isinstance(error, AdminUnreachable):
        return f"cannot reach admin at {base_url}: {error.message}"
    hint = " — pass --token" if error.status == 401 else ""
    return f"admin answered {error}{hint}"
