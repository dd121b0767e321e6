"""Path normalisation and longest-prefix routing (SPEC sections 3 and 8)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway.dataplane.routing import BadPath, RouteTable, host_name, normalize_path


@dataclass(frozen=True)
class Route:
    prefix: str
    service: str
    host: str | None = None
    strip_prefix: bool = False
    split: tuple[object, ...] = ()
    split_header: str = "X-Canary"


def routed(table: RouteTable, path: str, host: str | None = None) -> str | None:
    match = table.match(host, path)
    return match.route.service if match is not None else None


# -- normalize_path ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("/api/users", "/api/users"),
        ("/api/users/", "/api/users/"),
        ("/a/./b", "/a/b"),
        ("/./a", "/a"),
        ("/a/../b", "/b"),
        ("/api/users/../orders/1", "/api/orders/1"),
        ("/a/b/../../c", "/c"),
        ("/a/..", "/"),
        ("/a/../", "/"),
        ("/.", "/"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/a/./", "/a/"),
        ("/a/%2e%2e/b", "/b"),
        ("/a/%2E%2E/b", "/b"),
        ("/a/%2e%2E/b", "/b"),
        ("/a/.%2e/b", "/b"),
        ("/a/%2e./b", "/b"),
        ("/a/%2e/b", "/a/b"),
        ("/a/b/%2e%2e", "/a/"),
        # not dot segments: kept as sent
        ("/a../b", "/a../b"),
        ("/a/.../b", "/a/.../b"),
        ("/a/b.", "/a/b."),
        ("/a/.b", "/a/.b"),
        ("/file.tar.gz", "/file.tar.gz"),
        ("/a/%2F/b", "/a/%2F/b"),
        ("/a%20b/c", "/a%20b/c"),
        ("/a//b", "/a//b"),
    ],
)
def test_normalize_path(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "/..",
        "/../",
        "/../etc/passwd",
        "/a/../..",
        "/a/../../b",
        "/%2e%2e",
        "/%2E%2E/x",
        "/a/%2e%2e/%2e%2e/b",
        "/./..",
        "",
        "api/users",
        "*",
    ],
)
def test_normalize_path_refuses_climbing_above_root(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


def test_bad_path_is_a_value_error() -> None:
    assert issubclass(BadPath, ValueError)


# -- host_name ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("API.Example.com:443", "api.example.com"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]:8080", "[::1]"),
        ("[::1]", "[::1]"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        (None, None),
        ("", None),
    ],
)
def test_host_name_strips_port_and_lowercases(header: str | None, name: str | None) -> None:
    assert host_name(header) == name


# -- prefix matching ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/api/users", "users"),
        ("/api/users/", "users"),
        ("/api/users/7", "users"),
        ("/api/users/7/orders", "users"),
        ("/api/usersX", None),
        ("/api/users-old", None),
        ("/api/users.json", None),
        ("/api/user", None),
        ("/api", None),
        ("/", None),
        ("/other", None),
    ],
)
def test_prefix_matches_on_a_segment_boundary(path: str, service: str | None) -> None:
    table = RouteTable([Route("/api/users", "users")])
    assert routed(table, path) == service


ROUTES = [
    Route("/", "web"),
    Route("/api", "api"),
    Route("/api/users", "users"),
    Route("/api/users/admin", "admin"),
]


@pytest.mark.parametrize("routes", [ROUTES, ROUTES[::-1]], ids=["in-order", "reversed"])
@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/", "web"),
        ("/index.html", "web"),
        ("/deep/down/the/tree", "web"),
        ("/apiX", "web"),
        ("/api", "api"),
        ("/api/orders/1", "api"),
        ("/api/users", "users"),
        ("/api/users/7", "users"),
        ("/api/usersX", "api"),
        ("/api/users/admin", "admin"),
        ("/api/users/admin/x", "admin"),
        ("/api/users/administrator", "users"),
    ],
)
def test_longest_prefix_wins_whatever_the_order(
    routes: list[Route], path: str, service: str
) -> None:
    assert routed(RouteTable(routes), path) == service


def test_empty_table_matches_nothing() -> None:
    assert RouteTable([]).match(None, "/") is None
    assert RouteTable([]).match("example.com", "/x") is None


def test_match_carries_the_route() -> None:
    route = Route("/api/users", "users")
    match = RouteTable([route]).match(None, "/api/users/7")
    assert match is not None
    assert match.route == route


def test_normalised_traversal_cannot_cross_into_another_route() -> None:
    table = RouteTable([Route("/public", "public"), Route("/admin", "admin")])
    assert routed(table, normalize_path("/public/../admin/secrets")) == "admin"
    assert routed(table, normalize_path("/public/%2e%2e/admin")) == "admin"
    assert routed(table, normalize_path("/public/./files")) == "public"


# -- strip_prefix ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/api/users", "/"),
        ("/api/users/", "/"),
        ("/api/users/7", "/7"),
        ("/api/users/7/", "/7/"),
        ("/api/users/7/orders", "/7/orders"),
    ],
)
def test_strip_prefix(path: str, upstream: str) -> None:
    table = RouteTable([Route("/api/users", "users", strip_prefix=True)])
    match = table.match(None, path)
    assert match is not None
    assert match.upstream_path == upstream


@pytest.mark.parametrize("path", ["/api/users", "/api/users/", "/api/users/7", "/api/users/7/"])
def test_without_strip_prefix_the_path_is_forwarded_unchanged(path: str) -> None:
    match = RouteTable([Route("/api/users", "users")]).match(None, path)
    assert match is not None
    assert match.upstream_path == path


@pytest.mark.parametrize("path", ["/", "/x", "/x/y/"])
def test_strip_prefix_on_the_root_route_keeps_the_path(path: str) -> None:
    match = RouteTable([Route("/", "web", strip_prefix=True)]).match(None, path)
    assert match is not None
    assert match.upstream_path == path


# -- host routes ----------------------------------------------------------------------


HOSTED = [
    Route("/api", "generic"),
    Route("/api", "admin-api", host="admin.example.com"),
    Route("/", "admin-site", host="admin.example.com"),
    Route("/", "site"),
]


@pytest.mark.parametrize("routes", [HOSTED, HOSTED[::-1]], ids=["in-order", "reversed"])
@pytest.mark.parametrize(
    ("host", "path", "service"),
    [
        ("admin.example.com", "/api/x", "admin-api"),
        ("admin.example.com", "/api", "admin-api"),
        ("admin.example.com", "/", "admin-site"),
        ("admin.example.com", "/about", "admin-site"),
        ("www.example.com", "/api/x", "generic"),
        ("www.example.com", "/about", "site"),
        (None, "/api/x", "generic"),
        (None, "/", "site"),
    ],
)
def test_host_route_wins_at_equal_prefix(
    routes: list[Route], host: str | None, path: str, service: str
) -> None:
    assert routed(RouteTable(routes), path, host) == service


def test_longer_prefix_beats_a_host_route_with_a_shorter_one() -> None:
    table = RouteTable([Route("/", "site", host="a.example.com"), Route("/api", "api")])
    assert routed(table, "/api/x", "a.example.com") == "api"
    assert routed(table, "/x", "a.example.com") == "site"
    assert routed(table, "/x", "b.example.com") is None


def test_host_only_route_does_not_match_other_hosts() -> None:
    table = RouteTable([Route("/", "site", host="a.example.com")])
    assert routed(table, "/", "b.example.com") is None
    assert routed(table, "/", None) is None


@pytest.mark.parametrize(
    "header", ["admin.example.com", "Admin.Example.COM", "admin.example.com:8443"]
)
def test_host_header_matches_by_name_without_port_case_insensitively(header: str) -> None:
    table = RouteTable(HOSTED)
    assert routed(table, "/api/x", host_name(header)) == "admin-api"


@pytest.mark.parametrize("route_host", ["Admin.Example.COM", "ADMIN.EXAMPLE.COM"])
def test_route_host_written_in_capitals_still_matches(route_host: str) -> None:
    # SPEC 8: a route's host matches the Host header's name case-insensitively
    table = RouteTable([Route("/", "admin", host=route_host), Route("/", "site")])
    assert routed(table, "/", host_name("admin.example.com:8080")) == "admin"


def test_ipv6_host_route() -> None:
    table = RouteTable([Route("/", "v6", host="[::1]"), Route("/", "site")])
    assert routed(table, "/", host_name("[::1]:8080")) == "v6"
    assert routed(table, "/", host_name("127.0.0.1:8080")) == "site"


def test_host_routes_apply_strip_prefix() -> None:
    table = RouteTable([Route("/api", "admin-api", host="admin.example.com", strip_prefix=True)])
    match = table.match("admin.example.com", "/api/users/7")
    assert match is not None
    assert match.upstream_path == "/users/7"
