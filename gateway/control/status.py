"""The status page: GET / on the admin listener, a human view of routes and instances.

Its size follows the number of services, not of instances: a summary row per service,
and the instances themselves listed only for a small registry or for one service
(``/?service=NAME``), a page of PAGE_SIZE at a time (``&page=N``). ``&filter=TEXT``
keeps the routes, services and instances that mention TEXT (a form, no script: the page
runs none).
"""

from __future__ import annotations

import time
from html import escape
from itertools import islice

from gateway.dataplane.routing import RouteTable
from registry.core.models import INSTANCE_STATES, Instance
from registry.core.store import Registry

PAGE_SIZE = 100  # instances a page; also the most listed without choosing a service
MAX_FILTER = 200  # characters of a filter
MAX_ROUTES = 500  # route rows shown; the rest are in /routes

_STYLE = (
    "body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:2em}"
    "th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}"
    "th{background:#f4f4f4}.failing,.ejected{color:#b00}.draining{color:#a60}"
)


def _cells(values: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{v}</{tag}>" for v in values) + "</tr>"


def _link(text: str, service: str, page: int = 1) -> str:
    # Service names match SERVICE_NAME_RE ([a-z0-9._-]): nothing to quote or escape.
    query = f"service={service}" if page == 1 else f"service={service}&amp;page={page}"
    return f'<a href="/?{query}">{text}</a>'


def _expires(instance: Instance, now: float) -> str:
    if instance.expires_at is None:
        return "static" if instance.ttl is None else "in etcd"  # a lease etcd keeps
    return _left(max(0.0, instance.expires_at - now))


def _left(seconds: float) -> str:
    """A countdown as a person reads it: 42s, 59m, 2h 5m."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m"
    return f"{minutes // 60}h {minutes % 60}m" if minutes % 60 else f"{minutes // 60}h"


def _metadata(instance: Instance) -> str:
    # Whatever a service registered, shown as text: never markup.
    return ", ".join(f"{escape(k)}={escape(v)}" for k, v in sorted(instance.metadata.items()))


def _health(instance: Instance, now: float) -> str:
    """The verdict, and for one that is not healthy why and (an ejection) for how long."""
    health = escape(instance.health)
    cell = f'<span class="{health}">{health}</span>'
    if instance.health_until is not None and instance.health == "ejected":
        cell += f" · back in {_left(max(0.0, instance.health_until - now))}"
    if instance.health_reason and instance.health != "healthy":
        cell += f'<br><small class="{health}">{escape(instance.health_reason)}</small>'
    return cell


def _instance_row(instance: Instance, now: float) -> str:
    state = escape(instance.state)
    return _cells(
        [
            escape(instance.service),
            escape(instance.id),
            escape(instance.address),
            f'<span class="{state}">{state}</span>',
            _health(instance, now),
            str(instance.weight),
            str(instance.in_flight + instance.remote_in_flight),
            _expires(instance, now),
            _metadata(instance),
        ]
    )


def _mentions(text: str, *fields: str) -> bool:
    """The filter's test: ``text`` (lower case) in any field, ignoring case."""
    return any(text in f.lower() for f in fields)


def _instance_mentions(instance: Instance, text: str) -> bool:
    return _mentions(
        text,
        instance.service,
        instance.id,
        instance.address,
        instance.state,
        instance.health,
        instance.health_reason,
        *(f"{k}={v}" for k, v in instance.metadata.items()),
    )


def _routes(table: RouteTable, registry: Registry, text: str, kept: set[str]) -> str:
    """The routes that mention ``text`` or go to a service kept by the filter."""
    rows = []
    routes = [
        r
        for r in table.routes
        if r.service in kept or _mentions(text, r.host or "*", r.prefix, r.service)
    ]
    for route in islice(routes, MAX_ROUTES):
        routable = registry.counts(route.service)[1]
        service = escape(route.service)
        rows.append(
            _cells(
                [
                    escape(route.host or "*"),
                    escape(route.prefix),
                    service
                    if routable
                    else f'{service} <span class="failing">no routable instance: 503</span>',
                    "yes" if route.strip_prefix else "",
                ]
            )
        )
    more = len(routes) - MAX_ROUTES
    if more > 0:
        rows.append(_cells([f'… and {more} more in <a href="/routes">/routes</a>', "", "", ""]))
    return (
        "<h2>Routes</h2><table>"
        + _cells(["host", "prefix", "service", "strip prefix"], "th")
        + "".join(rows)
        + "</table>"
    )


def _services(registry: Registry, names: list[str]) -> tuple[str, int]:
    """The summary table, one row per service, and the count of all instances."""
    rows = []
    total = 0
    for name in names:
        counts = registry.state_counts(name)
        instances = sum(counts.values())
        total += instances
        states = [str(counts[state]) if counts[state] else "" for state in INSTANCE_STATES]
        listed = _link(str(instances), name) if instances else "<i>no instances</i>"
        healthy = f"{registry.counts(name)[1]}/{instances}"
        rows.append(_cells([name, listed, healthy, *states]))
    table = (
        "<h2>Services</h2><table>"
        + _cells(["service", "instances", "routable", *INSTANCE_STATES], "th")
        + "".join(rows)
        + "</table>"
    )
    return table, total


def _instances(registry: Registry, names: list[str], now: float, page: int, text: str) -> str:
    members = [i for n in names for i in registry.instances(n) if _instance_mentions(i, text)]
    pages = max(1, -(-len(members) // PAGE_SIZE))
    shown = members[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    heading = "Instances"
    if len(names) == 1:
        heading = f"Instances of {escape(names[0])} · {len(members)}"
        if pages > 1:
            heading += f" · page {page} of {pages}"
            if page > 1:
                heading += " · " + _link("previous", names[0], page - 1)
            if page < pages:
                heading += " · " + _link("next", names[0], page + 1)
    if not members:
        nothing = f"No instance mentions “{escape(text)}”." if text else "No instances."
        return f"<h2>{heading}</h2><p>{nothing}</p>"
    return (
        f"<h2>{heading}</h2><table>"
        + _cells(
            [
                "service",
                "id",
                "address",
                "state",
                "health",
                "weight",
                "in flight",
                "lease",
                "metadata",
            ],
            "th",
        )
        + "".join(_instance_row(instance, now) for instance in shown)
        + "</table>"
    )


EMPTY = (
    "<p>No instance has registered yet. Register one with "
    "<code>gateway register web 127.0.0.1:9001</code>, or POST "
    "<code>{&quot;host&quot;: &quot;127.0.0.1&quot;, &quot;port&quot;: 9001}</code> to "
    "<code>/registry/services/web/instances</code>.</p>"
)
# What the page may do: its own inline style and filter form, nothing else (no script,
# no frame).
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _filter_form(service: str | None, text: str) -> str:
    hidden = f'<input type=hidden name=service value="{service}">' if service else ""
    clear = ' <a href="/">clear</a>' if text else ""
    return (
        f'<form method=get action="/">{hidden}<input type=search name=filter size=40 '
        f'value="{escape(text)}" placeholder="service, id, address, state, metadata">'
        f" <button>filter</button>{clear}</form>"
    )


def render(
    table: RouteTable,
    registry: Registry,
    service: str | None = None,
    page: int = 1,
    secured: bool = False,
    text: str = "",
) -> str:
    """The page; ``service`` (known to the registry) lists its instances, ``page`` of them.
    ``secured``: /registry needs a token, which a link cannot send: it is not offered.
    ``text``: only what mentions it (service names, instances, routes)."""
    now = registry.clock()
    wanted = text.lower()
    names = [
        name
        for name in registry.service_names()
        if _mentions(wanted, name)
        or any(_instance_mentions(i, wanted) for i in registry.instances(name))
    ]
    summary, total = _services(registry, names)
    if service is not None:
        instances = _instances(registry, [service], now, page, wanted)
    elif total == 0 and not text:
        instances = EMPTY
    elif total <= PAGE_SIZE:
        instances = _instances(registry, names, now, 1, wanted)
    else:
        instances = f"<p>{total} instances: choose a service above to list its instances.</p>"
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        '<meta http-equiv="refresh" content="5"><title>gateway</title>'
        f"<style>{_STYLE}</style></head><body><h1>gateway</h1>"
        f"<p>{generated} · refreshes every 5 s · "
        '<a href="/">overview</a> · <a href="/metrics">metrics</a> · '
        '<a href="/routes">routes (JSON)</a>'
        + ("" if secured else ' · <a href="/registry/services">services (JSON)</a>')
        + "</p>"
        + _filter_form(service, text)
        + _routes(table, registry, wanted, set(names))
        + summary
        + instances
        + "</body></html>"
    )
