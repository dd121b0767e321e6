"""The registry API on a real admin listener (SPEC sections 4 and 8)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Gateway, StartupError
from gateway.config.loader import parse_config
from tests.fakes import FakeClock

ROUTES = """
registry:
  default_ttl: 12s
  max_ttl: 1m
routes:
  - prefix: /api
    service: api
  - prefix: /web
    service: web
"""

INSTANCE_FIELDS = {
    "id",
    "host",
    "port",
    "scheme",
    "weight",
    "state",
    "health",
    "in_flight",
    "metadata",
    "registered_at",
    "last_heartbeat",
    "expires_at",
    "health_reason",  # beyond SPEC's list: null while healthy
    "health_until",
}


def _time(text: str) -> float:
    """Seconds since the epoch from an RFC 3339 UTC time as the API writes it."""
    assert text.endswith("Z"), text
    return datetime.fromisoformat(text).astimezone(UTC).timestamp()


async def _call(gw, method, path, **kwargs):
    """(status, JSON body or None, headers) of one admin request."""
    async with gw.session.request(method, gw.admin_url + path, **kwargs) as response:
        text = await response.text()
        body = json.loads(text) if text else None
        return response.status, body, response.headers


def _assert_error(status, body, expected_status, code):
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def _instances(gw, service="api"):
    status, body, _ = await _call(gw, "GET", f"/registry/services/{service}")
    assert status == 200, body
    return body["instances"]


# -- register ------------------------------------------------------------------


async def test_register_new_then_update(gateway_factory):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    body = {"host": "10.0.0.5", "port": 9000, "ttl": "30s", "metadata": {"version": "1.4"}}
    status, first, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert status == 201
    assert set(first) == INSTANCE_FIELDS | {"ttl", "heartbeat_interval"}
    assert first["id"] == "10.0.0.5:9000"
    assert first["host"] == "10.0.0.5" and first["port"] == 9000
    assert first["scheme"] == "http" and first["weight"] == 1
    assert first["state"] == "up" and first["health"] == "healthy"
    assert first["in_flight"] == 0
    assert first["metadata"] == {"version": "1.4"}
    assert first["ttl"] == 30
    assert first["heartbeat_interval"] == pytest.approx(10.0)
    assert _time(first["registered_at"]) == clock.now
    assert _time(first["last_heartbeat"]) == clock.now
    assert _time(first["expires_at"]) == clock.now + 30

    clock.advance(2)
    again = {**body, "weight": 7, "metadata": {"version": "1.5"}}
    status, second, _ = await _call(gw, "POST", "/registry/services/api/instances", json=again)
    assert status == 200
    assert second["id"] == "10.0.0.5:9000"
    assert second["weight"] == 7 and second["metadata"] == {"version": "1.5"}
    assert _time(second["expires_at"]) == clock.now + 30
    assert [i["id"] for i in await _instances(gw)] == ["10.0.0.5:9000"]


@pytest.mark.parametrize("ttl", ["30s", 30, 30.0, "0.5m"])
async def test_ttl_as_duration_or_number(gateway_factory, ttl):
    gw = await gateway_factory(ROUTES)
    body = {"host": "127.0.0.1", "port": 9000, "ttl": ttl}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert status == 201, answer
    assert answer["ttl"] == 30
    assert answer["heartbeat_interval"] == pytest.approx(10.0)


async def test_heartbeat_interval_may_be_fractional(gateway_factory):
    gw = await gateway_factory(ROUTES)
    body = {"host": "127.0.0.1", "port": 9000, "ttl": "1s"}
    _, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert answer["ttl"] == 1
    assert answer["heartbeat_interval"] == pytest.approx(1 / 3)


async def test_default_ttl_comes_from_config(gateway_factory):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    body = {"host": "127.0.0.1", "port": 9000}
    _, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert answer["ttl"] == 12
    assert answer["heartbeat_interval"] == pytest.approx(4.0)
    assert _time(answer["expires_at"]) == clock.now + 12


@pytest.mark.parametrize(
    ("host", "stored", "instance_id"),
    [
        ("127.0.0.1", "127.0.0.1", "127.0.0.1:9000"),
        ("::1", "::1", "[::1]:9000"),
        ("2001:DB8:0:0::42", "2001:db8::42", "[2001:db8::42]:9000"),
        ("::ffff:10.0.0.1", "10.0.0.1", "10.0.0.1:9000"),
        ("users-1.internal.example", "users-1.internal.example", "users-1.internal.example:9000"),
    ],
)
async def test_default_id_is_host_port(gateway_factory, host, stored, instance_id):
    gw = await gateway_factory(ROUTES)
    body = {"host": host, "port": 9000}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert status == 201, answer
    assert answer["id"] == instance_id
    assert answer["host"] == stored
    status, _, _ = await _call(
        gw, "PUT", f"/registry/services/api/instances/{instance_id}/heartbeat"
    )
    assert status == 200


async def test_chosen_id_and_https_scheme(gateway_factory):
    gw = await gateway_factory(ROUTES)
    body = {"host": "127.0.0.1", "port": 9443, "id": "api-[a]:1.x_y", "scheme": "https"}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert status == 201, answer
    assert answer["id"] == "api-[a]:1.x_y" and answer["scheme"] == "https"


async def test_service_names_at_the_edges_are_accepted(gateway_factory):
    gw = await gateway_factory(ROUTES)
    for name in ("a", "0.svc_name-x", "a" * 63):
        body = {"host": "127.0.0.1", "port": 9000}
        status, answer, _ = await _call(
            gw, "POST", f"/registry/services/{name}/instances", json=body
        )
        assert status == 201, (name, answer)


# -- validation ------------------------------------------------------------------

OK = {"host": "127.0.0.1", "port": 9000}


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({**OK, "host": "0.0.0.0"}, "invalid_host"),
        ({**OK, "host": "::"}, "invalid_host"),
        ({**OK, "host": "http://x"}, "invalid_host"),
        ({**OK, "host": "x:80"}, "invalid_host"),
        ({**OK, "host": ""}, "invalid_host"),
        ({**OK, "host": 10}, "invalid_host"),
        ({"port": 9000}, "invalid_host"),
        ({**OK, "port": "9000"}, "invalid_port"),
        ({**OK, "port": 9000.0}, "invalid_port"),
        ({**OK, "port": 0}, "invalid_port"),
        ({**OK, "port": 70000}, "invalid_port"),
        ({**OK, "port": True}, "invalid_port"),
        ({"host": "127.0.0.1"}, "invalid_port"),
        ({**OK, "weight": 0}, "invalid_weight"),
        ({**OK, "weight": 101}, "invalid_weight"),
        ({**OK, "weight": "5"}, "invalid_weight"),
        ({**OK, "ttl": "0.5s"}, "invalid_ttl"),
        ({**OK, "ttl": 0.5}, "invalid_ttl"),
        ({**OK, "ttl": "2m"}, "invalid_ttl"),
        ({**OK, "ttl": 61}, "invalid_ttl"),
        ({**OK, "ttl": "soon"}, "invalid_ttl"),
        ({**OK, "ttl": -5}, "invalid_ttl"),
        ({**OK, "metadata": {"version": 1}}, "invalid_metadata"),
        ({**OK, "metadata": {f"k{i}": "v" for i in range(65)}}, "invalid_metadata"),
        ({**OK, "metadata": ["a"]}, "invalid_metadata"),
        ({**OK, "id": "has space"}, "invalid_id"),
        ({**OK, "id": "x" * 129}, "invalid_id"),
        ({**OK, "id": ""}, "invalid_id"),
        ({**OK, "id": 5}, "invalid_id"),
        ({**OK, "scheme": "ftp"}, "invalid_scheme"),
        ({**OK, "scheme": "HTTP"}, "invalid_scheme"),
    ],
)
async def test_register_field_errors(gateway_factory, body, code):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    _assert_error(status, answer, 400, code)
    assert await _instances(gw) == []


@pytest.mark.parametrize(
    "host",
    ["0", "0.0.0", "2130706433", "0x7f.1", "127.1", "0177.0.0.1", "::ffff:0.0.0.0", "fe80::1%eth0"],
)
async def test_host_that_only_a_resolver_reads_as_an_address_is_refused(gateway_factory, host):
    gw = await gateway_factory(ROUTES)
    body = {**OK, "host": host}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    _assert_error(status, answer, 400, "invalid_host")
    assert "dotted-quad" in answer["error"]["message"]
    assert await _instances(gw) == []


async def test_metadata_of_64_keys_is_accepted(gateway_factory):
    gw = await gateway_factory(ROUTES)
    body = {**OK, "metadata": {f"k{i}": "v" for i in range(64)}}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    assert status == 201, answer
    assert len(answer["metadata"]) == 64


@pytest.mark.parametrize("name", ["Bad_Name", "a" * 64, "-lead", "_x", "a%2Fb"])
async def test_bad_service_name_in_path(gateway_factory, name):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(gw, "POST", f"/registry/services/{name}/instances", json=OK)
    _assert_error(status, answer, 400, "invalid_service")


@pytest.mark.parametrize("data", [b"{bad", b"[1, 2]", b"", b'"text"', b"\xff\xfe"])
async def test_invalid_json(gateway_factory, data):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(
        gw,
        "POST",
        "/registry/services/api/instances",
        data=data,
        headers={"Content-Type": "application/json"},
    )
    _assert_error(status, answer, 400, "invalid_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
async def test_body_must_be_json(gateway_factory, content_type):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(
        gw,
        "POST",
        "/registry/services/api/instances",
        data=json.dumps(OK).encode(),
        headers={"Content-Type": content_type},
    )
    _assert_error(status, answer, 415, "unsupported_media_type")


async def test_json_with_charset_is_json(gateway_factory):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(
        gw,
        "POST",
        "/registry/services/api/instances",
        data=json.dumps(OK).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert status == 201, answer


async def test_body_over_64kib_is_413(gateway_factory):
    gw = await gateway_factory(ROUTES)
    body = {**OK, "metadata": {"blob": "x" * (64 * 1024)}}
    status, answer, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    _assert_error(status, answer, 413, "payload_too_large")
    assert await _instances(gw) == []


async def _pieces(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start : start + size]
        await asyncio.sleep(0)  # let each piece go out on its own


async def test_chunked_body_over_64kib_is_413(gateway_factory):
    gw = await gateway_factory(ROUTES)
    data = json.dumps({**OK, "metadata": {"blob": "x" * (70 * 1024)}}).encode()
    status, answer, _ = await _call(
        gw,
        "POST",
        "/registry/services/api/instances",
        data=_pieces(data, 8192),
        headers={"Content-Type": "application/json"},
    )
    _assert_error(status, answer, 413, "payload_too_large")


async def test_body_that_arrives_in_pieces_is_read_whole(gateway_factory):
    gw = await gateway_factory(ROUTES)
    data = json.dumps({**OK, "metadata": {"blob": "x" * 40000}}).encode()
    status, answer, _ = await _call(
        gw,
        "POST",
        "/registry/services/api/instances",
        data=_pieces(data, 4096),
        headers={"Content-Type": "application/json"},
    )
    assert status == 201, answer
    assert len(answer["metadata"]["blob"]) == 40000


async def test_body_with_content_length_in_two_writes_is_read_whole(gateway_factory):
    gw = await gateway_factory(ROUTES)
    data = json.dumps({**OK, "metadata": {"blob": "x" * 40000}}).encode()
    head = (
        "POST /registry/services/api/instances HTTP/1.1\r\n"
        f"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.gateway.admin_port)
    try:
        writer.write(head + data[:1000])
        await writer.drain()
        await asyncio.sleep(0.05)  # the rest of the body comes in a later segment
        writer.write(data[1000:])
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    assert status_line.startswith(b"HTTP/1.1 201"), status_line


# -- heartbeat, deregister, patch -------------------------------------------------


async def test_heartbeat_extends_the_lease(gateway_factory):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    body = {**OK, "ttl": "10s"}
    _, registered, _ = await _call(gw, "POST", "/registry/services/api/instances", json=body)
    clock.advance(6)
    status, renewed, _ = await _call(
        gw, "PUT", "/registry/services/api/instances/127.0.0.1:9000/heartbeat"
    )
    assert status == 200, renewed
    assert renewed["id"] == "127.0.0.1:9000"
    assert _time(renewed["expires_at"]) == _time(registered["expires_at"]) + 6
    assert _time(renewed["last_heartbeat"]) == clock.now
    assert _time(renewed["registered_at"]) == _time(registered["registered_at"])
    clock.advance(6)  # past the first lease, inside the renewed one
    assert [i["id"] for i in await _instances(gw)] == ["127.0.0.1:9000"]


@pytest.mark.parametrize(
    "path",
    [
        "/registry/services/api/instances/127.0.0.1:1/heartbeat",
        "/registry/services/never-seen/instances/127.0.0.1:9000/heartbeat",
    ],
)
async def test_heartbeat_of_unknown_instance_is_404(gateway_factory, path):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    status, answer, _ = await _call(gw, "PUT", path)
    _assert_error(status, answer, 404, "unknown_instance")


async def test_heartbeat_after_the_lease_ended_is_404(gateway_factory):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "ttl": "2s"})
    clock.advance(2)
    status, answer, _ = await _call(
        gw, "PUT", "/registry/services/api/instances/127.0.0.1:9000/heartbeat"
    )
    _assert_error(status, answer, 404, "unknown_instance")
    status, _, _ = await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    assert status == 201  # registering again after the 404 makes a new instance


async def test_deregister_then_unknown(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    path = "/registry/services/api/instances/127.0.0.1:9000"
    async with gw.session.delete(gw.admin_url + path) as response:
        assert response.status == 204
        assert await response.read() == b""
    assert await _instances(gw) == []
    status, answer, _ = await _call(gw, "DELETE", path)
    _assert_error(status, answer, 404, "unknown_instance")
    status, answer, _ = await _call(gw, "PUT", path + "/heartbeat")
    _assert_error(status, answer, 404, "unknown_instance")
    status, answer, _ = await _call(gw, "PATCH", path, json={"weight": 2})
    _assert_error(status, answer, 404, "unknown_instance")


async def test_patch_weight_metadata_state(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    path = "/registry/services/api/instances/127.0.0.1:9000"
    change = {"weight": 5, "metadata": {"zone": "b"}, "state": "draining"}
    status, answer, _ = await _call(gw, "PATCH", path, json=change)
    assert status == 200, answer
    assert set(answer) >= INSTANCE_FIELDS
    assert (answer["weight"], answer["metadata"], answer["state"]) == (5, {"zone": "b"}, "draining")
    [listed] = await _instances(gw)
    assert (listed["weight"], listed["metadata"], listed["state"]) == (5, {"zone": "b"}, "draining")
    status, answer, _ = await _call(gw, "PATCH", path, json={"state": "up"})
    assert status == 200
    assert (answer["weight"], answer["metadata"], answer["state"]) == (5, {"zone": "b"}, "up")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"state": "down"}, "invalid_state"),
        ({"state": None}, "invalid_state"),
        ({"weight": 0}, "invalid_weight"),
        ({"metadata": {"a": 1}}, "invalid_metadata"),
    ],
)
async def test_patch_field_errors(gateway_factory, body, code):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    path = "/registry/services/api/instances/127.0.0.1:9000"
    status, answer, _ = await _call(gw, "PATCH", path, json=body)
    _assert_error(status, answer, 400, code)
    [listed] = await _instances(gw)
    assert (listed["state"], listed["weight"], listed["metadata"]) == ("up", 1, {})


async def test_patch_body_must_be_a_json_object(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    path = "/registry/services/api/instances/127.0.0.1:9000"
    status, answer, _ = await _call(gw, "PATCH", path, json=["draining"])
    _assert_error(status, answer, 400, "invalid_json")
    status, answer, _ = await _call(
        gw, "PATCH", path, data=b"state=draining", headers={"Content-Type": "text/plain"}
    )
    _assert_error(status, answer, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "data",
    [b"[" * 3000, b'{"a":' * 3000, b"[" * 3000 + b"]" * 3000],
    ids=["open-arrays", "open-objects", "closed-arrays"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/registry/services/api/instances"),
        ("PATCH", "/registry/services/api/instances/127.0.0.1:9000"),
    ],
)
async def test_json_nested_too_deeply_is_invalid_json(gateway_factory, method, path, data):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    status, answer, _ = await _call(
        gw, method, path, data=data, headers={"Content-Type": "application/json"}
    )
    _assert_error(status, answer, 400, "invalid_json")
    [listed] = await _instances(gw)
    assert (listed["state"], listed["weight"]) == ("up", 1)


async def test_drain_and_deregister_when_idle_removes_idle_instance(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "port": 9001})
    path = "/registry/services/api/instances/127.0.0.1:9000"
    change = {"state": "draining", "deregister_when_idle": True}
    status, answer, _ = await _call(gw, "PATCH", path, json=change)
    assert status == 200, answer
    assert [i["id"] for i in await _instances(gw)] == ["127.0.0.1:9001"]
    status, answer, _ = await _call(gw, "PUT", path + "/heartbeat")
    _assert_error(status, answer, 404, "unknown_instance")


# -- reading the registry ----------------------------------------------------------


async def test_services_lists_counts(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "port": 9001})
    await _call(gw, "POST", "/registry/services/other/instances", json=OK)
    await _call(
        gw,
        "PATCH",
        "/registry/services/api/instances/127.0.0.1:9001",
        json={"state": "draining"},
    )
    status, answer, headers = await _call(gw, "GET", "/registry/services")
    assert status == 200
    assert set(answer) == {"services"}
    by_name = {s["name"]: s for s in answer["services"]}
    assert by_name["api"] == {"name": "api", "instances": 2, "healthy": 1}
    assert by_name["other"] == {"name": "other", "instances": 1, "healthy": 1}
    assert all(set(s) == {"name", "instances", "healthy"} for s in answer["services"])
    assert int(headers["X-Registry-Index"]) > 0


async def test_get_service_lists_instances_with_index(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    status, answer, headers = await _call(gw, "GET", "/registry/services/api")
    assert status == 200
    assert set(answer) == {"name", "instances"}
    assert answer["name"] == "api"
    [instance] = answer["instances"]
    assert set(instance) == INSTANCE_FIELDS
    first_index = int(headers["X-Registry-Index"])
    assert first_index > 0
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "port": 9001})
    _, _, headers = await _call(gw, "GET", "/registry/services/api")
    assert int(headers["X-Registry-Index"]) > first_index


async def test_index_is_per_service_and_one_counter(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, _, api_headers = await _call(gw, "GET", "/registry/services/api")
    await _call(gw, "POST", "/registry/services/web/instances", json=OK)
    _, _, web_headers = await _call(gw, "GET", "/registry/services/web")
    _, _, again = await _call(gw, "GET", "/registry/services/api")
    _, _, all_headers = await _call(gw, "GET", "/registry/services")
    assert again["X-Registry-Index"] == api_headers["X-Registry-Index"]
    assert int(web_headers["X-Registry-Index"]) > int(api_headers["X-Registry-Index"])
    assert int(all_headers["X-Registry-Index"]) >= int(web_headers["X-Registry-Index"])


async def test_unknown_service_is_404(gateway_factory):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(gw, "GET", "/registry/services/never-seen")
    _assert_error(status, answer, 404, "unknown_service")


async def test_unknown_service_404_carries_the_index(gateway_factory):
    """SPEC 8: X-Registry-Index is on every GET under /registry."""
    gw = await gateway_factory(ROUTES)
    status, _, headers = await _call(gw, "GET", "/registry/services/never-seen")
    assert status == 404
    assert "X-Registry-Index" in headers


async def test_service_named_in_routes_is_empty_not_404(gateway_factory):
    gw = await gateway_factory(ROUTES)
    status, answer, headers = await _call(gw, "GET", "/registry/services/web")
    assert status == 200
    assert answer == {"name": "web", "instances": []}
    assert headers["X-Registry-Index"] == "0"  # a service that never changed


async def test_service_whose_last_instance_left_is_empty(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/other/instances", json=OK)
    status, _, _ = await _call(gw, "DELETE", "/registry/services/other/instances/127.0.0.1:9000")
    assert status == 204
    status, answer, _ = await _call(gw, "GET", "/registry/services/other")
    assert status == 200
    assert answer == {"name": "other", "instances": []}


async def test_lease_expiry_removes_instance_and_counts_eviction(gateway_factory):
    clock = FakeClock()
    gw = await gateway_factory(ROUTES, clock=clock)
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "ttl": "1s"})
    await _call(gw, "POST", "/registry/services/api/instances", json={**OK, "port": 9001})
    clock.advance(1.0)  # the first lease ends exactly now
    assert [i["id"] for i in await _instances(gw)] == ["127.0.0.1:9001"]
    _, answer, _ = await _call(gw, "GET", "/registry/services")
    assert {"name": "api", "instances": 1, "healthy": 1} in answer["services"]
    async with gw.session.get(gw.admin_url + "/metrics") as response:
        text = await response.text()
    evictions = {
        sample.labels["service"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_registry_evictions_total"
    }
    assert evictions == {"api": 1}


# -- long poll -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "code"),
    [("index=x&wait=1s", "invalid_index"), ("index=1&wait=soon", "invalid_wait"),
     ("wait=", "invalid_wait"), ("wait=-1s", "invalid_wait")],
)  # fmt: skip
async def test_long_poll_refuses_a_bad_index_or_wait(gateway_factory, query, code):
    """A bad wait is refused even without an index, where it would have no effect."""
    gw = await gateway_factory(ROUTES)
    status, body, _ = await _call(gw, "GET", f"/registry/services/api?{query}")
    _assert_error(status, body, 400, code)


async def test_long_poll_with_index_zero_answers_at_once(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer, headers = await _call(gw, "GET", "/registry/services/api?index=0&wait=5s")
    assert loop.time() - started < 1.0
    assert status == 200
    assert len(answer["instances"]) == 1
    assert int(headers["X-Registry-Index"]) > 0


async def test_long_poll_below_the_index_answers_at_once(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, _, headers = await _call(gw, "GET", "/registry/services/api")
    older = int(headers["X-Registry-Index"]) - 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, _ = await _call(gw, "GET", f"/registry/services/api?index={older}&wait=5s")
    assert status == 200
    assert loop.time() - started < 1.0


async def test_long_poll_ahead_of_the_registry_answers_at_once(gateway_factory):
    # An index remembered from before a restart is ahead of the new counter: waiting for it
    # would miss every change, so the answer is the current list and index, as from Consul.
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, _, headers = await _call(gw, "GET", "/registry/services/api")
    current = headers["X-Registry-Index"]
    ahead = int(current) + 1000
    status, answer, headers = await asyncio.wait_for(
        _call(gw, "GET", f"/registry/services/api?index={ahead}&wait=30s"), 1.0
    )
    assert status == 200
    assert [i["port"] for i in answer["instances"]] == [9000]
    assert headers["X-Registry-Index"] == current


async def test_long_poll_answers_on_change(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, _, headers = await _call(gw, "GET", "/registry/services/api")
    index = int(headers["X-Registry-Index"])
    loop = asyncio.get_running_loop()
    started = loop.time()
    poll = asyncio.create_task(_call(gw, "GET", f"/registry/services/api?index={index}&wait=5s"))
    await asyncio.sleep(0.05)  # let the poll reach the server and park
    assert not poll.done()
    status, _, _ = await _call(
        gw, "POST", "/registry/services/api/instances", json={**OK, "port": 9001}
    )
    assert status == 201
    status, answer, headers = await asyncio.wait_for(poll, 2.0)
    assert loop.time() - started < 2.0
    assert status == 200
    assert sorted(i["port"] for i in answer["instances"]) == [9000, 9001]
    assert int(headers["X-Registry-Index"]) > index


async def test_long_poll_ignores_other_services(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, _, headers = await _call(gw, "GET", "/registry/services/api")
    index = headers["X-Registry-Index"]
    poll = asyncio.create_task(_call(gw, "GET", f"/registry/services/api?index={index}&wait=300ms"))
    await asyncio.sleep(0.05)
    await _call(gw, "POST", "/registry/services/web/instances", json=OK)
    await asyncio.sleep(0.05)
    assert not poll.done()
    status, answer, headers = await poll
    assert status == 200
    assert headers["X-Registry-Index"] == index
    assert len(answer["instances"]) == 1


async def test_long_poll_times_out_with_unchanged_list(gateway_factory):
    gw = await gateway_factory(ROUTES)
    await _call(gw, "POST", "/registry/services/api/instances", json=OK)
    _, before, headers = await _call(gw, "GET", "/registry/services/api")
    index = headers["X-Registry-Index"]
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, answer, headers = await _call(
        gw, "GET", f"/registry/services/api?index={index}&wait=200ms"
    )
    elapsed = loop.time() - started
    assert status == 200
    assert 0.15 <= elapsed < 2.0
    assert headers["X-Registry-Index"] == index
    assert answer == before


# -- errors of the admin listener ----------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/registry/services", "GET"),
        ("POST", "/registry/services/api", "GET"),
        ("GET", "/registry/services/api/instances", "POST"),
        ("POST", "/registry/services/api/instances/x:1/heartbeat", "PUT"),
    ],
)
async def test_wrong_method_is_405_with_allow(gateway_factory, method, path, allowed):
    gw = await gateway_factory(ROUTES)
    status, answer, headers = await _call(gw, method, path)
    _assert_error(status, answer, 405, "method_not_allowed")
    assert allowed in [m.strip() for m in headers["Allow"].split(",")]


@pytest.mark.parametrize("path", ["/nope", "/registry/nope", "/registry/services/api/x/y/z"])
async def test_unknown_admin_path_is_404_json(gateway_factory, path):
    gw = await gateway_factory(ROUTES)
    status, answer, _ = await _call(gw, "GET", path)
    _assert_error(status, answer, 404, "not_found")


# -- the admin token ---------------------------------------------------------------

TOKEN_ROUTES = (
    ROUTES
    + """
