"""The churn driver shared by tests/test_churn.py (10 s) and benchmarks/churn.py (longer).

Mixed load (GET and POST) runs against a gateway while, every second, instances
register, deregister, drain (deregister_when_idle), let a 1 s lease expire, or are
killed without deregistering. Each upstream records when it left the registry;
a request reaching it after that (beyond a short grace for requests already on
the wire) is stale routing.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
from aiohttp import web

GRACE = 0.05  # a request picked just before an instance left may still arrive


@dataclass
class Report:
    requests: int = 0
    failed: int = 0
    failure_codes: list[str] = field(default_factory=list)
    stale: int = 0
    registrations: int = 0
    deregistrations: int = 0
    drains: int = 0
    expiries: int = 0
    kills: int = 0
    in_flight_at_kills: int = 0
    leaked_tasks: int = 0
    rss_start_kib: int = 0
    rss_end_kib: int = 0


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class ChurnUpstream:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.left_at: float | None = None  # wall time it left the registry
        self.in_flight = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        if self.left_at is not None and time.time() > self.left_at + GRACE:
            self.report.stale += 1
        self.in_flight += 1
        try:
            await request.read()
            await asyncio.sleep(random.uniform(0.002, 0.02))
            return web.Response(text="ok")
        finally:
            self.in_flight -= 1

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.01)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


async def run_churn(
    gateway: object,
    session: aiohttp.ClientSession,
    admin: str,
    proxy: str,
    seconds: float,
    clients: int = 8,
) -> Report:
    report = Report(rss_start_kib=rss_kib())
    tasks_before = set(asyncio.all_tasks())
    base = f"{admin}/registry/services/web/instances"
    live: list[ChurnUpstream] = []
    everyone: list[ChurnUpstream] = []

    async def register(ttl: str = "30s") -> ChurnUpstream:
        upstream = ChurnUpstream(report)
        await upstream.start()
        body = {"host": "127.0.0.1", "port": upstream.port, "ttl": ttl}
        async with session.post(base, json=body) as response:
            answer = await response.json()
        report.registrations += 1
        everyone.append(upstream)
        if ttl == "1s":  # left to expire: no traffic after its expiry
            upstream.left_at = datetime.fromisoformat(
                answer["expires_at"].replace("Z", "+00:00")
            ).timestamp()
            report.expiries += 1
        else:
            live.append(upstream)
        return upstream

    async def leave(upstream: ChurnUpstream, how: str) -> None:
        live.remove(upstream)
        url = f"{base}/127.0.0.1:{upstream.port}"
        if how == "deregister":
            async with session.delete(url) as response:
                assert response.status in (204, 404)
            upstream.left_at = time.time()
            report.deregistrations += 1
        elif how == "drain":
            change = {"state": "draining", "deregister_when_idle": True}
            async with session.patch(url, json=change) as response:
                assert response.status in (200, 404)
            upstream.left_at = time.time()
            report.drains += 1
        else:  # killed without deregistering
            report.in_flight_at_kills += upstream.in_flight
            report.kills += 1
            await upstream.stop()

    stop = asyncio.Event()

    async def client(number: int) -> None:
        async with aiohttp.ClientSession() as own:
            for i in itertools.count():
                if stop.is_set():
                    return
                method = "POST" if (i + number) % 3 == 0 else "GET"
                try:
                    async with own.request(method, f"{proxy}/r{i}", data=b"x" * 100) as response:
                        report.requests += 1
                        if response.status >= 500:
                            report.failed += 1
                            body = await response.json()
                            report.failure_codes.append(body["error"]["code"])
                        else:
                            await response.read()
                except aiohttp.ClientError:
                    report.requests += 1
                    report.failed += 1
                    report.failure_codes.append("connection")

    for _ in range(4):
        await register()
    load = [asyncio.create_task(client(n)) for n in range(clients)]
    actions = itertools.cycle(["deregister", "drain", "expire", "kill"])
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(1.0)
        await register()
        action = next(actions)
        if action == "expire":
            await register("1s")
        elif len(live) > 2:
            await leave(live[0], action)
    stop.set()
    await asyncio.gather(*load)
    for upstream in everyone:
        await upstream.stop()
    await asyncio.sleep(0)
    # The data plane's own tasks (connects) must all be gone; the admin listener's
    # keep-alive handlers belong to the test's client session.
    report.leaked_tasks = sum(
        1
        for task in asyncio.all_tasks() - tasks_before
        if getattr(task.get_coro(), "__qualname__", "").startswith(("Exchange", "Connection"))
    )
    report.rss_end_kib = rss_kib()
    return report
