#!/usr/bin/env python3
"""The registry snapshot under load: heartbeats and registrations with `registry.snapshot` on.

    python3 benchmarks/snapshot_load.py [--instances 10000] [--services 1] [--rate 1000]
                                        [--seconds 10] [--ttl 30s] [--no-snapshot]
    python3 benchmarks/snapshot_load.py --stall [--instances 10000] [--writes 5]

The first form runs a gateway (`python3 -m gateway run`-like, uvloop when installed) in a
child process pinned to core 1, registers --instances leased instances over the admin API
(32 at a time, spread over --services services), then sends --rate heartbeats a second for
--seconds (open loop: a heartbeat's latency counts from when it was due, so a stalled
gateway cannot hide its queue). It prints one JSON object: registrations/s, heartbeats
sent and answered, heartbeat latency p50/p99/max, the gateway's CPU over the heartbeat
phase, the snapshot writes in that phase (counted by wrapping
`registry.snapshot._write_atomically` in the child), the file's size, and the longest
stall of the gateway's event loop (a ticker sleeping 1 ms) in each phase.

`--stall` measures in this process only: a registry with --instances leased instances
and a SnapshotWriter, a ticker on the loop, and --writes snapshot writes, each after a
quiet 0.6 s; it prints the longest loop stall from a change until its write is done, the
longest in the quiet spells (the machine's own noise), and how long each write took.

Standard library and aiohttp only; runs the repository's code (pure Python unless built).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONFIG = """
registry:
  max_ttl: 1h
{snapshot}
routes:
  - prefix: /
    service: svc-00
"""


class Ticker:
    """Sleeps 1 ms in a loop and records how much later than that it woke up."""

    def __init__(self) -> None:
        self.gaps: list[tuple[float, float]] = []  # (wall time, gap in s) for gaps > 2 ms
        self.max_gap = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            gap = loop.time() - before - 0.001
            self.max_gap = max(self.max_gap, gap)
            if gap > 0.002:
                self.gaps.append((time.time(), gap))


def count_writes() -> list[dict[str, Any]]:
    """Wrap the snapshot's file writer; returns the list it appends each write to."""
    import registry.backends.snapshot as snapshot

    writes: list[dict[str, Any]] = []
    original = snapshot._write_atomically

    def counting(path: Path, data: Any) -> None:
        started = time.time()
        sizes: list[int] = []

        def counted(chunks: Iterable[bytes]) -> Iterator[bytes]:
            for chunk in chunks:
                sizes.append(len(chunk))
                yield chunk

        try:  # bytes: the writer before issue 14; chunks: after it
            original(path, data if isinstance(data, bytes) else counted(data))
        finally:
            writes.append(
                {
                    "at": started,
                    "seconds": time.time() - started,
                    "bytes": len(data) if isinstance(data, bytes) else sum(sizes),
                    "on_main_thread": threading.current_thread() is threading.main_thread(),
                }
            )

    snapshot._write_atomically = counting  # type: ignore[assignment]
    return writes


# -- the child: a gateway with a ticker ---------------------------------------------------


