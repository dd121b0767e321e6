#!/usr/bin/env python3
"""End-to-end benchmark: the gateway against a direct connection, nginx and HAProxy.

    python3 benchmarks/run.py                 # the default run (< 5 minutes)
    python3 benchmarks/run.py --quick         # smoke test: 1 run, 3 s a measurement
    python3 benchmarks/run.py --help

One nginx process (1 worker, two listening ports = two upstream instances) is the
upstream. Every proxy under test is pinned to core 1 (``taskset -c 1``); wrk and the
upstream are pinned to core 0. Runs are interleaved (for each run, for each scenario,
for each target) and medians over the runs are reported, with ratios to nginx.
See benchmarks/README.md. Standard library only; needs wrk, nginx and (optionally)
haproxy, which it installs from Debian packages when they are missing and it runs as root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_JSON = REPO / "benchmarks" / "results" / "latest.json"

SMALL_BODY = b"hello"  # GET /small
BIG_SIZE = 1024 * 1024  # GET /1m
POST_SIZE = 64 * 1024  # POST /post
NOFILE = 65536  # wanted RLIMIT_NOFILE for the runner and every child

PROXY_CPUS = "1"  # the proxy under test
LOAD_CPUS = "0"  # wrk and the upstream nginx
BUDGET_SECONDS = 290.0  # the default run must stay under 5 minutes, start-up included
STARTUP_ESTIMATE = 5.0  # starting and checking every target, seconds
WRK_OVERHEAD = 0.1  # launching wrk and parsing its output, seconds per invocation

APT_PACKAGES = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy"}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    path: str
    connections: int
    description: str
    headers: tuple[str, ...] = ()
    post: bool = False
    headline: bool = False  # measured for --duration, the others for --other-duration


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "small", "/small", 50, "GET /small (5 B) over 50 keep-alive connections", headline=True
        ),
        Scenario(
            "post64k", "/post", 50, "POST /post with a 64 KiB body over 50 connections", post=True
        ),
        Scenario("1m", "/1m", 50, "GET /1m (1 MiB) over 50 connections"),
        Scenario("c1000", "/small", 1000, "GET /small over 1,000 keep-alive connections"),
        Scenario(
            "newconn",
            "/small",
            50,
            "GET /small with Connection: close (a new connection a request), 50 connections",
            headers=("Connection: close",),
        ),
    )
}

TARGET_NAMES = ("direct", "nginx", "haproxy", "gateway", "gateway-w2")
TARGET_NOTES = {
    "direct": "wrk straight to the upstream (no proxy), upstream shares core 0 with wrk",
    "nginx": "nginx 1 worker, keepalive 64 to both upstreams, core 1",
    "haproxy": "HAProxy nbthread 1, http-reuse always, core 1",
    "gateway": "gateway, default config, 1 process, core 1",
    "gateway-w2": "gateway --workers 2, NOT pinned to one core (taskset -c 0,1)",
}


# --------------------------------------------------------------------------- processes


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else max(hard, soft)
    try:  # root may raise the hard limit too
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(NOFILE, soft), max(NOFILE, hard)))
        return
    except (ValueError, OSError):
        pass
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(NOFILE, want), hard))


def nofile() -> int:
    """The descriptor limit the runner got (children inherit it)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return NOFILE if soft == resource.RLIM_INFINITY else int(soft)


def _child_setup() -> None:  # preexec_fn: runs in the child between fork and exec
    _raise_nofile()


