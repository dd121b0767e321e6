"""Header rules of the proxy (SPEC sections 5 and 8), on bytes as they come off the wire. Pure.

The data plane feeds each parsed header to a RequestHead or ResponseHead, which
checks limits and framing rules and sorts it as it arrives: kept headers are
stored as ready-to-send lines, so building the head for the other side is one
``b"".join``. Hop-by-hop headers are never stored, so ``Connection:
X-Forwarded-For`` can only remove the client's copy, never the one the gateway
adds afterwards.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from http import HTTPStatus
from typing import Final

from registry.core.errors import ApiError

MAX_FIELD: Final = 8 * 1024  # one header line
MAX_TOTAL: Final = 64 * 1024  # all header lines of a message

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Tokens of Connection that name no header to remove.
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive"})

# How a request header is handled (a dict lookup per header; absent: kept as it is).
_HOST, _LENGTH, _CODING, _CONNECTION, _DROP, _FOR, _ID, _EXPECT, _UPGRADE, _CLAIM, _TRACE = range(
    11
)
_REQUEST_KINDS: Final = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"upgrade": _UPGRADE,
    b"http2-settings": _DROP,  # of an h2c upgrade, which is not tunnelled
    # Set by the gateway; a trusted proxy's (proxy.trusted_proxies) go on, the others'
    # are replaced (upstream_head).
    b"x-forwarded-proto": _CLAIM,
    b"x-forwarded-host": _CLAIM,
    b"forwarded": _CLAIM,
    b"x-forwarded-prefix": _DROP,  # set by the gateway with strip_prefix
    b"x-real-ip": _DROP,  # set by the gateway
    # Claims about the client that nobody here vouches for (see README, Security):
    b"x-forwarded-port": _DROP,
    b"x-forwarded-server": _DROP,
    b"true-client-ip": _DROP,
    b"x-client-ip": _DROP,
    b"x-forwarded-for": _FOR,
    b"x-request-id": _ID,
    b"traceparent": _TRACE,  # W3C trace context: the gateway adds itself as a span
    b"tracestate": _TRACE,
    b"expect": _EXPECT,  # answered by the gateway itself
}


def _underscored(name: bytes) -> list[bytes]:
    """Every spelling of ``name`` with some dashes as underscores."""
    spellings = [b""]
    for part in name.split(b"-"):
        spellings = [s + sep + part for s in spellings for sep in ((b"-", b"_") if s else (b"",))]
    return [spelling for spelling in spellings if spelling != name]


# CGI and WSGI servers read X_Forwarded_For (and X-Forwarded_For) as X-Forwarded-For:
# such spellings of the headers above are dropped, at no cost per header.
_REQUEST_KINDS.update(
    {spelling: _DROP for name in list(_REQUEST_KINDS) for spelling in _underscored(name)}
)


class HeaderError(ApiError):
    """A request (or response) the data plane refuses; status and code are SPEC's."""


def no_fragment(part: bytes) -> None:
    """A ``#`` in a request target is refused, never read as part of the path or query.
    (find, not ``in``: ``bytes in bytes`` first tries an int and pays for the TypeError.)"""
    if part.find(b"#") >= 0:
        raise HeaderError(400, "bad_request", "malformed request: # in the request target")


def sane_request_id(value: bytes | None) -> bool:
    """1 to 200 characters, each in 0x21..0x7E."""
    return value is not None and 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)


# 16 random hex digits (per process), a dash, then a counter in decimal: the cheapest
# unique id to make (no formatting call), e.g. 9f1c0a6e3b2d4c58-1042.
_ID_PREFIX: Final = os.urandom(8).hex().encode() + b"-"
_id_counter: Final = itertools.count(1)


def new_request_id() -> bytes:
    """Unique per process and across processes: a random prefix and a counter."""
    return _ID_PREFIX + str(next(_id_counter)).encode()


