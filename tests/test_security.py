"""The front door (issue 10): what a registration may point the gateway at, and how
many it may hold. Through the real admin API of a running gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.app import Gateway
from gateway.config.loader import parse_config
from tests.conftest import RunningGateway

GatewayFactory = Callable[..., Awaitable[RunningGateway]]


async def post(gw: RunningGateway, body: dict[str, Any], service: str = "web",
               token: str | None = None) -> tuple[int, dict[str, Any]]:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{gw.admin_url}/registry/services/{service}/instances"
    async with gw.session.post(url, json=body, headers=headers) as response:
        return response.status, await response.json()


async def test_metadata_addresses_and_the_gateways_own_ports_are_refused(
    gateway_factory: GatewayFactory,
) -> None:
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    for body, words in [
        ({"host": "169.254.169.254", "port": 80}, "link-local"),
        ({"host": "fe80::1", "port": 80}, "link-local"),
        ({"host": "224.0.0.251", "port": 5353}, "multicast"),
        ({"host": "127.0.0.1", "port": gw.gateway.proxy_port}, "own listener"),
        ({"host": "localhost", "port": gw.gateway.admin_port}, "own listener"),
    ]:
        status, answer = await post(gw, body)
        assert status == 400 and answer["error"]["code"] == "invalid_host", (body, answer)
        assert words in answer["error"]["message"]
    async with gw.session.get(f"{gw.admin_url}/registry/services/web") as response:
        assert (await response.json())["instances"] == []  # nothing was stored
    status, _ = await post(gw, {"host": "127.0.0.1", "port": 9000})  # admin on loopback
    assert status == 201


@pytest.mark.parametrize("allow", [False, True])
async def test_loopback_with_the_admin_off_loopback(
    allow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADMIN_SECRET", "s3cret")
    text = f"""
admin:
  token_env: ADMIN_SECRET
registry:
  allow_loopback: {"true" if allow else "false"}
routes:
  - prefix: /
    service: web
"""
    gateway = Gateway(parse_config(text), listen=("127.0.0.1", 0), admin_listen=("0.0.0.0", 0))
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            gw = RunningGateway(gateway, session)
            status, answer = await post(gw, {"host": "127.0.0.1", "port": 9000}, token="s3cret")
            if allow:
                assert status == 201
            else:
                assert (status, answer["error"]["code"]) == (400, "invalid_host")
                assert "registry.allow_loopback" in answer["error"]["message"]
            status, _ = await post(gw, {"host": "10.1.2.3", "port": 9000}, token="s3cret")
            assert status == 201
    finally:
        await gateway.stop()


async def test_the_caps_answer_429_and_503(gateway_factory: GatewayFactory) -> None:
    gw = await gateway_factory("""
registry:
  max_instances: 3
  max_instances_per_service: 2
routes:
  - prefix: /
    service: web
""")
    assert (await post(gw, {"host": "10.0.0.1", "port": 1}))[0] == 201
    assert (await post(gw, {"host": "10.0.0.2", "port": 1}))[0] == 201
    status, answer = await post(gw, {"host": "10.0.0.3", "port": 1})
    assert (status, answer["error"]["code"]) == (429, "too_many_instances")
    assert (await post(gw, {"host": "10.0.0.2", "port": 1, "weight": 3}))[0] == 200
    assert (await post(gw, {"host": "10.0.0.4", "port": 1}, service="other"))[0] == 201
    url = f"{gw.admin_url}/registry/services/third/instances"
    async with gw.session.post(url, json={"host": "10.0.0.5", "port": 1}) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "5"
        assert (await response.json())["error"]["code"] == "registry_full"
