"""``Sidecar`` keeps one instance's lease alive, from a thread of the service or from
``gateway register``. It logs (logger ``registry.sidecar``: what happens at info,
trouble at warning) and prints nothing; the CLI (gateway.cli.registry) prints.

In a service: ``sidecar.start()`` at start-up; at shutdown ``sidecar.leave()`` *before*
closing the listener. Leaving drains the instance: the gateway sends no new request and
removes it once the requests already sent are answered; ``leave`` returns then.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from registry.client.http import (
    FIRST_BACKOFF,
    MAX_BACKOFF,
    AdminClient,
    AdminError,
    AdminUnreachable,
    describe_failure,
)
from registry.core.models import format_address
from registry.core.units import parse_duration

log = logging.getLogger("registry.sidecar")

DRAIN_POLL = 0.1  # seconds between looks at a draining instance
DRAIN_TIMEOUT = 30.0  # then it is deregistered with requests still in flight


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
    """Register an instance, renew its lease until stopped, then drain and deregister it.

    Time passes only through ``sleep``; Ctrl-C is a KeyboardInterrupt out of ``sleep`` or
    a call, or ``stop()`` turning true, or ``leave()`` from another thread. The first
    registration's 4xx ends the run (exit 1); after that every failure is retried, and a
    404 heartbeat registers again. A second Ctrl-C while draining deregisters at once.
    """

    def __init__(
        self,
        client: AdminClient,
        service: str,
        body: Mapping[str, Any],
        *,
        sleep: Callable[[float], None] | None = None,
        stop: Callable[[], bool] | None = None,
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.client = client
        self.service = service
        self.body = dict(body)
        self._leaving = threading.Event()
        # Waits end early on leave(); the drain's polls must not, so they sleep for real.
        self.sleep: Callable[[float], None] = sleep or self._until_left
        self.pause: Callable[[float], None] = sleep or time.sleep
        self.stop: Callable[[], bool] = stop or self._leaving.is_set
        self.drain_timeout = drain_timeout
        self.ttl = parse_duration(self.body.get("ttl", 30.0))
        self.interval = self.ttl / 3
        self.backoff = Backoff(cap=min(MAX_BACKOFF, self.ttl / 3))
        self.instance_id: str | None = None
        self.code: int | None = None  # run's exit code, once it returned
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a daemon thread (for a service that registers itself)."""
        self._thread = threading.Thread(target=self._run_in_thread, name=self.label, daemon=True)
        self._thread.start()

    def _run_in_thread(self) -> None:
        self.code = self.run()

    def _until_left(self, seconds: float) -> None:
        self._leaving.wait(seconds)

    def leave(self, timeout: float | None = None) -> None:
        """Stop the thread started by ``start``: drained and deregistered when it returns."""
        self._leaving.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def label(self) -> str:
        return f"{self.service}/{self.instance_id or self._default_id()}"

    def _default_id(self) -> str:
        if self.body.get("id"):
            return str(self.body["id"])
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
            try:
                return self._drain()
            except KeyboardInterrupt:
                log.info("interrupted while draining %s: deregistering now", self.label)
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

    def _drain(self) -> int:
        """Draining, removed by the gateway once idle: wait for that, then report."""
        assert self.instance_id is not None
        body = {"state": "draining", "deregister_when_idle": True}
        self.client.update(self.service, self.instance_id, body)
        waited = 0.0
        while self.client.instance(self.service, self.instance_id) is not None:
            if waited >= self.drain_timeout:
                self.client.deregister(self.service, self.instance_id)
                log.warning(
                    "deregistered %s with requests still in flight after %s",
                    self.label,
                    _seconds(self.drain_timeout),
                )
                return 0
            if waited == 0:
                log.info("draining %s: waiting for its requests in flight", self.label)
            self.pause(DRAIN_POLL)
            waited += DRAIN_POLL
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
