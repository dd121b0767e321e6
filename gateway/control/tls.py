"""TLS contexts: the listeners' (certificate files reloaded in place) and the one for
https instances (verified against the system's CAs or upstream_ca, unless turned off)."""

from __future__ import annotations

import ssl

from gateway.config.model import ProxySettings, TlsConfig


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """For a listener: TLS 1.2 and later, the config's certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(tls.cert, tls.key)
    return context


def reload_into(context: ssl.SSLContext, tls: TlsConfig) -> None:
    """The files again, into the listener's own context: new handshakes get the new
    certificate, connections already open keep theirs. The files were loaded once by the
    config loader; a pair that fails now raises and leaves the old one in place."""
    server_context(tls)  # the whole pair, checked apart first
    context.load_cert_chain(tls.cert, tls.key)


def upstream_context(settings: ProxySettings) -> ssl.SSLContext:
    """For https instances: the server's certificate checked against the system's CA
    store (or upstream_ca) and the instance's host name; no check at all only when
    upstream_tls_verify is false."""
    context = ssl.create_default_context(cafile=settings.upstream_ca)
    if not settings.upstream_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
