"""The command line as a user runs it: exit codes, one-line errors, signals."""

from __future__ import annotations

import argparse
import asyncio
import json
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


# Item 3 of issue 13: a user's first hour with the CLI


def run_main(argv: list[str]) -> int:
    from gateway.cli.main import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return int(exc.code or 0)


def test_version_is_the_package_version(tmp_path: Path) -> None:
    from gateway import version

    result = gateway("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"gateway {version()}\n"


@pytest.mark.parametrize("command", ["run", "check", "services", "register", "drain", "deregister"])
def test_every_option_has_help_and_says_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli.main import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = commands.choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
        if action.option_strings and not isinstance(action, argparse._StoreTrueAction):
            assert "default" in action.help, f"{command} {action.option_strings} says no default"
    assert run_main([command, "--help"]) == 0
    assert "default: " in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "gateway: the following arguments are required: COMMAND (see gateway --help)\n"),
        (
            ["frobnicate"],
            "gateway: argument COMMAND: invalid choice: 'frobnicate' (choose from 'run', "
            "'check', 'services', 'register', 'drain', 'deregister') (see gateway --help)\n",
        ),
        (
            ["run", "--workers", "0"],
            "gateway: argument --workers: workers must be a positive integer, not '0' "
            "(see gateway run --help)\n",
        ),
    ],
)
def test_usage_errors_name_gateway_once_and_never_the_worker_command(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = gateway(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.endswith(message)
    assert "_worker" not in result.stderr


def test_the_worker_command_is_in_no_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "_worker" not in out
    assert "GATEWAY_ADMIN_URL" in out and "GATEWAY_ADMIN_TOKEN" in out
    # ...but `run --workers N` still starts it: its own parser answers.
    assert run_main(["_worker"]) == 2
    assert "required: --config, --listen, --feed-fd" in capsys.readouterr().err


async def test_services_takes_admin_and_token_from_the_environment(
    gateway_factory, upstreams, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("SECRET_FOR_TEST", "s3cret")
    gw = await gateway_factory("admin: {token_env: SECRET_FOR_TEST}\n" + GOOD)
    up = await upstreams("web")
    headers = {"Authorization": "Bearer s3cret"}
    async with gw.session.post(
        f"{gw.admin_url}/registry/services/web/instances",
        json={"host": "127.0.0.1", "port": up.port, "id": "web-1"},
        headers=headers,
    ) as response:
        assert response.status in (200, 201)

    monkeypatch.setenv("GATEWAY_ADMIN_URL", gw.admin_url)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "s3cret")
    assert await asyncio.to_thread(run_main, ["deregister", "web", "web-1"]) == 0
    assert capsys.readouterr().out == "deregistered web/web-1\n"
    # The flag wins over the variable.
    code = await asyncio.to_thread(run_main, ["deregister", "web", "x", "--token", "wrong"])
    assert code == 1
    assert "401 unauthorized" in capsys.readouterr().err
    code = await asyncio.to_thread(run_main, ["services", "--admin", "http://127.0.0.1:1"])
    assert code == 1
    assert capsys.readouterr().err.startswith("gateway: cannot reach admin at http://127.0.0.1:1")


def test_register_scheme_is_http_or_https(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["register", "web", "127.0.0.1:9001", "--scheme", "ftp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway: argument --scheme: invalid choice: 'ftp'")
    assert err.endswith("(see gateway register --help)\n")


async def test_drain_waits_for_the_request_in_flight(gateway_factory, upstreams, capsys) -> None:
    gw = await gateway_factory(GOOD)
    up = await upstreams("web")
    await gw.register("web", up, id="web-1")
    slow = asyncio.ensure_future(gw.session.get(f"{gw.proxy_url}/slow?delay=1"))
    await up.arrived.wait()

    argv = ["drain", "web", "web-1", "--wait", "--admin", gw.admin_url]
    assert await asyncio.to_thread(run_main, argv) == 0

    assert capsys.readouterr().out == (
        "draining web/web-1: no new requests; 1 request in flight\n"
        "web/web-1 has no requests in flight\n"
    )
    response = await slow
    assert response.status == 200  # it finished; the drain waited for it
    response.release()
    async with gw.session.get(f"{gw.admin_url}/registry/services/web") as listing:
        [instance] = (await listing.json())["instances"]
    assert instance["state"] == "draining"


async def test_drain_wait_gives_up_at_its_timeout(gateway_factory, upstreams, capsys) -> None:
    gw = await gateway_factory(GOOD)
    up = await upstreams("web")
    await gw.register("web", up, id="web-1")
    slow = asyncio.ensure_future(gw.session.get(f"{gw.proxy_url}/slow?delay=3"))
    await up.arrived.wait()

    argv = ["drain", "web", "web-1", "--wait", "--timeout", "300ms", "--admin", gw.admin_url]
    assert await asyncio.to_thread(run_main, argv) == 1

    captured = capsys.readouterr()
    assert captured.err == "gateway: web/web-1 still has 1 request in flight after 300ms\n"
    slow.cancel()


async def test_drain_wait_ends_when_the_instance_is_gone(
    gateway_factory, upstreams, capsys
) -> None:
    gw = await gateway_factory(GOOD)
    up = await upstreams("web")
    await gw.register("web", up, id="web-1")
    slow = asyncio.ensure_future(gw.session.get(f"{gw.proxy_url}/slow?delay=3"))
    await up.arrived.wait()
    argv = ["drain", "web", "web-1", "--wait", "--admin", gw.admin_url]
    drained = asyncio.ensure_future(asyncio.to_thread(run_main, argv))
    await asyncio.sleep(0.3)
    async with gw.session.delete(f"{gw.admin_url}/registry/services/web/instances/web-1"):
        pass
    assert await drained == 0
    assert capsys.readouterr().out.endswith("web/web-1 is gone from the registry\n")
    slow.cancel()


@pytest.mark.parametrize("command", ["drain", "deregister"])
async def test_drain_and_deregister_of_an_unknown_instance_say_the_api_message(
    gateway_factory, capsys, command: str
) -> None:
    gw = await gateway_factory(GOOD)

    argv = [command, "web", "nope", "--admin", gw.admin_url]
    assert await asyncio.to_thread(run_main, argv) == 1

    assert capsys.readouterr().err == (
        "gateway: admin answered 404 unknown_instance: no instance 'nope' in service 'web'\n"
    )


@pytest.mark.parametrize("wait", [["--wait"], []], ids=["with-wait", "without"])
def test_drain_bad_timeout_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], wait: list[str]
) -> None:
    argv = ["drain", "web", "web-1", *wait, "--timeout", "soon", "--admin", "127.0.0.1:1"]
    assert run_main(argv) == 2  # argparse's exit, before any call is made
    assert capsys.readouterr().err == (
        "gateway: argument --timeout: invalid duration 'soon': use e.g. 500ms, 30s, 2m, 1h "
        "(see gateway drain --help)\n"
    )


def test_register_says_a_port_out_of_range_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["register", "web", "127.0.0.1:70000", "--admin", "127.0.0.1:1"]) == 2
    assert capsys.readouterr().err == (
        "gateway: invalid address '127.0.0.1:70000': port must be an integer in 1..65535\n"
    )


