"""The status page: GET / on the admin listener, a human view of routes and instances."""

from __future__ import annotations

import time
from html import escape

from gateway.routing import RouteTable
from registry.models import Instance
from registry.store import Registry

_STYLE = (
    "body{font:14px system-ui,sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;margin-bottom:2em}"
    "th,td{padding:.3em .8em;border-bottom:1px solid #ddd;text-align:left}"
    "th{background:#f4f4f4}.failing,.ejected{color:#b00}.draining{color:#a60}"
)


def _cells(values: list[str], tag: str = "td") -> str:
    return "<tr>" + "".join(f"<{tag}>{v}</{tag}>" for v in values) + "</tr>"


def _expires(instance: Instance, now: float) -> str:
    if instance.expires_at is None:
        return "static"
    return f"{max(0.0, instance.expires_at - now):.0f}s"


def render(table: RouteTable, registry: Registry) -> str:
    now = registry.clock()
    routes = [
        _cells(
            [
                escape(route.host or "*"),
                escape(route.prefix),
                escape(route.service),
                "yes" if route.strip_prefix else "",
            ]
        )
        for route in table.routes
    ]
    instances = []
    for name in registry.service_names():
        members = registry.instances(name)
        if not members:
            instances.append(_cells([escape(name), "<i>no instances</i>", "", "", "", "", ""]))
        for instance in members:
            health = escape(instance.health)
            instances.append(
                _cells(
                    [
                        escape(name),
                        escape(instance.id),
                        escape(instance.address),
                        f'<span class="{escape(instance.state)}">{escape(instance.state)}</span>',
                        f'<span class="{health}">{health}</span>',
                        str(instance.in_flight + instance.remote_in_flight),
                        _expires(instance, now),
                    ]
                )
            )
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    return (
        "<!doctype html><html><head><meta charset=utf-8>"
        '<meta http-equiv="refresh" content="5"><title>gateway</title>'
        f"<style>{_STYLE}</style></head><body><h1>gateway</h1>"
        f"<p>{generated} · refreshes every 5 s · "
        '<a href="/metrics">metrics</a> · <a href="/routes">routes (JSON)</a> · '
        '<a href="/registry/services">services (JSON)</a></p>'
        "<h2>Routes</h2><table>"
        + _cells(["host", "prefix", "service", "strip prefix"], "th")
        + "".join(routes)
        + "</table><h2>Instances</h2><table>"
        + _cells(["service", "id", "address", "state", "health", "in flight", "lease"], "th")
        + "".join(instances)
        + "</table></body></html>"
    )