class Processes:
    """Every process the runner starts, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.live: dict[int, tuple[str, subprocess.Popen[bytes]]] = {}

    def start(self, name: str, cmd: list[str], log: Path, **kw: Any) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup,
                start_new_session=True,  # its own process group: nginx master + worker together
                **kw,
            )
        self.live[proc.pid] = (name, proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        self.live.pop(proc.pid, None)
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # Children left in the group (nginx worker after its master died): the group id is ours.
        _signal_group(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _name, proc in list(self.live.values()):
            try:
                self.stop(proc)
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Interrupted(Exception):
    pass


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore http_proxy


def http(url: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------- tools


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )


def ensure_tools(install: bool) -> dict[str, str | None]:
    tools = {name: find_tool(name) for name in APT_PACKAGES}
    missing = [name for name, path in tools.items() if path is None]
    if missing and install:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            print(f"missing {', '.join(missing)}; cannot install (needs root and apt-get)")
        else:
            pkgs = " ".join(APT_PACKAGES[m] for m in missing)
            print(f"installing {pkgs} from Debian packages ...", flush=True)
            cmd = "apt-get update -qq && apt-get install -y -qq --no-install-recommends " + pkgs
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            try:
                r = subprocess.run(
                    ["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=900
                )
                if r.returncode != 0:
                    last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                    print(f"apt-get failed (exit {r.returncode}): {last[0]}")
            except subprocess.TimeoutExpired:
                print("apt-get took more than 15 minutes; gave up")
        tools = {name: find_tool(name) for name in APT_PACKAGES}
    return tools


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (r.stdout + r.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def machine_info(tools: dict[str, str | None]) -> dict[str, Any]:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": run(["nproc"]),
        "uname": run(["uname", "-a"]),
        "cpu": cpu,
        "python": sys.version.split()[0],
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
    if tools.get("wrk"):
        info["wrk"] = tool_version([tools["wrk"], "-v"])  # type: ignore[list-item]
    if tools.get("nginx"):
        info["nginx"] = tool_version([tools["nginx"], "-v"])  # type: ignore[list-item]
    if tools.get("haproxy"):
        info["haproxy"] = tool_version([tools["haproxy"], "-v"])  # type: ignore[list-item]
    for mod in ("aiohttp", "uvloop", "httptools"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            pass
    return info


# --------------------------------------------------------------------------- configs


def nginx_common(tmp: Path, name: str) -> str:
    temp = tmp / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers must read the temp dir
    return f"""{user}daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile()};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
