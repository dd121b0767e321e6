"""The upstream client: pooled keep-alive connections and error mapping.

This is the one place where client library errors become the gateway's own
upstream errors, so the request path above it does not know which HTTP client
is underneath (it is replaced by a faster data plane later).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from registry.models import Instance


class UpstreamError(Exception):
    """An attempt failed; ``reason`` is a gateway_upstream_errors_total label."""

    reason = "protocol"
    reached_upstream = True  # whether the upstream may have seen the request


class ConnectFailed(UpstreamError):
    reason = "connect"
    reached_upstream = False


class UpstreamTimeout(UpstreamError):
    reason = "timeout"


class UpstreamReset(UpstreamError):
    reason = "reset"


class UpstreamProtocolError(UpstreamError):
    reason = "protocol"


@contextmanager
def mapped_errors() -> Iterator[None]:
    """Turn aiohttp and socket errors into UpstreamError subclasses."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:  # connect phase; also a TimeoutError
        raise ConnectFailed(f"connect timed out: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ConnectFailed(str(exc)) from exc
    except TimeoutError as exc:
        raise UpstreamTimeout("no response head within the route's timeout") from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as exc:
        raise UpstreamReset(str(exc) or type(exc).__name__) from exc
    except (aiohttp.ClientResponseError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamProtocolError(str(exc)) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamProtocolError(str(exc) or type(exc).__name__) from exc


class UpstreamClient:
    """Sends one attempt to one instance. Never re-sends a request on its own."""

    def __init__(self, keepalive_timeout: float = 4.0) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # the default of 100 is shared by every upstream
            keepalive_timeout=keepalive_timeout,
            ttl_dns_cache=10,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        # aiohttp re-sends idempotent requests once when a pooled connection drops,
        # even after the upstream read them; the proxy decides retries itself.
        self._session._retry_connection = False
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def close(self) -> None:
        await self._session.close()

    async def send(
        self,
        instance: Instance,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        *,
        connect_timeout: float,
        timeout: float,
    ) -> aiohttp.ClientResponse:
        """Send the request and wait for the response head (at most ``timeout``)."""
        url = URL(f"{instance.scheme}://{instance.address}{target}", encoded=True)
        client_timeout = self._timeouts.get(connect_timeout)
        if client_timeout is None:
            client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
            self._timeouts[connect_timeout] = client_timeout
        with mapped_errors():
            async with asyncio.timeout(timeout):
                return await self._session.request(
                    method,
                    url,
                    headers=CIMultiDict(headers),
                    data=body,
                    allow_redirects=False,
                    timeout=client_timeout,
                    compress=None,
                )
