"""The balancers side by side with one slow instance: small GET, p50 and p99.

    python3 benchmarks/balancers.py [--runs 3] [--seconds 5] [--delay 0.05]

Three instances of one service: the two nginx upstreams of run.py (fast) and a Python
one that answers after --delay seconds (slow). A gateway per balancer (round_robin,
least_request, peak_ewma; the repository's code, static instances), wrk with 50
keep-alive connections against each in turn, interleaved --runs times; medians. The
slow instance's share comes from the gateway's own gateway_instance_requests_total.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import run  # noqa: E402  (benchmarks/run.py: processes, nginx upstream, wrk)

BALANCERS = ("round_robin", "least_request", "peak_ewma")


def serve_slow(port: int, delay: float) -> None:
    """The slow instance: every request answered with 5 bytes after ``delay`` seconds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def gateway_yaml(port: int, admin: int, instances: list[int], balancer: str) -> str:
    listed = ", ".join(f"127.0.0.1:{p}" for p in instances)
    return (
        f"listen: 127.0.0.1:{port}\nadmin:\n  listen: 127.0.0.1:{admin}\n"
        f"proxy:\n  instance_metrics: 10\nroutes:\n  - prefix: /\n    service: api\n"
        f"services:\n  api:\n    instances: [{listed}]\n    balancer: {balancer}\n"
    )


def slow_share(admin: int, slow: int) -> tuple[float, float]:
    """(requests to the slow instance, requests in all), from the gateway's metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts = re.findall(
        r'gateway_instance_requests_total\{[^}]*instance="([^"]+)"[^}]*\} (\S+)', text
    )
    total = sum(float(n) for _, n in counts)
    return sum(float(n) for i, n in counts if i.endswith(f":{slow}")), total


def main(args: argparse.Namespace) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk") or "wrk"
    can_pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    tmp = Path(tempfile.mkdtemp(prefix="gateway-balancers-bench-"))
    procs = run.Processes()
    results: dict[str, list[dict[str, float]]] = {b: [] for b in BALANCERS}
    shares: dict[str, tuple[float, float]] = {}
    try:
        ups = run.start_upstream(tmp, nginx, procs, can_pin)
        if ups is None:
            return 1
        slow = run.free_port()
        cmd = [sys.executable, __file__, "--serve-slow", str(slow), "--delay", str(args.delay)]
        proc = procs.start("slow", cmd, tmp / "slow.log")
        if not run.wait_port(slow, proc, 10):
            print("the slow upstream did not start:\n" + run.tail(tmp / "slow.log"))
            return 1
        gateways = {}
        for balancer in BALANCERS:
            port, admin = run.free_port(), run.free_port()
            conf = tmp / f"{balancer}.yaml"
            conf.write_text(gateway_yaml(port, admin, [*ups, slow], balancer))
            cmd = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = procs.start(balancer, run.pinned(run.PROXY_CPUS, cmd, can_pin),
                               tmp / f"{balancer}.log", env=env)  # fmt: skip
            if not run.wait_port(port, proc, 20):
                print(f"gateway ({balancer}) did not start:\n" + run.tail(tmp / f"{balancer}.log"))
                return 1
            gateways[balancer] = (port, admin)
        for number in range(args.runs):
            for balancer, (port, _) in gateways.items():
                target = run.Target(balancer, port=port)
                result = run.run_wrk(wrk, target, run.SCENARIOS["small"], args.seconds, tmp,
                                     procs, can_pin)  # fmt: skip
                results[balancer].append(result)
                print(f"run {number + 1} {balancer:13} {result['rps']:8.0f} req/s  "
                      f"p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms",
                      flush=True)  # fmt: skip
        shares = {b: slow_share(admin, slow) for b, (_, admin) in gateways.items()}
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\none instance of three answers after {args.delay * 1000:.0f} ms; medians of "
          f"{args.runs} runs of {args.seconds} s, 50 connections:")  # fmt: skip
    print(f"{'balancer':14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'to the slow one':>16}")
    for balancer, runs in results.items():
        to_slow, total = shares[balancer]
        print(f"{balancer:14} {statistics.median(r['rps'] for r in runs):8.0f} "
              f"{statistics.median(r['p50_ms'] for r in runs):8.2f} "
              f"{statistics.median(r['p99_ms'] for r in runs):8.2f} "
              f"{100 * to_slow / max(total, 1):15.2f}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--serve-slow", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parsed = parser.parse_args()
    if parsed.serve_slow:
        serve_slow(parsed.serve_slow, parsed.delay)
        sys.exit(0)
    sys.exit(main(parsed))