# W3C trace context: ids unique per process and across processes (a random prefix per
# process, then a counter). The counter is written in decimal, from 10**15 on: always
# 16 digits, which are hex digits too, and str() is the cheapest way to write a number
# (a hex format cost twice as much a request).
_TRACE_PREFIX: Final = os.urandom(8).hex().encode()
_SPAN_PREFIX: Final = os.urandom(4).hex().encode()
_span_counter: Final = itertools.count(10**15)
_TRACEPARENT_RE: Final = re.compile(
    rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[ -~]*)?"
)
_NO_TRACE: Final = b"0" * 32
_NO_SPAN: Final = b"0" * 16


def trace_parent(sent: bytes | None, count: int) -> tuple[bytes, bytes] | None:
    """(trace id, flags) of a valid traceparent (``count`` of them sent), else None:
    absent, two, version ff, zero ids, upper case, or version 00 with more fields."""
    found = _TRACEPARENT_RE.fullmatch(sent) if sent is not None and count == 1 else None
    if (
        found is None
        or found[1] == b"ff"
        or (found[1] == b"00" and found[5] is not None)
        or found[2] == _NO_TRACE
        or found[3] == _NO_SPAN
    ):
        return None
    return found[2], found[4]


class RequestHead:
    """A client request's headers, checked and sorted as the parser reports them.

    Fields most requests leave alone are class attributes: nothing to store.
    """

    content_length: bytes | None = None
    chunked = False
    close = False  # Connection: close
    keep_alive = False  # Connection: keep-alive
    named: set[bytes] | None = None  # headers listed in Connection
    host: bytes | None = None
    forwarded_for: list[bytes] | None = None
    claims: dict[bytes, bytes] | None = None  # X-Forwarded-Proto/-Host, Forwarded as sent
    traceparent: bytes | None = None
    tracestate: bytes | None = None
    traces = 0  # traceparent headers seen: more than one is no valid trace context
    trace_id = b""  # the request's W3C trace id, set by its first upstream_head
    trace_flags = b"01"
    trace_state = b""  # the tracestate line that goes with a valid traceparent
    request_id: bytes | None = None
    expect_continue = False
    upgrade_to: bytes | None = None  # Upgrade's value

    def __init__(self) -> None:
        self.lines: list[bytes] = []  # kept headers, each "Name: value\r\n"
        self.size = 0

    def _connection(self, value: bytes) -> None:
        tokens = {t.strip().lower() for t in value.split(b",")}
        if b"close" in tokens:
            self.close = True
        if b"keep-alive" in tokens:
            self.keep_alive = True
        tokens -= _CONNECTION_OPTIONS | {b""}
        if tokens:
            self.named = tokens if self.named is None else self.named | tokens

    def _coding(self, value: bytes) -> None:
        # Only a lone, final "chunked" is understood; anything else is refused.
        if value.strip().lower() != b"chunked" or self.chunked:
            raise HeaderError(
                400, "bad_request", "malformed request: unsupported Transfer-Encoding"
            )
        self.chunked = True

    def value_of(self, name: bytes) -> bytes | None:
        """The first value of a kept header, by its lower-case name (a scan: rare use)."""
        for line in self.lines:
            key, _, value = line.partition(b":")
            if key.lower() == name:
                return value.strip()
        return None

    def kept_lines(self) -> list[bytes]:
        named = self.named
        if named is None:
            return self.lines
        return [line for line in self.lines if line.partition(b":")[0].lower() not in named]

    def add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 4
        total = self.size = self.size + size
        if size > MAX_FIELD or total > MAX_TOTAL:
            which = "a header over the 8" if size > MAX_FIELD else "headers over the 64"
            raise HeaderError(431, "headers_too_large", which + " KiB limit")
        kind = _REQUEST_KINDS.get(name.lower())
        if kind is None:
            self.lines.append(name + b": " + value + b"\r\n")
        elif kind == _HOST:
            if self.host is not None:
                raise HeaderError(400, "bad_request", "malformed request: two Host headers")
            self.host = value
        elif kind == _LENGTH:
            self.content_length = value  # the parser refuses duplicates and bad values
        elif kind == _CODING:
            self._coding(value)
        elif kind == _CONNECTION:
            self._connection(value)
        elif kind == _FOR:
            if value.strip():
                if self.forwarded_for is None:
                    self.forwarded_for = []
                self.forwarded_for.append(value.strip())
        elif kind == _ID:
            self.request_id = value
        elif kind == _TRACE:
            if name.lower() == b"traceparent":
                self.traceparent = value.strip()
                self.traces += 1
            else:  # tracestate: a list, its lines joined
                state = value.strip()
                self.tracestate = (
                    state if self.tracestate is None else self.tracestate + b"," + state
                )
        elif kind == _CLAIM:
            claims = self.claims
            if claims is None:
                claims = self.claims = {}
            lower = name.lower()
            old = claims.get(lower)
            claims[lower] = value.strip() if old is None else old + b", " + value.strip()
        elif kind == _UPGRADE:
            self.upgrade_to = value
        elif kind == _EXPECT:
            self.expect_continue = value.strip().lower() == b"100-continue"

    @property
    def websocket(self) -> bool:
        """A WebSocket handshake's headers: ``Connection: upgrade``, ``Upgrade: websocket``.
        No other protocol is tunnelled (h2c is answered as plain HTTP/1.1)."""
        upgrade = self.upgrade_to
        return (
            upgrade is not None
            and self.named is not None
            and b"upgrade" in self.named
            and upgrade.strip().lower() == b"websocket"
        )

    @property
    def has_body(self) -> bool:
        """Chunked, or a Content-Length other than 0."""
        return self.chunked or self.content_length not in (None, b"0")

    def request_id_or_new(self) -> bytes:
        """The client's X-Request-ID if sane, else a new one."""
        value = self.request_id
        if value is None or (self.named is not None and b"x-request-id" in self.named):
            return new_request_id()
        return value if sane_request_id(value) else new_request_id()

    def upstream_head(
        self,
        method: bytes,
        target: bytes,
        *,
        client_ip: bytes,
        request_id: bytes,
        host_override: bytes | None = None,
        forwarded_prefix: bytes | None = None,
        upgrade: bytes | None = None,
        proto: bytes = b"http",
        trusted: bool = False,
    ) -> bytes:
        """The request head to send upstream: kept headers plus the gateway's own;
        ``upgrade`` for a WebSocket handshake the gateway tunnels. From a ``trusted``
        peer (a proxy in front), the forwarding headers it sent go on, with this hop
        added; from anyone else they are replaced."""
        named = self.named or ()
        host = host_override if host_override is not None else self.host
        lines = b"".join(self.lines if self.named is None else self.kept_lines())
        forwarded_for = client_ip
        if trusted and self.forwarded_for and b"x-forwarded-for" not in named:
            forwarded_for = b", ".join(self.forwarded_for) + b", " + client_ip
        forwarded_host = self.host
        extra = b""
        claims = self.claims
        if claims is not None:
            extra, proto, forwarded_host = _claims(
                claims, trusted, client_ip, proto, self.host, forwarded_host
            )
        if forwarded_prefix is not None:
            extra += b"X-Forwarded-Prefix: " + forwarded_prefix + b"\r\n"
        if self.chunked:
            extra += b"Transfer-Encoding: chunked\r\n"
        elif self.content_length is not None:
            extra += b"Content-Length: " + self.content_length + b"\r\n"
        if upgrade is not None:  # hop-by-hop: set anew
            extra += b"Connection: Upgrade\r\nUpgrade: " + upgrade + b"\r\n"
        # W3C trace context: the gateway is a span (a new parent id) of the request's trace,
        # one per attempt; the trace is the client's if it sent a valid one, else new.
        digits = str(next(_span_counter)).encode()
        if not self.trace_id:
            self._start_trace(digits)
        return _UPSTREAM_HEAD % (
            method,
            target,
            b"" if host is None else b"Host: " + host + b"\r\n",
            lines,
            forwarded_for,
            client_ip,
            proto,
            b"" if forwarded_host is None else b"X-Forwarded-Host: " + forwarded_host + b"\r\n",
            self.trace_id,
            _SPAN_PREFIX,
            digits[8:],
            self.trace_flags,
            self.trace_state,
            request_id,
            extra,
        )

    def _start_trace(self, digits: bytes) -> None:
        valid = trace_parent(self.traceparent, self.traces)
        if valid is None:
            self.trace_id = _TRACE_PREFIX + digits  # a new trace; tracestate goes with none
        else:
            self.trace_id, self.trace_flags = valid
            if self.tracestate is not None:
                self.trace_state = b"tracestate: " + self.tracestate + b"\r\n"


