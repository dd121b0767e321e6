"""Scale: does anything on the gateway's event loop grow with the registry, config or connections?

    python3 benchmarks/scale.py [--services 100,1000] [--instances 10000] [--json PATH]

Runs `python3 -m gateway run` from this checkout (so a compiled build in place is what
is measured) with `registry.snapshot` on, pinned to CPU 0 when it can be, and drives it
from this process (pinned to CPU 1). A prober sends one proxied GET every 10 ms through
every phase and reports its p99 and max latency per phase:

- register: INSTANCES instances over SERVICES services (never routed to);
- heartbeat: 1,000 heartbeats a second for 10 s, with the gateway's CPU use;
- list: GET /metrics, /registry/services, /routes and / (status page), 10 each, timed;
- reload: the config rewritten with 10,000 routes, then SIGHUP, until /routes shows them;
- churn: 30,000 connections opened, used for one GET and closed; RSS before and after.

Goal (issue 14): prober p99 < 5 ms and max < 50 ms in every phase; CPU < 20% of a core
at 1,000 heartbeats/s; RSS after churn within 10% of before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config_text(snapshot: Path, routes: int) -> str:
    lines = [
        f"registry: {{snapshot: {snapshot}, max_ttl: 1h}}",
        "routes:",
        "  - {prefix: /probe, service: probe}",
    ]
    lines += [f"  - {{prefix: /r{i}/v1, service: s{i % 100}}}" for i in range(routes)]
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Prober:
    """A process of its own sending one proxied GET every 10 ms (the driver runs at nice 10).

    It prints ``monotonic_time latency_ms ok`` lines; phases are time ranges of the driver.
    """

    def __init__(self, url: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--probe", url], stdout=subprocess.PIPE, text=True
        )
        self.phases: list[tuple[str, float]] = []
        self.samples: list[tuple[float, float, bool]] = []

    def enter(self, phase: str) -> None:
        self.phases.append((phase, time.monotonic()))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=30)
        for line in out.splitlines():
            at, ms, ok = line.split()
            self.samples.append((float(at), float(ms), ok == "1"))

    def summary(self, phase: str) -> dict[str, float]:
        bounds = dict(self.phases)
        starts = sorted(bounds.values())
        start = bounds[phase]
        end = next((t for t in starts if t > start), float("inf"))
        values = sorted(ms for at, ms, _ in self.samples if start <= at < end) or [0.0]
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        failed = sum(1 for at, _, ok in self.samples if start <= at < end and not ok)
        return {
            "probes": len(values),
            "p99_ms": round(p99, 2),
            "max_ms": round(values[-1], 2),
            "failed": failed,
        }


async def probe(url: str) -> None:
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    async with aiohttp.ClientSession() as session:
        while not stopping.is_set():
            started = time.perf_counter()
            ok = False
            try:
                async with session.get(url) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                pass
            elapsed = time.perf_counter() - started
            print(f"{time.monotonic():.4f} {elapsed * 1000:.3f} {int(ok)}")
            await asyncio.sleep(max(0.0, 0.01 - elapsed))


async def heartbeats(
    session: aiohttp.ClientSession,
    admin: str,
    ids: list[tuple[str, str]],
    rate: int,
    seconds: float,
) -> tuple[int, float]:
    """Send ``rate`` heartbeats a second for ``seconds``; returns (sent, p99 ms)."""
    latencies: list[float] = []
    random.shuffle(ids)

    async def one(service: str, instance_id: str) -> None:
        started = time.perf_counter()
        url = f"{admin}/registry/services/{service}/instances/{instance_id}/heartbeat"
        async with session.put(url) as response:
            await response.read()
        latencies.append((time.perf_counter() - started) * 1000)

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for n in range(int(rate * seconds)):
        delay = start + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(*ids[n % len(ids)])))
    await asyncio.gather(*tasks)
    return len(latencies), round(statistics.quantiles(latencies, n=100)[98], 2)


async def churn(port: int, connections: int, parallel: int = 20) -> None:
    request = b"GET /probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    async def worker(count: int) -> None:
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await reader.read()
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(worker(connections // parallel) for _ in range(parallel)))


async def scenario(services: int, instances: int) -> dict[str, Any]:
    result: dict[str, Any] = {"services": services, "instances": instances}
    upstream = web.Application()
    upstream.router.add_get("/{tail:.*}", lambda request: web.Response(text="ok"))
    runner = web.AppRunner(upstream, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]
    proxy_port, admin_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "routes.yaml"
        config.write_text(config_text(Path(tmp) / "snapshot.json", 0))
        command = [sys.executable, "-m", "gateway", "run", "--config", str(config)]
        command += [
            "--listen",
            f"127.0.0.1:{proxy_port}",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
        ]
        command += ["--log-level", "warning"]
        if (os.cpu_count() or 1) > 1:
            command = ["taskset", "-c", "0", *command]
            os.sched_setaffinity(0, {1})
        process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
        admin = f"http://127.0.0.1:{admin_port}"
        prober: Prober | None = None
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:
                for _ in range(300):  # the gateway answers /healthz once it listens
                    try:
                        async with session.get(admin + "/healthz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                base = f"{admin}/registry/services"
                body = {"host": "127.0.0.1", "port": upstream_port, "ttl": "1h"}
                async with session.post(f"{base}/probe/instances", json=body) as response:
                    assert response.status in (200, 201), await response.text()
                prober = Prober(f"http://127.0.0.1:{proxy_port}/probe")
                os.nice(10)  # the prober's requests go first; the driver's load waits
                await asyncio.sleep(1)
                prober.enter("register")
                ids = []
                started = time.perf_counter()

                async def register(n: int) -> None:
                    service = f"s{n % services}"
                    body = {"host": f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", "port": 9000}
                    body["ttl"] = "1h"
                    async with session.post(f"{base}/{service}/instances", json=body) as response:
                        answer = await response.json()
                    ids.append((service, answer["id"]))

                for chunk in range(0, instances, 500):
                    await asyncio.gather(
                        *(register(n) for n in range(chunk, min(chunk + 500, instances)))
                    )
                rate = round(instances / (time.perf_counter() - started))
                registered = {"registrations_per_s": rate}

                prober.enter("heartbeat")
                cpu = cpu_seconds(process.pid)
                started = time.perf_counter()
                sent, p99 = await heartbeats(session, admin, ids, 1000, 10.0)
                elapsed = time.perf_counter() - started
                heartbeat = {
                    "heartbeats_per_s": round(sent / elapsed),
                    "heartbeat_p99_ms": p99,
                    "gateway_cpu_pct": round(100 * (cpu_seconds(process.pid) - cpu) / elapsed, 1),
                }

                prober.enter("list")
                listing: dict[str, float] = {}
                for path in ("/metrics", "/registry/services", "/routes", "/"):
                    times = []
                    for _ in range(10):
                        t0 = time.perf_counter()
                        async with session.get(admin + path) as response:
                            await response.read()
                        times.append((time.perf_counter() - t0) * 1000)
                    listing[path] = round(statistics.median(times), 2)
                listed = {"median_ms": listing}

                prober.enter("reload")
                config.write_text(config_text(Path(tmp) / "snapshot.json", 10_000))
                started = time.perf_counter()
                process.send_signal(signal.SIGHUP)
                while True:
                    async with session.get(admin + "/routes") as response:
                        if len((await response.json())["routes"]) > 10_000:
                            break
                    await asyncio.sleep(0.05)
                reloaded = {"applied_after_s": round(time.perf_counter() - started, 2)}

                prober.enter("churn")
                rss = rss_mib(process.pid)
                await churn(proxy_port, 30_000)
                await asyncio.sleep(2)  # the last connections' teardown
                churned = {
                    "rss_before_mib": round(rss, 1),
                    "rss_after_mib": round(rss_mib(process.pid), 1),
                }
                prober.enter("end")
                prober.stop()
                for phase, extra in (
                    ("register", registered),
                    ("heartbeat", heartbeat),
                    ("list", listed),
                    ("reload", reloaded),
                    ("churn", churned),
                ):
                    result[phase] = prober.summary(phase) | extra
        finally:
            if prober is not None and prober.process.poll() is None:
                prober.process.kill()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            await runner.cleanup()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="100,1000")
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the prober process
    args = parser.parse_args()
    if args.probe:
        await probe(args.probe)
        return
    results = []
    for services in (int(s) for s in args.services.split(",")):
        result = await scenario(services, args.instances)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    asyncio.run(main())
