"""W3C trace context (issue 11 item 2): a valid traceparent goes on with the gateway as
the new parent span; an absent or invalid one starts a new trace."""

from __future__ import annotations

import re
from typing import Any

import pytest

from gateway.dataplane.wire import trace_context

VALID = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
LINE = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})\r\n")


def test_a_valid_traceparent_goes_on_with_a_new_parent_id() -> None:
    trace, lines = trace_context(VALID, b"congo=t61rcWkgMzE", 1)
    found = LINE.match(lines)
    assert found is not None
    assert trace == found[1] == b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert found[2] != b"00f067aa0ba902b7" and found[2] != b"0" * 16  # the gateway's span
    assert found[3] == b"01"  # the flags as sent
    assert lines.endswith(b"\r\ntracestate: congo=t61rcWkgMzE\r\n")
    assert trace_context(VALID, None, 1)[1].count(b"\r\n") == 1


def test_each_attempt_is_a_span_of_its_own() -> None:
    spans = {LINE.match(trace_context(VALID, None, 1)[1])[2] for _ in range(1000)}  # type: ignore[index]
    assert len(spans) == 1000


@pytest.mark.parametrize(
    ("sent", "count"),
    [
        (None, 0),
        (b"garbage", 1),
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", 1),  # version ff
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", 1),  # no trace id
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", 1),  # no parent id
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", 1),  # upper case
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", 1),  # 00 + more
        (VALID, 2),  # two traceparent headers
    ],
)
def test_an_absent_or_invalid_traceparent_starts_a_new_trace(sent: Any, count: int) -> None:
    trace, lines = trace_context(sent, b"dropped=1", count)
    found = LINE.fullmatch(lines)
    assert found is not None, lines  # and no tracestate: it went with the invalid parent
    assert trace == found[1] != b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert found[3] == b"01"
    assert len({trace_context(sent, None, count)[0] for _ in range(100)}) == 100


def test_a_future_version_is_read_as_version_00() -> None:
    trace, lines = trace_context(
        b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future", None, 1
    )
    assert trace == b"4bf92f3577b34da6a3ce929d0e0e4736"
    assert lines.startswith(b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert lines.endswith(b"-00\r\n")


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
