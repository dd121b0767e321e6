"""The access log: one line per request, JSON or Common Log Format, on standard output.

Lines are formatted on the loop (a few microseconds) and kept in a buffer; the
listener's ticker hands the buffer to one writer thread at least once a second (and
whenever it passes 64 KiB), so a slow reader of stdout never stalls the proxy. If
the writer falls behind by more than MAX_PENDING bytes, lines are dropped and
counted (``dropped``), never queued without bound.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final

FLUSH_AT: Final = 64 * 1024
MAX_PENDING: Final = 16 * 1024 * 1024


def write_stdout(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _clf_stamp(now: float) -> str:
    return time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", time.gmtime(now))


class AccessLog:
    def __init__(self, form: str, write: Callable[[bytes], None] = write_stdout) -> None:
        """``form``: "json" or "common"."""
        self.json = form == "json"
        self._write = write
        self._lines: list[bytes] = []
        self._size = 0
        self._pending = 0  # bytes handed to the writer and not written yet
        self.dropped = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="access-log")

    def record(
        self,
        *,
        request_id: bytes,
        trace_id: bytes,
        client: bytes,
        method: bytes,
        target: bytes,
        route: str,
        service: str,
        instance: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        seconds: float,
        attempts: int,
        error: str,
    ) -> None:
        now = time.time()
        if self.json:
            line = (
                json.dumps(
                    {
                        "time": _stamp(now),
                        "request_id": request_id.decode("latin-1"),
                        "trace_id": trace_id.decode("latin-1"),
                        "client": client.decode("latin-1"),
                        "method": method.decode("latin-1"),
                        "path": target.decode("latin-1"),
                        "route": route,
                        "service": service,
                        "instance": instance,
                        "status": status,
                        "bytes_in": bytes_in,
                        "bytes_out": bytes_out,
                        "duration_ms": round(seconds * 1000, 3),
                        "attempts": attempts,
                        "upstream_error": error or None,
                    }
                ).encode()
                + b"\n"
            )
        else:
            request = b'"' + method + b" " + target.replace(b'"', b"%22") + b' HTTP/1.1"'
            line = b"%b - - %b %b %d %d\n" % (
                client or b"-",
                _clf_stamp(now).encode(),
                request,
                status,
                bytes_out,
            )
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the writer thread (called by the listener's ticker)."""
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        if self._pending + len(data) > MAX_PENDING:
            self.dropped += data.count(b"\n")
            return
        self._pending += len(data)
        self._writer.submit(self._write, data).add_done_callback(self._written(len(data)))

    def _written(self, size: int) -> Callable[[Future[None]], None]:
        def done(_: Future[None]) -> None:
            self._pending -= size  # an int update: atomic enough under the GIL

        return done

    def close(self) -> None:
        """Write what is left and wait for it."""
        self.flush()
        self._writer.shutdown(wait=True)
