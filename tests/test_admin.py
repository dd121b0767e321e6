"""The admin listener's probes and routing table (SPEC section 8, "Admin and CLI")."""

from __future__ import annotations

import re
from urllib.parse import urlencode

import pytest

ROUTES = """
routes:
  - prefix: /api/users
    service: users
    strip_prefix: true
  - prefix: /api
    service: api
  - prefix: /
    service: site
    host: Example.COM
"""


async def _get(gw, path):
    async with gw.session.get(gw.admin_url + path) as response:
        return response.status, await response.json(), response.headers


def _assert_error(status, body, expected_status, code):
    assert status == expected_status, body
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


async def test_healthz(gateway_factory):
    gw = await gateway_factory(ROUTES)
    status, _, headers = await _get(gw, "/healthz")
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")


async def test_readyz(gateway_factory):
    gw = await gateway_factory(ROUTES)
    status, body, _ = await _get(gw, "/readyz")
    assert status == 200
    assert body == {"status": "ready"}


async def test_routes_lists_the_table_with_counts(gateway_factory):
    gw = await gateway_factory(ROUTES)
    _, before, _ = await _get(gw, "/routes")  # the table's routes are encoded once...
    assert {r["prefix"]: r["instances"] for r in before["routes"]}["/api/users"] == 0
    for port in (9000, 9001):
        async with gw.session.post(
            gw.admin_url + "/registry/services/users/instances",
            json={"host": "127.0.0.1", "port": port},
        ) as response:
            assert response.status == 201
    async with gw.session.patch(
        gw.admin_url + "/registry/services/users/instances/127.0.0.1:9001",
        json={"state": "draining"},
    ) as response:
        assert response.status == 200
    status, body, _ = await _get(gw, "/routes")  # ...and the counts read at each listing
    assert status == 200
    assert set(body) == {"routes"}
    listed = sorted(body["routes"], key=lambda r: (r["host"] or "", r["prefix"]))
    assert listed == [
        {
            "host": None,
            "prefix": "/api",
            "service": "api",
            "strip_prefix": False,
            "instances": 0,
            "healthy": 0,
            "panic": False,
        },
        {
            "host": None,
            "prefix": "/api/users",
            "service": "users",
            "strip_prefix": True,
            "instances": 2,
            "healthy": 1,
            "panic": False,
        },
        {
            "host": "example.com",
            "prefix": "/",
            "service": "site",
            "strip_prefix": False,
            "instances": 0,
            "healthy": 0,
            "panic": False,
        },
    ]


@pytest.mark.parametrize(
    ("query", "match"),
    [
        (
            {"path": "/api/users/7"},
            {"host": None, "prefix": "/api/users", "service": "users", "upstream_path": "/7"},
        ),
        (
            {"path": "/api/users"},
            {"host": None, "prefix": "/api/users", "service": "users", "upstream_path": "/"},
        ),
        (
            {"path": "/api/users/"},
            {"host": None, "prefix": "/api/users", "service": "users", "upstream_path": "/"},
        ),
        (
            {"path": "/api/usersX"},
            {"host": None, "prefix": "/api", "service": "api", "upstream_path": "/api/usersX"},
        ),
        (
            {"path": "/api/users/../v2/x"},
            {"host": None, "prefix": "/api", "service": "api", "upstream_path": "/api/v2/x"},
        ),
        (
            {"path": "/x/%2e%2e/api/users/3"},
            {"host": None, "prefix": "/api/users", "service": "users", "upstream_path": "/3"},
        ),
        (
            {"path": "/nothing", "host": "example.com"},
            {"host": "example.com", "prefix": "/", "service": "site", "upstream_path": "/nothing"},
        ),
        (
            {"path": "/nothing", "host": "EXAMPLE.com:8443"},
            {"host": "example.com", "prefix": "/", "service": "site", "upstream_path": "/nothing"},
        ),
        (
            {"path": "/api/users/7", "host": "example.com"},
            {"host": None, "prefix": "/api/users", "service": "users", "upstream_path": "/7"},
        ),
    ],
)
async def test_routes_path_shows_the_match(gateway_factory, query, match):
    gw = await gateway_factory(ROUTES)
    status, body, _ = await _get(gw, "/routes?" + urlencode(query))
    assert status == 200, body
    assert body == {"match": match}