def _claims(
    claims: dict[bytes, bytes],
    trusted: bool,
    client_ip: bytes,
    proto: bytes,
    host: bytes | None,
    forwarded_host: bytes | None,
) -> tuple[bytes, bytes, bytes | None]:
    """What forwarding headers the client sent become: (the Forwarded line, or nothing;
    X-Forwarded-Proto; X-Forwarded-Host). A trusted proxy's values stand and Forwarded
    gets this hop appended; an untrusted client's are replaced by the gateway's."""
    sent = claims.get(b"forwarded")
    line = b""
    if sent is not None:  # this hop, as RFC 7239 writes it (by the gateway's own listener)
        node = b'"[' + client_ip + b']"' if b":" in client_ip else client_ip
        hop = b"for=" + node + b";proto=" + proto + (b";host=" + host if host is not None else b"")
        line = b"Forwarded: " + (sent + b", " + hop if trusted else hop) + b"\r\n"
    if trusted:
        proto = claims.get(b"x-forwarded-proto", proto)
        forwarded_host = claims.get(b"x-forwarded-host", forwarded_host)
    return line, proto, forwarded_host


# Host and X-Forwarded-Host come as whole lines (absent for an HTTP/1.0 request without Host).
_UPSTREAM_HEAD: Final = (
    b"%b %b HTTP/1.1\r\n%b%bX-Forwarded-For: %b\r\nX-Real-IP: %b\r\nX-Forwarded-Proto: %b\r\n"
    b"%bVia: 1.1 gateway\r\ntraceparent: 00-%b-%b%b-%b\r\n%bX-Request-ID: %b\r\n%b\r\n"
)


