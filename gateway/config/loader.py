"""The one loader of routes.yaml (SPEC sections 3 and 8). Pure: no aiohttp, no asyncio.

The YAML is composed into nodes and walked by hand so that every mistake names its
line, and all mistakes of a file are reported together in one ConfigError as
``file:line: where: message``. A null value (``key:`` with nothing after it) counts
as an absent key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config import yamltree
from gateway.config.describe import format_duration
from gateway.config.model import (
    AdminConfig,
    AffinityConfig,
    Config,
    ConfigError,
    HealthCheckConfig,
    OutlierConfig,
    ProxySettings,
    RateLimitConfig,
    RegistryConfig,
    RouteConfig,
    ServiceConfig,
    SplitConfig,
    TlsConfig,
    TokenConfig,
    parse_listen,
    parse_port,
)
from registry.core.balancer import BALANCERS, ROUND_ROBIN, Balancing
from registry.core.errors import InvalidField
from registry.core.models import SERVICE_NAME_RE, format_address, validate_host
from registry.core.units import parse_duration, parse_size

_T = TypeVar("_T")


_TOP_KEYS = ("listen", "tls", "admin", "registry", "proxy", "routes", "services")
_ADMIN_KEYS = ("listen", "token_env", "tls", "tokens")
_TOKEN_KEYS = ("name", "token_env", "services", "role")
_TLS_KEYS = ("cert", "key")
ACCESS_LOG_FORMS = ("off", "json", "common")
_REGISTRY_KEYS = (
    "default_ttl",
    "max_ttl",
    "snapshot",
    "backend",
    "allow_loopback",
    "max_instances",
    "max_instances_per_service",
    "self_preservation",
)
_PROXY_KEYS = tuple(ProxySettings.__dataclass_fields__)
_ROUTE_KEYS = tuple(k for k in RouteConfig.__dataclass_fields__ if k != "line")
_SERVICE_KEYS = (
    "instances", "health_check", "outlier", "balancer", "slow_start", "max_requests",
    "max_pending", "affinity", "panic_threshold",
)  # fmt: skip
_HEALTH_KEYS = tuple(HealthCheckConfig.__dataclass_fields__)
_OUTLIER_KEYS = tuple(OutlierConfig.__dataclass_fields__)
_AFFINITY_KEYS = tuple(AffinityConfig.__dataclass_fields__)

_NULL_TAG = "tag:yaml.org,2002:null"
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PERCENT_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*%\s*")
_STATUS_RANGE_RE = re.compile(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?")
_BAD = object()  # a scalar YAML could not construct; the error is already recorded


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and parse a config file; relative paths in it resolve against its folder."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{file}: cannot read: {reason}"]) from None
    if _is_empty(text):  # parse_config("") is a valid (default) config; an empty file is a slip
        raise ConfigError(
            [
                f"{file} is empty: give it at least a routes: list, e.g. "
                "routes: [{prefix: /, service: web}]"
            ]
        )
    config = parse_config(text, filename=str(file), base_dir=file.absolute().parent)
    return replace(config, path=file)


def _is_empty(text: str) -> bool:
    """Nothing but blank lines and comments."""
    return all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines())


def parse_config(text: str, filename: str = "routes.yaml", base_dir: Path | None = None) -> Config:
    """Parse config text; ``Config.path`` is None (load_config sets it)."""
    try:
        root = yamltree.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "invalid YAML"
        if "'\\t'" in problem:  # PyYAML: "found character '\\t' that cannot start any token"
            problem = "a tab character; YAML indents with spaces"
        raise ConfigError([f"{filename}:{line}: {problem}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError([f"{filename}:{line}: {exc.reason} (#x{exc.character:04x})"]) from None
    except RecursionError:
        raise ConfigError([f"{filename}:1: nested too deeply"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1: invalid YAML: {exc}"]) from None
    reader = _Reader(filename)
    top = reader.section(root, "", _TOP_KEYS)
    proxy = _proxy(reader.section(top.node("proxy"), "proxy", _PROXY_KEYS), base_dir)
    admin = reader.section(top.node("admin"), "admin", _ADMIN_KEYS)
    admin_tls = _tls(reader.section(admin.node("tls"), "admin.tls", _TLS_KEYS), base_dir)
    tokens = _tokens(reader, admin.node("tokens"))
    config = Config(
        path=None,
        listen=top.get("listen", Config.listen, parse_listen),
        tls=_tls(reader.section(top.node("tls"), "tls", _TLS_KEYS), base_dir),
        admin=_admin(admin, admin_tls, tokens),
        registry=_registry(
            reader.section(top.node("registry"), "registry", _REGISTRY_KEYS), base_dir
        ),
        proxy=proxy,
        routes=_routes(reader, top.node("routes"), proxy),
        services=_services(reader, top.node("services")),
    )
    yamltree.dismantle(root)
    if reader.errors:
        raise ConfigError([message for _, message in sorted(reader.errors, key=lambda e: e[0])])
    return config


class _Reader:
    """Walks composed YAML nodes and collects ``(line, "file:line: where: message")`` errors."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.errors: list[tuple[int, str]] = []
        # A constructor alone: a SafeLoader is a reference cycle, and with it every node
        # it constructed (garbage only a full collection frees: 50 ms at 10,000 routes).
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, node: Node, where: str, message: str) -> None:
        line = node.start_mark.line + 1
        where = f"{where}: " if where else ""
        self.errors.append((line, f"{self.filename}:{line}: {where}{message}"))

    def value(self, node: Node, where: str) -> object:
        """A scalar's Python value; a mapping or list node comes back as itself."""
        if not isinstance(node, ScalarNode):
            return node
        try:
            return self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError):
            self.error(node, where, f"cannot read {node.value!r} as {node.tag}")
            return _BAD
        finally:
            self._constructor.constructed_objects.clear()  # it would keep every node

    def entries(self, node: Node | None, where: str) -> list[tuple[str, Node, Node]]:
        """(key, key node, value node) of a mapping, without duplicate keys; null is empty."""
        if node is None or node.tag == _NULL_TAG:
            return []
        if not isinstance(node, MappingNode):
            self.error(
                node, where, f"expected a mapping, got {_describe(node, self.value(node, where))}"
            )
            return []
        first_lines: dict[str, int] = {}
        entries: list[tuple[str, Node, Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.error(key_node, where, "keys must be plain names")
                continue
            key = str(key_node.value)
            if key in first_lines:
                self.error(
                    key_node, where, f"duplicate key {key!r} (first on line {first_lines[key]})"
                )
                continue
            first_lines[key] = key_node.start_mark.line + 1
            entries.append((key, key_node, value_node))
        return entries

    def section(self, node: Node | None, where: str, keys: Sequence[str]) -> _Section:
        fields = {}
        for key, key_node, value_node in self.entries(node, where):
            if key in keys:
                fields[key] = value_node
            else:
                self.error(key_node, where, _unknown_key(key, keys))
        readable = node is not None and (isinstance(node, MappingNode) or node.tag == _NULL_TAG)
        return _Section(self, node if readable else None, where, fields)

    def convert(
        self,
        node: Node,
        where: str,
        default: _T,
        parse: Callable[[Any], _T],
        kinds: tuple[type, ...] = (str,),
        expected: str = "a string",
    ) -> _T:
        """The node's value, checked against kinds, then parse (whose ValueError is an error)."""
        value = self.value(node, where)
        if value is _BAD:
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            self.error(node, where, f"expected {expected}, got {_describe(node, value)}")
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.error(node, where, str(exc))
        return default

    def items(self, node: Node | None, where: str) -> list[Node]:
        """The items of a list; null is empty."""
        if node is None or node.tag == _NULL_TAG:
            return []
        if not isinstance(node, SequenceNode):
            self.error(
                node, where, f"expected a list, got {_describe(node, self.value(node, where))}"
            )
            return []
        return list(node.value)

    def name(self, node: Node, where: str) -> str | None:
        """A service name as written (``007`` stays ``007``), checked against SERVICE_NAME_RE."""
        if not isinstance(node, ScalarNode):
            self.error(node, where, f"expected a service name, got {_describe(node, node)}")
            return None
        name = str(node.value)
        if not SERVICE_NAME_RE.fullmatch(name):
            self.error(
                node, where, f"invalid service name {name!r}: must match {SERVICE_NAME_RE.pattern}"
            )
            return None
        return name


class _Section:
    """The known keys of one mapping (None when absent or not a mapping), read with defaults."""

    def __init__(
        self, reader: _Reader, node: Node | None, where: str, fields: dict[str, Node]
    ) -> None:
        self.reader = reader
        self.mapping = node
        self.where = where
        self.fields = fields

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def node(self, key: str) -> Node | None:
        node = self.fields.get(key)
        return None if node is None or node.tag == _NULL_TAG else node

    def error(self, key: str | None, message: str) -> None:
        """An error on the value of key, or on the mapping itself when key is None."""
        node = self.fields[key] if key is not None else self.mapping
        if node is not None:
            self.reader.error(node, self.path(key) if key is not None else self.where, message)

    def get(
        self,
        key: str,
        default: _T,
        parse: Callable[[Any], _T],
        kinds: tuple[type, ...] = (str,),
        expected: str = "a string",
    ) -> _T:
        """The value at key as ``_Reader.convert`` makes it; default when absent or wrong."""
        node = self.node(key)
        if node is None:
            return default
        return self.reader.convert(node, self.path(key), default, parse, kinds, expected)

    def flag(self, key: str, default: bool) -> bool:
        return self.get(key, default, bool, (bool,), "true or false")

    def integer(self, key: str, default: int, minimum: int) -> int:
        return self.get(key, default, lambda value: _at_least(value, minimum), (int,), "an integer")

    def duration(self, key: str, default: float) -> float:
        return self.get(key, default, _positive_duration, (str, int, float), "a duration like 30s")

    def require(self, key: str) -> None:
        if self.node(key) is None and self.mapping is not None:
            self.reader.error(self.mapping, self.where, f"missing key {key!r}")


def _admin(s: _Section, tls: TlsConfig | None, tokens: tuple[TokenConfig, ...]) -> AdminConfig:
    return AdminConfig(
        listen=s.get("listen", AdminConfig.listen, parse_listen),
        token_env=s.get("token_env", None, _env_name),
        tls=tls,
        tokens=tokens,
    )


def _tokens(reader: _Reader, node: Node | None) -> tuple[TokenConfig, ...]:
    tokens: list[TokenConfig] = []
    names: set[str] = set()
    for index, item in enumerate(reader.items(node, "admin.tokens")):
        s = reader.section(item, f"admin.tokens[{index}]", _TOKEN_KEYS)
        if s.mapping is None:
            reader.error(item, f"admin.tokens[{index}]", "expected {name, token_env, ...}")
            continue
        s.require("name")
        s.require("token_env")
        name = s.get("name", "", _token_name)
        if name in names:
            s.error("name", f"duplicate token name {name!r}")
        names.add(name)
        services = tuple(
            reader.convert(glob, f"{s.path('services')}[{i}]", "", _service_glob)
            for i, glob in enumerate(reader.items(s.node("services"), s.path("services")))
        )
        role = s.get("role", "write", _role)
        env = s.get("token_env", "", _env_name)
        if name and env:
            tokens.append(TokenConfig(name, env, services or ("*",), role))
    return tuple(tokens)


_TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_GLOB_RE = re.compile(r"[a-z0-9._*?\[\]!-]{1,64}")


def _token_name(value: str) -> str:
    if not _TOKEN_NAME_RE.fullmatch(value):
        raise ValueError(f"must match {_TOKEN_NAME_RE.pattern}, got {value!r}")
    return value


def _service_glob(value: str) -> str:
    if not _GLOB_RE.fullmatch(value):
        raise ValueError(f"a service name or glob like billing-*, got {value!r}")
    return value


def _role(value: str) -> str:
    if value not in ("write", "read"):
        raise ValueError(f"must be write or read, got {value!r}")
    return value


def _tls(s: _Section, base_dir: Path | None) -> TlsConfig | None:
    """``{cert, key}``: both files, relative to the config's folder; loaded once here so
    that a wrong pair is a config error (at check, start and reload), not a failed start."""
    if s.mapping is None:
        return None
    cert = s.get("cert", None, _file_path)
    key = s.get("key", None, _file_path)
    for name, value in (("cert", cert), ("key", key)):
        if value is None and s.node(name) is None:
            s.error(None, f"{name} is missing (tls needs cert and key, PEM files)")
    if cert is None or key is None:
        return None
    if base_dir is not None:
        cert, key = base_dir / cert, base_dir / key
    missing = [(name, path) for name, path in (("cert", cert), ("key", key)) if not path.is_file()]
    for name, path in missing:
        s.error(name, f"no file {path}")
    if missing:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        s.error(None, f"cannot load the certificate and key: {_ssl_reason(exc)}")
        return None
    return TlsConfig(cert, key)


def _ssl_reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    return str(reason).lower().replace("_", " ")


def _registry(s: _Section, base_dir: Path | None) -> RegistryConfig:
    max_ttl = s.duration("max_ttl", RegistryConfig.max_ttl)
    default_ttl = s.duration("default_ttl", RegistryConfig.default_ttl)
    if max_ttl < 1:
        s.error("max_ttl", "must be at least 1s")
    elif not 1 <= default_ttl <= max_ttl:
        if s.node("default_ttl") is not None:
            s.error("default_ttl", f"must be between 1s and max_ttl ({format_duration(max_ttl)})")
        else:
            s.error("max_ttl", f"must be at least default_ttl ({format_duration(default_ttl)})")
    snapshot = s.get("snapshot", None, _file_path)
    if snapshot is not None and base_dir is not None:
        snapshot = base_dir / snapshot
    backend = s.get("backend", RegistryConfig.backend, _backend)
    return RegistryConfig(
        default_ttl,
        max_ttl,
        snapshot,
        backend,
        allow_loopback=s.flag("allow_loopback", False),
        max_instances=s.integer("max_instances", RegistryConfig.max_instances, 1),
        max_instances_per_service=s.integer(
            "max_instances_per_service", RegistryConfig.max_instances_per_service, 1
        ),
        self_preservation=s.get(
            "self_preservation",
            RegistryConfig.self_preservation,
            _share_or_off,
            (str, int, float, bool),
            "a percentage like 50% or off",
        ),
    )


def _proxy(s: _Section, base_dir: Path | None) -> ProxySettings:
    d = ProxySettings()
    ca = s.get("upstream_ca", None, _file_path)
    if ca is not None:
        ca = base_dir / ca if base_dir is not None else ca
        try:
            ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            s.error("upstream_ca", f"cannot load CA certificates from {ca}: {_ssl_reason(exc)}")
    trusted = tuple(
        s.reader.convert(item, f"{s.path('trusted_proxies')}[{i}]", "", _cidr)
        for i, item in enumerate(
            s.reader.items(s.node("trusted_proxies"), s.path("trusted_proxies"))
        )
    )
    return ProxySettings(
        access_log=s.get("access_log", "off", _access_log_form),
        trusted_proxies=tuple(cidr for cidr in trusted if cidr),
        upstream_ca=ca,
        upstream_tls_verify=s.flag("upstream_tls_verify", True),
        connect_timeout=s.duration("connect_timeout", d.connect_timeout),
        timeout=s.duration("timeout", d.timeout),
        retries=s.integer("retries", d.retries, 0),
        header_timeout=s.duration("header_timeout", d.header_timeout),
        idle_timeout=s.duration("idle_timeout", d.idle_timeout),
        body_timeout=s.duration("body_timeout", d.body_timeout),
        send_timeout=s.duration("send_timeout", d.send_timeout),
        max_connections=s.integer("max_connections", d.max_connections, 1),
        instance_metrics=s.integer("instance_metrics", d.instance_metrics, 0),
    )


def _routes(reader: _Reader, node: Node | None, proxy: ProxySettings) -> tuple[RouteConfig, ...]:
    routes: list[RouteConfig] = []
    first_lines: dict[tuple[str | None, str], int] = {}
    for index, item in enumerate(reader.items(node, "routes")):
        errors_before = len(reader.errors)
        s = reader.section(item, f"routes[{index}]", _ROUTE_KEYS)
        s.require("prefix")
        s.require("service")
        service = s.node("service")
        name = reader.name(service, s.path("service")) if service is not None else None
        route = RouteConfig(
            prefix=s.get("prefix", "/", _prefix),
            service=name or "",
            strip_prefix=s.flag("strip_prefix", False),
            host=s.get("host", None, _route_host),
            preserve_host=s.flag("preserve_host", True),
            timeout=s.duration("timeout", proxy.timeout),
            connect_timeout=s.duration("connect_timeout", proxy.connect_timeout),
            retries=s.integer("retries", proxy.retries, 0),
            max_body=s.get("max_body", None, parse_size, (str, int), "a size like 10MiB"),
            rate_limit=_rate_limit(
                reader.section(s.node("rate_limit"), s.path("rate_limit"), _RATE_LIMIT_KEYS)
            ),  # fmt: skip
            split=_split(reader, s.node("split"), s.path("split")),
            split_header=s.get("split_header", RouteConfig.split_header, _header_name),
            line=item.start_mark.line + 1,
        )
        if route.split_header != RouteConfig.split_header and not route.split:
            s.error("split_header", "is for split (set split: too)")
        if len(reader.errors) > errors_before:
            continue  # a route with mistakes is reported once, not again as a duplicate
        key = (route.host, route.prefix)
        if key in first_lines:
            host = f" and host {route.host}" if route.host else ""
            first = first_lines[key]
            s.error(
                "prefix", f"duplicate route for prefix {route.prefix}{host} (first on line {first})"
            )
            continue
        first_lines[key] = route.line
        routes.append(route)
    return tuple(routes)


_SPLIT_KEYS = ("metadata", "weight")


def _split(reader: _Reader, node: Node | None, where: str) -> tuple[SplitConfig, ...]:
    """``[{metadata: {version: "2"}, weight: 10}, {metadata: {version: "1"}, weight: 90}]``:
    the first subset is the canary; weights 0..100, at least one above 0."""
    if node is None:
        return ()
    subsets: list[SplitConfig] = []
    first_lines: dict[tuple[tuple[str, str], ...], int] = {}
    items = reader.items(node, where)
    if isinstance(node, SequenceNode) and not items:
        reader.error(
            node, where, 'list at least one subset, like {metadata: {version: "2"}, weight: 10}'
        )
    for index, item in enumerate(items):
        s = reader.section(item, f"{where}[{index}]", _SPLIT_KEYS)
        if s.mapping is None:  # not a mapping (reported) or null
            if item.tag == _NULL_TAG:
                reader.error(item, f"{where}[{index}]", "expected {metadata: {...}, weight: N}")
            continue
        s.require("metadata")
        s.require("weight")
        metadata = _split_metadata(reader, s.node("metadata"), s.path("metadata"))
        weight = s.get("weight", -1, _split_weight, (int,), "an integer 0..100")
        line = item.start_mark.line + 1
        if metadata in first_lines:
            s.error("metadata", f"duplicate subset (first on line {first_lines[metadata]})")
        elif metadata and weight >= 0:
            first_lines[metadata] = line
            subsets.append(SplitConfig(metadata, weight, line))
    if len(subsets) == len(items) and items and not any(subset.weight for subset in subsets):
        reader.error(node, where, "every weight is 0: give at least one subset a weight above 0")
    return tuple(subsets)


def _split_metadata(reader: _Reader, node: Node | None, where: str) -> tuple[tuple[str, str], ...]:
    """A subset's metadata: string to string, at least one pair; sorted by key."""
    if node is None:
        return ()
    pairs = []
    entries = reader.entries(node, where)
    for key, _, value_node in entries:
        value = reader.convert(
            value_node, f"{where}.{key}", None, str, (str,), 'a string (quote numbers: "2")'
        )
        if value is not None:
            pairs.append((key, value))
    if isinstance(node, MappingNode) and not entries:
        reader.error(node, where, 'name at least one key, like {version: "2"}')
    if len(pairs) != len(entries) or not pairs:
        return ()
    return tuple(sorted(pairs))


def _split_weight(value: int) -> int:
    if not 0 <= value <= 100:
        raise ValueError(f"must be an integer in 0..100, got {value}")
    return value


_RATE_LIMIT_KEYS = ("average", "burst", "by", "header")


def _rate_limit(s: _Section) -> RateLimitConfig | None:
    """``{average: 100, burst: 50, by: client_ip}`` or ``by: header`` with ``header: X-Api-Key``."""
    if s.mapping is None:
        return None
    s.require("average")
    average = s.get("average", 0.0, _positive_rate, (int, float), "requests a second, like 100")
    burst = s.integer("burst", max(1, int(average)), 1)
    by = s.get("by", "client_ip", _rate_key)
    header = s.get("header", None, _header_name)
    if by == "header" and header is None:
        s.error("by", "by: header needs header: <name>, the header whose value tells clients apart")
    if by == "client_ip" and header is not None:
        s.error("header", "is for by: header")
    if average <= 0 or (by == "header") != (header is not None):
        return None
    return RateLimitConfig(average, burst, header)


def _positive_rate(value: float) -> float:
    if value <= 0:
        raise ValueError(f"must be above 0, got {value}")
    return float(value)


def _rate_key(value: str) -> str:
    if value not in ("client_ip", "header"):
        raise ValueError(f"must be client_ip or header, got {value!r}")
    return value


_HEADER_NAME_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}")


def _header_name(value: str) -> str:
    if not _HEADER_NAME_RE.fullmatch(value):
        raise ValueError(f"not a header name: {value!r}")
    return value


def _services(reader: _Reader, node: Node | None) -> dict[str, ServiceConfig]:
    services = {}
    for _, key_node, value_node in reader.entries(node, "services"):
        name = reader.name(key_node, "services")
        s = reader.section(value_node, f"services.{key_node.value}", _SERVICE_KEYS)
        instances = _instances(reader, s.node("instances"), s.path("instances"))
        health = _health_check(
            reader.section(s.node("health_check"), s.path("health_check"), _HEALTH_KEYS)
        )
        outlier = _outlier(reader.section(s.node("outlier"), s.path("outlier"), _OUTLIER_KEYS))
        balancing = Balancing(
            s.get("balancer", ROUND_ROBIN, _balancer),
            s.get("slow_start", 0.0, parse_duration, (str, int, float), "a duration like 30s"),
        )
        max_requests = s.get("max_requests", None, _positive_int, (int,), "an integer")
        max_pending = s.get("max_pending", None, _positive_int, (int,), "an integer")
        affinity = _affinity(reader.section(s.node("affinity"), s.path("affinity"), _AFFINITY_KEYS))
        panic_threshold = s.get(
            "panic_threshold",
            ServiceConfig.panic_threshold,
            _fraction,
            (str, int, float),
            "a number",
        )
        if name is not None:
            services[name] = ServiceConfig(
                name,
                instances,
                health,
                outlier,
                balancing,
                max_requests,
                max_pending,
                affinity,
                panic_threshold,
            )
    return services


def _instances(reader: _Reader, node: Node | None, where: str) -> tuple[tuple[str, int], ...]:
    instances: list[tuple[str, int]] = []
    for index, item in enumerate(reader.items(node, where)):
        address = reader.convert(item, f"{where}[{index}]", None, _parse_address)
        if address in instances:
            reader.error(
                item, f"{where}[{index}]", f"duplicate instance {format_address(*address)}"
            )
        elif address is not None:
            instances.append(address)
    return tuple(instances)


def _health_check(s: _Section) -> HealthCheckConfig | None:
    if s.mapping is None:
        return None
    d = HealthCheckConfig()
    tcp = s.flag("tcp", False)
    if tcp and s.node("path") is not None:
        s.error(None, "path (an HTTP check) and tcp: true exclude each other")
    elif not tcp and s.node("path") is None:
        s.error(None, "set path (an HTTP check, e.g. path: /healthz) or tcp: true")
    return HealthCheckConfig(
        path=None if tcp else s.get("path", None, _check_path),
        tcp=tcp,
        interval=s.duration("interval", d.interval),
        timeout=s.duration("timeout", d.timeout),
        healthy=s.integer("healthy", d.healthy, 1),
        unhealthy=s.integer("unhealthy", d.unhealthy, 1),
        expected_status=s.get("expected_status", d.expected_status, _status_range, (str, int)),
    )


def _affinity(s: _Section) -> AffinityConfig | None:
    if s.mapping is None:
        return None
    cookie = s.get("cookie", None, _header_name)
    header = s.get("header", None, _header_name)
    if (s.node("cookie") is None) == (s.node("header") is None):
        s.error(None, "takes one of cookie or header (the name whose value is hashed)")
        return None
    return AffinityConfig(cookie, header)


def _outlier(s: _Section) -> OutlierConfig:
    d = OutlierConfig()
    return OutlierConfig(
        consecutive_failures=s.integer("consecutive_failures", d.consecutive_failures, 1),
        base_ejection=s.duration("base_ejection", d.base_ejection),
        max_ejected=s.get("max_ejected", d.max_ejected, _fraction, (str, int, float), "a number"),
        consecutive_5xx=s.get("consecutive_5xx", None, _positive_int, (int,), "an integer"),
    )


# Value parsers: each raises ValueError with the message a user sees after "where: ".


def _at_least(value: int, minimum: int) -> int:
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    return value


def _positive_int(value: int) -> int:
    return _at_least(value, 1)


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


def _env_name(value: str) -> str:
    if not _ENV_NAME_RE.fullmatch(value):
        raise ValueError(f"must name an environment variable, got {value!r}")
    return value


def _file_path(value: str) -> Path:
    if not value.strip():
        raise ValueError("must be a file path")
    return Path(value)


def _balancer(value: str) -> str:
    if value not in BALANCERS:
        raise ValueError(f"must be one of {', '.join(BALANCERS)}, got {value!r}")
    return value


def _access_log_form(value: str) -> str:
    if value not in ACCESS_LOG_FORMS:
        raise ValueError(f"must be off, json or common, got {value!r}")
    return value


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or CIDR (like 10.0.0.0/8): {value!r}") from None


def _backend(value: str) -> str:
    if value == "memory":
        return value
    usage = f"invalid backend {value!r}: use memory or etcd://HOST:PORT[,HOST:PORT...]"
    scheme, _, addresses = value.partition("://")
    if scheme != "etcd":
        raise ValueError(usage)
    for address in addresses.split(","):
        try:
            _parse_address(address)
        except ValueError:
            raise ValueError(usage) from None
    return value


def _prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with /, got {value!r}")
    prefix = value[:-1] if len(value) > 1 and value.endswith("/") else value
    segments = prefix[1:].split("/") if prefix != "/" else []
    if any(s in ("", ".", "..") for s in segments) or re.search(r"[\s?#]", prefix):
        raise ValueError(f"use a plain path like /api/users (no //, ., .., ? or #), got {value!r}")
    return prefix


def _route_host(value: str) -> str:
    try:
        return validate_host(value)
    except InvalidField:
        raise ValueError(f"use a host name without scheme or port, got {value!r}") from None


def _check_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with /, got {value!r}")
    return value


def _status_range(value: str | int) -> tuple[int, int]:
    match = _STATUS_RANGE_RE.fullmatch(str(value))
    low, high = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (0, 0)
    if not 100 <= low <= high <= 599:
        raise ValueError(f"use a status like 200 or a range like 200-399, got {value!r}")
    return low, high


def _fraction(value: str | float) -> float:
    match = _PERCENT_RE.fullmatch(value) if isinstance(value, str) else None
    fraction = float(match.group(1)) / 100 if match else value
    if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"use a percentage like 50% or a fraction 0..1, got {value!r}")
    return float(fraction)


def _share_or_off(value: str | float) -> float:
    """A _fraction, or off (0); YAML reads a bare ``off`` as false."""
    if value is False or value == "off":
        return 0.0
    if value is True:
        raise ValueError("use a percentage like 50% or off, got true")
    return _fraction(value)


def _parse_address(text: str) -> tuple[str, int]:
    """An instance or etcd ``host:port``; IPv6 in brackets as ``[::1]:9000``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"invalid address {text!r}: use host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(
            f"invalid address {text!r}: put an IPv6 address in brackets, e.g. [::1]:9000"
        )
    try:
        return validate_host(host), parse_port(port_text, 1, f"invalid address {text!r}")
    except InvalidField as exc:
        raise ValueError(f"invalid address {text!r}: {exc.message}") from None


def _unknown_key(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key {key!r} ({hint})"


def _describe(node: Node, value: object) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return repr(value) if isinstance(value, str) else str(node.value) or "null"
