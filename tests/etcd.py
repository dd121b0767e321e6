"""Real etcd servers for the tests: each on free ports with its own data directory,
stopped by the test that started it (Debian's etcd-server: the README's test command
installs it; its packaged service on 2379 is never used)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
from pathlib import Path

import aiohttp

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EtcdMember:
    """One etcd process. ``start`` again after ``kill`` brings the same member back."""

    def __init__(self, name: str, folder: Path, cluster: str = "", state: str = "new") -> None:
        self.name = name
        self.folder = folder
        self.client_port = free_port()
        self.peer_port = free_port()
        self.cluster = cluster or f"{name}=http://127.0.0.1:{self.peer_port}"
        self.state = state
        self.process: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    async def start(self, wait: bool = True) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / f"{self.name}.log", "ab")  # noqa: SIM115 (the process owns it)
        client = f"http://{self.address}"
        self.process = await asyncio.create_subprocess_exec(
            ETCD, "--name", self.name, "--data-dir", str(self.folder / self.name),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster, "--initial-cluster-state", self.state,
            "--initial-cluster-token", f"t-{self.folder.name}",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        if wait:
            await self.ready()

    async def ready(self, timeout: float = 20.0) -> None:
        """Until the member answers a read (a cluster member: once it has a leader)."""
        url = f"http://{self.address}/v3/kv/range"
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(timeout):
                delay = 0.01
                while True:
                    assert self.process is not None and self.process.returncode is None, (
                        self.folder / f"{self.name}.log"
                    ).read_text()[-2000:]
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.post(url, json={"key": "eA=="}) as response:
                            if response.status == 200:
                                return
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        self.state = "existing"

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def wipe(self) -> None:
        """Its data gone (etcd restored from nothing): start() makes a new cluster."""
        shutil.rmtree(self.folder / self.name, ignore_errors=True)
        self.state = "new"

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # a frozen one cannot die otherwise
            await self.kill()


async def start_cluster(folder: Path, size: int) -> list[EtcdMember]:
    members = [EtcdMember(f"m{i}", folder) for i in range(size)]
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in members)
    for member in members:
        member.cluster = cluster
    for member in members:
        await member.start(wait=False)
    for member in members:
        await member.ready()
    return members
