"""Self-registration for asyncio services: register, heartbeat, deregister.

    async with Registration("http://127.0.0.1:8081", "billing", port=9000):
        await serve_forever()

On entry the instance is registered (if the admin is away, the entry does not wait:
it keeps trying in the background, backing off up to 30 s); then it heartbeats at a
third of its ttl, with jitter so that a fleet does not beat in step, and registers
again when a heartbeat answers 404 (the lease ended, or the registry lost it).

On exit (``leave``) it is marked draining with ``deregister_when_idle``: the gateway
sends it no new request and removes it once the requests it already sent are done;
``leave`` returns then (or after ``drain_timeout``, deregistering it anyway). Leave
before the service closes its listener and no client sees a refused connection.

For aiohttp applications, ``register_app(app, admin_url, service, port=...)`` does the
same around the application's life: on SIGTERM or SIGINT under ``web.run_app`` it
leaves first and only then lets aiohttp stop listening (aiohttp itself closes the
listener before its shutdown hooks run). Logs on ``registry.client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("registry.client")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
DRAIN_POLL = 0.1  # seconds between looks at a draining instance
LISTEN_PATIENCE = 5.0  # seconds register_app waits for the service's port to accept


class Registration:
    def __init__(
        self,
        admin_url: str,
        service: str,
        *,
        port: int,
        host: str = "127.0.0.1",
        instance_id: str | None = None,
        ttl: str | float = "30s",
        token: str | None = None,
        metadata: Mapping[str, str] | None = None,
        weight: int | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        self.service_url = admin_url.rstrip("/") + f"/registry/services/{service}"
        self.base = self.service_url + "/instances"
        self.service = service
        self.body: dict[str, Any] = {"host": host, "port": port, "ttl": ttl}
        if instance_id is not None:
            self.body["id"] = instance_id
        if metadata:
            self.body["metadata"] = dict(metadata)
        if weight is not None:
            self.body["weight"] = weight
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.instance_id: str | None = None  # as the registry named it
        self.interval = 10.0  # seconds between heartbeats: the registry's answer says
        self.heartbeats = 0  # answered heartbeats, for the curious (and the tests)
        self.registrations = 0
        self.drain_timeout = drain_timeout
        self.registered = asyncio.Event()  # set at the first answered registration
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._entering: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Registration:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            await self._register()
        except (aiohttp.ClientError, TimeoutError, RegistrationRefused) as exc:
            log.warning("%s: not registered yet (%s); trying again in the background",
                        self.service, exc)  # fmt: skip
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.leave()

    def enter_when_listening(self, patience: float = LISTEN_PATIENCE) -> None:
        """Enter in the background once the service's port accepts connections: an
        aiohttp application's startup runs before its listener opens, and an instance
        registered then would have its first requests refused. After ``patience``
        seconds of refusals it registers anyway (the port may be reachable only from
        elsewhere), with a warning."""
        self._entering = asyncio.get_running_loop().create_task(self._when_listening(patience))

    async def _when_listening(self, patience: float) -> None:
        host, port = str(self.body["host"]), int(self.body["port"])
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + patience, 0.005
        while True:
            try:
                async with asyncio.timeout(1.0):  # an address that drops packets: a refusal
                    _, writer = await asyncio.open_connection(host, port)
            except OSError as exc:  # TimeoutError among them
                if loop.time() >= deadline:
                    log.warning("%s: %s:%d refuses connections after %gs (%s); registering "
                                "anyway", self.service, host, port, patience, exc)  # fmt: skip
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.25)
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                break
        await self.__aenter__()

    async def leave(self, *, drain: bool = True) -> None:
        """Stop heartbeating, drain, wait until the gateway has nothing in flight on this
        instance (it then removes it), at most ``drain_timeout``; deregister. Once.
        ``drain=False`` deregisters at once: for a service that has stopped listening
        already, whose requests in flight could be waited for in vain."""
        if self._entering is not None:  # not entered yet: it will not now
            self._entering.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._entering
            self._entering = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is None:
            return
        try:
            if self.instance_id is not None and drain:
                await self._drain()
            elif self.instance_id is not None:
                await self._deregister()
        except (aiohttp.ClientError, TimeoutError, RegistrationRefused) as exc:
            log.warning("%s/%s: could not deregister (%s); its lease will end", self.service,
                        self.instance_id, exc)  # fmt: skip
        finally:
            await self._session.close()
            self._session = None

    async def _drain(self) -> None:
        url = f"{self.base}/{self.instance_id}"
        body = {"state": "draining", "deregister_when_idle": True}
        async with self._client().patch(url, json=body, headers=self.headers) as answer:
            if answer.status == 404:
                log.info("%s/%s deregistered (its lease had ended)", self.service,
                         self.instance_id)  # fmt: skip
                return
            if answer.status != 200:
                raise RegistrationRefused(answer.status, await answer.json(content_type=None))
        log.info("%s/%s draining: no new requests", self.service, self.instance_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while loop.time() < deadline:
            if not await self._listed():
                log.info("%s/%s deregistered", self.service, self.instance_id)
                return
            await asyncio.sleep(DRAIN_POLL)
        await self._deregister(f" with requests still in flight after {self.drain_timeout}s")

    async def _deregister(self, why: str = "") -> None:
        url = f"{self.base}/{self.instance_id}"
        async with self._client().delete(url, headers=self.headers) as answer:
            if answer.status not in (204, 404):
                raise RegistrationRefused(answer.status, await answer.json(content_type=None))
        log.log(logging.WARNING if why else logging.INFO, "%s/%s deregistered%s", self.service,
                self.instance_id, why)  # fmt: skip

    async def _listed(self) -> bool:
        async with self._client().get(self.service_url, headers=self.headers) as answer:
            if answer.status == 404:
                return False
            data = await answer.json(content_type=None)
            if answer.status != 200:
                raise RegistrationRefused(answer.status, data)
        return any(i.get("id") == self.instance_id for i in data.get("instances", []))

    def _client(self) -> aiohttp.ClientSession:
        assert self._session is not None
        return self._session

    async def _register(self) -> None:
        async with self._client().post(self.base, json=self.body, headers=self.headers) as answer:
            data = await answer.json(content_type=None)
            if answer.status not in (200, 201):
                raise RegistrationRefused(answer.status, data)
        self.instance_id = str(data["id"])
        self.interval = float(data.get("heartbeat_interval", self.interval))
        self.registrations += 1
        self.registered.set()
        log.info("%s/%s registered (heartbeat every %.1fs)", self.service, self.instance_id,
                 self.interval)  # fmt: skip

    async def _keep(self) -> None:
        backoff = FIRST_BACKOFF
        while True:
            try:
                if self.instance_id is None:
                    await self._register()
                await asyncio.sleep(self.interval * random.uniform(0.8, 1.0))
                url = f"{self.base}/{self.instance_id}/heartbeat"
                async with self._client().put(url, headers=self.headers) as answer:
                    if answer.status == 404:
                        log.warning("%s/%s: lease gone; registering again", self.service,
                                    self.instance_id)  # fmt: skip
                        self.instance_id = None
                        continue
                    if answer.status != 200:
                        raise RegistrationRefused(answer.status, await answer.json())
                self.heartbeats += 1
                backoff = FIRST_BACKOFF
            except (aiohttp.ClientError, TimeoutError, RegistrationRefused) as exc:
                log.warning("%s: registry unreachable or refusing (%s); again in %.1fs",
                            self.service, exc, backoff)  # fmt: skip
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
                backoff = min(backoff * 2, MAX_BACKOFF)


class RegistrationRefused(Exception):
    def __init__(self, status: int, answer: Any) -> None:
        error = answer.get("error", {}) if isinstance(answer, dict) else {}
        super().__init__(f"{status} {error.get('code', '')}: {error.get('message', answer)}")
        self.status = status


def register_app(
    app: web.Application,
    admin_url: str,
    service: str,
    *,
    handle_signals: bool = True,
    **kw: Any,
) -> Registration:
    """Register an aiohttp application's instance for as long as it runs.

    Registered once the listener accepts connections (startup runs before it opens;
    ``registration.registered`` is an Event for that moment). With ``handle_signals``
    (and the loop in the main thread, as under ``web.run_app``), SIGTERM and SIGINT first
    drain and deregister it, then stop the application as run_app would: requests the
    gateway already sent are answered, and the listener closes only after. A second
    signal stops at once. Otherwise it is deregistered at shutdown, after aiohttp has
    closed the listener: requests routed to it meanwhile are refused (the gateway sends
    them elsewhere when it can).
    """
    registration = Registration(admin_url, service, **kw)

    async def life(_: web.Application) -> AsyncIterator[None]:
        registration.enter_when_listening()
        signals = handle_signals and threading.current_thread() is threading.main_thread()
        restore = _leave_on_signals(registration) if signals else None
        yield
        if restore is not None:
            restore()

    async def leave(_: web.Application) -> None:
        await registration.leave(drain=False)  # a no-op when a signal made it leave already

    app.cleanup_ctx.append(life)
    app.on_shutdown.append(leave)
    return registration


def _leave_on_signals(registration: Registration) -> Callable[[], None]:
    loop = asyncio.get_running_loop()
    leaving: list[asyncio.Task[None]] = []

    async def leave_then_exit() -> None:
        await registration.leave()
        loop.call_soon(_exit)  # out of the loop to run_app, which stops listening and cleans up

    def on_signal() -> None:
        if leaving:
            _exit()  # a second signal: stop now
        leaving.append(loop.create_task(leave_then_exit()))

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        before = signal.getsignal(signum)
        try:
            loop.add_signal_handler(signum, on_signal)
        except NotImplementedError:  # Windows has no add_signal_handler
            continue
        previous[signum] = before

    def restore() -> None:
        """The application is done: ours go, and a handler from outside the loop (the
        default, asyncio.Runner's Ctrl-C) comes back. One the loop kept (run_app's) was
        replaced by ours in the loop's table: run_app's own cleanup finds it gone."""
        for signum, before in previous.items():
            loop.remove_signal_handler(signum)
            owner = getattr(before, "__module__", None) or ""
            if before is not None and not owner.startswith(("asyncio.unix_events", "uvloop")):
                signal.signal(signum, before)

    return restore


def _exit() -> None:
    raise web.GracefulExit  # what run_app's own signal handler raises