async def test_services_of_one_service_and_as_json(gateway_factory, upstreams, capsys) -> None:
    gw = await gateway_factory(GOOD)
    up = await upstreams("web")
    await gw.register("web", up)
    await gw.register("api", up, id="api-1")
    admin = ["--admin", gw.admin_url]

    assert await asyncio.to_thread(run_main, ["services", "--service", "web", *admin]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "SERVICE", "INSTANCE", "STATE", "HEALTH", "WEIGHT", "IN_FLIGHT", "EXPIRES"
    ]  # fmt: skip
    assert lines[1].split()[:3] == ["web", f"127.0.0.1:{up.port}", "up"]
    assert lines[2:] == ["", "web: 1 instance, 1 healthy"]

    assert (
        await asyncio.to_thread(run_main, ["services", "--json", "--service", "api", *admin]) == 0
    )
    async with gw.session.get(f"{gw.admin_url}/registry/services/api") as response:
        api = await response.json()
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "api" and [i["id"] for i in shown["instances"]] == ["api-1"]
    assert shown["instances"][0].keys() == api["instances"][0].keys()

    assert await asyncio.to_thread(run_main, ["services", "--json", *admin]) == 0
    listed = json.loads(capsys.readouterr().out)["services"]
    assert [s["name"] for s in listed] == ["api", "users", "web"]

    assert await asyncio.to_thread(run_main, ["services", "--service", "nope", *admin]) == 1
    assert capsys.readouterr().err == (
        f"gateway: no service 'nope' in the registry at {gw.admin_url} "
        "(`gateway services` lists them)\n"
    )