"""


def nginx_temp_paths(tmp: Path, name: str) -> str:
    temp = tmp / f"{name}-temp"
    return "".join(
        f"  {kind}_temp_path {temp}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def upstream_conf(tmp: Path, ports: tuple[int, int]) -> str:
    www = tmp / "www"
    return (
        nginx_common(tmp, "upstream")
        + f"""http {{
  access_log off;
{nginx_temp_paths(tmp, "upstream")}  default_type application/octet-stream;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 100000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{ports[0]} backlog=4096;
    listen 127.0.0.1:{ports[1]} backlog=4096;
    location = /small {{ return 200 "{SMALL_BODY.decode()}"; }}
    location = /1m {{ root {www}; }}
    # return discards (reads) the request body, keeping the connection alive
    location = /post {{
      client_max_body_size 2m;
      client_body_buffer_size 1m;
      return 200 "ok\\n";
    }}
  }}
}}
"""
    )


def nginx_proxy_conf(tmp: Path, port: int, ups: tuple[int, int]) -> str:
    return (
        nginx_common(tmp, "nginx")
        + f"""http {{
  access_log off;
{nginx_temp_paths(tmp, "nginx")}  keepalive_requests 100000;
  keepalive_timeout 75s;
  upstream bench {{
    server 127.0.0.1:{ups[0]};
    server 127.0.0.1:{ups[1]};
    keepalive 64;
    keepalive_requests 100000;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    # Bodies stay in memory, as in the gateway (which never touches the disk and reads
    # 64 KiB at a time): nginx's default 4 KiB proxy buffers halve its 1m figure.
    client_max_body_size 2m;
    client_body_buffer_size 1m;
    proxy_max_temp_file_size 0;
    proxy_buffer_size 64k;
    proxy_buffers 8 64k;
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
"""
    )


def haproxy_conf(port: int, ups: tuple[int, int]) -> str:
    # HAProxy needs about two descriptors a connection and refuses to start without them
    maxconn = max(2000, min(20000, (nofile() - 200) // 2))
    return f"""global
  nbthread 1
  maxconn {maxconn}

defaults
  mode http
  option http-keep-alive
  http-reuse always
  maxconn {maxconn}
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  timeout http-request 10s
  timeout http-keep-alive 75s

frontend bench
  bind 127.0.0.1:{port} backlog 4096
  default_backend bench

backend bench
  balance roundrobin
  server s1 127.0.0.1:{ups[0]}
  server s2 127.0.0.1:{ups[1]}
"""


def gateway_conf(port: int, admin: int, ups: tuple[int, int]) -> str:
    return f"""# generated by benchmarks/run.py: defaults, one route to two static instances
listen: 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin}
routes:
  - prefix: /
    service: bench
services:
  bench:
    instances: ["127.0.0.1:{ups[0]}", "127.0.0.1:{ups[1]}"]
"""


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    port: int = 0
    status: str = "pending"  # ok | failed | n/a | skipped
    reason: str = ""
    cmd: list[str] = field(default_factory=list)
    cpus: str = PROXY_CPUS
    log: Path | None = None
    log_tail: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        if self.log is not None:
            self.log_tail = tail(self.log)


def pinned(cpus: str, cmd: list[str], can_pin: bool) -> list[str]:
    return ["taskset", "-c", cpus, *cmd] if can_pin else cmd


def check_target(target: Target) -> str | None:
    """One request of each kind through the target; None when all are right."""
    base = f"http://127.0.0.1:{target.port}"
    checks = (
        ("GET /small", f"{base}/small", None, len(SMALL_BODY)),
        ("GET /1m", f"{base}/1m", None, BIG_SIZE),
        ("POST /post", f"{base}/post", b"x" * POST_SIZE, 3),
    )
    for label, url, data, length in checks:
        try:
            status, body = http(url, data, timeout=10)
        except (OSError, urllib.error.URLError) as exc:
            return f"{label}: {exc}"
        if status != 200 or len(body) != length:
            return f"{label}: status {status}, {len(body)} bytes (wanted 200, {length} bytes)"
    return None


def start_targets(
    names: list[str],
    tmp: Path,
    ups: tuple[int, int],
    tools: dict[str, str | None],
    procs: Processes,
    can_pin: bool,
    env: dict[str, str],
) -> list[Target]:
    targets: list[Target] = []
    for name in names:
        t = Target(name, port=free_port())
        targets.append(t)
        t.log = tmp / f"{name}.log"
        if name == "direct":
            t.port, t.cpus = ups[0], LOAD_CPUS
            t.cmd = ["(upstream nginx, first instance)"]
            continue
        if name == "nginx":
            conf = tmp / "nginx.conf"
            conf.write_text(nginx_proxy_conf(tmp, t.port, ups))
            nginx = tools["nginx"]
            assert nginx is not None
            t.log = tmp / "nginx-error.log"
            t.cmd = pinned(
                PROXY_CPUS, [nginx, "-e", str(t.log), "-p", str(tmp), "-c", str(conf)], can_pin
            )
        elif name == "haproxy":
            if tools["haproxy"] is None:
                t.fail("skipped", "haproxy is not installed and could not be installed")
                continue
            conf = tmp / "haproxy.cfg"
            conf.write_text(haproxy_conf(t.port, ups))
            t.cmd = pinned(PROXY_CPUS, [tools["haproxy"], "-db", "-f", str(conf)], can_pin)
        elif name in ("gateway", "gateway-w2"):
            admin = free_port()
            conf = tmp / f"{name}-routes.yaml"
            conf.write_text(gateway_conf(t.port, admin, ups))
            cmd = [
                sys.executable,
                "-m",
                "gateway",
                "run",
                "--config",
                str(conf),
                "--listen",
                f"127.0.0.1:{t.port}",
                "--admin-listen",
                f"127.0.0.1:{admin}",
            ]
            if name == "gateway-w2":
                cmd += ["--workers", "2"]
                t.cpus = "0,1"
            t.cmd = pinned(t.cpus, cmd, can_pin)
        # nginx writes to its error log; the others to stdout/stderr
        t.proc = procs.start(name, t.cmd, t.log, cwd=str(tmp), env=env)
    # Wait for all of them, in parallel, bounded.
    for t in targets:
        if t.proc is None:
            if t.status == "pending":
                t.status = "ok"  # direct
            continue
        if t.name.startswith("gateway"):
            ready = wait_readyz(t, timeout=20)
        else:
            ready = wait_port(t.port, t.proc, timeout=10)
        if not ready:
            code = t.proc.poll()
            if code is not None:
                if t.name == "gateway-w2":
                    last = tail(t.log, 1) if t.log else ""
                    t.fail("n/a", f"--workers 2 refused (exit {code}): {last}")
                else:
                    t.fail("failed", f"exited with status {code} at start-up")
            else:
                t.fail("failed", "not ready in time")
                procs.stop(t.proc)
            continue
        t.status = "ok"
    for t in targets:
        if t.status != "ok":
            continue
        problem = check_target(t)
        if problem:
            t.fail("failed", f"check request failed: {problem}")
            if t.proc is not None:
                procs.stop(t.proc)
    return targets


def wait_readyz(t: Target, timeout: float) -> bool:
    assert t.proc is not None
    admin = int(t.cmd[t.cmd.index("--admin-listen") + 1].rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if t.proc.poll() is not None:
            return False
        try:
            status, _ = http(f"http://127.0.0.1:{admin}/readyz", timeout=1)
            if status == 200:
                return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.1)
    return False


# --------------------------------------------------------------------------- wrk


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unknown time {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s*50(?:\.000)?%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s*99(?:\.000)?%\s+(\S+)", out, re.M)
    if not (rps and p50 and p99):
        raise ValueError("could not parse wrk output: " + " | ".join(out.strip().splitlines()[-3:]))
    total = re.search(r"(\d+) requests in", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = {
        k: int(v)
        for k, v in zip(
            ("connect", "read", "write", "timeout"),
            sock.groups() if sock else (0,) * 4,
            strict=True,
        )
    }
    errors["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    return {
        "rps": float(rps.group(1)),
        "p50_ms": to_ms(p50.group(1)),
        "p99_ms": to_ms(p99.group(1)),
        "requests": int(total.group(1)) if total else 0,
        "errors": errors,
    }


def run_wrk(
    wrk: str,
    target: Target,
    sc: Scenario,
    seconds: int,
    post_script: Path,
    procs: Processes,
    can_pin: bool,
) -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{sc.connections}", f"-d{seconds}s", "--timeout", "10s", "--latency"]
    for h in sc.headers:
        cmd += ["-H", h]
    if sc.post:
        cmd += ["-s", str(post_script)]
    cmd.append(f"http://127.0.0.1:{target.port}{sc.path}")
    cmd = pinned(LOAD_CPUS, cmd, can_pin)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_child_setup,
        start_new_session=True,
    )
    procs.live[proc.pid] = ("wrk", proc)
    try:
        out, _ = proc.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise ValueError("wrk did not finish in time") from None
    except BaseException:  # interrupted: wrk must not outlive the runner
        procs.stop(proc)
        raise
    procs.live.pop(proc.pid, None)
    return parse_wrk(out.decode(errors="replace"))


# --------------------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summarise(
    results: list[dict[str, Any]], scenarios: list[str], targets: list[Target]
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for sc in scenarios:
        rows: dict[str, Any] = {}
        for t in targets:
            runs = [
                r for r in results if r["scenario"] == sc and r["target"] == t.name and "rps" in r
            ]
            if t.status != "ok" or not runs:
                rows[t.name] = {
                    "status": t.status if t.status != "ok" else "no data",
                    "reason": t.reason or "no measurement (interrupted, or wrk failed)",
                }
                continue
            errors: dict[str, int] = {}
            for r in runs:
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
            rows[t.name] = {
                "status": "ok",
                "rps": statistics.median(r["rps"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "runs_rps": [r["rps"] for r in runs],
                "errors": errors,
            }
        ref = rows.get("nginx", {})
        for row in rows.values():
            if row.get("status") == "ok" and ref.get("status") == "ok":
                row["rps_vs_nginx"] = row["rps"] / ref["rps"] if ref["rps"] else None
                row["p99_vs_nginx"] = row["p99_ms"] / ref["p99_ms"] if ref["p99_ms"] else None
        summary[sc] = rows
    return summary


def print_tables(summary: dict[str, dict[str, Any]], runs: int) -> None:
    for sc, rows in summary.items():
        if not any(row.get("status") == "ok" for row in rows.values()):
            continue  # nothing measured (interrupted)
        print(f"\n== {sc}: {SCENARIOS[sc].description} (median of {runs} run(s))")
        print(
            f"{'target':<12} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'rps/nginx':>9} {'p99/nginx':>9}  req/s per run; errors"
        )
        for name, row in rows.items():
            if row.get("status") != "ok":
                reason = row.get("reason", "")
                reason = reason if len(reason) <= 70 else reason[:67] + "..."
                print(f"{name:<12} {row.get('status')}: {reason}")
                continue
            errs = {k: v for k, v in row["errors"].items() if v}
            per_run = ", ".join(f"{v:.0f}" for v in row["runs_rps"])
            note = " (cores 0,1: not pinned)" if name == "gateway-w2" else ""
            print(
                f"{name:<12} {row['rps']:>9.0f} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                f"{fmt(row.get('rps_vs_nginx')):>9} {fmt(row.get('p99_vs_nginx')):>9}  "
                f"[{per_run}]{'; errors ' + str(errs) if errs else ''}{note}"
            )


# --------------------------------------------------------------------------- main


def estimate(
    n_targets: int,
    scenarios: list[str],
    runs: int,
    dur: int,
    other: int,
    warm: int,
    warm_others: bool = True,
) -> float:
    per_run = (
        sum(dur if SCENARIOS[s].headline else other for s in scenarios)
        + len(scenarios) * WRK_OVERHEAD
    )
    warmed = sum(1 for s in scenarios if warm_others or SCENARIOS[s].headline)
    warmups = warmed * (warm + WRK_OVERHEAD) if warm > 0 else 0
    return STARTUP_ESTIMATE + n_targets * (runs * per_run + warmups)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--runs", type=int, default=None, help="interleaved runs, medians reported (default 3)"
    )
    p.add_argument(
        "--duration",
        type=int,
        default=None,
        help="seconds a measurement of the headline scenario 'small' (default 10)",
    )
    p.add_argument(
        "--other-duration",
        type=int,
        default=None,
        help="seconds a measurement of the other scenarios (default 3; lowered, down to 2, "
        "when the run would last over 5 minutes)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="seconds of discarded load before the first measurement of each "
        "target+scenario (default 1; 0 = none)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGET_NAMES),
        help=f"comma-separated, from {','.join(TARGET_NAMES)}",
    )
    p.add_argument(
        "--json",
        default=str(DEFAULT_JSON),
        metavar="PATH",
        help="where to write all the numbers (default benchmarks/results/latest.json)",
    )
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run, 3 s a measurement")
    p.add_argument("--no-install", action="store_true", help="never call apt-get")
    args = p.parse_args(argv)
    args.explicit = {
        k for k in ("runs", "duration", "other_duration") if getattr(args, k) is not None
    }
    if args.quick:
        args.runs = args.runs or 1
        args.duration = args.duration or 3
        args.other_duration = args.other_duration or 3
    args.runs = args.runs or 3
    args.duration = args.duration or 10
    args.other_duration = args.other_duration or 3
    if min(args.runs, args.duration, args.other_duration) < 1 or args.warmup < 0:
        p.error("--runs, --duration and --other-duration must be at least 1, --warmup at least 0")
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.target_list = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    bad += [t for t in args.target_list if t not in TARGET_NAMES]
    if bad or not args.scenario_list or not args.target_list:
        p.error(f"unknown or empty scenario/target: {', '.join(bad) or '(none given)'}")
    return args


def probe_gateway(env: dict[str, str]) -> tuple[str | None, str | None]:
    """(why the gateway cannot be imported or None, its data plane build or None).
    The build is "compiled", "pure Python", or "stale" (a compiled module older than
    its source: the old code would run)."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import gateway.app\n"
            "print('stale' if gateway.stale_extensions() else gateway.data_plane_build())",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode == 0:
        return None, probe.stdout.strip()
    return (probe.stderr.strip().splitlines() or ["?"])[-1], None


def ensure_compiled(env: dict[str, str], install: bool) -> tuple[str | None, str | None]:
    """The repository's gateway, with its compiled data plane built in place when it is
    missing or stale (pip install -e ., not counted in the 5 minutes)."""
    problem, build = probe_gateway(env)
    if problem is None and build != "compiled" and install:
        print(f"gateway data plane: {build}; building it (pip install -e . --no-deps, ~2 min)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=900,
        )
        problem, build = probe_gateway(env)
    if build is not None:
        print(f"gateway data plane: {build}")
        if build != "compiled":
            print("  (not the compiled build: expect about 2/3 of its throughput; see setup.py)")
    return problem, build


def start_upstream(
    tmp: Path, nginx: str, procs: Processes, can_pin: bool
) -> tuple[int, int] | None:
    """The upstream nginx on two ports; None (after saying why) if it does not start."""
    (tmp / "www").mkdir()
    (tmp / "www" / "1m").write_bytes(os.urandom(BIG_SIZE))
    ups = (free_port(), free_port())
    conf = tmp / "upstream.conf"
    conf.write_text(upstream_conf(tmp, ups))
    log = tmp / "upstream-error.log"
    cmd = pinned(LOAD_CPUS, [nginx, "-e", str(log), "-p", str(tmp), "-c", str(conf)], can_pin)
    proc = procs.start("upstream", cmd, tmp / "upstream.log")
    if wait_port(ups[0], proc, 10) and wait_port(ups[1], proc, 10):
        return ups
    print("the upstream nginx did not start:\n" + tail(log) + tail(tmp / "upstream.log"))
    return None


def plan(args: argparse.Namespace, n_targets: int) -> float:
    """The estimated total; lowers --other-duration (unless given) to stay under 5 minutes."""
    scenarios, runs, dur, warm = args.scenario_list, args.runs, args.duration, args.warmup
    args.warm_others = True
    est = estimate(n_targets, scenarios, runs, dur, args.other_duration, warm)
    if est > BUDGET_SECONDS and "other_duration" not in args.explicit and not args.quick:
        for other in range(args.other_duration - 1, 1, -1):
            args.other_duration = other
            est = estimate(n_targets, scenarios, runs, dur, other, warm)
            if est <= BUDGET_SECONDS:
                break
        print(f"note: --other-duration lowered to {args.other_duration} s to stay under 5 min")
        if est > BUDGET_SECONDS and "warmup" not in args.explicit:
            args.warm_others = False
            est = estimate(n_targets, scenarios, runs, dur, args.other_duration, warm, False)
            print("note: only the headline scenario is warmed up, to stay under 5 min")
        if est > BUDGET_SECONDS:
            print("note: still over 5 min; drop a target (--targets) or a run (--runs 2)")
    return est


def measure_all(
    args: argparse.Namespace,
    active: list[Target],
    wrk: str,
    post_script: Path,
    procs: Processes,
    can_pin: bool,
    results: list[dict[str, Any]],
) -> None:
    """For each run, for each scenario, for each target: targets alternate A/B/C/A/B/C."""
    total = args.runs * len(args.scenario_list) * len(active)
    done = 0
    for run in range(1, args.runs + 1):
        for sc_name in args.scenario_list:
            sc = SCENARIOS[sc_name]
            seconds = args.duration if sc.headline else args.other_duration
            for t in active:
                if t.status != "ok":
                    continue
                if t.proc is not None and t.proc.poll() is not None:
                    t.fail("failed", f"exited with status {t.proc.returncode} during the run")
                    print(f"target {t.name} died:\n  " + t.log_tail.replace("\n", "\n  "))
                    continue
                done += 1
                label = f"[{done}/{total}] run {run} {sc_name:<8} {t.name:<11}"
                entry: dict[str, Any] = {
                    "run": run,
                    "scenario": sc_name,
                    "target": t.name,
                    "seconds": seconds,
                }
                try:
                    warm = args.warm_others or sc.headline
                    if run == 1 and args.warmup > 0 and warm:  # discarded
                        run_wrk(wrk, t, sc, args.warmup, post_script, procs, can_pin)
                    entry.update(run_wrk(wrk, t, sc, seconds, post_script, procs, can_pin))
                except ValueError as exc:
                    entry["error"] = str(exc)
                    print(f"{label} failed: {exc}", flush=True)
                else:
                    errs = sum(entry["errors"].values())
                    print(
                        f"{label} {entry['rps']:>9.0f} req/s  p50 {entry['p50_ms']:7.2f} ms  "
                        f"p99 {entry['p99_ms']:8.2f} ms" + (f"  errors {errs}" if errs else ""),
                        flush=True,
                    )
                results.append(entry)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    _raise_nofile()

    tools = ensure_tools(install=not args.no_install)
    wrk, nginx = tools["wrk"], tools["nginx"]
    if wrk is None or nginx is None:
        print("cannot benchmark: wrk and nginx are needed (apt-get install wrk nginx)")
        return 1
    wanted = list(args.target_list)
    can_pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    if not can_pin:
        print("fewer than 2 CPUs or no taskset: nothing is pinned; figures are less comparable")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("GATEWAY_ADMIN_TOKEN", None)
    build = None
    if any(t.startswith("gateway") for t in wanted):
        problem, build = ensure_compiled(env, install=not args.no_install)
        if problem:
            print(f"the gateway cannot be imported ({problem}): skipping the gateway targets")
            wanted = [t for t in wanted if not t.startswith("gateway")]

    procs = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    record: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    results: list[dict[str, Any]] = []
    targets: list[Target] = []
    interrupted = None
    try:
        post_script = tmp / "post.lua"
        post_script.write_text(
            'wrk.method = "POST"\n'
            f'wrk.body = string.rep("a", {POST_SIZE})\n'
            'wrk.headers["Content-Type"] = "application/octet-stream"\n'
        )
        ups = start_upstream(tmp, nginx, procs, can_pin)
        if ups is None:
            return 1
        targets = start_targets(wanted, tmp, ups, tools, procs, can_pin, env)
        for t in targets:
            if t.status != "ok":
                print(f"target {t.name}: {t.status}: {t.reason}")
                if t.status == "failed" and t.log_tail:
                    print("  " + t.log_tail.replace("\n", "\n  "))
        active = [t for t in targets if t.status == "ok"]
        if not active:
            print("no target works; nothing to measure")
            return 1

        est = plan(args, len(active))
        print(
            f"targets: {', '.join(t.name for t in active)}; "
            f"scenarios: {', '.join(args.scenario_list)}; runs {args.runs}, "
            f"small {args.duration} s, others {args.other_duration} s, warm-up {args.warmup} s"
        )
        print(f"estimated total: {est:.0f} s ({est / 60:.1f} min), start-up included", flush=True)
        record["config"] = {
            "runs": args.runs,
            "duration": args.duration,
            "other_duration": args.other_duration,
            "warmup": args.warmup,
            "scenarios": {s: SCENARIOS[s].description for s in args.scenario_list},
            "targets": {
                t.name: {
                    "status": t.status,
                    "reason": t.reason,
                    "cmd": t.cmd,
                    "cpus": t.cpus,
                    "note": TARGET_NOTES[t.name],
                    "log_tail": t.log_tail,
                }
                for t in targets
            },
            "pinning": {"proxy": PROXY_CPUS, "wrk_and_upstream": LOAD_CPUS, "pinned": can_pin},
            "wrk": "wrk -t1 --latency --timeout 10s",
            "upstream": f"nginx 1 worker on 127.0.0.1:{ups[0]} and :{ups[1]}",
            "estimated_seconds": round(est, 1),
            "gateway_build": build,
        }
        record["machine"] = machine_info(tools)
        measure_all(args, active, wrk, post_script, procs, can_pin, results)
    except Interrupted as exc:
        interrupted = str(exc)
        print(f"\ninterrupted by {interrupted}; stopping everything")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for t in targets:  # keep the log tails of targets that misbehaved
            if t.status == "failed" and not t.log_tail and t.log is not None:
                t.log_tail = tail(t.log)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if not results:
        return 130 if interrupted else 1
    summary = summarise(results, args.scenario_list, targets)
    print_tables(summary, args.runs)
    elapsed = time.monotonic() - t0
    est_text = record.get("config", {}).get("estimated_seconds", "?")
    print(f"\ntotal time: {elapsed:.0f} s ({elapsed / 60:.1f} min); estimated {est_text} s")
    record.update(
        {
            "results": results,
            "summary": summary,
            "total_seconds": round(elapsed, 1),
            "interrupted": interrupted,
        }
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (Interrupted, KeyboardInterrupt):
        print("interrupted")
        sys.exit(130)
