"""Who may call the registry API: bearer tokens, each scoped to services and a role.

``admin.token_env`` is one token with every right (named "admin"); ``admin.tokens``
adds named ones: ``services`` globs (``billing-*``) a write token may change, and
``role: read`` for GET only. Reading is open to every token. Each secret comes from an
environment variable, so none is written in routes.yaml or on a command line.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from gateway.config.model import AdminConfig
from registry.core.errors import ApiError
from registry.core.models import rfc3339
from registry.core.policy import is_loopback

READS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class Token:
    name: str
    secret: bytes
    services: tuple[str, ...] = ("*",)
    role: str = "write"

    def may_change(self, service: str) -> bool:
        return any(fnmatchcase(service, glob) for glob in self.services)


def tokens_from(admin: AdminConfig, environ: Mapping[str, str]) -> tuple[list[Token], list[str]]:
    """The tokens whose variable is set, and a warning for each one that is not."""
    tokens, warnings = [], []
    if admin.token_env is not None and environ.get(admin.token_env):
        tokens.append(Token("admin", environ[admin.token_env].encode()))
    for each in admin.tokens:
        secret = environ.get(each.token_env)
        if secret:
            tokens.append(Token(each.name, secret.encode(), each.services, each.role))
        else:
            warnings.append(f"admin token {each.name!r} is off: {each.token_env} is not set")
    return tokens, warnings


def open_admin_refusal(
    admin: AdminConfig, listen: tuple[str, int], tokens: list[Token], config_file: str
) -> str | None:
    """Why not to start (``gateway run``, and ``gateway check`` too): an admin listener off
    loopback with no token set. The message names what to set in ``config_file``."""
    if is_loopback(listen[0]) or tokens:
        return None
    variables = [v for v in [admin.token_env] if v] + [t.token_env for t in admin.tokens]
    if variables:
        fix = f"export {' or '.join(variables)}=<secret> (named under admin: in {config_file})"
    else:
        fix = (
            f"add 'token_env: GATEWAY_ADMIN_TOKEN' under admin: in {config_file} "
            "and export GATEWAY_ADMIN_TOKEN=<secret>"
        )
    return (
        f"admin listener {listen[0]}:{listen[1]} is not on loopback and no admin token is "
        f"set: {fix}, or listen on 127.0.0.1"
    )


def identify(tokens: list[Token], authorization: str) -> Token:
    """The token the Authorization header carries; ApiError 401 ``unauthorized``."""
    scheme, _, value = authorization.partition(" ")
    sent = value.strip().encode() if scheme.lower() == "bearer" else b""
    found = None
    for token in tokens:  # every one compared: the time taken says nothing of which
        if hmac.compare_digest(sent, token.secret) and found is None:
            found = token
    if found is None:
        raise ApiError(
            401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
        )
    return found


def check(token: Token, method: str, service: str | None) -> None:
    """ApiError 403 ``forbidden`` unless ``token`` may make this call."""
    if method in READS:
        return
    if token.role == "read":
        raise ApiError(403, "forbidden", f"token {token.name!r} may only read (role: read)")
    if service is not None and not token.may_change(service):
        raise ApiError(
            403,
            "forbidden",
            f"token {token.name!r} may not change service {service!r} "
            f"(it may change: {', '.join(token.services)})",
        )


def audit_line(
    token: str | None,
    client: str | None,
    method: str,
    path: str,
    service: str | None,
    instance: str | None,
    status: int,
) -> str:
    """One JSON line for the audit log (logger ``gateway.audit``)."""
    return json.dumps(
        {
            "time": rfc3339(time.time()),
            "token": token,
            "client": client,
            "method": method,
            "path": path,
            "service": service,
            "instance": instance,
            "status": status,
        }
    )
