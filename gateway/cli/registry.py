"""``gateway services`` and ``gateway register``: the CLI on registry.client.

The sidecar logs (logger ``registry.sidecar``); ``gateway register`` prints those
lines (``console_output``): what happens on stdout, trouble on stderr.
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from gateway.config.model import parse_listen
from registry.client.http import AdminClient, AdminError, AdminUnreachable, describe_failure
from registry.client.sidecar import Sidecar, log
from registry.core.errors import InvalidField
from registry.core.models import format_address, validate_host, validate_port, validate_service_name
from registry.core.units import parse_duration


def print_services(admin_url: str, token: str | None) -> int:
    try:
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    listing: list[tuple[str, list[dict[str, Any]]]] = []
    try:
        for entry in client.services():
            name = str(entry.get("name", "?"))
            try:
                instances = client.service(name).get("instances")
            except AdminError as exc:
                if exc.status != 404:  # 404: removed since the list was made
                    raise
                instances = []
            listing.append((name, instances if isinstance(instances, list) else []))
    except (AdminError, AdminUnreachable) as exc:
        print(f"gateway: {describe_failure(exc, client.base_url)}", file=sys.stderr)
        return 1
    for line in format_services(listing, time.time()):
        print(line)
    return 0


def format_services(listing: Sequence[tuple[str, Sequence[Any]]], now: float) -> list[str]:
    """An aligned table, one line per instance and one for a service without any."""
    if not listing:
        return ["no services registered"]
    header = ("SERVICE", "INSTANCE", "ADDRESS", "STATE", "HEALTH", "WEIGHT", "IN_FLIGHT", "EXPIRES")
    rows: list[tuple[str, ...]] = [header]
    for name, instances in sorted(listing, key=lambda item: item[0]):
        entries = [i for i in instances if isinstance(i, dict)]
        if not entries:
            rows.append((name, "-", "-", "-", "-", "-", "-", "-"))
        for instance in sorted(entries, key=lambda i: str(i.get("id", ""))):
            rows.append((name, *_instance_cells(instance, now)))
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


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


def registration_body(service: str, address: str, ttl: str) -> dict[str, Any]:
    """The register body for ``gateway register``; ValueError with a one-line message."""
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
    return {"host": host, "port": port, "ttl": ttl.strip()}


def parse_instance_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` of an instance: no wildcard host, no port 0."""

    try:
        host, port = parse_listen(address)
        return validate_host(host), validate_port(port)
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
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    try:
        body = registration_body(service, address, ttl)
        client = AdminClient(admin_url, token)
    except ValueError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    with signals_as_keyboard_interrupt(), console_output():
        return Sidecar(client, service, body, sleep=sleep).run()
