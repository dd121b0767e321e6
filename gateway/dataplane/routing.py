"""The routing table: path normalisation and longest-prefix match. Pure.

Routes are compiled once into dicts keyed by prefix; a lookup walks the path's
segment boundaries from the longest candidate down, so its cost depends on the
path's depth, not on the number of routes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.dataplane.split import Split, SplitSpec


class BadPath(ValueError):
    """A path that climbs above / or is not an absolute path."""


class RouteSpec(Protocol):
    """What the table needs of a configured route (gateway.config.model.RouteConfig)."""

    @property
    def prefix(self) -> str: ...
    @property
    def service(self) -> str: ...
    @property
    def host(self) -> str | None: ...
    @property
    def strip_prefix(self) -> bool: ...
    @property
    def split(self) -> Sequence[SplitSpec]: ...
    @property
    def split_header(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Match:
    route: RouteSpec
    upstream_path: str  # normalised path, after strip_prefix, without query


def normalize_path(raw: str) -> str:
    """Resolve dot segments (also percent-encoded ones) as RFC 3986 5.2.4 does.

    Other percent-escapes are left as sent, so the path forwarded upstream is
    the same string that was routed.
    """
    if not raw.startswith("/"):
        raise BadPath("path must start with /")
    if "." not in raw and "%2" not in raw:
        return raw  # fast path: nothing to resolve
    out: list[str] = []
    trailing_slash = False
    for segment in raw[1:].split("/"):
        dots = segment.replace("%2e", ".").replace("%2E", ".")
        if dots == ".":
            trailing_slash = True
        elif dots == "..":
            if not out:
                raise BadPath("path climbs above /")
            out.pop()
            trailing_slash = True
        else:
            out.append(segment)
            trailing_slash = False
    path = "/" + "/".join(out)
    if trailing_slash and out:
        path += "/"
    return path


def host_name(host_header: str | None) -> str | None:
    """The Host header's name without port, lower-cased."""
    if not host_header:
        return None
    if host_header.startswith("["):
        end = host_header.find("]")
        return host_header[: end + 1].lower() if end > 0 else host_header.lower()
    return host_header.rsplit(":", 1)[0].lower() if ":" in host_header else host_header.lower()


def _key(prefix: str) -> str:
    return prefix.rstrip("/")


class RouteTable:
    def __init__(self, routes: Iterable[RouteSpec]) -> None:
        self.routes: tuple[RouteSpec, ...] = tuple(routes)
        self._any: dict[str, RouteSpec] = {}
        self._by_host: dict[str, dict[str, RouteSpec]] = {}
        for route in self.routes:
            table = (
                self._any
                if route.host is None
                else self._by_host.setdefault(route.host.lower(), {})
            )
            table.setdefault(_key(route.prefix), route)
        # Each route's canary split: its schedule lives as long as this table, so a
        # reload's new weights apply from the new table's first request.
        self._splits: dict[tuple[str | None, str], Split] = {
            (route.host, route.prefix): Split(route.split, route.split_header)
            for route in self.routes
            if route.split
        }

    def split(self, route: RouteSpec) -> Split | None:
        """The canary split of one of this table's routes; None for a route without one."""
        return self._splits.get((route.host, route.prefix)) if self._splits else None

    def match(self, host: str | None, path: str) -> Match | None:
        """Longest prefix on a segment boundary; for equal prefixes a route for the host wins.

        ``host`` is the request's host name (see host_name); ``path`` is normalised.
        """
        hosted = self._by_host.get(host) if host is not None and self._by_host else None
        anyhost = self._any
        key = path.rstrip("/")
        while True:
            route = hosted.get(key) if hosted else None
            if route is None:
                route = anyhost.get(key)
            if route is not None:
                if not route.strip_prefix:
                    return Match(route, path)
                rest = path[len(key) :]
                return Match(route, rest if rest.startswith("/") else "/" + rest)
            if not key:
                return None
            key = key[: key.rfind("/")]
