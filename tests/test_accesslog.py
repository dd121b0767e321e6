"""The access log (issue 11 item 1): JSON or Common Log Format, buffered off the loop."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.dataplane.accesslog import MAX_PENDING, AccessLog
from tests.conftest import start_gateway_process, stop_gateway_process

FIELDS = dict(
    request_id=b"r-1", trace_id=b"4bf92f3577b34da6a3ce929d0e0e4736", client=b"10.0.0.9",
    method=b"GET", target=b'/a?b="c"', route="/", service="web", instance="10.0.0.5:80",
    status=200, bytes_in=0, bytes_out=5, seconds=0.00123, attempts=1, error="",
)  # fmt: skip


def test_a_json_line_has_every_field() -> None:
    written: list[bytes] = []
    log = AccessLog("json", written.append)
    log.record(**FIELDS)  # type: ignore[arg-type]
    assert written == []  # buffered: nothing is written on the loop
    log.close()
    (line,) = b"".join(written).splitlines()
    entry = json.loads(line)
    assert entry["time"].endswith("Z") and entry["request_id"] == "r-1"
    assert {k: entry[k] for k in ("method", "path", "status", "duration_ms", "upstream_error")} == {
        "method": "GET", "path": '/a?b="c"', "status": 200, "duration_ms": 1.23,
        "upstream_error": None,
    }  # fmt: skip
    assert entry["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736" and entry["attempts"] == 1


def test_a_common_line() -> None:
    written: list[bytes] = []
    log = AccessLog("common", written.append)
    log.record(**FIELDS)  # type: ignore[arg-type]
    log.close()
    line = b"".join(written).decode()
    assert line.startswith("10.0.0.9 - - [") and line.endswith(
        ' "GET /a?b=%22c%22 HTTP/1.1" 200 5\n'
    )


def test_a_stuck_reader_costs_dropped_lines_not_memory() -> None:
    stuck = threading.Event()
    log = AccessLog("json", lambda data: stuck.wait(10))
    big = {**FIELDS, "target": b"/" + b"x" * 4000}
    for _ in range(MAX_PENDING // 4000 + 2000):
        log.record(**big)  # type: ignore[arg-type]
    log.flush()
    assert log.dropped > 0
    stuck.set()
    log.close()


@pytest.mark.parametrize("form", ["json", "common"])
async def test_the_gateway_writes_it_on_stdout(tmp_path: Path, upstreams: Any, form: str) -> None:
    (tmp_path / "routes.yaml").write_text("routes:\n  - prefix: /\n    service: web\n")
    gateway = await start_gateway_process(tmp_path, "--access-log", form, stdout=True)
    try:
        up = await upstreams("web")
        async with aiohttp.ClientSession() as session:
            url = f"{gateway.admin_url}/registry/services/web/instances"
            async with session.post(url, json={"host": "127.0.0.1", "port": up.port}) as r:
                assert r.status == 201
            async with session.get(gateway.proxy_url + "/hello") as r:
                assert r.status == 200
                body = await r.read()
        assert gateway.process.stdout is not None
        line = await asyncio.wait_for(gateway.process.stdout.readline(), 5)  # within 1 s
        if form == "json":
            entry = json.loads(line)
            assert (entry["path"], entry["status"], entry["service"]) == ("/hello", 200, "web")
            assert entry["instance"] == f"127.0.0.1:{up.port}" and entry["bytes_out"] == len(body)
            assert len(entry["trace_id"]) == 32 and entry["duration_ms"] > 0
        else:
            assert b'"GET /hello HTTP/1.1" 200 %d' % len(body) in line
    finally:
        await stop_gateway_process(gateway)
