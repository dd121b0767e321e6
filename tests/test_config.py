"""gateway.config.loader: routes.yaml into frozen dataclasses, mistakes as `file:line: message`."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config.describe import describe_routes, ignored_settings, shadow_warnings
from gateway.config.loader import load_config, parse_config
from gateway.config.model import (
    AdminConfig,
    Config,
    ConfigError,
    HealthCheckConfig,
    OutlierConfig,
    ProxySettings,
    RegistryConfig,
    RouteConfig,
    ServiceConfig,
    parse_listen,
)

# The example of SPEC section 3, as written there.
SPEC_EXAMPLE = """\
listen: 0.0.0.0:8080
admin:
  listen: 127.0.0.1:8081
  token_env: GATEWAY_ADMIN_TOKEN      # bearer token for /registry when this env var is set
registry:
  default_ttl: 30s                    # lease length when a registration names none
  max_ttl: 1h
  snapshot: registry-state.json       # optional: registrations survive a restart
  backend: memory                     # or etcd://127.0.0.1:2379 to share one registry between gateways
proxy:                                # the values shown are the defaults
  connect_timeout: 2s
  timeout: 30s                        # until the upstream's response headers
  retries: 2                          # extra attempts on other instances (rules in 5)
  header_timeout: 10s                 # a client must send its request head within this
  idle_timeout: 60s                   # an idle client keep-alive connection is closed after this
  max_connections: 10000              # client connections; beyond it: 503 overloaded
routes:
  - prefix: /api/users
    service: users
    strip_prefix: true                # /api/users/7 -> /7 upstream
  - prefix: /
    service: web
    timeout: 5s                       # per-route override of proxy settings
services:                             # optional per-service settings
  web:
    instances: [127.0.0.1:9001]       # static instances: never expire
    health_check: {path: /healthz, interval: 5s, timeout: 1s, healthy: 2, unhealthy: 3}   # or {tcp: true, ...}
    outlier: {consecutive_failures: 5, base_ejection: 30s, max_ejected: 50%}
