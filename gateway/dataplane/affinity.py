"""Session affinity: the key a request is hashed by (``services.NAME.affinity``).

A service with affinity picks by consistent hashing of the key (Registry.pick_by_key);
a request without the cookie or header is balanced as any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config.model import Config
    from gateway.dataplane.wire import RequestHead

# service -> (the name: a cookie's as written, a header's lower-case; whether a cookie)
Affinities = dict[str, tuple[bytes, bool]]


def affinities_of(config: Config) -> Affinities:
    found: Affinities = {}
    for name, service in config.services.items():
        affinity = service.affinity
        if affinity is not None and affinity.cookie is not None:
            found[name] = (affinity.cookie.encode(), True)
        elif affinity is not None and affinity.header is not None:
            found[name] = (affinity.header.lower().encode(), False)
    return found


def request_key(head: RequestHead, name: bytes, cookie: bool) -> bytes | None:
    """The value the request is hashed by: its header ``name``'s, or its cookie ``name``'s
    (cookie names are case-sensitive); None when absent or empty."""
    if not cookie:
        return head.value_of(name) or None
    for line in head.lines:
        key, _, value = line.partition(b":")
        if key.lower() != b"cookie":
            continue
        for pair in value.split(b";"):
            cookie_name, equals, cookie_value = pair.strip().partition(b"=")
            if equals and cookie_name == name and cookie_value:
                return cookie_value
    return None
