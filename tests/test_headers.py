"""Header rules of the proxy (SPEC sections 5 and 8)."""

from __future__ import annotations

import pytest

from gateway.headers import (
    downstream_response_headers,
    hop_by_hop,
    request_id_of,
    sane_request_id,
    upstream_request_headers,
)

Headers = list[tuple[str, str]]

HOP_BY_HOP = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
]


def values(headers: Headers, name: str) -> list[str]:
    return [value for key, value in headers if key.lower() == name.lower()]


def names(headers: Headers) -> set[str]:
    return {key.lower() for key, _ in headers}


def upstream(headers: Headers, **kw: object) -> Headers:
    options: dict[str, object] = {
        "client_ip": "192.0.2.10",
        "proto": "http",
        "request_id": "req-1",
    }
    options.update(kw)
    return upstream_request_headers(headers, **options)  # type: ignore[arg-type]


# -- hop-by-hop -------------------------------------------------------------------


def test_hop_by_hop_names_the_fixed_set_and_what_connection_lists() -> None:
    drop = hop_by_hop([("Connection", "close, X-Secret"), ("connection", " X-Other ,")])
    assert {name.lower() for name in HOP_BY_HOP} <= drop
    assert {"x-secret", "x-other"} <= drop
    assert "" not in drop
    assert "host" not in drop


@pytest.mark.parametrize("name", HOP_BY_HOP + [n.upper() for n in HOP_BY_HOP])
def test_hop_by_hop_headers_are_not_sent_upstream(name: str) -> None:
    out = upstream([("Host", "example.com"), (name, "whatever"), ("Accept", "*/*")])
    assert name.lower() not in names(out)
    assert values(out, "Accept") == ["*/*"]
    assert values(out, "Host") == ["example.com"]


def test_headers_named_in_connection_are_not_sent_upstream() -> None:
    out = upstream(
        [
            ("Host", "example.com"),
            ("Connection", "keep-alive, X-Secret"),
            ("connection", "x-session"),
            ("X-Secret", "1"),
            ("X-Session", "2"),
            ("X-Kept", "3"),
        ]
    )
    assert not {"connection", "x-secret", "x-session"} & names(out)
    assert values(out, "X-Kept") == ["3"]


def test_connection_cannot_remove_the_gateways_x_forwarded_for() -> None:
    out = upstream(
        [
            ("Host", "example.com"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Connection", "X-Forwarded-For"),
        ]
    )
    assert values(out, "X-Forwarded-For") == ["192.0.2.10"]


@pytest.mark.parametrize(
    "name", ["X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID", "X-Forwarded-Prefix"]
)
def test_connection_cannot_remove_the_other_gateway_headers(name: str) -> None:
    out = upstream(
        [("Host", "example.com"), (name, "client"), ("Connection", name)],
        forwarded_prefix="/api",
    )
    assert len(values(out, name)) == 1
    assert values(out, name) != ["client"]


def test_other_headers_keep_their_order_and_repeats() -> None:
    out = upstream(
        [
            ("Host", "example.com"),
            ("Accept", "text/html"),
            ("X-Custom", "1"),
            ("Cookie", "a=1"),
            ("X-Custom", "2"),
        ]
    )
    kept = [(k, v) for k, v in out if k.lower() in {"accept", "x-custom", "cookie"}]
    assert kept == [
        ("Accept", "text/html"),
        ("X-Custom", "1"),
        ("Cookie", "a=1"),
        ("X-Custom", "2"),
    ]


# -- X-Forwarded-* ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], "192.0.2.10"),
        ([("X-Forwarded-For", "203.0.113.1")], "203.0.113.1, 192.0.2.10"),
        ([("X-Forwarded-For", "203.0.113.1, 10.0.0.1")], "203.0.113.1, 10.0.0.1, 192.0.2.10"),
        (
            [("X-Forwarded-For", "203.0.113.1"), ("x-forwarded-for", "10.0.0.1")],
            "203.0.113.1, 10.0.0.1, 192.0.2.10",
        ),
    ],
)
def test_x_forwarded_for_gets_the_client_appended(given: Headers, expected: str) -> None:
    out = upstream([("Host", "example.com"), *given])
    assert values(out, "X-Forwarded-For") == [expected]


