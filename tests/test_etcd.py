"""The etcd backend against a real etcd (SPEC section 7): gateways share one registry,
and keep routing through etcd trouble.

Gateways run in this process (gateway_factory), etcd members as subprocesses on free
ports (tests/etcd.py). Waiting for a change to reach a gateway is a long poll of its
registry API, as a client would wait; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from registry.backends.etcd import PREFIX, EtcdBackend
from registry.backends.etcd_client import EtcdClient
from registry.core.store import Registry
from tests.conftest import (
    RunningGateway,
    fresh_get,
    settle,
    start_gateway_process,
    stop_gateway_process,
)
from tests.etcd import EtcdMember, start_cluster

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd not installed (the README's test command does)"
)

GatewayFactory = Callable[..., Awaitable[RunningGateway]]


def routes(*members: EtcdMember) -> str:
    endpoints = ",".join(m.address for m in members)
    return f"""
registry:
  backend: etcd://{endpoints}
routes:
  - prefix: /
    service: web
"""


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdMember]:
    member = EtcdMember("solo", tmp_path / "etcd")
    await member.start()
    yield member
    await member.stop()


async def instance_ids(gw: RunningGateway, service: str = "web") -> tuple[int, list[str]]:
    async with gw.session.get(f"{gw.admin_url}/registry/services/{service}") as response:
        body = await response.json()
        index = int(response.headers["X-Registry-Index"])
    return index, sorted(i["id"] for i in body.get("instances", []))


async def until_ids(
    gw: RunningGateway, expected: list[str], service: str = "web", timeout: float = 15.0
) -> None:
    """Long-polls ``gw``'s registry until ``service`` holds exactly ``expected``."""
    async with asyncio.timeout(timeout):
        index, ids = await instance_ids(gw, service)
        while ids != sorted(expected):
            url = f"{gw.admin_url}/registry/services/{service}?index={index}&wait=5s"
            async with gw.session.get(url) as response:
                body = await response.json()
                index = int(response.headers["X-Registry-Index"])
            ids = sorted(i["id"] for i in body.get("instances", []))


async def until_ready(gw: RunningGateway, ready: bool, timeout: float = 15.0) -> dict[str, Any]:
    """Polls /readyz (it has no long poll) until it says ``ready`` or not."""
    async with asyncio.timeout(timeout):
        delay = 0.02
        while True:
            async with gw.session.get(f"{gw.admin_url}/readyz") as response:
                body: dict[str, Any] = await response.json()
                if (response.status == 200) == ready:
                    return body
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)


async def get(gw: RunningGateway, path: str = "/") -> tuple[int, str]:
    """Status, and which upstream answered for which path (``web /x``) or the error code."""
    async with gw.session.get(gw.proxy_url + path) as response:
        body = await response.json()
        if response.status == 200:
            return 200, f"{body['upstream']} {body['path']}"
        return response.status, body["error"]["code"]


