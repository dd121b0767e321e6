"""The command line as a user runs it: exit codes, one-line errors, signals."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import REPO, start_gateway_process, stop_gateway_process

GOOD = """
routes:
  - prefix: /api/users
    service: users
    strip_prefix: true
  - prefix: /api
    service: api
  - prefix: /
    service: web
"""


def gateway(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_prints_the_routing_table_and_warns_of_shadowing(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(GOOD)
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(
        "/api/users" in line and "users" in line and "strip_prefix" in line for line in lines
    )
    assert any(re.search(r"\*\s+/\s+-> web", line) for line in lines)
    assert "shadows part of /api" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_reports_every_mistake_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "routes:\n"
        "  - prefix: api\n"
        "    service: users\n"
        "  - prefix: /x\n"
        "    service: Bad_Name\n"
        "    timout: 5s\n"
    )
    result = gateway("check", "--config", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert [e.split(":")[1] for e in errors] == ["2", "5", "6"]
    assert all(e.startswith("bad.yaml:") for e in errors)
    assert "Traceback" not in result.stderr


def test_missing_config_is_one_line(tmp_path: Path) -> None:
    result = gateway("run", "--config", "nope.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "nope.yaml" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["run", "--listen", "nonsense"],
        ["run", "--workers", "0"],
        ["register", "web"],
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, args: list[str]) -> None:
    result = gateway(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()


def test_open_admin_without_token_is_refused(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(GOOD)
    result = gateway(
        "run",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "0.0.0.0:0",
        cwd=tmp_path,
        env={"GATEWAY_ADMIN_TOKEN": ""},
    )
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "token" in result.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    (tmp_path / "routes.yaml").write_text(GOOD)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = gateway(
            "run", "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0", cwd=tmp_path
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(tmp_path, upstreams):
    (tmp_path / "routes.yaml").write_text(GOOD)
    gateway = await start_gateway_process(tmp_path)
    try:
        up = await upstreams("web")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{gateway.admin_url}/registry/services/web/instances",
                json={"host": "127.0.0.1", "port": up.port},
            ) as response:
                assert response.status == 201
            request = asyncio.ensure_future(session.get(f"{gateway.proxy_url}/slow?delay=0.5"))
            await up.arrived.wait()
            gateway.process.send_signal(signal.SIGTERM)
            response = await request
            assert response.status == 200
            assert await response.text() == "slow"
            response.release()
        assert await asyncio.wait_for(gateway.process.wait(), 10) == 0
    finally:
        await stop_gateway_process(gateway)


async def test_register_sidecar_keeps_the_lease_and_deregisters_on_ctrl_c(gateway_factory):
    gw = await gateway_factory(GOOD)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "register",
        "web",
        "127.0.0.1:9",
        "--ttl",
        "1s",
        "--admin",
        gw.admin_url,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        assert line.startswith(b"registered web/127.0.0.1:9")
        listing = f"{gw.admin_url}/registry/services/web"
        async with gw.session.get(listing) as response:
            [instance] = (await response.json())["instances"]
        # Two heartbeats later (ttl 1s, one every 1/3 s), the lease was renewed.
        index = response.headers["X-Registry-Index"]
        async with gw.session.get(f"{listing}?index={index}&wait=700ms") as response:
            [renewed] = (await response.json())["instances"]
        assert renewed["expires_at"] > instance["expires_at"]
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        async with gw.session.get(listing) as response:
            assert (await response.json())["instances"] == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
