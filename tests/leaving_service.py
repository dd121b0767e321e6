"""An aiohttp service that registers itself with ``register_app`` and answers slowly
(20 ms), run as a process by tests/test_registration.py to be stopped with SIGTERM:

    python -m tests.leaving_service ADMIN_URL [--no-signals]

``--no-signals`` leaves at aiohttp's shutdown, after the listener closed (the old way),
and 0.3 s later, as long as a deregistration can take to reach gateways elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from aiohttp import web

from registry.client.registration import register_app


async def slow(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.sleep(0.02)
    return web.Response(text="done")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # the port is known before startup registers it
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    handle_signals = "--no-signals" not in sys.argv
    if not handle_signals:
        app.on_shutdown.append(lambda _: asyncio.sleep(0.3))
    register_app(app, sys.argv[1], "web", port=sock.getsockname()[1],
                 handle_signals=handle_signals)  # fmt: skip
    web.run_app(app, sock=sock, print=None, access_log=None, shutdown_timeout=5)


if __name__ == "__main__":
    main()