@pytest.mark.parametrize("proto", ["http", "https"])
def test_x_forwarded_proto_is_set(proto: str) -> None:
    out = upstream([("Host", "example.com"), ("X-Forwarded-Proto", "gopher")], proto=proto)
    assert values(out, "X-Forwarded-Proto") == [proto]


@pytest.mark.parametrize("host", ["example.com", "example.com:8080", "[::1]:8080", "Example.COM"])
def test_x_forwarded_host_is_the_host_as_sent(host: str) -> None:
    out = upstream([("Host", host), ("X-Forwarded-Host", "evil.example")])
    assert values(out, "X-Forwarded-Host") == [host]
    assert values(out, "Host") == [host]  # passed through by default


def test_host_override_replaces_host_but_not_x_forwarded_host() -> None:
    out = upstream([("Host", "example.com:8080")], host_override="10.0.0.5:9000")
    assert values(out, "Host") == ["10.0.0.5:9000"]
    assert values(out, "X-Forwarded-Host") == ["example.com:8080"]


def test_x_forwarded_prefix_carries_the_stripped_prefix() -> None:
    out = upstream(
        [("Host", "example.com"), ("X-Forwarded-Prefix", "/spoofed")],
        forwarded_prefix="/api/users",
    )
    assert values(out, "X-Forwarded-Prefix") == ["/api/users"]


def test_no_x_forwarded_prefix_without_strip_prefix() -> None:
    out = upstream([("Host", "example.com")])
    assert values(out, "X-Forwarded-Prefix") == []


# -- X-Request-ID ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["abc-123", "x", "x" * 200, "!~", "550e8400-e29b-41d4-a716-446655440000"]
)
def test_sane_request_id_is_kept(value: str) -> None:
    assert sane_request_id(value)
    assert request_id_of([("Host", "a"), ("X-Request-ID", value)]) == value
    assert request_id_of([("x-request-id", value)]) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 201, "a b", "tab\there", "é", "id\x7f", "id\x00", " lead"]
)
def test_insane_request_id_is_replaced(value: str) -> None:
    assert not sane_request_id(value)
    replacement = request_id_of([("X-Request-ID", value)])
    assert replacement != value
    assert sane_request_id(replacement)


def test_missing_request_id_is_generated_fresh_each_time() -> None:
    first = request_id_of([("Host", "example.com")])
    second = request_id_of([("Host", "example.com")])
    assert sane_request_id(first)
    assert sane_request_id(second)
    assert first != second


def test_sane_request_id_of_none() -> None:
    assert not sane_request_id(None)


def test_request_id_goes_upstream_once() -> None:
    out = upstream([("Host", "example.com"), ("X-Request-ID", "client-id")], request_id="client-id")
    assert values(out, "X-Request-ID") == ["client-id"]
    replaced = upstream([("Host", "example.com"), ("X-Request-ID", "a b")], request_id="new-id")
    assert values(replaced, "X-Request-ID") == ["new-id"]


# -- response headers -------------------------------------------------------------------


def test_response_keeps_repeated_set_cookie_and_drops_hop_by_hop() -> None:
    out = downstream_response_headers(
        [
            ("Content-Type", "text/plain"),
            ("Set-Cookie", "a=1; Path=/"),
            ("Connection", "keep-alive, X-Internal"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Internal", "secret"),
            ("Set-Cookie", "b=2; HttpOnly"),
            ("Trailer", "X-Checksum"),
            ("Upgrade", "h2c"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
        ],
        "req-1",
    )
    assert values(out, "Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]
    assert values(out, "Content-Type") == ["text/plain"]
    assert not {name.lower() for name in HOP_BY_HOP} & names(out)
    assert "x-internal" not in names(out)


@pytest.mark.parametrize("upstream_id", [None, "req-1", "other-id"])
def test_response_returns_the_request_id_once(upstream_id: str | None) -> None:
    given: Headers = [("Content-Length", "0")]
    if upstream_id is not None:
        given.append(("X-Request-ID", upstream_id))
    out = downstream_response_headers(given, "req-1")
    assert values(out, "X-Request-ID") == ["req-1"]
    assert values(out, "Content-Length") == ["0"]