# Response header lines the gateway takes out (and reads) before passing the head on.
# Groups: 1 Content-Length (kept), 2 Transfer-Encoding, 3 Connection, 4 the value.
# Matched on the lower-cased head (same length, so positions hold for the raw one);
# llhttp has already refused bare LF, obs-fold and a space before the colon.
_RESPONSE_SPECIAL: Final = re.compile(
    rb"\n(?:(content-length)|(transfer-encoding)|(connection)|keep-alive|proxy-connection|te"
    rb"|trailer|upgrade|x-request-id):[ \t]*([^\r\n]*)\r"
)
RESPONSE_CACHE_SIZE: Final = 512
_FRAMING: Final = frozenset({b"", b"content-length", b"transfer-encoding"})


class ResponseHead:
    """An upstream response head, rewritten for the client in one pass over its raw bytes.

    ``raw`` is what llhttp already checked: the status line and header lines, each
    ending in CRLF (the blank line excluded). Hop-by-hop headers, the ones Connection
    names and the upstream's X-Request-ID are removed; Content-Length is kept.
    """

    __slots__ = ("status_line", "lines", "content_length", "chunked", "close")

    def __init__(self, raw: bytes) -> None:
        if len(raw) > MAX_TOTAL:
            raise HeaderError(502, "upstream_protocol_error", "response headers over 64 KiB")
        end = raw.index(b"\r\n") + 2
        status_line = raw[:end]
        if not status_line.startswith(b"HTTP/1.1 "):
            status_line = b"HTTP/1.1 " + status_line.partition(b" ")[2]
        self.status_line = status_line
        self.content_length: bytes | None = None
        self.chunked = False
        self.close = False
        kept: list[bytes] = []
        named: set[bytes] = set()
        position = end
        for match in _RESPONSE_SPECIAL.finditer(raw.lower(), end - 1):
            group = match.group
            if group(1) is not None:
                self.content_length = raw[match.start(4) : match.end(4)]
                continue
            kept.append(raw[position : match.start() + 1])
            position = match.end() + 1
            if group(2) is not None:
                # llhttp de-chunks; the gateway frames the body anew for its client.
                self.chunked = self.chunked or b"chunked" in group(4).lower()
            elif group(3) is not None:
                value = group(4).lower()
                if value == b"close":
                    self.close = True
                elif value != b"keep-alive":
                    tokens = {t.strip() for t in value.split(b",")}
                    self.close = self.close or b"close" in tokens
                    # Framing is the gateway's to decide, whatever Connection names.
                    named |= tokens - _CONNECTION_OPTIONS - _FRAMING
        kept.append(raw[position:])
        lines = b"".join(kept)
        if named:
            lines = b"".join(
                line + b"\r\n"
                for line in lines.split(b"\r\n")[:-1]
                if line.partition(b":")[0].strip().lower() not in named
            )
        self.lines = lines

    @classmethod
    def of(cls, raw: bytes, cache: dict[bytes, ResponseHead] = {}) -> ResponseHead:  # noqa: B006
        """The ResponseHead of ``raw``, remembered: an upstream sends the same head again
        and again (only Date changes, once a second), so most responses skip the rewrite."""
        head = cache.get(raw)
        if head is None:
            head = cls(raw)
            if len(cache) >= RESPONSE_CACHE_SIZE:
                cache.clear()
            cache[raw] = head
        return head

    def client_head(self, request_id: bytes, framing: bytes) -> bytes:
        """The response head for the client; ``framing`` is its Transfer-Encoding/Connection."""
        return b"".join(
            (self.status_line, self.lines, _VIA_ID, request_id, b"\r\n", framing, b"\r\n")
        )


