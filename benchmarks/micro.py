#!/usr/bin/env python3
"""Micro-benchmarks of the pure hot path, timeit-style, standard library only.

    python3 benchmarks/micro.py                       # table of ns/op
    python3 benchmarks/micro.py --json                # also write benchmarks/results/micro.json
    python3 benchmarks/micro.py --only route,pick     # a subset (substring of the names)

Each benchmark builds its data once, then times a loop of operations; ns/op is the
median of --repeat timings (default 5) divided by the operations timed. The figure
includes the Python loop around the call (~15-30 ns). A benchmark whose code is not
there (a renamed or removed function) is reported as n/a, not as a crash.

To add a benchmark: write a function that takes no argument and returns
(callable, operations_per_call), and add it to BENCHMARKS below.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # works from a fresh clone without `pip install -e .`

DEFAULT_JSON = REPO / "benchmarks" / "results" / "micro.json"

Bench = Callable[[], tuple[Callable[[], object], int]]


@dataclass(frozen=True)
class Route:
    """What gateway.routing.RouteTable needs of a route (its RouteSpec protocol)."""

    prefix: str
    service: str
    host: str | None = None
    strip_prefix: bool = False


# --------------------------------------------------------------------------- benchmarks


def bench_route_match() -> tuple[Callable[[], object], int]:
    """RouteTable.match over 1,000 routes (/svc123/v1, a few host routes), varied paths."""
    from gateway.dataplane.routing import RouteTable

    routes = [Route(f"/svc{i}/v1", f"svc{i}", strip_prefix=i % 2 == 0) for i in range(990)]
    routes += [Route(f"/svc{i}/v1", f"host{i}", host=f"api{i % 5}.example.com") for i in range(10)]
    routes.append(Route("/", "web"))
    table = RouteTable(routes)
    hosts = (None, "api1.example.com", "www.example.com", "api3.example.com")
    queries = [
        (hosts[i % 4], path)
        for i in range(0, 1000, 7)
        for path in (f"/svc{i}/v1/users/{i}", f"/svc{i}/v1", f"/svc{i}/v2/x", "/static/app.js")
    ]
    match = table.match

    def run() -> None:
        for host, path in queries:
            match(host, path)

    return run, len(queries)


def bench_registry_pick() -> tuple[Callable[[], object], int]:
    """Registry.pick for a service of 1,000 live instances of equal weight (a rotation)."""
    from registry.core.store import Registry

    registry = Registry(clock=time.time)
    for i in range(1000):
        registry.register("bench", {"host": "10.0.0.1", "port": 10000 + i, "ttl": 3600})
    pick = registry.pick

    def run() -> None:
        for _ in range(10):
            pick("bench")

    return run, 10


def bench_weighted_pick() -> tuple[Callable[[], object], int]:
    """Registry.pick for a service of 1,000 live instances of weights 1..3 (a heap)."""
    from registry.core.store import Registry

    registry = Registry(clock=time.time)
    for i in range(1000):
        body = {"host": "10.0.0.1", "port": 10000 + i, "ttl": 3600, "weight": 1 + i % 3}
        registry.register("bench", body)
    pick = registry.pick

    def run() -> None:
        for _ in range(10):
            pick("bench")

    return run, 10


REQUEST_HEADERS = [
    ("Host", "api.example.com"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "application/json, text/plain, */*"),
    ("Accept-Language", "en-GB,en;q=0.5"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl"),
    ("Cookie", "session=0123456789abcdef; theme=dark"),
    ("X-Forwarded-For", "203.0.113.7"),
    ("Connection", "keep-alive"),
    ("Content-Type", "application/json"),
]


def bench_request_head() -> tuple[Callable[[], object], int]:
    """gateway.dataplane.wire.RequestHead: 10 headers in, the upstream request head out."""
    from gateway.dataplane.wire import RequestHead

    headers = [(k.encode(), v.encode()) for k, v in REQUEST_HEADERS]

    def run() -> None:
        head = RequestHead()
        for name, value in headers:
            head.add(name, value)
        head.upstream_head(
            b"GET", b"/api/users/7?x=1", client_ip=b"127.0.0.1", request_id=b"0123456789abcdef"
        )

    run()
    return run, 1


RESPONSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 14:20:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 1234\r\nConnection: keep-alive\r\n"
    b"Cache-Control: no-store\r\nSet-Cookie: a=1; Path=/\r\n"
)


def bench_response_head() -> tuple[Callable[[], object], int]:
    """gateway.dataplane.wire.ResponseHead on a typical 7-header response, not cached."""
    from gateway.dataplane.wire import ResponseHead

    def run() -> None:
        ResponseHead(RESPONSE_HEAD).client_head(b"0123456789abcdef", b"")

    run()
    return run, 1


def bench_response_head_cached() -> tuple[Callable[[], object], int]:
    """ResponseHead.of: the same head again (what most responses cost)."""
    from gateway.dataplane.wire import ResponseHead

    def run() -> None:
        ResponseHead.of(RESPONSE_HEAD).client_head(b"0123456789abcdef", b"")

    run()
    return run, 1


# ============================================================================
# BENCHMARKS: (name, function). Add new ones here; each function returns
# (callable to time, operations one call performs). Keep them independent of
# internals: use the modules' public names only.
# ============================================================================
BENCHMARKS: list[tuple[str, Bench]] = [
    ("route_match_1000_routes", bench_route_match),
    ("registry_pick_1000_instances", bench_registry_pick),
    ("weighted_pick_1000_instances", bench_weighted_pick),
    ("request_head_10_headers", bench_request_head),
    ("response_head_7_headers", bench_response_head),
    ("response_head_7_headers_cached", bench_response_head_cached),
]


# --------------------------------------------------------------------------- runner


def measure(bench: Bench, repeat: int, min_time: float) -> dict[str, object]:
    try:
        func, ops = bench()
    except Exception as exc:  # missing or changed code: report, do not crash
        return {"status": "n/a", "reason": f"{type(exc).__name__}: {exc}"}
    timer = timeit.Timer(func)
    number = 1
    while True:  # like Timer.autorange, but to min_time
        elapsed = timer.timeit(number)
        if elapsed >= min_time:
            break
        number = max(number * 2, int(number * min_time / max(elapsed, 1e-9) * 1.1))
    times = [timer.timeit(number) for _ in range(repeat)]
    per_op = [t / (number * ops) * 1e9 for t in times]
    return {
        "status": "ok",
        "ns_per_op": statistics.median(per_op),
        "min_ns": min(per_op),
        "max_ns": max(per_op),
        "ops_per_repeat": number * ops,
        "repeats_ns": per_op,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Micro-benchmarks of the gateway's pure hot path.")
    p.add_argument("--repeat", type=int, default=5, help="timings per benchmark, median reported")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds one timing lasts at least")
    p.add_argument("--only", default="", help="comma-separated substrings of benchmark names")
    p.add_argument(
        "--json",
        nargs="?",
        const=str(DEFAULT_JSON),
        default=None,
        metavar="PATH",
        help="write the results as JSON (default path benchmarks/results/micro.json)",
    )
    args = p.parse_args(argv)
    wanted = [w for w in args.only.split(",") if w]
    selected = [(n, b) for n, b in BENCHMARKS if not wanted or any(w in n for w in wanted)]
    if not selected:
        p.error(f"no benchmark matches {args.only!r}")

    results: dict[str, dict[str, object]] = {}
    print(f"{'benchmark':<32} {'ns/op':>10} {'min':>10} {'max':>10}")
    for name, bench in selected:
        r = measure(bench, args.repeat, args.min_time)
        results[name] = r
        if r["status"] == "ok":
            print(f"{name:<32} {r['ns_per_op']:>10.0f} {r['min_ns']:>10.0f} {r['max_ns']:>10.0f}")
        else:
            print(f"{name:<32} {'n/a':>10}  {r['reason']}")
        sys.stdout.flush()

    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": sys.version.split()[0],
            "machine": platform.platform(),
            "repeat": args.repeat,
            "results": results,
        }
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if any(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