@pytest.mark.parametrize(
    "query",
    [
        {"path": "/nothing"},
        {"path": "/nothing", "host": "other.example.com"},
        {"path": "/apiX"},
    ],
)
async def test_routes_path_without_match_is_no_route(gateway_factory, query):
    gw = await gateway_factory(ROUTES)
    status, body, _ = await _get(gw, "/routes?" + urlencode(query))
    _assert_error(status, body, 404, "no_route")


@pytest.mark.parametrize("path", ["/../x", "/api/../../x", "/%2e%2e/x", "api/users"])
async def test_routes_path_that_cannot_be_normalised_is_bad_path(gateway_factory, path):
    gw = await gateway_factory(ROUTES)
    status, body, _ = await _get(gw, "/routes?" + urlencode({"path": path}))
    _assert_error(status, body, 400, "bad_path")


async def test_status_page_lists_routes_and_instances(gateway_factory, upstreams):
    gw = await gateway_factory(
        "routes:\n  - prefix: /api\n    service: api\n  - prefix: /x<y>\n    service: web\n"
    )
    up = await upstreams("api")
    await gw.register("api", up, metadata={"version": "1.4", "note": "<b>&"})
    async with gw.session.get(gw.admin_url + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        page = await response.text()
    assert "/api" in page and f"127.0.0.1:{up.port}" in page and "healthy" in page
    assert "/x&lt;y&gt;" in page and "<y>" not in page  # escaped
    assert "<td>note=&lt;b&gt;&amp;, version=1.4</td>" in page and "<b>" not in page
    assert "no instances" in page  # web has none


async def _page(gw, path):
    async with gw.session.get(gw.admin_url + path) as response:
        return response.status, await response.text()


async def test_status_page_of_a_big_registry_summarises_services_and_pages_instances(
    gateway_factory,
):
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    registry = gw.gateway.registry
    for port in range(1, 251):
        registry.register(f"svc{port % 2}", {"host": "10.1.0.1", "port": port})
    registry.update("svc0", "10.1.0.1:2", {"state": "draining"})
    status, page = await _page(gw, "/")
    assert status == 200
    assert "10.1.0.1:" not in page  # 250 instances: not one of them listed, only counts
    assert "<td>svc0</td><td>" in page and ">125</a>" in page
    assert "<td>124</td><td>1</td>" in page  # svc0: 124 up, 1 draining
    assert "250 instances: choose a service above" in page

    status, page = await _page(gw, "/?service=svc0")
    assert status == 200
    assert page.count("<tr><td>svc0</td><td>10.1.0.1:") == 100 and "page 1 of 2" in page
    assert 'href="/?service=svc0&amp;page=2">next</a>' in page
    status, page = await _page(gw, "/?service=svc0&page=2")
    assert (
        page.count("<tr><td>svc0</td><td>10.1.0.1:") == 25
        and "previous" in page
        and "next" not in page
    )


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("service=nope", 404, "unknown_service"),
        ("service=web&page=0", 400, "invalid_page"),
        ("service=web&page=x", 400, "invalid_page"),
        ("page=%C2%B2", 400, "invalid_page"),
        ("filter=" + "x" * 201, 400, "invalid_filter"),
    ],
)
async def test_status_page_refuses_a_bad_query(gateway_factory, query, status, code):
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    answer, body, _ = await _get(gw, "/?" + query)
    _assert_error(answer, body, status, code)


