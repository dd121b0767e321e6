"""A real Prometheus server scrapes the admin listener's /metrics (SPEC section 6) and
answers the queries a dashboard would make about proxied traffic."""

from __future__ import annotations

import asyncio
import math
import re
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no prometheus on PATH (Debian package `prometheus`)",
)

ROUTES = "routes:\n  - prefix: /api\n    service: api\n"
DEADLINE = 15.0  # seconds for Prometheus to start, scrape twice and answer


def _log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-20:])


async def _start_prometheus(tmp_path: Path, target: str) -> tuple[asyncio.subprocess.Process, Path]:
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: gateway\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:0",
            stdout=out,
            stderr=out,
        )
    return process, log


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def _until_ready(
    process: asyncio.subprocess.Process, log: Path, session: aiohttp.ClientSession
) -> str:
    """Prometheus's URL once /-/ready says so; it logs the port that port 0 became."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    url = None
    while loop.time() < deadline and process.returncode is None:
        if url is None:
            found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', log.read_text())
            if found:
                url = f"http://{found.group(1)}"
        if url is not None:
            async with session.get(url + "/-/ready") as response:
                if response.status == 200:
                    return url
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus not ready (exit {process.returncode}):\n{_log_tail(log)}")


async def _query(session: aiohttp.ClientSession, url: str, promql: str) -> list[dict[str, Any]]:
    async with session.get(url + "/api/v1/query", params={"query": promql}) as response:
        body = await response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_gateway_and_computes_rates(
    gateway_factory, upstreams, tmp_path
):
    gw = await gateway_factory(ROUTES)
    await gw.register("api", await upstreams("api"))
    queries = {
        "up": 'up{job="gateway"}',
        "rate": "sum by (route, service, code) (rate(gateway_requests_total[5s]))",
        "median": "histogram_quantile(0.5, sum by (le) "
        '(rate(gateway_request_duration_seconds_bucket{route="/api"}[5s])))',
    }
    process, log = await _start_prometheus(tmp_path, f"127.0.0.1:{gw.gateway.admin_port}")
    try:
        # A session of its own, which decompresses Prometheus's gzip (the fixture's does not).
        async with aiohttp.ClientSession() as session:
            url = await _until_ready(process, log, session)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE
            while True:
                # Traffic between every two scrapes: rate() needs two samples that differ.
                for _ in range(5):
                    async with gw.session.get(gw.proxy_url + "/api/users") as response:
                        assert response.status == 200
                seen = {name: await _query(session, url, q) for name, q in queries.items()}
                up = [float(s["value"][1]) for s in seen["up"]]
                rates = {
                    tuple(s["metric"][k] for k in ("route", "service", "code")): float(
                        s["value"][1]
                    )
                    for s in seen["rate"]
                }
                median = [float(s["value"][1]) for s in seen["median"]]
                counted = rates.get(("/api", "api", "200"), 0) > 0
                if up == [1.0] and counted and median and math.isfinite(median[0]):
                    break
                if loop.time() > deadline:
                    raise AssertionError(f"Prometheus answered {seen}\n{_log_tail(log)}")
                await asyncio.sleep(0.25)
        assert 0 < median[0] < 1  # requests to a local upstream: well under a second
    finally:
        await _stop(process)
