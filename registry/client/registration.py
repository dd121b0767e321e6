"""Self-registration for asyncio services: register, heartbeat, deregister.

    async with Registration("http://127.0.0.1:8081", "billing", port=9000):
        await serve_forever()

On entry the instance is registered (if the admin is away, the entry does not wait:
it keeps trying in the background, backing off up to 30 s); then it heartbeats at a
third of its ttl, with jitter so that a fleet does not beat in step, and registers
again when a heartbeat answers 404 (the lease ended, or the registry lost it). On exit
it is marked draining, then deregistered, before the service stops listening: no new
request is routed to an instance about to go.

For aiohttp applications, ``register_app(app, admin_url, service, port)`` does the same
around the application's life (startup, shutdown). Logs on ``registry.client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from aiohttp import web

log = logging.getLogger("registry.client")

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0


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
    ) -> None:
        self.base = admin_url.rstrip("/") + f"/registry/services/{service}/instances"
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
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            if self.instance_id is not None:
                url = f"{self.base}/{self.instance_id}"
                async with self._client().patch(
                    url, json={"state": "draining"}, headers=self.headers
                ):
                    pass
                async with self._client().delete(url, headers=self.headers) as answer:
                    if answer.status in (204, 404):
                        log.info("%s/%s deregistered", self.service, self.instance_id)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("%s: could not deregister (%s); its lease will end", self.service, exc)
        finally:
            if self._session is not None:
                await self._session.close()

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


def register_app(app: web.Application, admin_url: str, service: str, **kw: Any) -> None:
    """Register an aiohttp application's instance for as long as it runs: registered at
    startup, drained and deregistered at shutdown (aiohttp has stopped accepting by then;
    the gateway sends a request refused meanwhile to another instance)."""
    registration = Registration(admin_url, service, **kw)

    async def life(_: web.Application) -> AsyncIterator[None]:
        await registration.__aenter__()
        yield

    async def leave(_: web.Application) -> None:
        await registration.__aexit__(None, None, None)

    app.cleanup_ctx.append(life)
    app.on_shutdown.append(leave)