async def test_status_page_says_what_is_wrong_and_how_to_start(gateway_factory, upstreams):
    gw = await gateway_factory("routes:\n  - prefix: /api\n    service: api\n")
    async with gw.session.get(gw.admin_url + "/") as response:
        page = await response.text()
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert "No instance has registered yet" in page and "gateway register web" in page
    assert "no routable instance: 503" in page  # /api's service has none
    up = await upstreams("api")
    await gw.register("api", up, ttl="1h", weight=7)
    _, page = await _page(gw, "/")
    assert "no routable instance" not in page and "<td>1/1</td>" in page
    assert "<td>7</td>" in page  # the weight
    assert re.search(r"<td>59m</td>|<td>1h</td>", page)  # the lease, as a person reads it


async def test_status_page_offers_no_link_a_token_would_refuse(gateway_factory, monkeypatch):
    monkeypatch.setenv("STATUS_TOKEN", "s3cret")
    gw = await gateway_factory("admin:\n  token_env: STATUS_TOKEN\n")
    _, page = await _page(gw, "/")
    assert 'href="/registry/services"' not in page and 'href="/routes"' in page


async def test_status_page_says_why_an_instance_fails_and_when_its_ejection_ends(
    gateway_factory,
):
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    registry = gw.gateway.registry
    failing = registry.register("web", {"host": "10.1.0.1", "port": 1})[0]
    ejected = registry.register("web", {"host": "10.1.0.1", "port": 2})[0]
    registry.set_health("web", failing.id, "failing", "status 503 <from a proxy>")
    registry.set_health(
        "web", ejected.id, "ejected", "5 5xx answers in a row", registry.clock() + 95
    )
    _, page = await _page(gw, "/")
    assert (
        '<span class="failing">failing</span><br>'
        '<small class="failing">status 503 &lt;from a proxy&gt;</small>'
    ) in page
    assert '<span class="ejected">ejected</span> · back in 1m<br>' in page
    async with gw.session.get(gw.admin_url + "/registry/services/web") as response:
        listed = {i["id"]: i for i in (await response.json())["instances"]}
    assert listed[failing.id]["health_reason"] == "status 503 <from a proxy>"
    assert listed[failing.id]["health_until"] is None
    assert listed[ejected.id]["health_reason"] == "5 5xx answers in a row"
    assert listed[ejected.id]["health_until"] is not None  # RFC 3339, 95 s on
    registry.set_health("web", failing.id, "healthy")  # recovered: the reason goes with it
    _, page = await _page(gw, "/")
    assert "status 503" not in page and failing.health_reason == ""


async def test_status_page_filter_keeps_what_mentions_the_text(gateway_factory):
    gw = await gateway_factory(
        "routes:\n  - prefix: /api\n    service: api\n  - prefix: /\n    service: web\n"
    )
    registry = gw.gateway.registry
    registry.register("api", {"host": "10.1.0.1", "port": 1, "metadata": {"version": "1.4"}})
    registry.register("api", {"host": "10.1.0.1", "port": 2, "metadata": {"version": "2.0"}})
    registry.register("web", {"host": "10.2.0.1", "port": 1})
    status, page = await _page(gw, "/?filter=Version%3D2")
    assert status == 200
    assert "10.1.0.1:2" in page and "10.1.0.1:1<" not in page and "10.2.0.1" not in page
    assert "<td>/api</td>" in page and "<td>/</td>" not in page  # the route of what is kept
    assert '<a href="/">clear</a>' in page
    _, page = await _page(gw, "/?filter=10.2.")
    assert "<td>web</td>" in page and "<td>api</td>" not in page
    _, page = await _page(gw, "/?filter=%22%3E%3Cscript%3E")  # "><script>: nothing matches
    assert 'value="&quot;&gt;&lt;script&gt;"' in page and "<script>" not in page
    assert "No instance has registered yet" not in page  # a filter that matches nothing
    assert "No instance mentions “&quot;&gt;&lt;script&gt;”." in page
    _, page = await _page(gw, "/?filter=nobody")
    assert "No instance mentions “nobody”." in page and "<h2>Instances</h2>" in page
    _, page = await _page(gw, "/?service=api&filter=1.4")
    assert '<input type=hidden name=service value="api">' in page
    assert "10.1.0.1:1<" in page and "10.1.0.1:2" not in page
