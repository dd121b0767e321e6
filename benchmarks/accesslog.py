"""The access log's cost: small GET through the gateway with --access-log off and json.

    python3 benchmarks/accesslog.py [--runs 3] [--seconds 8]

Two gateways (the repository's code, one core each in turn) routing to the same upstream
nginx; wrk, 50 keep-alive connections, interleaved --runs times; medians and the ratio.
The log goes to a file (what stdout is redirected to), as a deployment would have it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import run  # noqa: E402  (benchmarks/run.py: processes, nginx upstream, wrk)


def main(args: argparse.Namespace) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk") or "wrk"
    can_pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    tmp = Path(tempfile.mkdtemp(prefix="gateway-accesslog-bench-"))
    procs = run.Processes()
    results: dict[str, list[float]] = {"off": [], "json": []}
    try:
        ups = run.start_upstream(tmp, nginx, procs, can_pin)
        if ups is None:
            return 1
        ports = {}
        for form in results:
            port, admin = run.free_port(), run.free_port()
            conf = tmp / f"{form}.yaml"
            conf.write_text(run.gateway_conf(port, admin, ups))
            cmd = [sys.executable, "-m", "gateway", "run", "--config", str(conf),
                   "--access-log", form]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            proc = procs.start(form, run.pinned(run.PROXY_CPUS, cmd, can_pin), tmp / f"{form}.log",
                               env=env)  # fmt: skip
            if not run.wait_port(port, proc, 20):
                print(f"gateway ({form}) did not start:\n" + run.tail(tmp / f"{form}.log"))
                return 1
            ports[form] = port
        for number in range(args.runs):
            for form, port in ports.items():
                target = run.Target(form, port=port)
                result = run.run_wrk(wrk, target, run.SCENARIOS["small"], args.seconds, tmp,
                                     procs, can_pin)  # fmt: skip
                rps = result["rps"]
                results[form].append(rps)
                print(f"run {number + 1} access log {form:4} {rps:8.0f} req/s", flush=True)
        lines = (tmp / "json.log").read_bytes().count(b'"request_id"')
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = statistics.median(results["off"]), statistics.median(results["json"])
    print(f"\nsmall GET, medians of {args.runs}: off {off:.0f} req/s, json {on:.0f} req/s, "
          f"json/off {on / off:.2f} ({lines} lines logged)")  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    sys.exit(main(parser.parse_args()))
