"""``gateway services`` and ``gateway register``: the CLI on registry.client.

The sidecar logs (logger ``registry.sidecar``); ``gateway register`` prints those
lines (``console_output``): what happens on stdout, trouble on stderr.
"""

from __future__ import annotations

import json
import logging
import math
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from gateway.config.describe import plural
from gateway.config.model import parse_listen, parse_port
from registry.client.http import AdminClient, AdminError, AdminUnreachable, describe_failure
from registry.client.sidecar import Sidecar, log
from registry.core.errors import InvalidField
from registry.core.models import (
    format_address,
    validate_host,
    validate_id,
    validate_metadata,
    validate_scheme,
    validate_service_name,
    validate_weight,
)
from registry.core.units import parse_duration


def print_services(
    admin_url: str, token: str | None, *, service: str | None = None, as_json: bool = False
) -> int:
    """``gateway services``: a table (or, ``as_json``, each service as the API answers it)."""
    try:
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    answers: list[dict[str, Any]] = []
    try:
        if service is not None:
            answers.append(client.service(service))
        for entry in client.services() if service is None else []:
            try:
                answers.append(client.service(str(entry.get("name", "?"))))
            except AdminError as exc:
                if exc.status != 404:  # 404: removed since the list was made
                    raise
    except AdminError as exc:
        if exc.status == 404 and exc.code == "unknown_service":
            print(
                f"gateway: no service {service!r} in the registry at {client.base_url} "
                "(`gateway services` lists them)",
                file=sys.stderr,
            )
        else:
            print(f"gateway: {describe_failure(exc, client.base_url)}", file=sys.stderr)
        return 1
    except AdminUnreachable as exc:
        print(f"gateway: {describe_failure(exc, client.base_url)}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(answers[0] if service is not None else {"services": answers}, indent=2))
        return 0
    listing = [(str(answer.get("name", "?")), _listed(answer)) for answer in answers]
    for line in format_services(listing, time.time()):
        print(line)
    return 0


def _listed(answer: Mapping[str, Any]) -> list[Any]:
    instances = answer.get("instances")
    return instances if isinstance(instances, list) else []


def natural_key(text: str) -> list[Any]:
    """Sorts web-2 before web-10: digit runs compare as numbers (a str, int, str... list)."""
    return [int(part) if index % 2 else part for index, part in enumerate(_DIGITS.split(text))]


_DIGITS = re.compile(r"(\d+)")


def format_services(listing: Sequence[tuple[str, Sequence[Any]]], now: float) -> list[str]:
    """An aligned table, one line per instance and one for a service without any, then a
    summary line per service. ADDRESS only when some instance's id is not its address."""
    if not listing:
        return ["no services registered"]
    services = [
        (name, sorted((i for i in instances if isinstance(i, dict)), key=_instance_key))
        for name, instances in sorted(listing, key=lambda item: natural_key(item[0]))
    ]
    cells = {
        id(instance): _instance_cells(instance, now)
        for _, instances in services
        for instance in instances
    }
    addressed = any(row[0] != row[1] for row in cells.values())
    header = ("SERVICE", "INSTANCE", "ADDRESS", "STATE", "HEALTH", "WEIGHT", "IN_FLIGHT", "EXPIRES")
    rows: list[tuple[str, ...]] = [header]
    for name, instances in services:
        if not instances:
            rows.append((name, "-", "-", "-", "-", "-", "-", "-"))
        rows.extend((name, *cells[id(instance)]) for instance in instances)
    if not addressed:
        rows = [row[:2] + row[3:] for row in rows]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    table = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines = [*table, "", *(summary(name, instances) for name, instances in services)]
    return lines + [
        line for name, instances in services for i in instances if (line := _why(name, i, now))
    ]


def _why(service: str, instance: Mapping[str, Any], now: float) -> str | None:
    """``web/10.0.0.5:80 ejected (back in 28s): 5 connect failures or timeouts in a row``."""
    reason = instance.get("health_reason")
    if not reason:
        return None
    until = instance.get("health_until")
    back = f" (back in {_expires(until, now)})" if until is not None else ""
    return f"{service}/{instance.get('id', '?')} {instance.get('health', '?')}{back}: {reason}"


def _instance_key(instance: Mapping[str, Any]) -> list[Any]:
    return natural_key(str(instance.get("id", "")))


def summary(name: str, instances: Sequence[Mapping[str, Any]]) -> str:
    """``web: 3 instances, 2 healthy, 1 failing, 1 draining``."""
    if not instances:
        return f"{name}: no instances"
    # "healthy" as the registry API counts it: what gets traffic (up and healthy).
    routable = sum(
        1 for i in instances if i.get("state", "up") == "up" and i.get("health") == "healthy"
    )
    healths = Counter(str(i["health"]) for i in instances if "health" in i)
    healths.pop("healthy", None)
    parts = [plural(len(instances), "instance"), f"{routable} healthy"]
    parts.extend(f"{count} {health}" for health, count in sorted(healths.items()))
    draining = sum(1 for i in instances if i.get("state") == "draining")
    if draining:
        parts.append(f"{draining} draining")
    return f"{name}: {', '.join(parts)}"


def _instance_cells(instance: Mapping[str, Any], now: float) -> tuple[str, ...]:
    host, port = instance.get("host"), instance.get("port")
    address = format_address(host, port) if isinstance(host, str) and isinstance(port, int) else "-"
    return (
        str(instance.get("id", "-")),
        address,
        str(instance.get("state", "-")),
        str(instance.get("health", "-")),
        str(instance.get("weight", "-")),
        str(instance.get("in_flight", "-")),
        _expires(instance.get("expires_at"), now),
    )


def _expires(value: object, now: float) -> str:
    if value is None:
        return "static"
    try:
        remaining = datetime.fromisoformat(str(value)).timestamp() - now
    except ValueError:
        return str(value)
    return f"{math.ceil(remaining)}s" if remaining > 0 else "expired"


def registration_body(
    service: str,
    address: str,
    ttl: str,
    *,
    weight: str | None = None,
    metadata: Sequence[str] = (),
    instance_id: str | None = None,
    scheme: str | None = None,
) -> dict[str, Any]:
    """The register body for ``gateway register``; ValueError with a one-line message.
    Fields not given are left out: the registry's defaults apply (SPEC section 4)."""
    try:
        validate_service_name(service)
    except InvalidField as exc:
        raise ValueError(f"invalid service {service!r}: {exc.message}") from None
    host, port = parse_instance_address(address)
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        raise ValueError(f"invalid --ttl: {exc}") from None
    if seconds < 1:
        raise ValueError(f"invalid --ttl {ttl!r}: a lease lasts at least 1s")
    body: dict[str, Any] = {"host": host, "port": port, "ttl": ttl.strip()}
    try:
        if weight is not None:
            body["weight"] = validate_weight(int(weight) if weight.strip().isdigit() else weight)
        if metadata:
            body["metadata"] = validate_metadata(_metadata(metadata))
        if instance_id is not None:
            body["id"] = validate_id(instance_id)
        if scheme is not None:
            body["scheme"] = validate_scheme(scheme)
    except InvalidField as exc:
        given = {"weight": weight, "id": instance_id, "scheme": scheme}.get(exc.field)
        shown = f" {given!r}" if given is not None else ""
        raise ValueError(f"invalid --{exc.field}{shown}: {exc.message}") from None
    return body


def _metadata(pairs: Sequence[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"invalid --metadata {pair!r}: use KEY=VALUE, e.g. version=1.4")
        if key.strip() in metadata:
            raise ValueError(f"invalid --metadata {pair!r}: {key.strip()} is given twice")
        metadata[key.strip()] = value
    return metadata


def parse_instance_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` of an instance: no wildcard host, no port 0."""

    host_text, sep, port_text = address.rpartition(":")
    if sep and host_text:  # the port's own rule first: 1.. for an instance
        parse_port(port_text, 1, f"invalid address {address!r}")
    try:
        host, port = parse_listen(address)
        return validate_host(host), port
    except InvalidField as exc:
        raise ValueError(f"invalid address {address!r}: {exc.message}") from None
    except ValueError:
        raise ValueError(
            f"invalid address {address!r}: use HOST:PORT or [IPv6]:PORT, e.g. 127.0.0.1:9001"
        ) from None


class _Console(logging.Handler):
    """The sidecar's log as the CLI shows it: info lines on stdout, trouble on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            print(f"gateway: {record.getMessage()}", file=sys.stderr, flush=True)
        else:
            print(record.getMessage(), flush=True)


@contextmanager
def console_output() -> Iterator[None]:
    """While it lasts, the sidecar's log lines are printed (and only printed)."""
    handler = _Console()
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


@contextmanager
def signals_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT end the sidecar like Ctrl-C does, so it deregisters first.

    SIGINT is set explicitly because a shell starts background jobs with it ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run_sidecar(
    admin_url: str,
    token: str | None,
    service: str,
    address: str,
    ttl: str,
    *,
    weight: str | None = None,
    metadata: Sequence[str] = (),
    instance_id: str | None = None,
    scheme: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    try:
        body = registration_body(
            service,
            address,
            ttl,
            weight=weight,
            metadata=metadata,
            instance_id=instance_id,
            scheme=scheme,
        )
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    with signals_as_keyboard_interrupt(), console_output():
        return Sidecar(client, service, body, sleep=sleep).run()


POLL_INTERVAL = 0.5


def drain(
    admin_url: str,
    token: str | None,
    service: str,
    instance_id: str,
    *,
    wait_for: str | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """``gateway drain``: PATCH the state to draining; with ``wait_for`` (a duration), poll
    until the instance has nothing in flight or is gone, for that long at most."""
    label = f"{service}/{instance_id}"
    try:
        timeout = None if wait_for is None else parse_duration(wait_for)
    except ValueError as exc:
        print(f"gateway: invalid --timeout: {exc}", file=sys.stderr)
        return 2
    try:
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        answer = client.update(service, instance_id, {"state": "draining"})
        print(f"draining {label}: no new requests; {_in_flight(answer)} in flight", flush=True)
        if timeout is None:
            return 0
        deadline = clock() + timeout
        while (instance := client.instance(service, instance_id)) is not None:
            if instance.get("in_flight") == 0:
                print(f"{label} has no requests in flight", flush=True)
                return 0
            if clock() >= deadline:
                print(
                    f"gateway: {label} still has {_in_flight(instance)} in flight after {wait_for}",
                    file=sys.stderr,
                )
                return 1
            sleep(POLL_INTERVAL)
        print(f"{label} is gone from the registry", flush=True)
        return 0
    except (AdminError, AdminUnreachable) as exc:
        print(f"gateway: {describe_failure(exc, client.base_url)}", file=sys.stderr)
        return 1


def _in_flight(instance: Mapping[str, Any]) -> str:
    count = instance.get("in_flight")
    return plural(count, "request") if isinstance(count, int) else "? requests"


def deregister(admin_url: str, token: str | None, service: str, instance_id: str) -> int:
    """``gateway deregister``: DELETE the instance."""
    try:
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    try:
        client.deregister(service, instance_id)
    except (AdminError, AdminUnreachable) as exc:
        print(f"gateway: {describe_failure(exc, client.base_url)}", file=sys.stderr)
        return 1
    print(f"deregistered {service}/{instance_id}")
    return 0
