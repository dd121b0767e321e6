"""Registry changes in the log: one info line each, saying what changed and who did it.

    registered web/10.0.0.5:9000 at 10.0.0.5:9000 (ttl 30s, weight 1) by 10.0.0.9 (token deploy)
    updated web/10.0.0.5:9000: draining, weight 1, removed once idle by 10.0.0.9
    deregistered web/10.0.0.5:9000 by 10.0.0.9
    evicted web/10.0.0.5:9000: no heartbeat within its 30s lease

The admin listener says who is calling (``acting``) for the length of a request; changes
with nobody acting (lease ends, a drained instance going idle) say why instead. Changes
other gateways made (etcd's mirrored ones) are logged by the gateway that made them.
"""

from __future__ import annotations

import contextvars
import logging

from registry.core.models import Instance
from registry.core.store import Registry

log = logging.getLogger("gateway.registry")

# "10.0.0.9 (token deploy)" while an admin request is being handled; None otherwise.
ACTOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("actor", default=None)


def actor(client: str | None, token: str | None) -> str:
    return f"{client or '-'}" + (f" (token {token})" if token else "")


def describe(event: str, instance: Instance, by: str | None) -> str | None:
    """The line for a registry event, or None for events not logged (heartbeats, mirrors)."""
    name = f"{instance.service}/{instance.id}"
    who = f" by {by}" if by else ""
    if event == "registered":
        lease = f"ttl {instance.ttl:g}s" if instance.ttl is not None else "static"
        where = f"{instance.scheme}://{instance.address}" if instance.scheme != "http" else ""
        return (
            f"registered {name} at {where or instance.address} "
            f"({lease}, weight {instance.weight}){who}"
        )
    if event == "updated":
        idle = ", removed once idle" if instance.deregister_when_idle else ""
        return f"updated {name}: {instance.state}, weight {instance.weight}{idle}{who}"
    if event == "deregistered":
        why = who or (" (drained and idle)" if instance.deregister_when_idle else "")
        return f"deregistered {name}{why}"
    if event == "evicted":
        lease = f" within its {instance.ttl:g}s lease" if instance.ttl is not None else ""
        return f"evicted {name}: no heartbeat{lease}"
    return None


def log_changes(registry: Registry) -> None:
    """Log every change of ``registry`` from now on."""

    def on_event(event: str, service: str, instance: Instance) -> None:
        line = describe(event, instance, ACTOR.get())
        if line is not None:
            log.info("%s", line)

    registry.subscribe(on_event)
