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


# JSON string quoting in C (json's own), for the few string fields of a line.
_quote: Final = json.encoder.encode_basestring_ascii
_JSON: Final = (
    '{"time": "%s.%03dZ", "request_id": %s, "trace_id": %s, "client": %s, "method": %s, '
    '"path": %s, "route": %s, "service": %s, "instance": %s, "status": %d, "bytes_in": %d, '
    '"bytes_out": %d, "duration_ms": %s, "attempts": %d, "upstream_error": %s}\n'
)


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
        self._second = -1  # the second the cached time strings are of
        self._iso = ""
        self._clf = b""

    def _seconds(self, now: float) -> None:
        """The time strings of the second ``now`` is in, made once a second."""
        second = int(now)
        if second != self._second:
            self._second = second
            moment = time.gmtime(second)
            self._iso = time.strftime("%Y-%m-%dT%H:%M:%S", moment)
            self._clf = time.strftime("[%d/%b/%Y:%H:%M:%S +0000]", moment).encode()

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
        self._seconds(now)
        if self.json:
            line = (
                _JSON
                % (
                    self._iso,
                    int(now % 1 * 1000),
                    _quote(request_id.decode("latin-1")),
                    _quote(trace_id.decode("latin-1")),
                    _quote(client.decode("latin-1")),
                    _quote(method.decode("latin-1")),
                    _quote(target.decode("latin-1")),
                    _quote(route),
                    _quote(service),
                    _quote(instance),
                    status,
                    bytes_in,
                    bytes_out,
                    repr(round(seconds * 1000, 3)),
                    attempts,
                    _quote(error) if error else "null",
                )
            ).encode()
        else:
            request = b'"' + method + b" " + target.replace(b'"', b"%22") + b' HTTP/1.1"'
            line = b"%b - - %b %b %d %d\n" % (
                client or b"-",
                self._clf,
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