"""  # noqa: E501


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text))
    assert str(caught.value) == "\n".join(caught.value.errors)
    return caught.value.errors


@pytest.mark.parametrize(
    "text", ["", "\n", "# nothing configured\n", "---\n", "routes:\nservices:\n"]
)
def test_an_empty_file_gives_all_defaults(text: str) -> None:
    config = parse_config(text)
    assert config == Config(path=None)
    assert config.listen == ("0.0.0.0", 8080)
    assert config.admin == AdminConfig(listen=("127.0.0.1", 8081), token_env=None)
    assert config.registry == RegistryConfig(30.0, 3600.0, None, "memory")
    assert config.proxy == ProxySettings(2.0, 30.0, 2, 10.0, 60.0, 60.0, 60.0, 10000)
    assert config.routes == ()
    assert config.services == {}


def test_the_spec_example_parses_to_the_right_values(tmp_path: Path) -> None:
    config = parse_config(SPEC_EXAMPLE, base_dir=tmp_path)
    assert config == Config(
        path=None,
        listen=("0.0.0.0", 8080),
        admin=AdminConfig(listen=("127.0.0.1", 8081), token_env="GATEWAY_ADMIN_TOKEN"),
        registry=RegistryConfig(
            default_ttl=30.0,
            max_ttl=3600.0,
            snapshot=tmp_path / "registry-state.json",
            backend="memory",
        ),
        proxy=ProxySettings(
            connect_timeout=2.0,
            timeout=30.0,
            retries=2,
            header_timeout=10.0,
            idle_timeout=60.0,
            body_timeout=60.0,
            send_timeout=60.0,
            max_connections=10000,
        ),
        routes=(
            RouteConfig(prefix="/api/users", service="users", strip_prefix=True, line=18),
            RouteConfig(prefix="/", service="web", timeout=5.0, line=21),
        ),
        services={
            "web": ServiceConfig(
                name="web",
                instances=(("127.0.0.1", 9001),),
                health_check=HealthCheckConfig(
                    path="/healthz", interval=5.0, timeout=1.0, healthy=2, unhealthy=3
                ),
                outlier=OutlierConfig(consecutive_failures=5, base_ejection=30.0, max_ejected=0.5),
            )
        },
    )


def test_route_values_default_to_the_proxy_settings_and_can_override_them() -> None:
    config = parse_config(
        textwrap.dedent("""\
        proxy: {timeout: 10s, connect_timeout: 500ms, retries: 1}
        routes:
          - {prefix: /a, service: a}
          - prefix: /b/
            service: b
            host: API.Example.com
            preserve_host: false
            timeout: 2m
            connect_timeout: 1
            retries: 0
            max_body: 10MiB
          - {prefix: /c, service: "007", max_body: 1024}
        """)
    )
    a, b, c = config.routes
    assert (a.timeout, a.connect_timeout, a.retries, a.max_body) == (10.0, 0.5, 1, None)
    assert b == RouteConfig(
        prefix="/b",
        service="b",
        host="api.example.com",
        preserve_host=False,
        timeout=120.0,
        connect_timeout=1.0,
        retries=0,
        max_body=10 * 1024 * 1024,
        line=4,
    )
    assert (c.service, c.max_body) == ("007", 1024)


def test_service_settings_in_all_their_forms() -> None:
    config = parse_config(
        textwrap.dedent("""\
        services:
          tcp-checked:
            instances: ["[::1]:9000", Backend.local:80, 10.0.0.5:8080]
            health_check: {tcp: true, interval: 2s, timeout: 500ms}
            outlier: {max_ejected: 0.25, consecutive_5xx: 3, base_ejection: 1m}
          http-checked:
            health_check: {path: /ping, expected_status: 204}
          ranged:
            health_check: {path: /, expected_status: 200-299}
          bare:
        """)
    )
    assert config.services == {
        "tcp-checked": ServiceConfig(
            name="tcp-checked",
            instances=(("::1", 9000), ("backend.local", 80), ("10.0.0.5", 8080)),
            health_check=HealthCheckConfig(path=None, tcp=True, interval=2.0, timeout=0.5),
            outlier=OutlierConfig(max_ejected=0.25, consecutive_5xx=3, base_ejection=60.0),
        ),
        "http-checked": ServiceConfig(
            "http-checked", health_check=HealthCheckConfig(path="/ping", expected_status=(204, 204))
        ),
        "ranged": ServiceConfig(
            "ranged", health_check=HealthCheckConfig(path="/", expected_status=(200, 299))
        ),
        "bare": ServiceConfig("bare"),
    }


def test_the_same_prefix_under_two_hosts_is_fine() -> None:
    config = parse_config(
        "routes:\n"
        "  - {prefix: /api, service: a, host: a.example.com}\n"
        "  - {prefix: /api, service: b, host: b.example.com}\n"
        "  - {prefix: /api, service: c}\n"
    )
    assert [(r.host, r.prefix, r.service) for r in config.routes] == [
        ("a.example.com", "/api", "a"),
        ("b.example.com", "/api", "b"),
        (None, "/api", "c"),
    ]


def test_registry_address_policy_and_caps() -> None:
    text = (
        "registry:\n  allow_loopback: true\n  max_instances: 50\n  max_instances_per_service: 5\n"
    )
    registry = parse_config(text).registry
    assert (registry.allow_loopback, registry.max_instances) == (True, 50)
    assert registry.max_instances_per_service == 5
    assert parse_config("").registry.max_instances == 10_000
    assert errors_of("registry:\n  max_instances: 0\n") == [
        "routes.yaml:2: registry.max_instances: must be at least 1, got 0"
    ]


def test_a_snapshot_with_the_etcd_backend_is_ignored_with_a_warning() -> None:
    text = "registry:\n  backend: etcd://127.0.0.1:2379\n  snapshot: state.json\n"
    assert ignored_settings(parse_config(text)) == [
        "warning: routes.yaml: registry.snapshot is ignored with the etcd backend "
        "(etcd keeps the registrations)"
    ]
    assert ignored_settings(parse_config("registry:\n  snapshot: state.json\n")) == []


@pytest.mark.parametrize(
    ("backend", "ok"),
    [
        ("memory", True),
        ("etcd://127.0.0.1:2379", True),
        ("etcd://etcd-1:2379,etcd-2:2379,[::1]:2379", True),
        ("etcd://", False),
        ("etcd://host", False),
        ("etcd://host:2379,", False),
        ("redis://host:6379", False),
        ("Memory", False),
    ],
)
def test_registry_backend(backend: str, ok: bool) -> None:
    text = f"registry:\n  backend: '{backend}'\n"
    if ok:
        assert parse_config(text).registry.backend == backend
    else:
        assert errors_of(text) == [
            f"routes.yaml:2: registry.backend: invalid backend {backend!r}: "
            "use memory or etcd://HOST:PORT[,HOST:PORT...]"
        ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            """\
            routes:
              - prefix: /api
                service: api
                timout: 5s
            """,
            "routes.yaml:4: routes[0]: unknown key 'timout' (did you mean 'timeout'?)",
            id="unknown-key-with-suggestion",
        ),
        pytest.param(
            "listen: :80\ncolour: blue\n",
            "routes.yaml:2: unknown key 'colour' "
            "(known keys: listen, tls, admin, registry, proxy, routes, services)",
            id="unknown-key-without-suggestion",
        ),
        pytest.param(
            "proxy:\n  retries: true\n",
            "routes.yaml:2: proxy.retries: expected an integer, got true",
            id="bool-is-not-an-int",
        ),
        pytest.param(
            "routes:\n  - {prefix: /a, service: a, strip_prefix: 1}\n",
            "routes.yaml:2: routes[0].strip_prefix: expected true or false, got 1",
            id="int-is-not-a-bool",
        ),
        pytest.param(
            "admin:\n  token_env: [A, B]\n",
            "routes.yaml:2: admin.token_env: expected a string, got a list",
            id="list-is-not-a-string",
        ),
        pytest.param(
            "routes:\n  prefix: /a\n",
            "routes.yaml:2: routes: expected a list, got a mapping",
            id="mapping-is-not-a-list",
        ),
        pytest.param(
            "proxy: fast\n",
            "routes.yaml:1: proxy: expected a mapping, got 'fast'",
            id="string-is-not-a-mapping",
        ),
        pytest.param(
            "- listen\n",
            "routes.yaml:1: expected a mapping, got a list",
            id="top-level-not-a-mapping",
        ),
        pytest.param(
            """\
            routes:
              - prefix: /a
                service: a
              - prefix: /b
                service: b
                timeout: abc
            """,
            "routes.yaml:6: routes[1].timeout: invalid duration 'abc': use e.g. 500ms, 30s, 2m, 1h",
            id="bad-duration",
        ),
        pytest.param(
            "proxy:\n  timeout: 0s\n",
            "routes.yaml:2: proxy.timeout: must be longer than 0s",
            id="zero-timeout",
        ),
        pytest.param(
            "routes:\n  - {prefix: /a, service: a, max_body: 10 parsecs}\n",
            "routes.yaml:2: routes[0].max_body: invalid size '10 parsecs': use e.g. 64KiB, 10MiB",
            id="bad-size",
        ),
        pytest.param(
            "routes:\n  - prefix: api/users\n    service: users\n",
            "routes.yaml:2: routes[0].prefix: must start with /, got 'api/users'",
            id="prefix-without-slash",
        ),
        pytest.param(
            "routes:\n  - {prefix: /api//users, service: users}\n",
            "routes.yaml:2: routes[0].prefix: use a plain path like /api/users "
            "(no //, ., .., ? or #), got '/api//users'",
            id="prefix-not-plain",
        ),
        pytest.param(
            """\
            routes:
              - prefix: /api
                service: a
              - prefix: /other
                service: b
              - service: c
                prefix: /api/
            """,
            "routes.yaml:7: routes[2].prefix: duplicate route for prefix /api (first on line 2)",
            id="duplicate-prefix-on-the-second-line",
        ),
        pytest.param(
            "routes:\n"
            "  - {prefix: /api, service: a, host: x.example}\n"
            "  - {prefix: /api, service: b, host: X.Example}\n",
            "routes.yaml:3: routes[1].prefix: duplicate route for prefix /api and host x.example "
            "(first on line 2)",
            id="duplicate-prefix-and-host",
        ),
        pytest.param(
            "admin:\n  listen: 127.0.0.1:8081\n  token_env: A\n  listen: :9000\n",
            "routes.yaml:4: admin: duplicate key 'listen' (first on line 2)",
            id="duplicate-key",
        ),
        pytest.param(
            "routes:\n  - {prefix: /api, service: Users_API}\n",
            "routes.yaml:2: routes[0].service: invalid service name 'Users_API': "
            "must match [a-z0-9][a-z0-9._-]{0,62}",
            id="invalid-service-name-in-route",
        ),
        pytest.param(
            "services:\n  -web: {}\n",
            "routes.yaml:2: services: invalid service name '-web': "
            "must match [a-z0-9][a-z0-9._-]{0,62}",
            id="invalid-service-name-in-services",
        ),
        pytest.param(
            "routes:\n  - {prefix: /api}\n",
            "routes.yaml:2: routes[0]: missing key 'service'",
            id="missing-service",
        ),
        pytest.param(
            "routes:\n  - {prefix: /api, service: a, host: 'http://a.example'}\n",
            "routes.yaml:2: routes[0].host: use a host name without scheme or port, "
            "got 'http://a.example'",
            id="host-with-scheme",
        ),
        pytest.param(
            "listen: localhost\n",
            "routes.yaml:1: listen: invalid listen address 'localhost': "
            "use HOST:PORT, [IPv6]:PORT or :PORT",
            id="bad-listen",
        ),
        pytest.param(
            "admin:\n  listen: 127.0.0.1:65536\n",
            "routes.yaml:2: admin.listen: invalid listen address '127.0.0.1:65536': "
            "port must be an integer in 0..65535",
            id="bad-listen-port",
        ),
        pytest.param(
            "registry:\n  default_ttl: 2h\n",
            "routes.yaml:2: registry.default_ttl: must be between 1s and max_ttl (1h)",
            id="default-ttl-over-max",
        ),
        pytest.param(
            "registry:\n  max_ttl: 10s\n",
            "routes.yaml:2: registry.max_ttl: must be at least default_ttl (30s)",
            id="max-ttl-under-default",
        ),
        pytest.param(
            "proxy:\n  max_connections: 0\n",
            "routes.yaml:2: proxy.max_connections: must be at least 1, got 0",
            id="max-connections-zero",
        ),
        pytest.param(
            "routes:\n  - {prefix: /a, service: a, retries: -1}\n",
            "routes.yaml:2: routes[0].retries: must be at least 0, got -1",
            id="negative-retries",
        ),
        pytest.param(
            "services:\n  web:\n    instances: ['::1:9000']\n",
            "routes.yaml:3: services.web.instances[0]: invalid address '::1:9000': "
            "put an IPv6 address in brackets, e.g. [::1]:9000",
            id="ipv6-instance-without-brackets",
        ),
        pytest.param(
            "services:\n  web:\n    instances: [a.example:0]\n",
            "routes.yaml:3: services.web.instances[0]: invalid address 'a.example:0': "
            "port must be an integer in 1..65535",
            id="instance-port-zero",
        ),
        pytest.param(
            "services:\n  web:\n    instances:\n      - 10.0.0.1:80\n      - 10.0.0.1:80\n",
            "routes.yaml:5: services.web.instances[1]: duplicate instance 10.0.0.1:80",
            id="duplicate-instance",
        ),
        pytest.param(
            "services:\n  web:\n    health_check: {interval: 5s}\n",
            "routes.yaml:3: services.web.health_check: "
            "set path (an HTTP check, e.g. path: /healthz) or tcp: true",
            id="health-check-neither-path-nor-tcp",
        ),
        pytest.param(
            "services:\n  web:\n    health_check: {path: /h, tcp: true}\n",
            "routes.yaml:3: services.web.health_check: "
            "path (an HTTP check) and tcp: true exclude each other",
            id="health-check-both-path-and-tcp",
        ),
        pytest.param(
            "services:\n  web:\n    health_check: {path: /h, expected_status: 200-99}\n",
            "routes.yaml:3: services.web.health_check.expected_status: "
            "use a status like 200 or a range like 200-399, got '200-99'",
            id="bad-expected-status",
        ),
        pytest.param(
            "services:\n  web:\n    outlier:\n      max_ejected: 150%\n",
            "routes.yaml:4: services.web.outlier.max_ejected: "
            "use a percentage like 50% or a fraction 0..1, got '150%'",
            id="bad-max-ejected",
        ),
        pytest.param(
            "routes:\n  - prefix: /a\n    service: a\n  timeout: 5s\n",
            "routes.yaml:4: expected <block end>, but found '?'",
            id="yaml-syntax-error",
        ),
        pytest.param(
            "listen: :80\nproxy: {timeout: 5s\n",
            "routes.yaml:3: expected ',' or '}', but got '<stream end>'",
            id="yaml-unclosed-flow-mapping",
        ),
        pytest.param(
            "services:\n  web:\n    instances: [[::1]:9000]\n",
            "routes.yaml:3: expected the node content, but found ':'",
            id="yaml-unquoted-ipv6",
        ),
        pytest.param(
            "listen: :80\n---\nlisten: :81\n",
            "routes.yaml:2: but found another document",
            id="two-documents",
        ),
        pytest.param(
            "proxy:\n  retries: !!python/object:os.system ls\n",
            "routes.yaml:2: proxy.retries: "
            "cannot read 'ls' as tag:yaml.org,2002:python/object:os.system",
            id="unsafe-tag",
        ),
        pytest.param(
            "listen: :80\nadmin:\n  token_env: \x00\n",
            "routes.yaml:3: special characters are not allowed (#x0000)",
            id="control-character",
        ),
        pytest.param("[" * 5000, "routes.yaml:1: nested too deeply", id="deep-nesting"),
    ],
)
def test_each_mistake_names_its_line(text: str, expected: str) -> None:
    assert errors_of(text) == [expected]


def test_all_mistakes_are_reported_at_once_sorted_by_line() -> None:
    assert errors_of("""\
        routes:
          - prefix: /api
            service: API
            timeout: soon
          - prefix: /api
            service: api
        proxy:
          retries: many
        listen: 8080
        services:
          web:
            instances: [nohost]
        """) == [
        "routes.yaml:3: routes[0].service: invalid service name 'API': "
        "must match [a-z0-9][a-z0-9._-]{0,62}",
        "routes.yaml:4: routes[0].timeout: invalid duration 'soon': use e.g. 500ms, 30s, 2m, 1h",
        "routes.yaml:8: proxy.retries: expected an integer, got 'many'",
        "routes.yaml:9: listen: expected a string, got 8080",
        "routes.yaml:12: services.web.instances[0]: invalid address 'nohost': use host:port",
    ]


def test_errors_name_the_file_given() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config("proxy:\n  retries: -1\n", filename="conf/gw.yaml")
    assert caught.value.errors == ["conf/gw.yaml:2: proxy.retries: must be at least 0, got -1"]


@pytest.mark.parametrize(
    "text",
    [
        "just a string",
        "[1, 2, 3]",
        "42",
        "listen: [[[[[]]]]]",
        "services: {web: [1, 2]}",
        "services: {web: {instances: {a: b}}}",
        "routes: [null, 1, [], {}]",
        "? [complex, key]\n: value\n",
        "a: &anchor 1\nb: *anchor\n",
        "c: *undefined\n",
        "proxy: {timeout: " + "9" * 400 + "}\n",
        "proxy: {timeout: " + "9" * 400 + "h}\n",
        "routes: [{prefix: /, service: a, retries: -" + "9" * 400 + "}]\n",
        "routes: [{prefix: /, service: a, max_body: -" + "9" * 400 + "}]\n",
        "services: {a: {outlier: {max_ejected: " + "9" * 400 + "}}}\n",
        "services: {a: {outlier: {max_ejected: " + "9" * 400 + ".5%}}}\n",
        "services: {a: {health_check: {path: /, expected_status: " + "9" * 400 + "}}}\n",
        "proxy: {timeout: .nan}\n",
        "proxy: {retries: !!int x}\n",
        "<<: {listen: ':80'}\n",
        "[" * 5000,
    ],
)
def test_anything_a_user_writes_gives_a_config_error_not_a_traceback(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors
    assert all(error.startswith("routes.yaml:") for error in caught.value.errors)


def test_a_null_value_counts_as_absent() -> None:
    config = parse_config("admin:\nproxy:\n  timeout:\nservices:\n  web:\n    health_check:\n")
    assert config == Config(path=None, services={"web": ServiceConfig("web")})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:8080", ("0.0.0.0", 8080)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":9000", ("0.0.0.0", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::]:80", ("::", 80)),
        ("LocalHost:8081", ("localhost", 8081)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("8080", "invalid listen address '8080': use HOST:PORT, [IPv6]:PORT or :PORT"),
        ("::1:9000", "invalid listen address '::1:9000': use HOST:PORT, [IPv6]:PORT or :PORT"),
        (
            "[127.0.0.1]:80",
            "invalid listen address '[127.0.0.1]:80': use HOST:PORT, [IPv6]:PORT or :PORT",
        ),
        (
            "bad host:80",
            "invalid listen address 'bad host:80': use HOST:PORT, [IPv6]:PORT or :PORT",
        ),
        ("host:http", "invalid listen address 'host:http': port must be an integer in 0..65535"),
        ("host:70000", "invalid listen address 'host:70000': port must be an integer in 0..65535"),
        ("host:", "invalid listen address 'host:': port must be an integer in 0..65535"),
    ],
)
def test_parse_listen_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_listen(value)
    assert str(caught.value) == message


def test_describe_routes_lists_every_route_with_non_default_options() -> None:
    config = parse_config(
        textwrap.dedent("""\
        proxy: {timeout: 10s}
        routes:
          - {prefix: /api/users, service: users, strip_prefix: true, timeout: 5s}
          - {prefix: /, service: web, timeout: 10s}
          - prefix: /upload
            service: files
            host: files.example.com
            preserve_host: false
            connect_timeout: 500ms
            retries: 0
            max_body: 10MiB
        """)
    )
    assert describe_routes(config) == [
        "*                  /api/users  -> users  strip_prefix timeout=5s",
        "*                  /           -> web",
        "files.example.com  /upload     -> files  "
        "preserve_host=false connect_timeout=500ms retries=0 max_body=10MiB",
    ]


def test_describe_routes_of_a_single_route() -> None:
    config = parse_config(
        "routes:\n  - {prefix: /api/users, service: users, strip_prefix: true, timeout: 5s}\n"
    )
    assert describe_routes(config) == ["*  /api/users  -> users  strip_prefix timeout=5s"]
    assert describe_routes(parse_config("")) == []


def test_shadow_warnings() -> None:
    config = parse_config(
        textwrap.dedent("""\
        routes:
          - {prefix: /api, service: api}
          - {prefix: /api/users, service: users}
          - {prefix: /api/users/admin, service: users}
          - {prefix: /api/usersx, service: other}
          - {prefix: /api/orders, service: api}
          - {prefix: /api/v2, service: v2, host: new.example.com}
          - {prefix: /, service: web, host: old.example.com}
          - {prefix: /static, service: cdn, host: old.example.com}
          - {prefix: /docs, service: docs, host: docs.example.com}
        """)
    )
    assert shadow_warnings(config) == [
        "warning: routes.yaml:3: prefix /api/users (service users) shadows part of /api "
        "(service api)",
        "warning: routes.yaml:5: prefix /api/usersx (service other) shadows part of /api "
        "(service api)",
        "warning: routes.yaml:7: prefix /api/v2 (service v2) shadows part of /api (service api)",
    ]  # /static under the catch-all / (line 9): no warning, that is what / is for


def test_shadow_warnings_name_the_loaded_file(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(SPEC_EXAMPLE)
    assert shadow_warnings(load_config(path)) == []  # /api/users under the catch-all /
    path.write_text("routes:\n  - {prefix: /api, service: api}\n  - {prefix: /api/x, service: x}\n")
    assert shadow_warnings(load_config(path)) == [
        f"warning: {path}:3: prefix /api/x (service x) shadows part of /api (service api)"
    ]


def _quadratic_shadow_warnings(config: Config) -> list[str]:
    """The first, all-pairs version of shadow_warnings: the reference it must agree with."""
    warnings = []
    for route in config.routes:
        covering = [
            other
            for other in config.routes
            if other.host in (route.host, None)
            and other.prefix != route.prefix
            and (other.prefix == "/" or route.prefix.startswith(other.prefix + "/"))
        ]
        if covering:
            nearest = max(covering, key=lambda o: (len(o.prefix), o.host is not None))
            if nearest.service != route.service and nearest.prefix != "/":
                warnings.append(
                    f"warning: routes.yaml:{route.line}: prefix {route.prefix} (service "
                    f"{route.service}) shadows part of {nearest.prefix} (service {nearest.service})"
                )
    return warnings


@given(
    st.lists(
        st.tuples(
            st.lists(st.sampled_from(["a", "b", "ab"]), max_size=3),
            st.sampled_from(["s1", "s2", "s3"]),
            st.sampled_from([None, "x.example", "y.example"]),
        ),
        max_size=12,
    )
)
def test_shadow_warnings_agree_with_the_all_pairs_rule(
    routes: list[tuple[list[str], str, str | None]],
) -> None:
    config = Config(
        path=None,
        routes=tuple(
            RouteConfig(prefix="/" + "/".join(parts), service=service, host=host, line=line)
            for line, (parts, service, host) in enumerate(routes, 1)
        ),
    )
    assert shadow_warnings(config) == _quadratic_shadow_warnings(config)


def test_shadow_warnings_at_10000_routes() -> None:
    """10,000 routes (the all-pairs version took 76 s in `gateway check`)."""
    routes = tuple(
        RouteConfig(prefix=f"/api/v{i % 7}/s{i}", service=f"s{i % 3}", line=i)
        for i in range(10_000)
    ) + (RouteConfig(prefix="/api", service="api", line=10_001),)
    warnings = shadow_warnings(Config(path=None, routes=routes))
    assert len(warnings) == 10_000
    assert warnings[0] == (
        "warning: routes.yaml:0: prefix /api/v0/s0 (service s0) shadows part of /api (service api)"
    )


def test_relative_snapshot_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    text = "registry:\n  snapshot: state/registry.json\n"
    assert parse_config(text).registry.snapshot == Path("state/registry.json")
    assert (
        parse_config(text, base_dir=tmp_path).registry.snapshot == tmp_path / "state/registry.json"
    )
    absolute = tmp_path / "elsewhere.json"
    text_absolute = f"registry:\n  snapshot: {absolute}\n"
    assert parse_config(text_absolute, base_dir=Path("/x")).registry.snapshot == absolute

    folder = tmp_path / "conf"
    folder.mkdir()
    (folder / "routes.yaml").write_text(text)
    config = load_config(folder / "routes.yaml")
    assert config.path == folder / "routes.yaml"
    assert config.registry.snapshot == folder / "state" / "registry.json"


def test_load_config_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text("proxy:\n  retries: -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [f"{path}:2: proxy.retries: must be at least 0, got -1"]


def test_an_unreadable_file_is_one_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert caught.value.errors == [f"{missing}: cannot read: No such file or directory"]
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.errors == [f"{tmp_path}: cannot read: Is a directory"]
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(binary)
    assert caught.value.errors[0].startswith(f"{binary}: cannot read: 'utf-8' codec")


def test_importing_the_config_does_not_import_aiohttp_or_asyncio() -> None:
    code = (
        "import sys, gateway.config.loader; "
        "print(sorted(m for m in ('aiohttp', 'asyncio') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("text", ["", "\n", "# nothing yet\n", "   \n  # indented comment\n"])
def test_load_config_refuses_an_empty_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.errors == [
        f"{path} is empty: give it at least a routes: list, e.g. "
        "routes: [{prefix: /, service: web}]"
    ]
    assert parse_config(text) == Config(path=None)  # the text itself is a valid config


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("routes:\n\t- prefix: /\n    service: web\n", 2),
        ("routes:\n  - prefix: /\n\tservice: web\n", 3),
        ("routes:\n  - prefix: /\n    \tservice: web\n", 3),
        ("proxy:\n\ttimeout: 5s\n", 2),
    ],
)
def test_a_tab_is_explained(text: str, line: int) -> None:
    assert errors_of(text) == [f"routes.yaml:{line}: a tab character; YAML indents with spaces"]
