"""Header rules of the proxy (SPEC sections 5 and 8), on the bytes-based head builders."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.dataplane.wire import (
    HOP_BY_HOP,
    HeaderError,
    RequestHead,
    ResponseHead,
    new_request_id,
    sane_request_id,
)

Headers = list[tuple[bytes, bytes]]

CLIENT_IP = b"192.0.2.10"
KIB = 1024

# SPEC section 5: the hop-by-hop headers, as a client might spell them.
SPEC_HOP_BY_HOP = [
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
]
# A plausible value for each one that the head accepts (Transfer-Encoding is only `chunked`).
HOP_VALUES = {
    b"connection": b"close",
    b"keep-alive": b"timeout=5",
    b"proxy-connection": b"keep-alive",
    b"te": b"trailers",
    b"trailer": b"X-Checksum",
    b"upgrade": b"h2c",
}


# -- helpers -----------------------------------------------------------------------------


def parse(head: bytes) -> tuple[bytes, Headers]:
    """Split a produced head into its first line and its headers, checking the framing."""
    assert head.endswith(b"\r\n\r\n")
    assert head.index(b"\r\n\r\n") == len(head) - 4, "a blank line inside the head"
    assert head.count(b"\n") == head.count(b"\r\n"), "a bare LF"
    first, *lines = head[:-4].split(b"\r\n")
    headers: Headers = []
    for line in lines:
        name, sep, value = line.partition(b": ")
        assert sep and name and b" " not in name, line
        headers.append((name, value))
    return first, headers


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key.lower() == name.lower()]


def names(headers: Headers) -> set[bytes]:
    return {key.lower() for key, _ in headers}


def request(headers: Headers) -> RequestHead:
    head = RequestHead()
    for name, value in headers:
        head.add(name, value)
    return head


def upstream_raw(
    headers: Headers,
    *,
    method: bytes = b"GET",
    target: bytes = b"/",
    request_id: bytes = b"req-1",
    **kw: Any,
) -> bytes:
    return request(headers).upstream_head(
        method, target, client_ip=CLIENT_IP, request_id=request_id, **kw
    )


def upstream(headers: Headers, **kw: Any) -> Headers:
    return parse(upstream_raw(headers, **kw))[1]


def response(headers: Headers, status_line: bytes = b"HTTP/1.1 200 OK\r\n") -> ResponseHead:
    """A ResponseHead from the raw head llhttp checked: status line and header lines."""
    return ResponseHead(status_line + b"".join(b"%b: %b\r\n" % pair for pair in headers))


def downstream(headers: Headers, request_id: bytes = b"req-1") -> Headers:
    head = response(headers)
    status, out = parse(head.client_head(request_id, b""))
    assert status == b"HTTP/1.1 200 OK"
    return out


def header_of_size(size: int, name: bytes = b"X-Big") -> tuple[bytes, bytes]:
    """A header whose line `Name: value\\r\\n` is `size` bytes long."""
    return name, b"v" * (size - len(name) - 4)


# -- request line and framing ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"/"),
        (b"POST", b"/api/users?x=1&y=%20z"),
        (b"DELETE", b"/users/7"),
        (b"OPTIONS", b"*"),
    ],
)
def test_request_line_is_exact_and_the_head_ends_with_one_blank_line(
    method: bytes, target: bytes
) -> None:
    raw = upstream_raw([(b"Host", b"example.com")], method=method, target=target)
    first, headers = parse(raw)
    assert first == method + b" " + target + b" HTTP/1.1"
    assert raw.startswith(first + b"\r\n")
    assert values(headers, b"Host") == [b"example.com"]


@pytest.mark.parametrize("name", [b"Content-Length", b"content-length", b"CONTENT-LENGTH"])
def test_content_length_is_forwarded(name: bytes) -> None:
    head = request([(b"Host", b"example.com"), (name, b"5")])
    assert head.content_length == b"5"
    assert not head.chunked
    out = parse(head.upstream_head(b"POST", b"/", client_ip=CLIENT_IP, request_id=b"req-1"))[1]
    assert values(out, b"Content-Length") == [b"5"]
    assert values(out, b"Transfer-Encoding") == []


def test_no_body_framing_without_content_length_or_chunked() -> None:
    out = upstream([(b"Host", b"example.com")])
    assert not {b"content-length", b"transfer-encoding"} & names(out)


@pytest.mark.parametrize(
    "given",
    [
        [(b"Transfer-Encoding", b"chunked")],
        [(b"transfer-encoding", b"Chunked")],
        [(b"TRANSFER-ENCODING", b" CHUNKED ")],
        # The parser refuses this pair (SPEC section 5); should it slip through, the
        # upstream still never sees both.
        [(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
    ],
)
def test_chunked_request_goes_upstream_chunked_without_content_length(given: Headers) -> None:
    head = request([(b"Host", b"example.com"), *given])
    assert head.chunked
    out = parse(head.upstream_head(b"POST", b"/", client_ip=CLIENT_IP, request_id=b"req-1"))[1]
    assert [(k, v) for k, v in out if k.lower() == b"transfer-encoding"] == [
        (b"Transfer-Encoding", b"chunked")
    ]
    assert values(out, b"Content-Length") == []


@pytest.mark.parametrize(
    "given",
    [
        [(b"Transfer-Encoding", b"gzip, chunked")],
        [(b"Transfer-Encoding", b"chunked, chunked")],
        [(b"Transfer-Encoding", b"chunked, gzip")],
        [(b"Transfer-Encoding", b"gzip")],
        [(b"Transfer-Encoding", b"identity")],
        [(b"Transfer-Encoding", b"")],
        [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
    ],
)
def test_transfer_encoding_other_than_a_single_final_chunked_is_refused(given: Headers) -> None:
    with pytest.raises(HeaderError) as caught:
        request([(b"Host", b"example.com"), *given])
    assert (caught.value.status, caught.value.code) == (400, "bad_request")


@pytest.mark.parametrize(
    "hosts",
    [
        [(b"Host", b"example.com"), (b"Host", b"evil.example")],
        [(b"Host", b"example.com"), (b"host", b"example.com")],
        [(b"HOST", b""), (b"Host", b"example.com")],
    ],
)
def test_two_host_headers_are_refused(hosts: Headers) -> None:
    with pytest.raises(HeaderError) as caught:
        request(hosts)
    assert (caught.value.status, caught.value.code) == (400, "bad_request")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"100-continue", True), (b"100-Continue", True), (b"something-else", False)],
)
def test_expect_is_answered_by_the_gateway_and_not_forwarded(value: bytes, expected: bool) -> None:
    head = request([(b"Host", b"example.com"), (b"Expect", value), (b"Content-Length", b"5")])
    assert head.expect_continue is expected
    out = parse(head.upstream_head(b"POST", b"/", client_ip=CLIENT_IP, request_id=b"req-1"))[1]
    assert b"expect" not in names(out)
    assert values(out, b"Content-Length") == [b"5"]


def test_no_expect_means_no_continue() -> None:
    assert not request([(b"Host", b"example.com")]).expect_continue


# -- size limits -------------------------------------------------------------------------------


@pytest.mark.parametrize("head_class", [RequestHead])
def test_one_header_of_8_kib_is_accepted_and_one_byte_more_is_refused(
    head_class: type[RequestHead],
) -> None:
    head_class().add(*header_of_size(8 * KIB))
    with pytest.raises(HeaderError) as caught:
        head_class().add(*header_of_size(8 * KIB + 1))
    assert (caught.value.status, caught.value.code) == (431, "headers_too_large")


@pytest.mark.parametrize("head_class", [RequestHead])
def test_all_headers_up_to_64_kib_are_accepted_and_more_is_refused(
    head_class: type[RequestHead],
) -> None:
    head = head_class()
    for i in range(8):  # 8 lines of 8 KiB: exactly 64 KiB, none over the one-header limit
        head.add(*header_of_size(8 * KIB, name=b"X-Big-%d" % i))
    with pytest.raises(HeaderError) as caught:
        head.add(b"A", b"")
    assert (caught.value.status, caught.value.code) == (431, "headers_too_large")


def test_many_small_headers_over_64_kib_are_refused() -> None:
    head = RequestHead()
    with pytest.raises(HeaderError) as caught:
        for i in range(64 * KIB):
            head.add(b"X-H%d" % i, b"1")
    assert (caught.value.status, caught.value.code) == (431, "headers_too_large")


# -- hop-by-hop --------------------------------------------------------------------------------


def test_hop_by_hop_is_the_spec_set() -> None:
    assert {name.lower() for name in SPEC_HOP_BY_HOP} == HOP_BY_HOP
    assert b"host" not in HOP_BY_HOP


@pytest.mark.parametrize(
    "name",
    [n for n in SPEC_HOP_BY_HOP if n != b"Transfer-Encoding"]
    + [n.upper() for n in SPEC_HOP_BY_HOP if n != b"Transfer-Encoding"]
    + [n.lower() for n in SPEC_HOP_BY_HOP if n != b"Transfer-Encoding"],
)
def test_hop_by_hop_headers_are_not_sent_upstream(name: bytes) -> None:
    out = upstream(
        [(b"Host", b"example.com"), (name, HOP_VALUES[name.lower()]), (b"Accept", b"*/*")]
    )
    assert name.lower() not in names(out)
    assert values(out, b"Accept") == [b"*/*"]
    assert values(out, b"Host") == [b"example.com"]


@pytest.mark.parametrize("name", [b"Transfer-Encoding", b"transfer-encoding"])
def test_clients_transfer_encoding_is_replaced_by_the_gateways(name: bytes) -> None:
    out = upstream([(b"Host", b"example.com"), (name, b"chunked"), (b"Accept", b"*/*")])
    assert [(k, v) for k, v in out if k.lower() == b"transfer-encoding"] == [
        (b"Transfer-Encoding", b"chunked")
    ]
    assert values(out, b"Accept") == [b"*/*"]


def test_headers_named_in_connection_are_not_sent_upstream() -> None:
    out = upstream(
        [
            (b"Host", b"example.com"),
            (b"Connection", b"close, X-Secret"),
            (b"connection", b" X-Other ,"),
            (b"CONNECTION", b"keep-alive, x-session"),
            (b"X-Secret", b"1"),
            (b"X-OTHER", b"2"),
            (b"X-Session", b"3"),
            (b"X-Kept", b"4"),
        ]
    )
    assert not {b"connection", b"x-secret", b"x-other", b"x-session"} & names(out)
    assert values(out, b"X-Kept") == [b"4"]
    assert values(out, b"Host") == [b"example.com"]


def test_headers_named_in_connection_before_it_are_removed_too() -> None:
    out = upstream([(b"Host", b"example.com"), (b"X-Secret", b"1"), (b"Connection", b"X-SECRET")])
    assert b"x-secret" not in names(out)


def test_response_head_over_64_kib_is_a_protocol_error() -> None:
    response([(b"X-Big-%d" % i, b"v" * 8000) for i in range(8)])  # under 64 KiB: fine
    with pytest.raises(HeaderError) as caught:
        response([(b"X-Big-%d" % i, b"v" * 8000) for i in range(9)])
    assert (caught.value.status, caught.value.code) == (502, "upstream_protocol_error")


def test_response_status_line_is_sent_as_http11() -> None:
    head = response([(b"Content-Length", b"0")], b"HTTP/1.0 404 Not Here\r\n")
    assert head.client_head(b"r", b"").startswith(b"HTTP/1.1 404 Not Here\r\n")


@pytest.mark.parametrize(
    ("value", "close"),
    [(b"close", True), (b"Keep-Alive, CLOSE", True), (b"keep-alive", False), (b"X-A", False)],
)
def test_connection_close_is_noted(value: bytes, close: bool) -> None:
    assert request([(b"Host", b"example.com"), (b"Connection", value)]).close is close
    assert response([(b"Connection", value)]).close is close


def test_connection_cannot_remove_the_gateways_x_forwarded_for() -> None:
    out = upstream(
        [
            (b"Host", b"example.com"),
            (b"X-Forwarded-For", b"6.6.6.6"),
            (b"Connection", b"X-Forwarded-For"),
        ]
    )
    assert values(out, b"X-Forwarded-For") == [CLIENT_IP]


@pytest.mark.parametrize(
    "name", [b"X-Forwarded-Proto", b"X-Forwarded-Host", b"X-Request-ID", b"X-Forwarded-Prefix"]
)
def test_connection_cannot_remove_the_other_gateway_headers(name: bytes) -> None:
    head = request([(b"Host", b"example.com"), (name, b"client"), (b"Connection", name)])
    raw = head.upstream_head(
        b"GET",
        b"/",
        client_ip=CLIENT_IP,
        request_id=head.request_id_or_new(),
        forwarded_prefix=b"/api",
    )
    out = parse(raw)[1]
    assert len(values(out, name)) == 1
    assert values(out, name) != [b"client"]


def test_other_headers_keep_their_order_repeats_and_spelling() -> None:
    out = upstream(
        [
            (b"Host", b"example.com"),
            (b"Accept", b"text/html"),
            (b"X-Custom", b"1"),
            (b"cookie", b"a=1"),
            (b"X-Custom", b"2"),
        ]
    )
    kept = [(k, v) for k, v in out if k.lower() in {b"accept", b"x-custom", b"cookie"}]
    assert kept == [
        (b"Accept", b"text/html"),
        (b"X-Custom", b"1"),
        (b"cookie", b"a=1"),
        (b"X-Custom", b"2"),
    ]


# -- X-Forwarded-* -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], b"192.0.2.10"),
        ([(b"X-Forwarded-For", b"203.0.113.1")], b"203.0.113.1, 192.0.2.10"),
        (
            [(b"X-Forwarded-For", b"203.0.113.1, 10.0.0.1")],
            b"203.0.113.1, 10.0.0.1, 192.0.2.10",
        ),
        (
            [(b"X-Forwarded-For", b"203.0.113.1"), (b"x-forwarded-for", b"10.0.0.1")],
            b"203.0.113.1, 10.0.0.1, 192.0.2.10",
        ),
    ],
)
def test_x_forwarded_for_from_a_trusted_proxy_gets_the_client_appended(
    given: Headers, expected: bytes
) -> None:
    out = upstream([(b"Host", b"example.com"), *given], trusted=True)
    assert values(out, b"X-Forwarded-For") == [expected]


@pytest.mark.parametrize(
    "given",
    [
        [(b"X-Forwarded-For", b"203.0.113.1")],
        [(b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"evil")],
        [(b"Forwarded", b"for=10.9.9.9;proto=https")],
    ],
)
def test_forwarding_headers_of_an_untrusted_peer_are_replaced(given: Headers) -> None:
    out = upstream([(b"Host", b"example.com"), *given])
    assert values(out, b"X-Forwarded-For") == [CLIENT_IP]
    assert values(out, b"X-Forwarded-Proto") == [b"http"]
    assert values(out, b"X-Forwarded-Host") == [b"example.com"]
    sent_forwarded = any(name.lower() == b"forwarded" for name, _ in given)
    assert values(out, b"Forwarded") == (
        [b"for=" + CLIENT_IP + b";proto=http;host=example.com"] if sent_forwarded else []
    )


def test_a_trusted_proxys_forwarding_headers_go_on_with_this_hop() -> None:
    out = upstream(
        [
            (b"Host", b"example.com"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"www.example.com"),
            (b"Forwarded", b"for=203.0.113.9;proto=https"),
        ],
        trusted=True,
        proto=b"http",
    )
    assert values(out, b"X-Forwarded-Proto") == [b"https"]  # what the client spoke to it
    assert values(out, b"X-Forwarded-Host") == [b"www.example.com"]
    assert values(out, b"Forwarded") == [
        b"for=203.0.113.9;proto=https, for=" + CLIENT_IP + b";proto=http;host=example.com"
    ]
    assert values(out, b"Via") == [b"1.1 gateway"]


def test_an_ipv6_client_is_quoted_in_forwarded() -> None:
    head = request([(b"Host", b"h"), (b"Forwarded", b"for=x")]).upstream_head(
        b"GET", b"/", client_ip=b"2001:db8::1", request_id=b"r"
    )
    assert values(parse(head)[1], b"Forwarded") == [b'for="[2001:db8::1]";proto=http;host=h']


@pytest.mark.parametrize("given", [[], [(b"X-Forwarded-Proto", b"gopher")]])
def test_x_forwarded_proto_is_set(given: Headers) -> None:
    out = upstream([(b"Host", b"example.com"), *given])
    assert values(out, b"X-Forwarded-Proto") == [b"http"]


@pytest.mark.parametrize(
    "host", [b"example.com", b"example.com:8080", b"[::1]:8080", b"Example.COM"]
)
def test_x_forwarded_host_is_the_host_as_sent(host: bytes) -> None:
    out = upstream([(b"Host", host), (b"X-Forwarded-Host", b"evil.example")])
    assert values(out, b"X-Forwarded-Host") == [host]
    assert values(out, b"Host") == [host]  # passed through by default


def test_host_override_replaces_host_but_not_x_forwarded_host() -> None:
    out = upstream([(b"Host", b"example.com:8080")], host_override=b"10.0.0.5:9000")
    assert values(out, b"Host") == [b"10.0.0.5:9000"]
    assert values(out, b"X-Forwarded-Host") == [b"example.com:8080"]


def test_x_forwarded_prefix_carries_the_stripped_prefix() -> None:
    out = upstream(
        [(b"Host", b"example.com"), (b"X-Forwarded-Prefix", b"/spoofed")],
        forwarded_prefix=b"/api/users",
    )
    assert values(out, b"X-Forwarded-Prefix") == [b"/api/users"]


def test_no_x_forwarded_prefix_without_strip_prefix() -> None:
    out = upstream([(b"Host", b"example.com")])
    assert values(out, b"X-Forwarded-Prefix") == []


# -- X-Request-ID ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", [b"abc-123", b"x", b"x" * 200, b"!~", b"550e8400-e29b-41d4-a716-446655440000"]
)
def test_sane_request_id_is_kept(value: bytes) -> None:
    assert sane_request_id(value)
    assert request([(b"Host", b"a"), (b"X-Request-ID", value)]).request_id_or_new() == value
    assert request([(b"x-request-id", value)]).request_id_or_new() == value


@pytest.mark.parametrize(
    "value",
    [b"", b"x" * 201, b"a b", b"tab\there", "é".encode(), b"id\x7f", b"id\x00", b" lead"],
)
def test_insane_request_id_is_replaced(value: bytes) -> None:
    assert not sane_request_id(value)
    replacement = request([(b"X-Request-ID", value)]).request_id_or_new()
    assert replacement != value
    assert sane_request_id(replacement)


def test_missing_request_id_is_generated_fresh_each_time() -> None:
    head = request([(b"Host", b"example.com")])
    first, second = head.request_id_or_new(), head.request_id_or_new()
    assert sane_request_id(first)
    assert sane_request_id(second)
    assert first != second
    assert sane_request_id(new_request_id())
    assert new_request_id() != new_request_id()


def test_request_id_named_in_connection_is_replaced() -> None:
    head = request(
        [
            (b"Host", b"example.com"),
            (b"X-Request-ID", b"client-id"),
            (b"Connection", b"x-request-id"),
        ]
    )
    replacement = head.request_id_or_new()
    assert replacement != b"client-id"
    assert sane_request_id(replacement)


def test_sane_request_id_of_none() -> None:
    assert not sane_request_id(None)


@pytest.mark.parametrize(
    ("given", "sent"), [(b"client-id", b"client-id"), (b"a b", None), (None, None)]
)
def test_request_id_goes_upstream_once(given: bytes | None, sent: bytes | None) -> None:
    headers: Headers = [(b"Host", b"example.com")]
    if given is not None:
        headers.append((b"X-Request-ID", given))
    head = request(headers)
    request_id = head.request_id_or_new()
    if sent is not None:
        assert request_id == sent
    out = parse(head.upstream_head(b"GET", b"/", client_ip=CLIENT_IP, request_id=request_id))[1]
    assert values(out, b"X-Request-ID") == [request_id]


# -- response headers --------------------------------------------------------------------------


def test_client_head_of_a_simple_200() -> None:
    head = response([(b"Content-Type", b"text/plain"), (b"Content-Length", b"2")])
    assert head.content_length == b"2"
    assert not head.chunked
    assert head.client_head(b"req-1", b"Connection: close\r\n") == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 2\r\n"
        b"Via: 1.1 gateway\r\n"
        b"X-Request-ID: req-1\r\n"
        b"Connection: close\r\n"
        b"\r\n"
    )


def test_response_keeps_repeated_set_cookie_and_drops_hop_by_hop() -> None:
    head = response(
        [
            (b"Content-Type", b"text/plain"),
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"Connection", b"keep-alive, X-Internal"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"x-internal", b"secret"),
            (b"Set-Cookie", b"b=2; HttpOnly"),
            (b"Trailer", b"X-Checksum"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
        ]
    )
    assert head.chunked  # the gateway frames the body anew
    out = parse(head.client_head(b"req-1", b""))[1]
    assert values(out, b"Set-Cookie") == [b"a=1; Path=/", b"b=2; HttpOnly"]
    assert values(out, b"Content-Type") == [b"text/plain"]
    assert not HOP_BY_HOP & names(out)
    assert b"x-internal" not in names(out)


@pytest.mark.parametrize("upstream_id", [None, b"req-1", b"other-id"])
def test_response_returns_the_request_id_once(upstream_id: bytes | None) -> None:
    given: Headers = [(b"Content-Length", b"0")]
    if upstream_id is not None:
        given.append((b"x-request-id", upstream_id))
    out = downstream(given, b"req-1")
    assert values(out, b"X-Request-ID") == [b"req-1"]
    assert values(out, b"Content-Length") == [b"0"]