_VIA_ID: Final = b"Via: 1.1 gateway\r\nX-Request-ID: "


def error_body(code: str, message: str) -> bytes:
    """SPEC's JSON error shape (the admin listener answers the same bytes); a line, so
    that curl's output ends before the prompt."""
    return json.dumps({"error": {"code": code, "message": message}}).encode() + b"\n"


def error_bytes(
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    extra: bytes = b"",
    close: bool = False,
) -> bytes:
    """A whole JSON error response, as the data plane writes it."""
    body = error_body(code, message)
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode()),
            b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body),
            b"X-Request-ID: ",
            request_id,
            b"\r\n",
            extra,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        ]
    )


# How a response body reaches the client (response_framing).
BODYLESS: Final = 0  # HEAD, 204, 304: the head is the whole answer
AS_SENT: Final = 1  # its Content-Length is passed on with the bytes
CHUNKED: Final = 2  # chunked to an HTTP/1.1 client (the gateway chunks what llhttp decodes)
TO_CLOSE: Final = 3  # to an HTTP/1.0 client without a length: the body ends with the close


def response_framing(
    head_request: bool, status: int, content_length: bytes | None, chunked: bool, http11: bool
) -> int:
    """BODYLESS, AS_SENT, CHUNKED or TO_CLOSE for a response to the client."""
    if head_request or status == 204 or status == 304:
        return BODYLESS
    if content_length is not None and not chunked:
        return AS_SENT
    return CHUNKED if http11 else TO_CLOSE
