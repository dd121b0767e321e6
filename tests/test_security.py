"""The front door (issue 10): what a registration may point the gateway at, and how
many it may hold. Through the real admin API of a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import yarl

from gateway.app import Gateway
from gateway.config.loader import parse_config
from gateway.dataplane.routing import normalize_path
from tests.conftest import RawServer, RunningGateway

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


TOKENS = """
admin:
  tokens:
    - {name: billing-deployer, token_env: T_BILLING, services: ["billing-*"]}
    - {name: dashboard, token_env: T_READ, role: read}
    - {name: unset, token_env: T_NOT_SET}
routes:
  - prefix: /
    service: billing-api
"""


async def call(
    gw: RunningGateway, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    url = f"{gw.admin_url}/registry/services{path}"
    async with gw.session.request(method, url, json=body, headers=headers) as response:
        return response.status, (await response.json() if response.status != 204 else {})


async def test_scoped_tokens_and_the_audit_log(
    gateway_factory: GatewayFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("T_BILLING", "b-secret")
    monkeypatch.setenv("T_READ", "r-secret")
    monkeypatch.delenv("T_NOT_SET", raising=False)
    caplog.set_level(logging.WARNING, logger="gateway")
    caplog.set_level(logging.INFO, logger="gateway.audit")  # last: it sets the handler's level
    gw = await gateway_factory(TOKENS)
    assert "admin token 'unset' is off: T_NOT_SET is not set" in caplog.text
    body = {"host": "10.0.0.1", "port": 80}
    status, answer = await call(gw, "POST", "/billing-api/instances", "b-secret", body)
    assert status == 201
    status, answer = await call(gw, "POST", "/users/instances", "b-secret", body)
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    assert answer["error"]["message"] == (
        "token 'billing-deployer' may not change service 'users' (it may change: billing-*)"
    )
    status, answer = await call(gw, "DELETE", "/billing-api/instances/10.0.0.1:80", "r-secret")
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    assert "may only read" in answer["error"]["message"]
    assert (await call(gw, "GET", "/billing-api", "r-secret"))[0] == 200  # reading is open
    for wrong in (None, "nope", "b-secret "[:-2]):
        status, answer = await call(gw, "GET", "", wrong)
        assert (status, answer["error"]["code"]) == (401, "unauthorized")
    status, _ = await call(gw, "PUT", "/billing-api/instances/10.0.0.1:80/heartbeat", "b-secret")
    assert status == 200
    status, _ = await call(gw, "DELETE", "/billing-api/instances/10.0.0.1:80", "b-secret")
    assert status == 204
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.audit"]
    assert [(a["token"], a["method"], a["service"], a["instance"], a["status"]) for a in lines] == [
        ("billing-deployer", "POST", "billing-api", "10.0.0.1:80", 201),
        ("billing-deployer", "POST", "users", None, 403),
        ("dashboard", "DELETE", "billing-api", "10.0.0.1:80", 403),
        ("billing-deployer", "DELETE", "billing-api", "10.0.0.1:80", 204),
    ]  # heartbeats and reads are not changes: not audited
    assert all(a["client"] == "127.0.0.1" and a["time"].endswith("Z") for a in lines)


def test_tokens_config_mistakes_name_their_lines() -> None:
    from gateway.config.model import ConfigError

    text = """admin:
  tokens:
    - {name: a, token_env: A, role: admin}
    - {name: a, token_env: B, services: ["Bad Name"]}
    - {token_env: C}
"""
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    assert refused.value.errors == [
        "routes.yaml:3: admin.tokens[0].role: must be write or read, got 'admin'",
        "routes.yaml:4: admin.tokens[1].name: duplicate token name 'a'",
        "routes.yaml:4: admin.tokens[1].services[0]: a service name or glob like billing-*, "
        "got 'Bad Name'",
        "routes.yaml:5: admin.tokens[2]: missing key 'name'",
    ]


class Malicious(RawServer):
    """An upstream whose answer is not valid HTTP/1.1 framing, in one of the ways a
    response-splitting or desync attack would need."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(self.answer)
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the gateway closes the connection


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Split: a\rSet-Cookie: evil=1\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Split: a\nSet-Cookie: evil=1\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nX-Null: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["two-lengths", "length-and-chunked", "bare-cr", "bare-lf", "nul", "negative", "bad-chunk"],
)
async def test_a_malicious_upstream_answer_is_a_502_never_passed_on(
    gateway_factory: GatewayFactory, answer: bytes
) -> None:
    upstream = Malicious(answer)
    port = await upstream.start()
    try:
        gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n    retries: 0\n")
        status, _ = await post(gw, {"host": "127.0.0.1", "port": port})
        assert status == 201
        async with gw.session.get(gw.proxy_url + "/x") as response:
            body = await response.read()
            assert response.status == 502, body
            assert "Set-Cookie" not in response.headers and "X-Split" not in response.headers
        assert json.loads(body)["error"]["code"] == "upstream_protocol_error"
        assert b"hello" not in body
    finally:
        await upstream.stop()


