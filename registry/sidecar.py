"""``gateway services`` and ``gateway register``: the CLI on registry.client.

``Sidecar`` keeps one instance's lease alive; it is also usable from a service's own thread.
As a library it logs (logger ``registry.sidecar``: what happens at info, trouble at
warning); ``gateway register`` prints those lines (``console_output``).
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

from registry.client import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    AdminClient,
    AdminError,
    AdminUnreachable,
    describe_failure,
)
from registry.models import (
    InvalidField,
    format_address,
    validate_host,
    validate_port,
    validate_service_name,
)
from registry.units import parse_duration

log = logging.getLogger("registry.sidecar")

# gateway services


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


# gateway register


class _Stopped(Exception):
    """The ``stop`` check said so; handled like Ctrl-C."""


class Backoff:
    """0.5 s doubling up to ``cap``; ``reset`` after a success."""

    def __init__(self, cap: float = MAX_BACKOFF, first: float = FIRST_BACKOFF) -> None:
        self.cap = cap
        self.first = min(first, cap)
        self._next = self.first

    def next(self) -> float:
        delay = self._next
        self._next = min(delay * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Sidecar:
    """Register an instance, renew its lease until stopped, then deregister it.

    Time passes only through ``sleep``; Ctrl-C is a KeyboardInterrupt out of ``sleep`` or
    a call, or ``stop()`` turning true. The first registration's 4xx ends the run (exit 1);
    after that every failure is retried, and a 404 heartbeat registers again.
    """

    def __init__(
        self,
        client: AdminClient,
        service: str,
        body: Mapping[str, Any],
        *,
        sleep: Callable[[float], None] = time.sleep,
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        self.client = client
        self.service = service
        self.body = dict(body)
        self.sleep = sleep
        self.stop = stop
        self.ttl = parse_duration(self.body.get("ttl", 30.0))
        self.interval = self.ttl / 3
        self.backoff = Backoff(cap=min(MAX_BACKOFF, self.ttl / 3))
        self.instance_id: str | None = None

    @property
    def label(self) -> str:
        return f"{self.service}/{self.instance_id or self._default_id()}"

    def _default_id(self) -> str:
        return format_address(str(self.body.get("host")), int(self.body.get("port") or 0))

    def run(self) -> int:
        try:
            if not self._register(first=True):
                return 1
            while True:
                self._wait(self.interval)
                self._renew()
        except (KeyboardInterrupt, _Stopped):
            pass
        return self._deregister()

    def _wait(self, seconds: float) -> None:
        if self.stop():
            raise _Stopped
        self.sleep(seconds)
        if self.stop():
            raise _Stopped

    def _register(self, *, first: bool) -> bool:
        while True:
            try:
                answer = self.client.register(self.service, self.body)
            except AdminError as exc:
                if first and 400 <= exc.status < 500:
                    message = describe_failure(exc, self.client.base_url)
                    log.warning("cannot register %s: %s", self.label, message)
                    return False
                self._retry_later(exc)
            except AdminUnreachable as exc:
                self._retry_later(exc)
            else:
                self._registered(answer, again=not first)
                return True

    def _renew(self) -> None:
        failing = False
        while True:
            try:
                answer = self.client.heartbeat(self.service, self.instance_id or "")
            except AdminError as exc:
                if exc.status == 404:
                    log.info(
                        "lease of %s is gone (admin answered 404); registering again", self.label
                    )
                    self._register(first=False)
                    return
                self._retry_later(exc)
            except AdminUnreachable as exc:
                self._retry_later(exc)
            else:
                if failing:
                    log.info("admin reachable again; lease of %s renewed", self.label)
                self._adopt(answer)
                return
            failing = True

    def _retry_later(self, error: AdminError | AdminUnreachable) -> None:
        delay = self.backoff.next()
        message = describe_failure(error, self.client.base_url)
        log.warning("%s; retrying in %s", message, _seconds(delay))
        self._wait(delay)

    def _registered(self, answer: Mapping[str, Any], *, again: bool) -> None:
        self.instance_id = str(answer.get("id") or self._default_id())
        self._adopt(answer)
        if again:
            log.info("registered %s again", self.label)
        else:
            log.info(
                "registered %s (ttl %s, heartbeat every %s); Ctrl-C to deregister",
                self.label,
                _seconds(self.ttl),
                _seconds(self.interval),
            )

    def _adopt(self, answer: Mapping[str, Any]) -> None:
        """Take the lease terms from an answer; keep the old ones where it lacks them."""
        self.backoff.reset()
        ttl, interval = _positive(answer.get("ttl")), _positive(answer.get("heartbeat_interval"))
        if ttl is not None:
            self.ttl = ttl
            self.interval = ttl / 3
        if interval is not None:
            self.interval = interval
        self.backoff.cap = min(MAX_BACKOFF, self.ttl / 3)

    def _deregister(self) -> int:
        if self.instance_id is None:
            log.info("stopped before %s was registered", self.label)
            return 0
        try:
            self.client.deregister(self.service, self.instance_id)
        except AdminError as exc:
            if exc.status != 404:
                return self._not_deregistered(describe_failure(exc, self.client.base_url))
            log.info("deregistered %s (its lease had already ended)", self.label)
            return 0
        except AdminUnreachable as exc:
            return self._not_deregistered(describe_failure(exc, self.client.base_url))
        except KeyboardInterrupt:
            return self._not_deregistered("interrupted")
        log.info("deregistered %s", self.label)
        return 0

    def _not_deregistered(self, why: str) -> int:
        log.warning(
            "could not deregister %s: %s; its lease ends within %s",
            self.label,
            why,
            _seconds(self.ttl),
        )
        return 1


def _positive(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value > 0 and math.isfinite(value) else None


def _seconds(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".") + "s"


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
    from gateway.config import parse_listen  # imports yaml: only the CLI needs it

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
