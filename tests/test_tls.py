"""TLS (issue 10 item 1): the proxy listener terminates it, certificate files reload on
SIGHUP without dropping connections, the admin listener may speak it, and https
instances are verified. Certificates from trustme: a CA of the test's own."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from gateway.app import Gateway
from gateway.config.loader import load_config
from gateway.config.model import ConfigError
from tests.conftest import RunningGateway


def write_pair(ca: trustme.CA, folder: Path, name: str) -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        with cert_file.open("ab") as out:
            out.write(extra.bytes())
    return cert_file, key_file


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def start(folder: Path, text: str) -> Gateway:
    (folder / "routes.yaml").write_text(text)
    gateway = Gateway(
        load_config(folder / "routes.yaml"),
        listen=("127.0.0.1", 0),
        admin_listen=("127.0.0.1", 0),
    )
    await gateway.start()
    return gateway


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def register(gw: RunningGateway, port: int, **extra: Any) -> None:
    body = {"host": "127.0.0.1", "port": port, **extra}
    url = f"{gw.admin_url}/registry/services/web/instances"
    async with gw.session.post(url, json=body) as response:
        assert response.status == 201, await response.text()


ROUTES = """
routes:
  - prefix: /
    service: web
"""


async def test_the_proxy_listener_terminates_tls_and_says_so_upstream(
    tmp_path: Path, session: aiohttp.ClientSession, upstreams: Any
) -> None:
    ca = trustme.CA()
    write_pair(ca, tmp_path, "proxy")
    gateway = await start(tmp_path, "tls: {cert: proxy.pem, key: proxy.key}\n" + ROUTES)
    try:
        gw = RunningGateway(gateway, session)
        web_up = await upstreams("web")
        await register(gw, web_up.port)
        url = f"https://127.0.0.1:{gateway.proxy_port}/x"
        async with session.get(url, ssl=client_context(ca)) as response:
            assert response.status == 200
            body = await response.json()
        headers = dict(body["headers"])
        assert headers["X-Forwarded-Proto"] == "https"
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(url, ssl=ssl.create_default_context())  # not our CA: refused
    finally:
        await gateway.stop()


async def _get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive GET on an open connection; the status line."""
    writer.write(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    await reader.readexactly(length)
    return head.split(b"\r\n")[0]


async def test_a_reload_takes_new_certificate_files_and_keeps_connections(
    tmp_path: Path, session: aiohttp.ClientSession, upstreams: Any
) -> None:
    old_ca, new_ca = trustme.CA(), trustme.CA()
    write_pair(old_ca, tmp_path, "proxy")
    gateway = await start(tmp_path, "tls: {cert: proxy.pem, key: proxy.key}\n" + ROUTES)
    try:
        await register(RunningGateway(gateway, session), (await upstreams("web")).port)
        port = gateway.proxy_port
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(old_ca)
        )
        assert await _get_on(reader, writer) == b"HTTP/1.1 200 OK"
        write_pair(new_ca, tmp_path, "proxy")  # the operator renews the certificate
        assert await gateway.reload() is True
        assert await _get_on(reader, writer) == b"HTTP/1.1 200 OK"  # the same connection
        writer.close()
        url = f"https://127.0.0.1:{port}/x"
        async with session.get(url, ssl=client_context(new_ca)) as response:
            assert response.status == 200  # a new handshake: the new certificate
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await session.get(url, ssl=client_context(old_ca))
    finally:
        await gateway.stop()


async def test_the_admin_listener_may_speak_tls(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    ca = trustme.CA()
    write_pair(ca, tmp_path, "admin")
    gateway = await start(tmp_path, "admin:\n  tls: {cert: admin.pem, key: admin.key}\n" + ROUTES)
    try:
        url = f"https://127.0.0.1:{gateway.admin_port}/registry/services"
        async with session.get(url, ssl=client_context(ca)) as response:
            assert response.status == 200
            assert (await response.json())["services"][0]["name"] == "web"
    finally:
        await gateway.stop()


class TlsUpstream:
    """An https instance whose certificate a test CA signed."""

    def __init__(self, ca: trustme.CA) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1").configure_cert(self.context)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text=f"tls {request.path}")

        app = web.Application()
        app.router.add_get("/{tail:.*}", hello)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.parametrize(
    ("proxy", "status"),
    [
        ("proxy: {upstream_ca: ca.pem}\n", 200),  # verified against the configured CA
        ("", 502),  # the system's CAs do not know this one
        ("proxy: {upstream_tls_verify: false}\n", 200),  # by explicit choice only
    ],
)
async def test_https_instances_are_verified(
    tmp_path: Path, session: aiohttp.ClientSession, proxy: str, status: int
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    upstream = TlsUpstream(ca)
    await upstream.start()
    gateway = await start(tmp_path, proxy + ROUTES + "    retries: 0\n")
    try:
        gw = RunningGateway(gateway, session)
        await register(gw, upstream.port, scheme="https")
        async with session.get(f"http://127.0.0.1:{gateway.proxy_port}/a") as response:
            assert response.status == status
            if status == 200:
                assert await response.text() == "tls /a"
            else:
                assert (await response.json())["error"]["code"] == "upstream_unavailable"
    finally:
        await gateway.stop()
        await upstream.stop()


def test_a_wrong_pair_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    ca = trustme.CA()
    write_pair(ca, tmp_path, "one")
    write_pair(ca, tmp_path, "two")
    (tmp_path / "routes.yaml").write_text("tls:\n  cert: one.pem\n  key: two.key\n" + ROUTES)
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "routes.yaml")
    assert refused.value.errors == [
        f"{tmp_path / 'routes.yaml'}:2: tls: cannot load the certificate and key: "
        "key values mismatch"
    ]
    (tmp_path / "routes.yaml").write_text("tls:\n  cert: one.pem\n  key: nothere.key\n")
    with pytest.raises(ConfigError) as missing:
        load_config(tmp_path / "routes.yaml")
    assert missing.value.errors == [
        f"{tmp_path / 'routes.yaml'}:3: tls.key: no file {tmp_path / 'nothere.key'}"
    ]
    (tmp_path / "routes.yaml").write_text("tls:\n  cert: one.pem\n")
    with pytest.raises(ConfigError) as half:
        load_config(tmp_path / "routes.yaml")
    assert half.value.errors == [
        f"{tmp_path / 'routes.yaml'}:2: tls: key is missing (tls needs cert and key, PEM files)"
    ]
