"""Header rules of the proxy (SPEC section 5). Pure.

Headers are lists of (name, value) string pairs, as they came off the wire,
so repeated headers (Set-Cookie, X-Forwarded-For) keep their order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

Headers = list[tuple[str, str]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers the gateway itself sets on the way upstream; a client's copy is replaced.
_SET_UPSTREAM = frozenset({"x-forwarded-proto", "x-forwarded-host", "x-request-id"})


def hop_by_hop(headers: Iterable[tuple[str, str]]) -> set[str]:
    """Lower-cased names to drop: the fixed set plus every name Connection lists."""
    names = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
    return names


def sane_request_id(value: str | None) -> bool:
    """1 to 200 characters, each in 0x21..0x7E."""
    return value is not None and 0 < len(value) <= 200 and all("!" <= c <= "~" for c in value)


def new_request_id() -> str:
    return os.urandom(16).hex()


def request_id_of(headers: Iterable[tuple[str, str]]) -> str:
    """The client's X-Request-ID if sane, else a new one."""
    for name, value in headers:
        if name.lower() == "x-request-id":
            return value if sane_request_id(value) else new_request_id()
    return new_request_id()


def upstream_request_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client_ip: str,
    proto: str,
    request_id: str,
    host_override: str | None = None,
    forwarded_prefix: str | None = None,
) -> Headers:
    """Headers to send upstream.

    Hop-by-hop headers go first, so ``Connection: X-Forwarded-For`` can only
    remove the client's copy, never the one the gateway adds afterwards.
    """
    headers = list(headers)
    drop = hop_by_hop(headers) | _SET_UPSTREAM | {"expect"}
    if forwarded_prefix is not None:
        drop.add("x-forwarded-prefix")
    out: Headers = []
    forwarded_for: list[str] = []
    host: str | None = None
    for name, value in headers:
        lower = name.lower()
        if lower == "x-forwarded-for":
            if "x-forwarded-for" not in drop:
                forwarded_for.append(value)
        elif lower == "host":
            host = value
            out.append((name, host_override if host_override is not None else value))
        elif lower not in drop:
            out.append((name, value))
    if host is None and host_override is not None:
        out.append(("Host", host_override))
    forwarded_for.append(client_ip)
    out.append(("X-Forwarded-For", ", ".join(forwarded_for)))
    out.append(("X-Forwarded-Proto", proto))
    if host is not None:
        out.append(("X-Forwarded-Host", host))
    out.append(("X-Request-ID", request_id))
    if forwarded_prefix is not None:
        out.append(("X-Forwarded-Prefix", forwarded_prefix))
    return out


def downstream_response_headers(headers: Iterable[tuple[str, str]], request_id: str) -> Headers:
    """Headers to send back to the client: hop-by-hop removed, X-Request-ID set."""
    headers = list(headers)
    drop = hop_by_hop(headers)
    drop.add("x-request-id")
    out = [(name, value) for name, value in headers if name.lower() not in drop]
    out.append(("X-Request-ID", request_id))
    return out
