"""Session affinity (services.NAME.affinity): consistent hashing of a cookie or header."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.config.loader import parse_config
from gateway.config.model import AffinityConfig, ConfigError
from gateway.dataplane.affinity import request_key
from gateway.dataplane.wire import RequestHead
from registry.core.balancer import HashRing
from registry.core.models import Instance

KEYS = [b"session-%d" % n for n in range(2000)]


def _peers(*ids: str, weight: int = 1) -> list[Instance]:
    return [Instance("api", i, "10.0.0.1", n + 1, weight=weight) for n, i in enumerate(ids)]


def _owners(ring: HashRing[Instance]) -> dict[bytes, str]:
    return {key: ring.pick(key).id for key in KEYS}  # type: ignore[union-attr]


def test_a_key_keeps_its_instance_while_others_come_and_go():
    a, b, c, d = _peers("a", "b", "c", "d")
    before = _owners(HashRing([a, b, c]))
    assert set(before.values()) == {"a", "b", "c"}
    after_leave = _owners(HashRing([a, c]))  # b left: only b's keys move
    assert all(after_leave[k] == owner for k, owner in before.items() if owner != "b")
    after_join = _owners(HashRing([a, b, c, d]))  # d joined: keys move only to d
    moved = [k for k, owner in before.items() if after_join[k] != owner]
    assert moved and all(after_join[k] == "d" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.35  # about a quarter, d's share


def test_keys_spread_by_weight():
    light, heavy = _peers("light")[0], _peers("x", "heavy", weight=3)[1]
    shares = Counter(_owners(HashRing([light, heavy])).values())
    assert 0.15 < shares["light"] / len(KEYS) < 0.35  # a quarter by weight


def test_a_retry_walks_on_to_another_instance():
    ring = HashRing(_peers("a", "b", "c"))
    first = ring.pick(b"user-7")
    assert first is not None
    second = ring.pick(b"user-7", exclude={first.id})
    assert second is not None and second.id != first.id
    assert ring.pick(b"user-7", exclude={"a", "b", "c"}) is None
    assert HashRing([]).pick(b"user-7") is None


def _head(*lines: bytes) -> RequestHead:
    head = RequestHead()
    head.lines = list(lines)
    return head


def test_the_key_is_the_named_cookie_or_header():
    head = _head(b"Host: x\r\n", b"Cookie: theme=dark; sid=abc123\r\n", b"X-User: 42\r\n")
    assert request_key(head, b"sid", cookie=True) == b"abc123"
    assert request_key(head, b"SID", cookie=True) is None  # cookie names are case-sensitive
    assert request_key(head, b"x-user", cookie=False) == b"42"
    assert request_key(head, b"missing", cookie=True) is None
    assert request_key(_head(b"Cookie: sid=\r\n"), b"sid", cookie=True) is None  # empty: none


def test_the_config_takes_a_cookie_or_a_header():
    config = parse_config(
        "services:\n  api: {affinity: {cookie: sid}}\n  web: {affinity: {header: X-User}}\n"
    )
    assert config.services["api"].affinity == AffinityConfig(cookie="sid")
    assert config.services["web"].affinity == AffinityConfig(header="X-User")


ONE_OF = "services.api.affinity: takes one of cookie or header (the name whose value is hashed)"


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("{}", ONE_OF),
        ("{cookie: a, header: b}", ONE_OF),
        ("{cookie: 'a b'}", "services.api.affinity.cookie: not a header name: 'a b'"),
        ("{hash: ip}", "services.api.affinity: unknown key 'hash' (known keys: cookie, header)"),
    ],
)
def test_a_bad_affinity_is_refused_with_its_line(setting, error):
    with pytest.raises(ConfigError) as caught:
        parse_config(f"services:\n  api:\n    affinity: {setting}\n")
    assert f"routes.yaml:3: {error}" in caught.value.errors


ROUTES = """
routes:
  - prefix: /
    service: api
services:
  api:
    affinity: {cookie: sid}
"""


async def _upstream_of(gw, cookie: str | None = None) -> str:
    headers = {"Cookie": f"sid={cookie}"} if cookie else {}
    async with gw.session.get(gw.proxy_url + "/x", headers=headers) as response:
        assert response.status == 200
        return response.headers["X-Upstream"]


async def test_through_the_gateway_a_session_sticks_to_its_instance(gateway_factory, upstreams):
    gw = await gateway_factory(ROUTES)
    started = {name: await upstreams(name) for name in ("a", "b", "c")}
    for upstream in started.values():
        await gw.register("api", upstream)
    sessions = [f"user-{n}" for n in range(30)]
    owners = {s: await _upstream_of(gw, s) for s in sessions}
    assert len(set(owners.values())) == 3  # sessions spread over the instances
    for s in sessions[:10]:  # and each sticks
        assert [await _upstream_of(gw, s) for _ in range(3)] == [owners[s]] * 3
    gone = owners[sessions[0]]
    port = started[gone].port
    async with gw.session.delete(
        f"{gw.admin_url}/registry/services/api/instances/127.0.0.1:{port}"
    ):
        pass
    for s in sessions:  # the instances that stay keep their sessions; the others move
        now = await _upstream_of(gw, s)
        assert now != gone
        if owners[s] != gone:
            assert now == owners[s]
    # Without the cookie: balanced as usual (round-robin over the two left).
    assert Counter([await _upstream_of(gw) for _ in range(4)]).most_common()[0][1] == 2
