"""The request path without sockets: the Python cost of one proxied GET.

    python3 benchmarks/requestpath.py [N]            # microseconds per request
    python3 benchmarks/requestpath.py N --profile    # cProfile, by own time

Drives the real ClientConnection, Exchange and UpstreamConnection with fake transports
(a small GET in, an nginx-like answer back), so what it measures is the gateway's own
Python, free of the kernel and of the machine's noise. For numbers that do not move
between runs, count instructions instead of timing them:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null python3 benchmarks/requestpath.py 200
    valgrind --tool=callgrind --callgrind-out-file=/dev/null python3 benchmarks/requestpath.py 700

(the difference of the two totals over 500 x 7 requests is the cost of one request).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.app import run_loop  # noqa: E402
from gateway.config.loader import parse_config  # noqa: E402
from gateway.dataplane.context import ProxyContext  # noqa: E402
from gateway.dataplane.listener import ClientConnection, Listener  # noqa: E402
from gateway.dataplane.pool import UpstreamConnection  # noqa: E402
from gateway.dataplane.routing import RouteTable  # noqa: E402
from gateway.dataplane.stats import RequestStats  # noqa: E402
from registry.core.store import Registry  # noqa: E402
from tests.fakes import FakeTransport  # noqa: E402

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 14:20:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
)
CONFIG = """
routes:
  - prefix: /
    service: bench
services:
  bench:
    instances: ["127.0.0.1:18001", "127.0.0.1:18002"]
"""


async def main(count: int, profile: bool) -> None:
    config = parse_config(CONFIG)
    registry = Registry(time.time)
    registry.set_static("bench", config.services["bench"].instances)
    proxy = ProxyContext(RouteTable(config.routes), registry, RequestStats(registry))
    listener = Listener(proxy, config.proxy)
    upstreams = []
    for instance in registry.instances("bench"):
        connection = UpstreamConnection(proxy.pool, (instance.scheme, instance.host, instance.port))
        transport = FakeTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        proxy.pool.put(connection)
        upstreams.append((connection, transport))
    client = ClientConnection(listener)
    client_transport = FakeTransport()
    client.connection_made(client_transport)  # type: ignore[arg-type]

    def one() -> None:
        client.data_received(REQUEST)
        for connection, transport in upstreams:  # whichever instance got it answers
            if transport.out:
                transport.out.clear()
                connection.data_received(RESPONSE)
                break
        assert client_transport.out[-1].endswith(b"hello")
        client_transport.out.clear()

    for _ in range(2000):
        one()
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(count):
            one()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(count):
            one()
        timings.append((time.perf_counter() - started) / count * 1e6)
    timings.sort()
    print(f"min {timings[0]:.2f} us, median {timings[3]:.2f} us per request")


if __name__ == "__main__":
    run_loop(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000, "--profile" in sys.argv))
