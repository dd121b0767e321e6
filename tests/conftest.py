"""Fixtures for server tests: upstreams and gateways on port 0, stopped by the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway import stale_extensions
from gateway.app import Gateway
from gateway.config.loader import parse_config
from registry.core.store import Registry
from tests.fakes import FakeClock


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_extensions()
    if stale:
        pytest.exit(
            f"edited after their compiled build: {', '.join(stale)}; the tests would run the "
            "old code. Rebuild with `pip install -e .` (or delete gateway/*.so registry/*.so)",
            returncode=2,
        )


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for unit tests of the pure core: time moves only when told."""
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(clock, default_ttl=30.0, max_ttl=3600.0)


@dataclass
class Upstream:
    """A test upstream that records what it received."""

    name: str
    port: int = 0
    requests: list[dict[str, object]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, request: dict[str, object]) -> None:
        self.requests.append(request)
        self.arrived.set()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def _upstream_app(upstream: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        upstream.record(
            {
                "method": request.method,
                "path": request.raw_path,
                "body": body,
                "headers": list(request.raw_headers),
            }
        )
        data = {
            "upstream": upstream.name,
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body_length": len(body),
        }
        return web.Response(
            body=json.dumps(data).encode(),
            content_type="application/json",
            headers={"X-Upstream": upstream.name},
        )

    async def download(request: web.Request) -> web.StreamResponse:
        size = int(request.query["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "chunked" not in request.query:
            response.content_length = size
        await response.prepare(request)
        block = b"x" * 65536
        sent = 0
        while sent < size and request.method != "HEAD":
            piece = block[: min(len(block), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response

    async def upload(request: web.Request) -> web.Response:
        import hashlib

        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            total += len(chunk)
        upstream.record(
            {
                "method": request.method,
                "path": request.raw_path,
                "body": b"",
                "headers": list(request.raw_headers),
            }
        )
        return web.json_response(
            {"sha256": digest.hexdigest(), "length": total, "upstream": upstream.name}
        )

    async def slow(request: web.Request) -> web.Response:
        upstream.record(
            {
                "method": request.method,
                "path": request.raw_path,
                "body": b"",
                "headers": list(request.raw_headers),
            }
        )
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="slow")

    async def status(request: web.Request) -> web.Response:
        upstream.record(
            {
                "method": request.method,
                "path": request.raw_path,
                "body": b"",
                "headers": list(request.raw_headers),
            }
        )
        return web.Response(
            status=int(request.match_info["code"]),
            headers={"Set-Cookie": "a=1", "X-Upstream": upstream.name},
        )

    handlers = {"download": download, "upload": upload, "slow": slow}

    async def dispatch(request: web.Request) -> web.StreamResponse:
        """By the last path segments, wherever the route put them: .../slow, .../status/204."""
        parts = request.path.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == "status":
            request.match_info["code"] = parts[-1]
            return await status(request)
        return await handlers.get(parts[-1], echo)(request)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[str], Awaitable[Upstream]]]:
    started: list[Upstream] = []

    async def start(name: str = "u") -> Upstream:
        upstream = Upstream(name)
        runner = web.AppRunner(_upstream_app(upstream), access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        upstream.runner = runner
        upstream.port = runner.addresses[0][1]
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.stop()


@dataclass
class RunningGateway:
    gateway: Gateway
    session: aiohttp.ClientSession

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.admin_port}"

    async def register(
        self, service: str, upstream: Upstream, **extra: object
    ) -> dict[str, object]:
        body = {"host": "127.0.0.1", "port": upstream.port, **extra}
        async with self.session.post(
            f"{self.admin_url}/registry/services/{service}/instances", json=body
        ) as response:
            assert response.status in (200, 201), await response.text()
            result: dict[str, object] = await response.json()
            return result


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    running: list[RunningGateway] = []

    async def start(yaml_text: str = "", **kwargs: object) -> RunningGateway:
        config = parse_config(yaml_text)
        gateway = Gateway(config, listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0), **kwargs)  # type: ignore[arg-type]
        await gateway.start()
        session = aiohttp.ClientSession(auto_decompress=False)
        result = RunningGateway(gateway, session)
        running.append(result)
        return result

    yield start
    for item in running:
        await item.session.close()
        await item.gateway.stop()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_raw_tasks: dict[asyncio.Server, set[asyncio.Task[None]]] = {}


async def start_raw_server(handler: RawHandler) -> asyncio.Server:
    """A hand-written upstream on port 0 whose connections stop_raw_server ends for sure."""
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    _raw_tasks[server] = tasks
    return server


async def stop_raw_server(server: asyncio.Server) -> None:
    server.close()
    tasks = _raw_tasks.pop(server, set())
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # ending them is the point
    await server.wait_closed()


class RawServer:
    """Base of hand-written test upstreams: ``handle`` serves one connection; ``start``
    returns the port, ``stop`` ends the server and every connection."""

    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> int:
        self.server = await start_raw_server(self.handle)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            await stop_raw_server(self.server)


REPO = Path(__file__).resolve().parent.parent


# What `gateway run` logs once both listeners are open: the proxy's port, the admin's.
READY_LINE = re.compile(
    r"proxy listening on \S+:(\d+), admin on \S+:(\d+), \d+ routes?, "
    r"(compiled|pure Python) data plane"
)


@dataclass
class GatewayProcess:
    process: asyncio.subprocess.Process
    proxy_url: str
    admin_url: str
    ready_line: str  # the log line that said it listens


async def start_gateway_process(cwd: Path, *extra: str, stdout: bool = False) -> GatewayProcess:
    """`gateway run` in a subprocess on ports 0, in ``cwd`` (with its routes.yaml);
    ready when it logs its addresses. The caller stops it. ``stdout``: piped, to read."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--listen", "127.0.0.1:0",
        "--admin-listen", "127.0.0.1:0", *extra,
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE if stdout else None,
    )  # fmt: skip
    assert process.stderr is not None
    while True:
        line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
        if not line:
            process.kill()
            await process.wait()
            raise AssertionError("gateway exited before listening")
        found = READY_LINE.search(line)
        if found:
            return GatewayProcess(
                process,
                f"http://127.0.0.1:{found.group(1)}",
                f"http://127.0.0.1:{found.group(2)}",
                line,
            )


async def stop_gateway_process(gateway: GatewayProcess) -> None:
    if gateway.process.returncode is None:
        gateway.process.kill()
        await gateway.process.wait()


async def fresh_get(url: str) -> int:
    """A GET on a new connection, so the kernel spreads them over the processes."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as r:
        return r.status


async def settle(url: str, status: int) -> list[int]:
    """Until 10 answers in a row are ``status``: the workers' mirrors have caught up."""
    seen: list[int] = []
    for _ in range(200):
        seen.append(await fresh_get(url))
        if seen[-10:] == [status] * 10:
            return seen
    raise AssertionError(f"never {status} ten times in a row")