@pytest.mark.parametrize("trusted", [False, True])
async def test_forwarding_headers_depend_on_trusted_proxies(
    gateway_factory: GatewayFactory, upstreams: Any, trusted: bool
) -> None:
    text = "routes:\n  - prefix: /\n    service: web\n"
    if trusted:
        text += "proxy:\n  trusted_proxies: [127.0.0.0/8, 10.0.0.0/8]\n"
    gw = await gateway_factory(text)
    await gw.register("web", await upstreams("web"))
    sent = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https",
            "Forwarded": "for=203.0.113.7;proto=https", "Via": "1.1 edge"}  # fmt: skip
    async with gw.session.get(gw.proxy_url + "/x", headers=sent) as response:
        assert response.status == 200
        assert response.headers.getall("Via") == ["1.1 gateway"]
        pairs = (await response.json())["headers"]
    got = dict(pairs)
    if trusted:  # the proxy in front is believed, and this hop added
        assert got["X-Forwarded-For"] == "203.0.113.7, 127.0.0.1"
        assert got["X-Forwarded-Proto"] == "https"
        assert got["Forwarded"] == "for=203.0.113.7;proto=https, for=127.0.0.1;proto=http;host=" + (
            gw.proxy_url.removeprefix("http://")
        )
    else:  # a client's claims about itself are replaced
        assert got["X-Forwarded-For"] == "127.0.0.1"
        assert got["X-Forwarded-Proto"] == "http"
        assert got["Forwarded"].startswith("for=127.0.0.1;proto=http")
    # The client's Via goes on, and the gateway's after it.
    assert [value for name, value in pairs if name == "Via"] == ["1.1 edge", "1.1 gateway"]


def test_trusted_proxies_must_be_addresses_or_cidrs() -> None:
    from gateway.config.model import ConfigError

    with pytest.raises(ConfigError) as refused:
        parse_config("proxy:\n  trusted_proxies: [10.0.0.0/8, everyone]\n")
    assert refused.value.errors == [
        "routes.yaml:2: proxy.trusted_proxies[1]: not an IP address or CIDR "
        "(like 10.0.0.0/8): 'everyone'"
    ]


@pytest.mark.parametrize(
    "path",
    [
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin/x",
        "/public/.%2e/admin",
        "/public/./../admin",
        "/public/..%2fadmin",
        "/public%2f..%2fadmin",
        "/public/%252e%252e/admin",
        "/public//../admin",
    ],
)
async def test_path_probes_reach_only_the_service_whose_prefix_they_are_in(
    gateway_factory: GatewayFactory, upstreams: Any, path: str
) -> None:
    """Whatever the encoding, the service that gets a request gets a path inside its own
    prefix, as it will read it: a dot segment in %2e is a dot segment (RFC 3986), an
    encoded slash is not a separator. Nothing reaches the public service as /admin."""
    gw = await gateway_factory("""
routes:
  - prefix: /public
    service: public
  - prefix: /admin
    service: admin
""")
    public, admin = await upstreams("public"), await upstreams("admin")
    await gw.register("public", public)
    await gw.register("admin", admin)
    async with gw.session.get(yarl.URL(gw.proxy_url + path, encoded=True)) as response:
        assert response.status in (200, 404)
    for upstream, prefix in ((public, "/public"), (admin, "/admin")):
        for request in upstream.requests:
            decoded = normalize_path(request["path"].replace("%2e", ".").replace("%2E", "."))
            assert decoded == prefix or decoded.startswith(prefix + "/"), (path, request)
    assert all("admin" not in r["path"].split("/")[1:2] for r in public.requests)


async def test_a_host_name_is_checked_for_what_it_resolves_to(
    gateway_factory: GatewayFactory,
    upstreams: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A registration may name a host; when the gateway connects, the addresses the name
    resolves to then are held to the same rules (DNS pointing at cloud metadata)."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    names = {"metadata.test": "169.254.169.254", "good.test": "127.0.0.1"}

    async def resolve(host: Any, port: Any, **kw: Any) -> Any:
        if host in names:
            return await real(names[host], port, **kw)
        return await real(host, port, **kw)

    monkeypatch.setattr(loop, "getaddrinfo", resolve)
    gw = await gateway_factory(
        "routes:\n  - prefix: /bad\n    service: bad\n    retries: 0\n"
        "  - prefix: /\n    service: web\n"
    )
    up = await upstreams("web")
    assert (await post(gw, {"host": "metadata.test", "port": 80}, service="bad"))[0] == 201
    assert (await post(gw, {"host": "good.test", "port": up.port}))[0] == 201
    async with gw.session.get(gw.proxy_url + "/bad") as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    assert "metadata.test resolves to 169.254.169.254, is link-local" in caplog.text
    async with gw.session.get(gw.proxy_url + "/fine") as response:
        assert response.status == 200  # a name that resolves to an allowed address works
    assert len(up.requests) == 1