# Item 4 of issue 13: gateway check


def test_check_says_1_route_and_does_not_warn_of_the_catch_all(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        "routes:\n  - {prefix: /api, service: api}\n  - {prefix: /, service: web}\n"
    )
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "routes.yaml: ok, 2 routes"
    assert result.stderr == ""  # /api under / is what / is for

    (tmp_path / "routes.yaml").write_text("routes:\n  - {prefix: /, service: web}\n")
    result = gateway("check", cwd=tmp_path)
    assert result.stdout.splitlines()[-1] == "routes.yaml: ok, 1 route"


@pytest.mark.parametrize("how", [["other.yaml"], ["-c", "other.yaml"], ["--config", "other.yaml"]])
def test_check_takes_the_file_as_promtool_and_nginx_users_give_it(
    tmp_path: Path, how: list[str]
) -> None:
    (tmp_path / "other.yaml").write_text("routes:\n  - {prefix: /, service: web}\n")
    result = gateway("check", *how, cwd=tmp_path)  # no routes.yaml here
    assert (result.returncode, result.stdout.splitlines()[-1]) == (0, "other.yaml: ok, 1 route")


@pytest.mark.parametrize("text", ["", "\n\n", "# routes: later\n  \n"])
def test_check_and_run_refuse_an_empty_file(tmp_path: Path, text: str) -> None:
    (tmp_path / "routes.yaml").write_text(text)
    for command in ("check", "run"):
        result = gateway(command, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr == (
            "routes.yaml is empty: give it at least a routes: list, e.g. "
            "routes: [{prefix: /, service: web}]\n"
        )


def test_check_explains_a_tab(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text("routes:\n  - prefix: /\n\tservice: web\n")
    result = gateway("check", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "routes.yaml:3: a tab character; YAML indents with spaces\n"


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    ("admin", "fix"),
    [
        (
            "",
            "add 'token_env: GATEWAY_ADMIN_TOKEN' under admin: in routes.yaml and export "
            "GATEWAY_ADMIN_TOKEN=<secret>",
        ),
        ("  token_env: MY_TOKEN\n", "export MY_TOKEN=<secret> (named under admin: in routes.yaml)"),
    ],
    ids=["no-token_env", "token_env"],
)
def test_check_and_run_refuse_an_open_admin_without_a_token_alike(
    tmp_path: Path, command: str, admin: str, fix: str
) -> None:
    (tmp_path / "routes.yaml").write_text("admin:\n  listen: 0.0.0.0:0\n" + admin + GOOD)
    env = {"GATEWAY_ADMIN_TOKEN": "set-but-not-named", "MY_TOKEN": ""}
    extra = ["--listen", "127.0.0.1:0"] if command == "run" else []
    result = gateway(command, *extra, cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"gateway: admin listener 0.0.0.0:0 is not on loopback and no admin token is set: "
        f"{fix}, or listen on 127.0.0.1\n"
    )


def test_check_passes_an_open_admin_with_its_token_set(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        "admin:\n  listen: 0.0.0.0:0\n  token_env: MY_TOKEN\n" + GOOD
    )
    result = gateway("check", cwd=tmp_path, env={"MY_TOKEN": "s3cret"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("routes.yaml: ok, 3 routes\n")


def test_an_edit_after_the_compiled_build_is_found(tmp_path: Path) -> None:
    """What `gateway run` warns of (and the suite refuses): Python would import the old
    compiled module, not the edited source."""
    from gateway import stale_extensions

    package = tmp_path / "gateway" / "dataplane"
    package.mkdir(parents=True)
    for name in ("exchange", "pool"):
        (package / f"{name}.py").write_text("")
        (package / f"{name}.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    built = (package / "exchange.cpython-311-x86_64-linux-gnu.so").stat().st_mtime
    os.utime(package / "exchange.py", (built + 10, built + 10))  # edited after the build
    os.utime(package / "pool.py", (built - 10, built - 10))

    assert stale_extensions(tmp_path) == ["gateway/dataplane/exchange.py"]
