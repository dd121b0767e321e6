"""A small asyncio client of etcd's v3 JSON gateway (``/v3/...``), on aiohttp.

Why not grpc or a library: the JSON gateway needs nothing but the HTTP client the
gateway already has; no grpc threads (a gateway forks its workers), no generated
code. What the gateway's JSON is like (etcd 3.4 and later):

- int64 values (revisions, lease ids, TTLs) are JSON strings; a zero value is omitted;
- keys and values are base64;
- a watch is one POST whose answer is a stream of JSON lines, each ``{"result": ...}``
  or ``{"error": ...}``; a PUT event has no "type" (PUT is 0, omitted), a DELETE has
  "type": "DELETE"; a line of a catch-up can be hundreds of KB (no line limit here);
- a keep-alive is one POST per renewal; a lease that is gone answers without "TTL".

Several endpoints: a call goes to the current one and moves on to the next when it
cannot connect, times out or answers 503; EtcdUnavailable when none answers.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

KeyValue = tuple[str, bytes, int, int]  # key, value, mod_revision, lease


class EtcdError(Exception):
    """etcd answered, with an error (``code``: gRPC's)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered (refused, timed out, or unavailable)."""


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def prefix_end(prefix: str) -> str:
    """The range end that covers every key starting with ``prefix`` (etcd's convention)."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


def key_value(kv: dict[str, Any]) -> KeyValue:
    return (
        base64.b64decode(kv["key"]).decode(),
        base64.b64decode(kv.get("value", "")),
        int(kv.get("mod_revision", 0)),
        int(kv.get("lease", 0)),
    )


class EtcdClient:
    def __init__(self, endpoints: Sequence[str], timeout: float = 2.0) -> None:
        """``endpoints``: ``host:port`` of the members (http)."""
        self.endpoints = [f"http://{address}" for address in endpoints]
        self.timeout = timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, force_close=False)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def failover(self) -> None:
        """The next endpoint becomes current (the current one does not answer)."""
        self._current = (self._current + 1) % len(self.endpoints)

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One unary call, on each endpoint at most once until one answers."""
        last = "no endpoint"
        for _ in self.endpoints:
            url = self.endpoint + path
            try:
                async with self._client().post(
                    url, json=body, timeout=aiohttp.ClientTimeout(total=self.timeout)
                ) as response:
                    data = await response.read()
                    if response.status == 503:
                        last = f"{self.endpoint}: unavailable"
                        self.failover()
                        continue
                    answer = json.loads(data) if data else {}
                    if response.status != 200:
                        message = answer.get("message") or answer.get("error") or str(answer)
                        raise EtcdError(f"{path}: {message}", int(answer.get("code", 0)))
                    return answer
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last = f"{self.endpoint}: {_reason(exc)}"
                self.failover()
            except ValueError as exc:  # not JSON: not etcd's gateway
                last = f"{self.endpoint}: {exc}"
                self.failover()
        raise EtcdUnavailable(last)

    # -- keys --------------------------------------------------------------------------

    async def range_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix``, and the store's revision they were read at."""
        answer = await self.call(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": prefix_end(prefix)}
        )
        revision = int(answer["header"]["revision"])
        return revision, [key_value(kv) for kv in answer.get("kvs", [])]

    async def count_newer(self, prefix: str, revision: int) -> int:
        """How many keys under ``prefix`` were written after ``revision``. (etcd's
        "count" ignores min_mod_revision: the keys themselves are counted.)"""
        answer = await self.call(
            "/v3/kv/range",
            {
                "key": _b64(prefix),
                "range_end": prefix_end(prefix),
                "keys_only": True,
                "min_mod_revision": str(revision + 1),
            },
        )
        return len(answer.get("kvs", []))

    async def get(self, key: str) -> KeyValue | None:
        answer = await self.call("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", [])
        return key_value(kvs[0]) if kvs else None

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Returns the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        answer = await self.call("/v3/kv/put", body)
        return int(answer["header"]["revision"])

    async def delete(self, key: str) -> tuple[int, int, int]:
        """How many keys went (0 or 1), the store's revision after, and the lease the key
        was on (0: none, or no key)."""
        answer = await self.call("/v3/kv/deleterange", {"key": _b64(key), "prev_kv": True})
        previous = answer.get("prev_kvs", [])
        lease = int(previous[0].get("lease", 0)) if previous else 0
        return int(answer.get("deleted", 0)), int(answer["header"]["revision"]), lease

    async def compact(self, revision: int) -> None:
        await self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    async def revision(self) -> int:
        """The store's current revision (a cheap call: the liveness probe)."""
        answer = await self.call("/v3/maintenance/status", {})
        return int(answer["header"]["revision"])

    # -- leases ------------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(max(1, round(ttl)))})
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> int:
        """Renew ``lease``; its TTL in seconds, 0 if it is gone (expired or revoked)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go with it); one already gone is no error."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except EtcdError as exc:
            if exc.code != 5:  # NOT_FOUND
                raise

    # -- watch -------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[dict[str, Any]]:
        """The watch stream of ``prefix`` from ``start_revision``: each message's
        ``result`` (events, a progress notification, a cancel). It ends when the stream
        does; EtcdUnavailable when it cannot start, EtcdError for an error line."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": str(start_revision),
                "progress_notify": True,
            }
        }
        url = self.endpoint + "/v3/watch"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout)
        try:
            async with self._client().post(url, json=body, timeout=timeout) as response:
                if response.status != 200:
                    raise EtcdUnavailable(f"{self.endpoint}: watch answered {response.status}")
                pending = bytearray()
                async for chunk in response.content.iter_any():
                    pending += chunk
                    while (end := pending.find(b"\n")) >= 0:
                        line = bytes(pending[:end])
                        del pending[: end + 1]
                        if line.strip():
                            yield _watch_result(line)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise EtcdUnavailable(f"{self.endpoint}: watch broke: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__


def _watch_result(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise EtcdError(f"watch: not JSON: {line[:80]!r}") from None
    if "error" in message:
        error = message["error"]
        text = error.get("message", error) if isinstance(error, dict) else error
        raise EtcdError(f"watch: {text}")
    result: dict[str, Any] = message.get("result", {})
    return result
