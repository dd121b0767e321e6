"""What `gateway check` says about a valid config: the routing table and shadowed prefixes."""

from __future__ import annotations

from gateway.config.model import Config, ProxySettings, RouteConfig


def plural(count: int, noun: str) -> str:
    """``1 route``, ``3 routes``: a count with its noun (nouns that take an s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def describe_routes(config: Config) -> list[str]:
    """The routing table for ``gateway check``: host, prefix, service and non-default options."""
    rows = [
        (
            route.host or "*",
            route.prefix,
            f"-> {route.service}",
            _route_options(route, config.proxy),
        )
        for route in config.routes
    ]
    widths = [max((len(row[column]) for row in rows), default=0) for column in range(3)]
    lines = []
    for row in rows:
        cells = [row[column].ljust(widths[column]) for column in range(3)]
        lines.append("  ".join([*cells, row[3]]).rstrip())
    return lines


def shadow_warnings(config: Config) -> list[str]:
    """Warn where a longer prefix takes paths from the route that would otherwise match.
    Not from a catch-all ``/``: taking what the longer prefixes leave is what it is for."""
    filename = str(config.path) if config.path is not None else "routes.yaml"
    first: dict[tuple[str | None, str], RouteConfig] = {}
    for route in config.routes:
        first.setdefault((route.host, route.prefix), route)
    warnings = []
    for route in config.routes:
        nearest = _nearest_cover(first, route)
        if nearest is not None and nearest.prefix != "/" and nearest.service != route.service:
            warnings.append(
                f"warning: {filename}:{route.line}: prefix {route.prefix} (service {route.service})"
                f" shadows part of {nearest.prefix} (service {nearest.service})"
            )
    return warnings


def _nearest_cover(
    first: dict[tuple[str | None, str], RouteConfig], route: RouteConfig
) -> RouteConfig | None:
    """The route with the longest prefix above ``route``'s, for its host or any host
    (the host's own first): a walk up the path, segment by segment, not over all routes."""
    prefix = route.prefix
    while prefix != "/":
        prefix = prefix.rsplit("/", 1)[0] or "/"
        found = (route.host is not None and first.get((route.host, prefix))) or first.get(
            (None, prefix)
        )
        if found:
            return found
    return None


def _route_options(route: RouteConfig, proxy: ProxySettings) -> str:
    """The route's non-default settings; timeouts and retries compare with the proxy's."""
    options = ["strip_prefix"] if route.strip_prefix else []
    if not route.preserve_host:
        options.append("preserve_host=false")
    if route.timeout != proxy.timeout:
        options.append(f"timeout={format_duration(route.timeout)}")
    if route.connect_timeout != proxy.connect_timeout:
        options.append(f"connect_timeout={format_duration(route.connect_timeout)}")
    if route.retries != proxy.retries:
        options.append(f"retries={route.retries}")
    if route.max_body is not None:
        options.append(f"max_body={_format_size(route.max_body)}")
    limit = route.rate_limit
    if limit is not None:
        by = f",by={limit.header}" if limit.header else ""
        options.append(f"rate_limit={limit.average:g}/s,burst={limit.burst}{by}")
    if route.split:
        subsets = ",".join(f"{subset.label}:{subset.weight}" for subset in route.split)
        header = "" if route.split_header == "X-Canary" else f",header={route.split_header}"
        options.append(f"split={subsets}{header}")
    return " ".join(options)


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, scale in (("h", 3600), ("m", 60)):
        if seconds % scale == 0:
            return f"{seconds / scale:g}{unit}"
    return f"{seconds:g}s"


def _format_size(size: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def ignored_settings(config: Config) -> list[str]:
    """Settings that a valid config has but that do nothing with the rest of it."""
    if config.registry.snapshot is not None and config.registry.backend != "memory":
        filename = str(config.path) if config.path is not None else "routes.yaml"
        return [
            f"warning: {filename}: registry.snapshot is ignored with the etcd backend "
            "(etcd keeps the registrations)"
        ]
    return []
