"""Concurrency limits per service (issue 12 item 4): ``max_requests`` in flight to one
instance, ``max_pending`` in flight to the service; beyond them 503 overloaded at once."""

from __future__ import annotations

import pytest

from gateway.config.loader import parse_config
from gateway.config.model import ConfigError


def _config(limits: str) -> str:
    return f"routes:\n  - prefix: /\n    service: web\nservices:\n  web: {{{limits}}}\n"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "must be at least 1, got 0"),
        ("-1", "must be at least 1, got -1"),
        ('"x"', "expected an integer, got 'x'"),
        ("true", "expected an integer, got true"),
        ("2.5", "expected an integer, got 2.5"),
    ],
)
@pytest.mark.parametrize("key", ["max_requests", "max_pending"])
def test_limits_must_be_positive_integers(key: str, value: str, message: str) -> None:
    text = f"services:\n  web:\n    instances: [127.0.0.1:9000]\n    {key}: {value}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert caught.value.errors == [f"routes.yaml:4: services.web.{key}: {message}"]


def test_limits_are_optional() -> None:
    services = parse_config(_config("max_requests: 10, max_pending: 100")).services
    assert (services["web"].max_requests, services["web"].max_pending) == (10, 100)
    bare = parse_config(_config("")).services["web"]
    assert (bare.max_requests, bare.max_pending) == (None, None)