admin:
  token_env: TEST_ADMIN_TOKEN
"""
)


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Bearer s3cret-and-more", "Basic s3cret", "s3cret", "Bearer "],
)
async def test_registry_needs_the_token(gateway_factory, monkeypatch, authorization):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret")
    gw = await gateway_factory(TOKEN_ROUTES)
    headers = {"Authorization": authorization} if authorization else {}
    for method, path, kwargs in [
        ("GET", "/registry/services", {}),
        ("GET", "/registry/services/api", {}),
        ("POST", "/registry/services/api/instances", {"json": OK}),
        ("DELETE", "/registry/services/api/instances/127.0.0.1:9000", {}),
    ]:
        status, answer, answer_headers = await _call(gw, method, path, headers=headers, **kwargs)
        _assert_error(status, answer, 401, "unauthorized")
        assert answer_headers["WWW-Authenticate"].startswith("Bearer")
    assert gw.gateway.registry.instances("api") == []


async def test_right_token_opens_the_registry(gateway_factory, monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret")
    gw = await gateway_factory(TOKEN_ROUTES)
    headers = {"Authorization": "Bearer s3cret"}
    status, answer, _ = await _call(
        gw, "POST", "/registry/services/api/instances", json=OK, headers=headers
    )
    assert status == 201, answer
    status, answer, _ = await _call(gw, "GET", "/registry/services/api", headers=headers)
    assert status == 200 and len(answer["instances"]) == 1


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_metrics_need_no_token(gateway_factory, monkeypatch, path):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret")
    gw = await gateway_factory(TOKEN_ROUTES)
    async with gw.session.get(gw.admin_url + path) as response:
        assert response.status == 200


async def test_token_env_unset_means_no_token(gateway_factory, monkeypatch):
    monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
    gw = await gateway_factory(TOKEN_ROUTES)
    status, _, _ = await _call(gw, "GET", "/registry/services")
    assert status == 200


def test_open_admin_listener_without_token_refuses_to_start(monkeypatch):
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    config = parse_config(ROUTES)
    with pytest.raises(StartupError) as caught:
        Gateway(config, listen=("127.0.0.1", 0), admin_listen=("0.0.0.0", 0))
    message = str(caught.value)
    assert "\n" not in message
    # No token_env is configured: exporting a variable alone would not help, so the
    # message says exactly what to add to routes.yaml and what to export (issue 13).
    assert message == (
        "admin listener 0.0.0.0:0 is not on loopback and no admin token is set: add "
        "'token_env: GATEWAY_ADMIN_TOKEN' under admin: in routes.yaml and export "
        "GATEWAY_ADMIN_TOKEN=<secret>, or listen on 127.0.0.1"
    )


def test_open_admin_listener_names_the_configured_variable(monkeypatch):
    monkeypatch.delenv("TEST_ADMIN_TOKEN", raising=False)
    config = parse_config(TOKEN_ROUTES)
    with pytest.raises(StartupError, match="TEST_ADMIN_TOKEN"):
        Gateway(config, listen=("127.0.0.1", 0), admin_listen=("0.0.0.0", 0))


async def test_open_admin_listener_with_token_starts(monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret")
    gateway = Gateway(
        parse_config(TOKEN_ROUTES), listen=("127.0.0.1", 0), admin_listen=("0.0.0.0", 0)
    )
    await gateway.start()
    try:
        assert gateway.admin_port > 0
    finally:
        await gateway.stop()
