"""TLS on the proxy listener: the gateway against nginx, both terminating TLS.

    python3 benchmarks/tls.py [--runs 3] [--seconds 8]

Small GET (wrk, 50 keep-alive connections, one TLS handshake each) through nginx with
`listen ... ssl` and through the gateway with `tls: {cert, key}`, both to the same
upstream nginx, interleaved --runs times; plain HTTP through both as the reference.
Certificates from trustme (a throwaway CA). Everything is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import trustme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import run  # noqa: E402  (benchmarks/run.py: processes, nginx upstream, wrk)


def nginx_tls_conf(tmp: Path, port: int, tls_port: int, ups: tuple[int, int]) -> str:
    plain = run.nginx_proxy_conf(tmp, port, ups)
    server = f"""  server {{
    listen 127.0.0.1:{tls_port} ssl backlog=4096;
    ssl_certificate {tmp}/cert.pem;
    ssl_certificate_key {tmp}/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    return plain.rstrip().removesuffix("}") + server


def main(args: argparse.Namespace) -> int:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk") or "wrk"
    can_pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    tmp = Path(tempfile.mkdtemp(prefix="gateway-tls-bench-"))
    procs = run.Processes()
    try:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
        ups = run.start_upstream(tmp, nginx, procs, can_pin)
        if ups is None:
            return 1
        nginx_port, nginx_tls = run.free_port(), run.free_port()
        (tmp / "nginx.conf").write_text(nginx_tls_conf(tmp, nginx_port, nginx_tls, ups))
        conf = tmp / "nginx.conf"
        cmd = [nginx, "-e", str(tmp / "nginx-error.log"), "-p", str(tmp), "-c", str(conf)]
        started = [
            (procs.start("nginx", run.pinned(run.PROXY_CPUS, cmd, can_pin), tmp / "nginx.log"),
             (nginx_port, nginx_tls))
        ]  # fmt: skip
        gateways = {}
        for name, tls in (("gateway", False), ("gateway-tls", True)):
            port, admin = run.free_port(), run.free_port()
            conf = tmp / f"{name}.yaml"
            conf.write_text(
                (f"tls: {{cert: {tmp}/cert.pem, key: {tmp}/key.pem}}\n" if tls else "")
                + run.gateway_conf(port, admin, ups)
            )
            cmd = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            pinned = run.pinned(run.PROXY_CPUS, cmd, can_pin)
            proc = procs.start(name, pinned, tmp / f"{name}.log", env=env)
            started.append((proc, (port,)))
            gateways[name] = port
        targets = {
            "nginx": f"http://127.0.0.1:{nginx_port}",
            "nginx-tls": f"https://127.0.0.1:{nginx_tls}",
            "gateway": f"http://127.0.0.1:{gateways['gateway']}",
            "gateway-tls": f"https://127.0.0.1:{gateways['gateway-tls']}",
        }
        for proc, ports in started:
            for port in ports:
                if not run.wait_port(port, proc, 20):
                    print(f"port {port} never opened:\n" + run.tail(tmp / "nginx-error.log"))
                    return 1
        results: dict[str, list[float]] = {name: [] for name in targets}
        for number in range(args.runs):
            for name, base in targets.items():
                load = [wrk, "-t1", "-c50", f"-d{args.seconds}s", "--latency", base + "/small"]
                cmd = run.pinned(run.LOAD_CPUS, load, can_pin)
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 30)
                rps = run.parse_wrk(out.stdout)["rps"]
                results[name].append(rps)
                print(f"run {number + 1} {name:12} {rps:8.0f} req/s", flush=True)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    med = {name: statistics.median(values) for name, values in results.items()}
    print(f"\nsmall GET, medians of {args.runs}:")
    for name in targets:
        print(f"  {name:12} {med[name]:8.0f} req/s")
    print(f"gateway/nginx plain {med['gateway'] / med['nginx']:.2f}, "
          f"with TLS {med['gateway-tls'] / med['nginx-tls']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    sys.exit(main(parser.parse_args()))
