"""W3C trace context (issue 11 item 2): a valid traceparent goes on with the gateway as
the new parent span; an absent or invalid one starts a new trace."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.dataplane.wire import RequestHead

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
LINE = re.compile(rb"\r\ntraceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\r\n")


def send(*headers: tuple[bytes, bytes]) -> tuple[RequestHead, bytes]:
    head = RequestHead()
    for name, value in headers:
        head.add(name, value)
    return head, head.upstream_head(b"GET", b"/", client_ip=b"192.0.2.1", request_id=b"r")


def parent(out: bytes) -> tuple[bytes, bytes, bytes]:
    found = LINE.search(out)
    assert found is not None, out
    return found[1], found[2], found[3]


def test_a_valid_traceparent_goes_on_with_a_new_parent_id() -> None:
    head, out = send((b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE"))
    trace, span, flags = parent(out)
    assert trace == head.trace_id == b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert span != b"00f067aa0ba902b7" and span != b"0" * 16  # the gateway's span
    assert flags == b"01"  # the flags as sent
    assert out.count(b"\r\ntracestate: congo=t61rcWkgMzE\r\n") == 1
    assert b"tracestate" not in send((b"traceparent", VALID))[1]


def test_each_attempt_is_a_span_of_its_own_in_the_same_trace() -> None:
    head, first = send()
    again = head.upstream_head(b"GET", b"/", client_ip=b"192.0.2.1", request_id=b"r")  # a retry
    assert parent(first)[0] == parent(again)[0] == head.trace_id
    assert parent(first)[1] != parent(again)[1]
    spans = {parent(send((b"traceparent", VALID))[1])[1] for _ in range(1000)}
    assert len(spans) == 1000


@pytest.mark.parametrize(
    "sent",
    [
        [],
        [VALID, VALID],  # two traceparent headers
        [b"garbage"],
        [b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"],  # version ff
        [b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"],  # no trace id
        [b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"],  # no parent id
        [b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"],  # upper case
        [b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"],  # 00 + more
    ],
)
def test_an_absent_or_invalid_traceparent_starts_a_new_trace(sent: list[bytes]) -> None:
    head, out = send(*[(b"traceparent", value) for value in sent], (b"tracestate", b"x=1"))
    trace, _, flags = parent(out)
    assert trace == head.trace_id != b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert flags == b"01" and b"tracestate" not in out  # it went with the invalid parent
    assert len({send()[0].trace_id for _ in range(100)}) == 100


def test_a_future_version_is_read_as_version_00() -> None:
    head, out = send((b"traceparent", b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x"))
    assert parent(out)[0] == b"4bf92f3577b34da6a3ce929d0e0e4736" and parent(out)[2] == b"00"


async def test_through_the_gateway(gateway_factory: Any, upstreams: Any) -> None:
    gw = await gateway_factory("routes:\n  - prefix: /\n    service: web\n")
    await gw.register("web", await upstreams("web"))
    headers = {"traceparent": VALID.decode(), "tracestate": "congo=t61rcWkgMzE"}
    async with gw.session.get(gw.proxy_url + "/x", headers=headers) as response:
        got = dict((await response.json())["headers"])
    assert got["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert not got["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa")
    assert got["tracestate"] == "congo=t61rcWkgMzE"
    async with gw.session.get(gw.proxy_url + "/x") as response:
        fresh = dict((await response.json())["headers"])["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", fresh)