async def write(
    gw: RunningGateway, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    url = f"{gw.admin_url}/registry/services/web{path}"
    async with gw.session.request(method, url, json=body) as response:
        data = await response.json() if response.status != 204 else {}
        return response.status, data


# -- several gateways, one registry ------------------------------------------------------


async def test_registered_on_a_is_routed_by_b_and_deregistered_on_b_is_gone_on_a(
    etcd: EtcdMember, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    a = await gateway_factory(routes(etcd))
    b = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    registered = await a.register("web", web, id="w1")
    assert registered["expires_at"] is None  # the lease is etcd's
    assert registered["ttl"] == 30.0 and registered["heartbeat_interval"] == 10.0
    await until_ids(b, ["w1"])
    assert await get(b, "/x") == (200, "web /x")
    status, renewed = await write(b, "PUT", "/instances/w1/heartbeat")  # on the other one
    assert status == 200 and renewed["id"] == "w1"
    status, drained = await write(b, "PATCH", "/instances/w1", {"state": "draining"})
    assert status == 200 and drained["state"] == "draining"
    await until_ids(a, ["w1"])
    async with asyncio.timeout(10):
        while (await get(a))[0] != 503:  # A sees the drain: no new requests
            await asyncio.sleep(0.02)
    status, _ = await write(b, "DELETE", "/instances/w1")
    assert status == 204
    await until_ids(a, [])
    status, body = await write(a, "PUT", "/instances/w1/heartbeat")
    assert (status, body["error"]["code"]) == (404, "unknown_instance")
    status, body = await write(b, "DELETE", "/instances/w1")
    assert (status, body["error"]["code"]) == (404, "unknown_instance")


async def test_a_lease_that_is_not_renewed_ends_on_every_gateway(
    etcd: EtcdMember, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    a = await gateway_factory(routes(etcd))
    b = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    await a.register("web", web, id="short", ttl="2s")
    await a.register("web", web, id="kept", ttl="30s")
    await until_ids(b, ["kept", "short"])
    # Nobody renews "short": etcd ends its lease; both copies follow.
    await asyncio.gather(until_ids(a, ["kept"]), until_ids(b, ["kept"]))
    status, body = await write(b, "PUT", "/instances/short/heartbeat")
    assert (status, body["error"]["code"]) == (404, "unknown_instance")


async def test_a_re_registration_keeps_the_instance_on_a_new_lease(
    etcd: EtcdMember, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    a = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    client = EtcdClient([etcd.address])
    try:
        first = await a.register("web", web, id="w", metadata={"v": "1"})
        before = await client.get(f"{PREFIX}web/w")
        again = await a.register("web", web, id="w", metadata={"v": "2"})
        assert again["registered_at"] == first["registered_at"]
        after = await client.get(f"{PREFIX}web/w")
        assert before is not None and after is not None and b'"v": "2"' in after[1]
        assert after[3] != before[3]
        gone = await client.call("/v3/kv/lease/timetolive", {"ID": str(before[3])})
        assert gone["TTL"] == "-1"  # the old lease was revoked, not left to linger
        kept = await client.call("/v3/kv/lease/timetolive", {"ID": str(after[3])})
        assert 29 <= int(kept["TTL"]) <= 30  # a spare lease is renewed to the full ttl
    finally:
        await client.close()


# -- etcd trouble --------------------------------------------------------------------------


class Traffic:
    """GETs through a gateway, one after another, until stopped: every status kept."""

    def __init__(self, gw: RunningGateway) -> None:
        self.gw = gw
        self.statuses: list[int] = []
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> Traffic:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.statuses.append((await get(self.gw))[0])

    async def after(self, count: int) -> None:
        """Until ``count`` more requests are answered."""
        target = len(self.statuses) + count
        async with asyncio.timeout(10):
            while len(self.statuses) < target:
                await asyncio.sleep(0.01)


async def test_etcd_killed_and_restarted_mid_traffic_fails_no_request_and_catches_up(
    etcd: EtcdMember,
    gateway_factory: GatewayFactory,
    upstreams: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="registry.etcd")
    a = await gateway_factory(routes(etcd))
    b = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    await a.register("web", web, id="w1")
    await until_ids(b, ["w1"])
    with Traffic(b) as traffic:
        await traffic.after(20)
        await etcd.kill()
        body = await until_ready(b, False)
        assert body["status"] == "degraded" and "etcd unreachable" in body["reason"]
        status, refused = await write(a, "POST", "/instances", {"host": "127.0.0.1", "port": 1})
        assert (status, refused["error"]["code"]) == (503, "registry_unavailable")
        await traffic.after(20)  # routing goes on from the copy
        await etcd.start()
        await until_ready(a, True)
        await until_ready(b, True)
        await traffic.after(20)
    assert set(traffic.statuses) == {200}, traffic.statuses
    await a.register("web", web, id="w2")  # after the return: seen by the other one
    await until_ids(b, ["w1", "w2"])
    messages = [r.getMessage() for r in caplog.records if r.name == "registry.etcd"]
    assert sum("etcd unreachable" in m for m in messages) == 2  # one line a gateway
    assert sum("etcd reachable again" in m for m in messages) == 2
    # The stream dropped, the data stayed: each watch went on from its revision.
    assert not any("reading the whole registry again" in m for m in messages)


async def test_a_frozen_etcd_is_noticed_by_the_probe(
    etcd: EtcdMember, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    a = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    await a.register("web", web, id="w1")
    etcd.freeze()  # connections stay open, nothing answers: only a timeout can tell
    try:
        body = await until_ready(a, False)
        assert "timed out" in body["reason"]
        assert await get(a) == (200, "web /")
        status, refused = await write(a, "PUT", "/instances/w1/heartbeat")
        assert (status, refused["error"]["code"]) == (503, "registry_unavailable")
    finally:
        etcd.thaw()
    await until_ready(a, True)
    await a.register("web", web, id="w2")
    await until_ids(a, ["w1", "w2"])


async def test_a_wiped_etcd_revision_going_back_means_a_full_read(
    etcd: EtcdMember, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    a = await gateway_factory(routes(etcd))
    web = await upstreams("web")
    for name in ("w1", "w2", "w3"):
        await a.register("web", web, id=name)
    await until_ids(a, ["w1", "w2", "w3"])
    await etcd.kill()
    etcd.wipe()
    await etcd.start()  # empty, its revision back at 1
    await until_ids(a, [])  # the copy is what etcd holds now
    await until_ready(a, True)
    await a.register("web", web, id="w4")
    await until_ids(a, ["w4"])


async def stop_watching(backend: EtcdBackend) -> None:
    """The backend's watch stream is gone (as a dropped connection leaves it)."""
    assert backend._watch is not None
    backend._watch.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await backend._watch


async def test_a_dropped_watch_resumes_from_the_last_revision_it_applied(
    etcd: EtcdMember, caplog: pytest.LogCaptureFixture
) -> None:
    """While the stream is gone keys change; the new stream starts at the revision after
    the last one applied and replays each change (no full read), deletes included."""
    caplog.set_level(logging.INFO, logger="registry.etcd")
    store = Registry(lambda: 1_700_000_000.0)
    backend = EtcdBackend(store, [etcd.address])
    client = EtcdClient([etcd.address])
    try:
        await backend.start()
        await backend.register("web", {"host": "127.0.0.1", "port": 9001, "id": "stays"})
        await backend.register("web", {"host": "127.0.0.1", "port": 9002, "id": "goes"})
        await stop_watching(backend)
        await client.delete(f"{PREFIX}web/goes")
        value = b'{"id": "new", "host": "127.0.0.1", "port": 9003, "registered_at": 1, "ttl": 30}'
        await client.put(f"{PREFIX}web/new", value, await client.grant(30))
        backend._restart_watch()
        async with asyncio.timeout(10):
            while sorted(i.id for i in store.instances("web")) != ["new", "stays"]:
                await backend.wait_for_change("web", store.service_index("web"), 1.0)
        messages = [r.getMessage() for r in caplog.records if r.name == "registry.etcd"]
        assert not any("reading the whole registry again" in m for m in messages)
        assert "web/goes left the registry (deregistered, or its lease ended)" in messages
    finally:
        await backend.stop()
        await client.close()


async def test_a_compacted_start_revision_means_a_full_read(
    etcd: EtcdMember, caplog: pytest.LogCaptureFixture
) -> None:
    """The watch was away while keys changed and the history was compacted: it cannot
    resume from its revision; a full read brings the copy to what etcd holds."""
    caplog.set_level(logging.INFO, logger="registry.etcd")
    store = Registry(lambda: 1_700_000_000.0)
    backend = EtcdBackend(store, [etcd.address])
    client = EtcdClient([etcd.address])
    try:
        await backend.start()
        await backend.register("web", {"host": "127.0.0.1", "port": 9001, "id": "old"})
        synced = backend.revision
        await stop_watching(backend)  # the stream is gone for a while
        await client.delete(f"{PREFIX}web/old")
        value = b'{"id": "new", "host": "127.0.0.1", "port": 9002, "registered_at": 1, "ttl": 30}'
        lease = await client.grant(30)
        revision = await client.put(f"{PREFIX}web/new", value, lease)
        await client.compact(revision)
        assert [i.id for i in store.instances("web")] == ["old"]
        backend._restart_watch()  # from synced + 1: compacted
        async with asyncio.timeout(10):
            while [i.id for i in store.instances("web")] != ["new"]:
                await backend.wait_for_change("web", store.service_index("web"), 1.0)
        assert backend.revision >= revision > synced
        assert any("was compacted" in r.getMessage() for r in caplog.records)
    finally:
        await backend.stop()
        await client.close()


async def test_a_three_member_cluster_with_one_member_stopped_still_takes_writes(
    tmp_path: Path, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    members = await start_cluster(tmp_path / "cluster", 3)
    try:
        a = await gateway_factory(routes(*members))
        b = await gateway_factory(routes(*reversed(members)))
        web = await upstreams("web")
        await a.register("web", web, id="w1")
        await until_ids(b, ["w1"])
        await members[0].kill()  # the member A talks to first
        status, _ = await write(a, "POST", "/instances", {"host": "127.0.0.1", "port": web.port,
                                                         "id": "w2"})  # fmt: skip
        assert status == 201
        await until_ids(b, ["w1", "w2"])
        await b.register("web", web, id="w3")
        await until_ids(a, ["w1", "w2", "w3"])  # A's watch moved to a member that answers
        assert (await until_ready(a, True))["status"] == "ready"
    finally:
        for member in members:
            await member.stop()


async def test_gateway_starts_with_etcd_down_and_catches_up_when_it_comes(
    tmp_path: Path, gateway_factory: GatewayFactory, upstreams: Callable[..., Any]
) -> None:
    member = EtcdMember("late", tmp_path / "etcd")
    try:
        a = await gateway_factory(routes(member))
        body = await until_ready(a, False)
        assert "etcd" in body["reason"]
        await member.start()
        await until_ready(a, True)
        await a.register("web", await upstreams("web"), id="w1")
        assert await get(a) == (200, "web /")
    finally:
        await member.stop()


async def test_bad_bodies_are_refused_before_etcd_is_asked(
    etcd: EtcdMember, gateway_factory: GatewayFactory
) -> None:
    a = await gateway_factory(routes(etcd))
    status, body = await write(a, "POST", "/instances", {"host": "127.0.0.1", "port": 0})
    assert (status, body["error"]["code"]) == (400, "invalid_port")
    status, body = await write(a, "PATCH", "/instances/nope", {"state": "draining"})
    assert (status, body["error"]["code"]) == (404, "unknown_instance")
    client = EtcdClient([etcd.address])
    try:
        assert (await client.range_prefix("/"))[1] == []  # nothing was written
    finally:
        await client.close()


async def test_workers_follow_etcd_through_the_primary(
    etcd: EtcdMember,
    tmp_path: Path,
    gateway_factory: GatewayFactory,
    upstreams: Callable[..., Any],
) -> None:
    """--workers 2 on etcd: the primary watches etcd and feeds its workers, as it does
    with the memory backend; a registration made on another gateway reaches them all."""
    (tmp_path / "routes.yaml").write_text(routes(etcd))
    process = await start_gateway_process(tmp_path, "--workers", "2")
    try:
        other = await gateway_factory(routes(etcd))
        web = await upstreams("web")
        await other.register("web", web, id="w1")
        await settle(f"{process.proxy_url}/x", 200)
        assert [await fresh_get(f"{process.proxy_url}/x") for _ in range(30)] == [200] * 30
        status, _ = await write(other, "DELETE", "/instances/w1")
        assert status == 204
        await settle(f"{process.proxy_url}/x", 503)
        assert [await fresh_get(f"{process.proxy_url}/x") for _ in range(20)] == [503] * 20
    finally:
        await stop_gateway_process(process)


async def test_a_watch_that_stopped_delivering_is_started_over(etcd: EtcdMember) -> None:
    """The stream is there but nothing comes (a silently dead connection): the probe
    sees keys of the prefix newer than the copy at two probes in a row, and restarts it.
    Writes of other keys of a shared etcd do not count."""
    store = Registry(lambda: 1_700_000_000.0)
    backend = EtcdBackend(store, [etcd.address], probe_interval=0.05)
    client = EtcdClient([etcd.address])
    restarts = 0
    try:
        await backend.start()
        original = backend._restart_watch

        def counted() -> None:
            nonlocal restarts
            restarts += 1
            original()

        backend._restart_watch = counted  # type: ignore[method-assign]
        for number in range(20):  # another application's keys, in the same etcd
            await client.put(f"/other-app/{number}", b"x")
        store.declare("web")
        await backend.wait_for_change("web", store.service_index("web"), 0.3)  # 6 probes
        assert restarts == 0
        await stop_watching(backend)  # the stream goes silent: nothing delivers any more
        value = b'{"id": "w", "host": "127.0.0.1", "port": 9002, "registered_at": 1, "ttl": 30}'
        await client.put(f"{PREFIX}web/w", value, await client.grant(30))
        async with asyncio.timeout(10):
            while [i.id for i in store.instances("web")] != ["w"]:
                await backend.wait_for_change("web", 0, 1.0)
        assert restarts >= 1
    finally:
        await backend.stop()
        await client.close()
