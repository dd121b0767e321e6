"""Hot reload (SPEC section 3): a valid file swaps the routing table, a bad one is refused."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
from collections.abc import Callable

import aiohttp

from gateway.app import Gateway
from gateway.config.loader import load_config
from gateway.control import reload
from gateway.control.reload import FileWatcher
from tests.conftest import start_gateway_process, stop_gateway_process

FIRST = "routes:\n  - prefix: /old\n    service: web\n"
SECOND = "routes:\n  - prefix: /new\n    service: web\n    strip_prefix: true\n"


async def _reloads(session: aiohttp.ClientSession, admin: str) -> dict[str, float]:
    async with session.get(f"{admin}/metrics") as response:
        text = await response.text()
    return {
        result: float(value)
        for result, value in re.findall(r'gateway_config_reloads_total{result="(\w+)"} (\S+)', text)
    }


async def test_reload_swaps_routes_and_keeps_registrations(tmp_path, upstreams):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(FIRST)
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await gateway.start()
    try:
        proxy = f"http://127.0.0.1:{gateway.proxy_port}"
        admin = f"http://127.0.0.1:{gateway.admin_port}"
        up = await upstreams("web")
        async with aiohttp.ClientSession() as session:
            url = f"{admin}/registry/services/web/instances"
            async with session.post(url, json={"host": "127.0.0.1", "port": up.port}) as r:
                assert r.status == 201
            async with session.get(f"{proxy}/old/x") as r:
                assert r.status == 200
            # A long request in flight during the reload finishes normally.
            up.arrived.clear()
            slow = asyncio.ensure_future(session.get(f"{proxy}/old/slow?delay=0.3"))
            await up.arrived.wait()

            config_file.write_text(SECOND)
            assert await gateway.reload() is True
            async with session.get(f"{proxy}/old/x") as r:
                assert r.status == 404
            async with session.get(f"{proxy}/new/x") as r:
                assert r.status == 200
                assert (await r.json())["path"] == "/x"  # strip_prefix of the new route
            response = await slow
            assert response.status == 200
            response.release()

            config_file.write_text("routes:\n  - prefix: nope\n    service: web\n")
            assert await gateway.reload() is False
            async with session.get(f"{proxy}/new/x") as r:
                assert r.status == 200  # the old table keeps serving
            assert await _reloads(session, admin) == {"success": 1.0, "failure": 1.0}
            async with session.get(f"{admin}/registry/services/web") as r:
                assert len((await r.json())["instances"]) == 1  # registration untouched
    finally:
        await gateway.stop()


async def _prefixes(session: aiohttp.ClientSession, admin: str) -> list[str]:
    async with session.get(f"{admin}/routes") as response:
        return [route["prefix"] for route in (await response.json())["routes"]]


async def test_sighup_and_file_change_reload_a_running_gateway(tmp_path):
    (tmp_path / "routes.yaml").write_text(FIRST)
    gateway = await start_gateway_process(tmp_path)
    process, admin = gateway.process, gateway.admin_url
    try:
        async with aiohttp.ClientSession() as session:
            assert await _prefixes(session, admin) == ["/old"]
            (tmp_path / "routes.yaml").write_text(SECOND)
            process.send_signal(signal.SIGHUP)
            for _ in range(100):
                if await _prefixes(session, admin) == ["/new"]:
                    break
                await asyncio.sleep(0.02)
            assert await _prefixes(session, admin) == ["/new"]
            # Without a signal: the file watcher notices within about a second.
            (tmp_path / "routes.yaml").write_text(FIRST + "  - prefix: /more\n    service: web\n")
            loop = asyncio.get_running_loop()
            started = loop.time()
            while await _prefixes(session, admin) != ["/old", "/more"]:
                assert loop.time() - started < 2.0, "not picked up within 2 s"
                await asyncio.sleep(0.05)
            assert (await _reloads(session, admin))["success"] == 2.0
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        await stop_gateway_process(gateway)


async def test_the_file_is_parsed_off_the_event_loop(tmp_path, monkeypatch):
    """A 10,000-route file takes ~1 s to parse: in a thread, so requests keep flowing."""
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(FIRST)
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    parsed_in: list[threading.Thread] = []
    real = reload.load_config

    def load_config_recording(path):
        parsed_in.append(threading.current_thread())
        return real(path)

    monkeypatch.setattr(reload, "load_config", load_config_recording)
    await gateway.start()
    try:
        config_file.write_text(
            "routes:\n" + "".join(f"  - {{prefix: /s{i}, service: web}}\n" for i in range(10_000))
        )
        assert await gateway.reload() is True
        assert parsed_in and parsed_in[0] is not threading.main_thread()
        assert len(gateway.config.routes) == 10_000
        assert gateway.proxy is not None and gateway.proxy.table.match(None, "/s9999/x")
    finally:
        await gateway.stop()


async def _until(done: Callable[[], bool]) -> None:
    while not done():
        await asyncio.sleep(0)


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_reloads_asked_for_during_one_run_once_after_it(tmp_path):
    """SIGHUPs while a reload runs are not lost and do not pile up: one more follows."""
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(FIRST)
    release = asyncio.Event()
    runs: list[int] = []

    async def on_change() -> None:
        runs.append(len(runs))
        await release.wait()

    watcher = FileWatcher(config_file, on_change, poll=None)
    watcher.start()
    try:
        watcher.ask()
        await _until(lambda: len(runs) == 1)
        for _ in range(5):
            watcher.ask()  # while the first one runs
        release.set()
        await _until(lambda: len(runs) == 2)
        await _settle()
        assert runs == [0, 1]
        config_file.write_text(SECOND)  # poll=None: a change on disk alone reloads nothing
        await _settle()
        assert runs == [0, 1]
    finally:
        await watcher.stop()


async def test_a_reload_that_fails_does_not_stop_the_watcher(tmp_path, caplog):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(FIRST)
    runs: list[int] = []

    async def on_change() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise RuntimeError("a bug")

    watcher = FileWatcher(config_file, on_change, poll=None)
    watcher.start()
    try:
        watcher.ask()
        await _until(lambda: len(runs) == 1)
        watcher.ask()
        await _until(lambda: len(runs) == 2)
        assert runs == [0, 1]
        assert f"reload of {config_file} failed" in caplog.text
    finally:
        await watcher.stop()


async def test_a_listen_change_is_told_once_and_going_back_is_not_a_change(tmp_path, caplog):
    config_file = tmp_path / "routes.yaml"
    running = "listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0'}\n" + SECOND
    config_file.write_text(running)
    caplog.set_level(logging.INFO, "gateway")
    gateway = Gateway(load_config(config_file))
    await gateway.start()
    try:
        restart = "listen addresses changed"
        config_file.write_text(running.replace("127.0.0.1:0", "127.0.0.1:1", 1))
        assert await gateway.reload() is True
        assert sum(restart in r.getMessage() for r in caplog.records) == 1
        config_file.write_text(running)  # back to what the gateway listens on
        caplog.clear()
        assert await gateway.reload() is True
        assert not [r for r in caplog.records if restart in r.getMessage()]
        assert [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()] == [
            f"reloaded {config_file}: 1 route"
        ]
    finally:
        await gateway.stop()


async def test_flags_over_the_file_are_the_running_listen_addresses(tmp_path, caplog):
    config_file = tmp_path / "routes.yaml"
    config_file.write_text(SECOND)  # listen: the default 0.0.0.0:8080, never used here
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", 0)
    )
    await gateway.start()
    try:
        assert await gateway.reload() is True
        assert not [r for r in caplog.records if "needs a restart" in r.getMessage()]
    finally:
        await gateway.stop()
