"""Validation rules for registrations (SPEC sections 4 and 8)."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from registry.core.errors import ApiError, InvalidField
from registry.core.models import (
    Instance,
    validate_host,
    validate_id,
    validate_metadata,
    validate_port,
    validate_scheme,
    validate_service_name,
    validate_state,
    validate_ttl,
    validate_weight,
)


def assert_invalid(validate: Callable[[object], object], value: object, code: str) -> None:
    with pytest.raises(InvalidField) as info:
        validate(value)
    assert info.value.code == code
    assert info.value.message  # says the rule
    assert isinstance(info.value, ApiError) and info.value.status == 400


# -- service names: [a-z0-9][a-z0-9._-]{0,62} -------------------------------------


@pytest.mark.parametrize(
    "name", ["users", "a", "0", "web-1", "svc.v2", "my_service", "9lives", "a" * 63]
)
def test_service_name_accepted(name: str) -> None:
    assert validate_service_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Users",
        "USERS",
        "-users",
        ".users",
        "_users",
        "a" * 64,
        "us ers",
        "us/ers",
        "usérs",
        "users\n",
        None,
        42,
        ["users"],
    ],
)
def test_service_name_refused(name: object) -> None:
    assert_invalid(validate_service_name, name, "invalid_service")


# -- host: IPv4 dotted quad, IPv6, or a DNS name that cannot read as a number -------


@pytest.mark.parametrize(
    "host",
    [
        "10.0.0.5",
        "127.0.0.1",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "2001:db8::42",
        "localhost",
        "example.com",
        "users.internal",
        "api.internal",
        "my-svc.default.svc.cluster.local",
        "a" * 63 + ".example.com",
        "x",
        "0x7f.example",  # not the last label: a resolver looks the name up
        "10.0.0.5.nip.io",
        "1e100.net",
        "0xg",
    ],
)
def test_host_accepted(host: str) -> None:
    assert validate_host(host)


@pytest.mark.parametrize(
    ("host", "normalised"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),  # IPv4-mapped IPv6 is the IPv4 address
        ("::FFFF:7f00:1", "127.0.0.1"),
        ("2001:DB8:0:0::42", "2001:db8::42"),  # compressed, lower case
        ("[::1]", "::1"),  # routes.yaml writes [::1]:9000
        ("Example.COM", "example.com"),
        ("example.com.", "example.com"),  # the root's dot is not part of the name
    ],
)
def test_host_normalised(host: str, normalised: str) -> None:
    assert validate_host(host) == normalised


@pytest.mark.parametrize(
    "host",
    [
        "",
        "0.0.0.0",
        "::",
        "0:0:0:0:0:0:0:0",
        "[::]",
        "::0.0.0.0",
        "::ffff:0.0.0.0",
        "http://x",
        "https://example.com",
        "x:9000",
        "example.com/path",
        "exa mple.com",
        "-bad.example.com",
        "bad-.example.com",
        "a..b",
        ".",
        "under_score.example.com",
        "a" * 64 + ".example.com",
        ("a" * 63 + ".") * 4,  # 256 characters
        # what inet_aton and getaddrinfo read as an IPv4 address, but not a dotted quad
        "0",
        "0.0.0",
        "127.1",
        "2130706433",
        "0x7f000001",
        "0x7f.1",
        "0X7F.0.0.1",
        "0177.0.0.1",
        "127.0.0.01",
        "1.2.3.4.5",
        "256.0.0.1",
        "10.0.0.5.",
        "example.0x",
        "example.123",
        "::ffff:127.1",
        "fe80::1%eth0",  # zone ids are not supported
        "[fe80::1%25eth0]",
        "[10.0.0.5]",  # brackets only around IPv6
        "[localhost]",
        " 10.0.0.5",
        "10.0.0.5\n",
        "١٢٧.0.0.1",  # non-ASCII digits
        None,
        10,
        ["10.0.0.5"],
    ],
)
def test_host_refused(host: object) -> None:
    assert_invalid(validate_host, host, "invalid_host")


# -- port: a JSON integer in 1..65535 -----------------------------------------------


@pytest.mark.parametrize("port", [1, 80, 9000, 65535])
def test_port_accepted(port: int) -> None:
    assert validate_port(port) == port


@pytest.mark.parametrize("port", ["9000", 9000.0, True, False, 0, -1, 65536, None, [9000]])
def test_port_refused(port: object) -> None:
    assert_invalid(validate_port, port, "invalid_port")


# -- weight: 1..100 -------------------------------------------------------------------


@pytest.mark.parametrize("weight", [1, 2, 50, 100])
def test_weight_accepted(weight: int) -> None:
    assert validate_weight(weight) == weight


@pytest.mark.parametrize("weight", [0, -1, 101, 1000, "5", 5.0, True, None])
def test_weight_refused(weight: object) -> None:
    assert_invalid(validate_weight, weight, "invalid_weight")


# -- ttl: 1s..max_ttl, a duration string or a number of seconds ------------------------


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        ("1s", 1.0),
        ("30s", 30.0),
        ("1000ms", 1.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        (1, 1.0),
        (30, 30.0),
        (2.5, 2.5),
        (3600, 3600.0),
        ("45", 45.0),
    ],
)
def test_ttl_accepted(ttl: object, seconds: float) -> None:
    assert validate_ttl(ttl, 3600.0) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "ttl",
    [
        "0s",
        "500ms",
        "999ms",
        0,
        0.5,
        -5,
        "3601s",
        "2h",
        3601,
        pytest.param(10**400, id="int-too-large-for-float"),
        float("inf"),
        "soon",
        "",
        None,
        True,
        [30],
    ],
)
def test_ttl_refused(ttl: object) -> None:
    assert_invalid(lambda value: validate_ttl(value, 3600.0), ttl, "invalid_ttl")


def test_ttl_upper_bound_is_the_configured_max_ttl() -> None:
    assert validate_ttl("60s", 60.0) == 60.0
    assert_invalid(lambda value: validate_ttl(value, 60.0), "61s", "invalid_ttl")


# -- metadata: string to string, at most 64 keys ---------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        {},
        {"version": "1.4"},
        {"zone": "eu-1", "canary": ""},
        {f"k{i}": str(i) for i in range(64)},
    ],
)
def test_metadata_accepted(metadata: dict[str, str]) -> None:
    assert validate_metadata(metadata) == metadata


def test_metadata_is_copied() -> None:
    given = {"version": "1.4"}
    kept = validate_metadata(given)
    given["version"] = "2.0"
    assert kept == {"version": "1.4"}


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": str(i) for i in range(65)},
        {"version": 1.4},
        {"version": None},
        {"tags": ["a"]},
        {"nested": {"a": "b"}},
        {1: "one"},
        [],
        ["version", "1.4"],
        "version=1.4",
        None,
    ],
)
def test_metadata_refused(metadata: object) -> None:
    assert_invalid(validate_metadata, metadata, "invalid_metadata")


# -- id: [A-Za-z0-9._:\[\]-]{1,128} -------------------------------------------------------


@pytest.mark.parametrize(
    "instance_id",
    ["a", "users-1", "10.0.0.5:9000", "[::1]:9000", "Node_7.eu-west", "x" * 128],
)
def test_id_accepted(instance_id: str) -> None:
    assert validate_id(instance_id) == instance_id


@pytest.mark.parametrize("instance_id", ["", "x" * 129, "a b", "a/b", "a?b", "é", "id\n", None, 7])
def test_id_refused(instance_id: object) -> None:
    assert_invalid(validate_id, instance_id, "invalid_id")


# -- scheme and state -----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_scheme_accepted(scheme: str) -> None:
    assert validate_scheme(scheme) == scheme


@pytest.mark.parametrize("scheme", ["ftp", "ws", "", "http://", None, 1])
def test_scheme_refused(scheme: object) -> None:
    assert_invalid(validate_scheme, scheme, "invalid_scheme")


@pytest.mark.parametrize("state", ["up", "draining"])
def test_state_accepted(state: str) -> None:
    assert validate_state(state) == state


@pytest.mark.parametrize("state", ["down", "drain", "", None, 1, True])
def test_state_refused(state: object) -> None:
    assert_invalid(validate_state, state, "invalid_state")


# -- an instance as listed ------------------------------------------------------------


def test_instance_listing_has_the_spec_fields_in_rfc3339_utc() -> None:
    instance = Instance(
        service="users",
        id="10.0.0.5:9000",
        host="10.0.0.5",
        port=9000,
        metadata={"version": "1.4"},
        registered_at=1_700_000_000.0,
        last_heartbeat=1_700_000_010.5,
        ttl=30.0,
        expires_at=1_700_000_040.5,
    )
    listed = instance.to_dict()
    assert set(listed) == {
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
        "health_reason",  # beyond SPEC's list: why not healthy, and an ejection's end
        "health_until",
    }
    assert (listed["health_reason"], listed["health_until"]) == (None, None)  # healthy
    instance.health, instance.health_reason = "ejected", "5 5xx answers in a row"
    instance.health_until = 1_700_000_100.0
    ejected = instance.to_dict()
    assert ejected["health_reason"] == "5 5xx answers in a row"
    assert ejected["health_until"] == "2023-11-14T22:15:00.000Z"
    instance.health = "healthy"  # back: what was said of it goes
    assert (instance.to_dict()["health_reason"], instance.to_dict()["health_until"]) == (None, None)
    assert listed["id"] == "10.0.0.5:9000"
    assert listed["state"] == "up"
    assert listed["health"] == "healthy"
    assert listed["metadata"] == {"version": "1.4"}
    rfc3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
    for key, expected in [
        ("registered_at", 1_700_000_000.0),
        ("last_heartbeat", 1_700_000_010.5),
        ("expires_at", 1_700_000_040.5),
    ]:
        assert rfc3339.fullmatch(listed[key]), listed[key]
        parsed = datetime.fromisoformat(listed[key].replace("Z", "+00:00"))
        assert parsed.tzinfo is not None
        assert parsed == datetime.fromtimestamp(expected, tz=UTC)