async def serve(config_file: Path, admin_port: int) -> None:
    from gateway.app import Gateway
    from gateway.config.loader import load_config

    writes = count_writes()
    ticker = Ticker()
    gateway = Gateway(
        load_config(config_file), listen=("127.0.0.1", 0), admin_listen=("127.0.0.1", admin_port)
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    await gateway.start()
    tick = asyncio.create_task(ticker.run())
    await stopping.wait()
    tick.cancel()
    await gateway.stop()
    print(json.dumps({"writes": writes, "gaps": ticker.gaps}), flush=True)


# -- the parent: the load ----------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def in_window(gaps: list[list[float]], start: float, end: float) -> float:
    return max((gap for at, gap in gaps if start <= at <= end), default=0.0)


async def load(args: argparse.Namespace, admin: str, pid: int) -> dict[str, Any]:
    import aiohttp

    ids = [(f"svc-{n % args.services:02d}", f"i-{n}") for n in range(args.instances)]
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{admin}/readyz") as response:
                    if response.status == 200:
                        break
            await asyncio.sleep(0.05)
        queue = iter(enumerate(ids))

        async def registrar() -> None:
            for n, (service, instance_id) in queue:
                body = {
                    "host": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                    "port": 8080,
                    "id": instance_id,
                    "ttl": args.ttl,
                    "metadata": {"version": "1.4.2", "zone": "eu-west-1a"},
                }
                url = f"{admin}/registry/services/{service}/instances"
                async with session.post(url, json=body) as response:
                    assert response.status in (200, 201), await response.text()

        reg_start = time.time()
        await asyncio.gather(*(registrar() for _ in range(32)))
        reg_end = time.time()
        await asyncio.sleep(1.0)  # let the last registrations reach the file

        latencies: list[float] = []
        errors: list[str] = []

        async def beat(due: float, service: str, instance_id: str) -> None:
            url = f"{admin}/registry/services/{service}/instances/{instance_id}/heartbeat"
            try:
                async with session.put(url) as response:
                    await response.read()
                    if response.status != 200:
                        errors.append(str(response.status))
            except aiohttp.ClientError as exc:
                errors.append(type(exc).__name__)
            latencies.append(time.monotonic() - due)

        tasks: set[asyncio.Task[None]] = set()
        total = int(args.rate * args.seconds)
        cpu_before = cpu_seconds(pid)
        hb_start, started = time.time(), time.monotonic()
        sent = 0
        while sent < total:
            now = time.monotonic()
            due_count = min(total, int((now - started) * args.rate) + 1)
            while sent < due_count:
                service, instance_id = ids[sent % len(ids)]
                task = asyncio.create_task(beat(started + sent / args.rate, service, instance_id))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.001)
        send_end = time.monotonic()
        await asyncio.gather(*tasks)
        hb_end = time.time()
        cpu = cpu_seconds(pid) - cpu_before
        elapsed = time.monotonic() - started
    return {
        "registrations_per_s": round(args.instances / (reg_end - reg_start)),
        "heartbeats_sent": sent,
        "heartbeats_answered_per_s": round(len(latencies) / elapsed),
        "heartbeat_errors": len(errors),
        "heartbeat_send_seconds": round(send_end - started, 2),
        "heartbeat_ms_p50": round(percentile(latencies, 0.50) * 1000, 1),
        "heartbeat_ms_p99": round(percentile(latencies, 0.99) * 1000, 1),
        "heartbeat_ms_max": round(max(latencies) * 1000, 1),
        "gateway_cpu_percent": round(100 * cpu / elapsed, 1),
        "_windows": (reg_start, reg_end, hb_start, hb_end),
    }


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="snapshot-load-"))
    try:
        config_file = folder / "routes.yaml"
        snapshot = "" if args.no_snapshot else "  snapshot: state/registry.json"
        config_file.write_text(CONFIG.format(snapshot=snapshot))
        port = free_port()
        command = [sys.executable, __file__, "--serve", str(config_file), str(port)]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            command = ["taskset", "-c", "1", *command]
            os.sched_setaffinity(0, {0})
        child = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=REPO)
        try:
            result = asyncio.run(load(args, f"http://127.0.0.1:{port}", child.pid))
        finally:
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=60)
        stats = json.loads(out.decode().strip().splitlines()[-1])
        reg_start, reg_end, hb_start, hb_end = result.pop("_windows")
        writes = stats["writes"]
        phase = [w for w in writes if hb_start <= w["at"] <= hb_end]
        state = folder / "state" / "registry.json"
        result.update(
            {
                "snapshot_writes_in_heartbeat_phase": len(phase),
                "snapshot_writes_total": len(writes),
                "snapshot_bytes": state.stat().st_size if state.exists() else 0,
                "write_ms_max": round(max((w["seconds"] for w in writes), default=0) * 1000, 1),
                "writes_on_loop_thread": sum(w["on_main_thread"] for w in writes),
                "loop_stall_ms_max_registrations": round(
                    in_window(stats["gaps"], reg_start, reg_end) * 1000, 1
                ),
                "loop_stall_ms_max_heartbeats": round(
                    in_window(stats["gaps"], hb_start, hb_end) * 1000, 1
                ),
            }
        )
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- --stall: one process, no HTTP ---------------------------------------------------------


async def stall(args: argparse.Namespace) -> dict[str, Any]:
    from registry.backends.snapshot import SnapshotWriter
    from registry.core.store import Registry

    writes = count_writes()
    folder = Path(tempfile.mkdtemp(prefix="snapshot-stall-"))
    try:
        registry = Registry(time.time, max_ttl=3600.0)
        writer = SnapshotWriter(registry, folder / "registry.json")
        for n in range(args.instances):
            body = {
                "host": f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                "port": 8080,
                "id": f"i-{n}",
                "ttl": "30m",
                "metadata": {"version": "1.4.2", "zone": "eu-west-1a"},
            }
            registry.register(f"svc-{n % args.services:02d}", body)
        writer.start()
        ticker = Ticker()
        tick = asyncio.create_task(ticker.run())
        while writer.pending:  # the registrations' write
            await asyncio.sleep(0.01)
        durations, worst, quiet = [], 0.0, 0.0
        for n in range(args.writes):
            ticker.max_gap = 0.0
            await asyncio.sleep(0.6)  # a quiet spell: the next write is the first after it
            quiet = max(quiet, ticker.max_gap)
            ticker.max_gap = 0.0
            written = len(writes) + 1
            begun = time.perf_counter()
            registry.update(f"svc-{n % args.services:02d}", f"i-{n}", {"weight": 2})
            while len(writes) < written:
                await asyncio.sleep(0.001)
            durations.append(time.perf_counter() - begun)
            worst = max(worst, ticker.max_gap)
        tick.cancel()
        await writer.stop()
        return {
            "instances": args.instances,
            "file_bytes": writes[-1]["bytes"],
            "writes": args.writes,
            "loop_stall_ms_max": round(worst * 1000, 2),
            "loop_stall_ms_max_without_writes": round(quiet * 1000, 2),
            "change_to_written_ms": [round(d * 1000, 1) for d in durations],
            "writes_on_loop_thread": sum(w["on_main_thread"] for w in writes),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument("--services", type=int, default=1)
    parser.add_argument("--rate", type=float, default=1000.0, help="heartbeats a second")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ttl", default="30s", help="the instances' lease")
    parser.add_argument("--no-snapshot", action="store_true")
    parser.add_argument("--stall", action="store_true", help="in-process loop stall only")
    parser.add_argument("--writes", type=int, default=5, help="--stall: writes to measure")
    parser.add_argument("--serve", nargs=2, metavar=("CONFIG", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        from gateway.app import run_loop

        run_loop(serve(Path(args.serve[0]), int(args.serve[1])))
    elif args.stall:
        print(json.dumps(asyncio.run(stall(args)), indent=1))
    else:
        print(json.dumps(run_load(args), indent=1))


if __name__ == "__main__":
    main()
